"""Post-training quantization modifiers (PTQ initialisation)."""

from rqat_sdk.modifiers.ptq.modifiers import AWQModifier, FlatQuantModifier, GPTQModifier, RotationModifier, RTNModifier

__all__ = ["AWQModifier", "FlatQuantModifier", "GPTQModifier", "RTNModifier", "RotationModifier"]
