"""Quantization-aware training: fake-quantized layers with straight-through gradients, trained by distillation."""

from rqat_sdk.modifiers.qat.modifier import QATKDModifier

__all__ = ["QATKDModifier"]
