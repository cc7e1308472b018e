"""Which compressed-tensors format each scheme is written in, and which schemes the exporter refuses.

- weight-only int, 2 to 8 bits: ``pack-quantized`` (3-bit packs densely since compressed-tensors 0.18);
- int W8A8: ``int-quantized`` (int8 weights, activations quantized at run time);
- int W4A4: ``pack-quantized``, forced, because compressed-tensors would otherwise infer the unpacked
  ``int-quantized`` layout for 4-bit weights with activations.

KV-cache quantization is refused: compressed-tensors 0.19 fails to compress a model with a KV-cache scheme
in a forced format (it looks for a ``weight`` on the attention module), and in the inferred format the
reloaded model's logits differ from the in-memory model's (max 0.4-0.5 on the tiny Qwen3, measured here),
so the round-trip check could never pass.

The recipe validator asks :func:`unsupported_reason` too, so a recipe the exporter cannot write is refused
before any model is loaded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rqat_sdk.recipe.scheme import QuantScheme

PACKED = "pack-quantized"
INT = "int-quantized"
DENSE = "dense"


def unsupported_reason(scheme: QuantScheme) -> str | None:
    """Why the exporter cannot write ``scheme``, or None when it can."""
    if scheme.kv_cache is not None:
        return (
            f"{scheme.label} is not exportable: KV-cache quantization does not survive a compressed-tensors "
            f"save and transformers reload (compressed-tensors 0.19); drop scheme.kv_cache"
        )
    acts = scheme.input_activations
    if acts is None:
        return None
    pair = (scheme.weights.num_bits, acts.num_bits)
    if pair not in ((8, 8), (4, 4)):
        return (
            f"{scheme.label} is not exportable: with activation quantization the exporter writes int W8A8 and "
            f"int W4A4 only (weight-only schemes take any of 2-8 bits)"
        )
    return None


def checkpoint_format(scheme: QuantScheme) -> str:
    """The compressed-tensors format the final checkpoint is written in."""
    reason = unsupported_reason(scheme)
    if reason:
        from rqat_sdk.errors import ExportError

        raise ExportError(reason)
    acts = scheme.input_activations
    if acts is not None and acts.num_bits == 8:
        return INT
    return PACKED
