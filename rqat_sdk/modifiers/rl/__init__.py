"""Reinforcement learning on the quantized model: cold-start GRPO with verifiable rewards."""

from rqat_sdk.modifiers.rl.modifier import ColdStartError, GRPOModifier, PolicyCollapseError

__all__ = ["ColdStartError", "GRPOModifier", "PolicyCollapseError"]
