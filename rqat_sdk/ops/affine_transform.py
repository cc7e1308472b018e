"""FlatQuant's affine transforms and learnable clipping, as pure functions (Sun et al., 2024, arXiv 2410.09426).

A Linear computes ``y = x W^T``. FlatQuant feeds it ``x T`` instead of ``x``, with ``T = diag(s) (L ⊗ R)``:
a per-channel smoothing scale ``s`` and a Kronecker product of two small invertible matrices (``L`` is
n1 x n1, ``R`` n2 x n2, n1 * n2 the input width), and folds the inverse into the weight,
``W' = W T^{-T}``, so that ``(x T) W'^T = x W^T``: the float model is unchanged, while ``x T`` and ``W'``
are flatter and quantize with less error.

``T`` is never materialised. With ``X`` the (n1, n2) reshaping of a row vector ``x`` (row-major),
``x (A ⊗ B) = vec(A^T X B)``: two small matrix products per token instead of one (n, n) product. The
inverse of a Kronecker product is the Kronecker product of the inverses, so only the small factors are
inverted (directly, in float32: they are well conditioned near their orthogonal or identity start).

Clipping factors are ``sigmoid(logit)`` (a logit of 4 starts at 0.982): they shrink the range a quantizer
reads from a tensor, so values past ``factor * max`` are clipped and the rest get a finer grid.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Any

import torch

from rqat_sdk.ops import use_triton
from rqat_sdk.ops.fake_quant import clamp_ste, int_range, round_ste

log = logging.getLogger(__name__)

CLIP_LOGIT_INIT = 4.0
"""The initial clipping logit: sigmoid(4) = 0.982, FlatQuant's start (nearly no clipping)."""


def kronecker_sizes(width: int) -> tuple[int, int]:
    """``(n1, n2)`` with ``n1 * n2 == width`` and ``n1 <= n2`` as close as possible to ``sqrt(width)``."""
    if width < 1:
        raise ValueError(f"width must be positive, got {width}")
    n1 = next(d for d in range(math.isqrt(width), 0, -1) if width % d == 0)
    return n1, width // n1


