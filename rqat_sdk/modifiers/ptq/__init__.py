"""Post-training quantization modifiers (PTQ initialisation)."""

from rqat_sdk.modifiers.ptq.modifiers import AWQModifier, GPTQModifier, RotationModifier, RTNModifier

__all__ = ["AWQModifier", "GPTQModifier", "RTNModifier", "RotationModifier"]
