"""Which compressed-tensors format each scheme is written in, and which schemes the exporter refuses.

- weight-only int, 2 to 8 bits: ``pack-quantized`` (3-bit packs densely since compressed-tensors 0.18);
- int W8A8: ``int-quantized`` (int8 weights, activations quantized at run time);
- int W4A4: ``pack-quantized``, forced, because compressed-tensors would otherwise infer the unpacked
  ``int-quantized`` layout for 4-bit weights with activations.

The KV cache is not part of the quantization config: vLLM takes only fp8 there and quantizes its int4 cache
itself. The checkpoint's ``config.json`` records it instead (:data:`rqat_sdk.models.KV_CACHE_CONFIG_KEY`).

The recipe validator asks :func:`unsupported_reason` too, so a recipe the exporter cannot write is refused
before any model is loaded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rqat_sdk.errors import ExportError

if TYPE_CHECKING:
    from rqat_sdk.scheme import QuantScheme

PACKED = "pack-quantized"
INT = "int-quantized"
DENSE = "dense"


def unsupported_reason(scheme: QuantScheme) -> str | None:
    """Why the exporter cannot write ``scheme``, or None when it can."""
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
        raise ExportError(reason)
    acts = scheme.input_activations
    if acts is not None and acts.num_bits == 8:
        return INT
    return PACKED