def kronecker_apply(x: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``x (left ⊗ right)`` on the last dimension of ``x``, without forming the Kronecker product."""
    n1, n2 = left.shape[0], right.shape[0]
    blocks = x.unflatten(-1, (n1, n2))
    return (left.mT @ blocks @ right).flatten(-2)


def kronecker_inverse(left: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The factors of ``(left ⊗ right)^{-1} = left^{-1} ⊗ right^{-1}``, in float32."""
    return torch.linalg.inv(left.float()), torch.linalg.inv(right.float())


def transform_activation(
    x: torch.Tensor, left: torch.Tensor, right: torch.Tensor, smooth: torch.Tensor | None
) -> torch.Tensor:
    """``x T`` with ``T = diag(smooth) (left ⊗ right)``, computed in float32 (the result is float32)."""
    x = x.float()
    if smooth is not None:
        x = x * smooth.float()
    return kronecker_apply(x, left.float(), right.float())


def fold_into_weight(
    weight: torch.Tensor, left: torch.Tensor, right: torch.Tensor, smooth: torch.Tensor | None
) -> torch.Tensor:
    """``W T^{-T} = (W diag(1/smooth)) (left^{-T} ⊗ right^{-T})``: the weight that takes ``x T`` to ``x W^T``.

    ``weight`` is (out, in) as ``torch.nn.Linear`` holds it; the result is float32 and differentiable in the
    factors (calibration trains through it).
    """
    inverse_left, inverse_right = kronecker_inverse(left, right)
    weight = weight.float()
    if smooth is not None:
        weight = weight / smooth.float()
    return kronecker_apply(weight, inverse_left.mT, inverse_right.mT)


def random_orthogonal(size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A random orthogonal matrix (Haar-distributed: QR of a Gaussian with the signs of R's diagonal fixed)."""
    gaussian = torch.randn(size, size, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    return (q * torch.sign(torch.diagonal(r))).float().contiguous()  # QR's Q is column-major


def clip_factor(logit: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(logit)


def _by_quantizer_group(x: torch.Tensor, args: Any) -> tuple[torch.Tensor, tuple[int, ...]]:
    """``x`` reshaped so that the dimensions ``dims`` hold exactly the values one activation scale covers."""
    if args.strategy == "tensor":
        return x, tuple(range(x.dim()))
    if args.strategy == "group":
        return x.unflatten(-1, (x.shape[-1] // args.group_size, args.group_size)), (-1,)
    return x, (-1,)


def clip_activation(x: torch.Tensor, factor: torch.Tensor, args: Any) -> torch.Tensor:
    """Clamp ``x`` to ``factor`` times its own range, per group of the dynamic activation quantizer ``args``.

    The quantizer then reads the clipped range as its min/max, so this is learnable activation clipping
    (LAC) in front of an unchanged quantizer: values past the range are clipped, the rest get a finer
    grid. Differentiable in ``factor`` (through the clipped values) and ``x``.
    """
    grouped, dims = _by_quantizer_group(x, args)
    if args.symmetric:
        high = factor * grouped.abs().amax(dim=dims, keepdim=True)
        low = -high
    else:
        high = factor * grouped.amax(dim=dims, keepdim=True).clamp(min=0)
        low = factor * grouped.amin(dim=dims, keepdim=True).clamp(max=0)
    return torch.minimum(torch.maximum(grouped, low), high).reshape(x.shape)


def fused_kernel_serves(
    x: torch.Tensor, left: torch.Tensor, right: torch.Tensor, clip_logit: torch.Tensor | None, activation_args: Any
) -> bool:
    """Whether :func:`transform_and_clip` runs as the fused Triton kernels: on CUDA with Triton, outside
    ``torch.compile`` (a compiled graph fuses the PyTorch path itself), with no clipping or the clipping of a
    symmetric per-token quantizer (W4A4's), and a transform whose blocks fit the kernels."""
    if not use_triton(x) or torch.compiler.is_compiling():
        return False
    clipping = clip_logit is not None and activation_args is not None
    if clipping and (activation_args.strategy != "token" or not activation_args.symmetric):
        return False
    # triton is optional (CUDA builds only) and imports at module level
    from rqat_sdk.ops.triton_affine_transform import supports

    if supports(x, left, right):
        return True
    _warn_unfused(left.shape[0], right.shape[0], x.dtype)
    return False


@functools.cache
def _warn_unfused(n1: int, n2: int, dtype: torch.dtype) -> None:
    """Say once per shape that a transform on CUDA takes the slower PyTorch path (a model's wider MLPs do)."""
    log.warning("FlatQuant transform %d x %d (%s) runs through PyTorch, not the fused kernels (they take float32, "
                "bf16 or fp16 inputs and factors that pad to at most 64): expect slower training", n1, n2, dtype)


def transform_and_clip(
    x: torch.Tensor,
    left: torch.Tensor,
    right: torch.Tensor,
    smooth: torch.Tensor | None,
    clip_logit: torch.Tensor | None,
    activation_args: Any,
) -> torch.Tensor:
    """``x T`` clipped to ``sigmoid(clip_logit)`` of the range where the activation quantizer
    ``activation_args`` reads it (no clipping without a logit or a quantizer), in ``x``'s dtype.

    Where :func:`fused_kernel_serves`, one Triton kernel computes it each way and autograd saves only ``x``
    (the backward kernel recomputes the transform). Elsewhere the functions above compute it in float32, and
    autograd keeps their float32 intermediates: a caller that trains through it checkpoints it.
    """
    factor = clip_factor(clip_logit) if clip_logit is not None and activation_args is not None else None
    if fused_kernel_serves(x, left, right, clip_logit, activation_args):
        # triton is optional (CUDA builds only) and imports at module level
        from rqat_sdk.ops.triton_affine_transform import TritonKroneckerTransform

        return TritonKroneckerTransform.apply(
            x, left.float(), right.float(), None if smooth is None else smooth.float(), factor
        )
    with torch.autocast(x.device.type, enabled=False):  # float32, as the kernels compute it, under any autocast
        y = transform_activation(x, left, right, smooth)
        if factor is not None:
            y = clip_activation(y, factor, activation_args)
    return y.to(x.dtype)


def clipped_weight_qparams(
    weight: torch.Tensor, factor: torch.Tensor, args: Any
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale and zero point of ``weight`` (out, in) for the weight quantizer ``args``, computed as
    compressed-tensors' min/max observer computes them but from ``factor`` times each group's range.

    ``factor`` has the scale's shape, (out, in // group_size) or (out, 1). The zero point is a float on
    the integer grid (rounded with a straight-through gradient), so both stay differentiable in ``factor``:
    learnable weight clipping (LWC).
    """

    qmin, qmax = int_range(args.num_bits)
    group = args.group_size or weight.shape[-1]
    grouped = weight.unflatten(-1, (weight.shape[-1] // group, group))
    high = grouped.amax(-1).clamp(min=0) * factor
    low = grouped.amin(-1).clamp(max=0) * factor
    if args.symmetric:
        scale = torch.maximum(high, -low) / ((qmax - qmin) / 2)
        return scale.clamp(min=torch.finfo(scale.dtype).tiny), None
    scale = ((high - low) / (qmax - qmin)).clamp(min=torch.finfo(high.dtype).tiny)
    return scale, clamp_ste(round_ste(qmin - low / scale), qmin, qmax)


def clamp_to_clipped_range(weight: torch.Tensor, factor: torch.Tensor, args: Any) -> torch.Tensor:
    """``weight`` clamped to ``factor`` times each quantization group's range.

    A min/max observer (RTN, GPTQ) reading the clamped weight computes the clipped scales that
    :func:`clipped_weight_qparams` computes, so learned weight clipping survives any later quantizer.
    """
    group = args.group_size or weight.shape[-1]
    grouped = weight.unflatten(-1, (weight.shape[-1] // group, group))
    high = (grouped.amax(-1, keepdim=True).clamp(min=0) * factor.unsqueeze(-1)).to(weight.dtype)
    low = (grouped.amin(-1, keepdim=True).clamp(max=0) * factor.unsqueeze(-1)).to(weight.dtype)
    if args.symmetric:
        high = torch.maximum(high, -low)
        low = -high
    return torch.minimum(torch.maximum(grouped, low), high).reshape(weight.shape)
