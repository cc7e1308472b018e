"""Reinforcement learning on the quantized model: cold-start GRPO with verifiable rewards."""

from rqat_sdk.modifiers.rl.modifier import ColdStartError, GRPOModifier

__all__ = ["ColdStartError", "GRPOModifier"]
