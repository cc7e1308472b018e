"""Fake quantization with straight-through gradients, computing exactly what compressed-tensors computes.

The forward value of :func:`fake_quantize_weight` is bit-identical to compressed-tensors' ``fake_quantize``
for the same weight, scale and zero point in the same dtype (tested), so the model QAT trains is the model
the exporter writes. Arithmetic happens in ``dtype`` (the checkpoint's dtype) even when the latent weights
are fp32 masters: each step rounds to ``dtype`` as the compressed-tensors kernels do.

Gradients (straight-through estimator with a clipping mask), with ``u = w / s + z`` and
``q = round(clamp(u, qmin, qmax))``, ``out = (q - z) * s``:

- weight: ``grad`` where ``qmin <= u <= qmax``, 0 elsewhere;
- scale (LSQ): ``q - u`` inside the range, ``q - z`` where clipped, summed over the group;
- zero point: 0 inside the range, ``-s`` where clipped, summed over the group.

On CUDA the same numbers come from fused Triton kernels (:mod:`rqat_sdk.ops.triton_fake_quant`), which
quantize many weights in one launch (:func:`fake_quantize_weights`).
"""

from __future__ import annotations

from typing import Any

import torch

from rqat_sdk.ops import use_triton


def int_range(num_bits: int) -> tuple[int, int]:
    """compressed-tensors' signed integer range: ``[-2**(b-1), 2**(b-1) - 1]``."""
    return -(2 ** (num_bits - 1)), 2 ** (num_bits - 1) - 1


def fake_quantize_weight(
    weight: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    num_bits: int,
    group_size: int | None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Quantize-dequantize ``weight`` (out, in) group-wise (``group_size``) or per output channel (None).

    ``scale`` and ``zero_point`` have shape (out, in // group_size) or (out, 1). The result has ``dtype``
    (default: the weight's). Differentiable in ``weight``, ``scale`` and a floating ``zero_point``.
    """
    zero_points = [zero_point] if zero_point is not None else None
    return fake_quantize_weights([weight], [scale], zero_points, num_bits, group_size, dtype)[0]


def fake_quantize_weights(
    weights: list[torch.Tensor],
    scales: list[torch.Tensor],
    zero_points: list[torch.Tensor] | None,
    num_bits: int,
    group_size: int | None,
    dtype: torch.dtype | None = None,
) -> list[torch.Tensor]:
    """:func:`fake_quantize_weight` for several weights of one scheme (and one group width) at once.

    On CUDA all of them take one kernel launch forward and one backward, which matters when a step
    quantizes every Linear of a model; elsewhere each runs the PyTorch path. Same numbers either way.
    """
    dtype = dtype or weights[0].dtype
    groups = {group_size or w.shape[-1] for w in weights}
    if len(groups) != 1:
        raise ValueError(f"one call quantizes weights of one group width; got widths {sorted(groups)}")
    group = groups.pop()
    for weight in weights:
        if weight.shape[-1] % group:
            raise ValueError(f"group size {group} does not divide the weight's {weight.shape[-1]} columns")
    qmin, qmax = int_range(num_bits)
    # a graph being traced takes the PyTorch path: the kernel's launch tables read data pointers, which traced
    # tensors lack (the trainers quantize outside compiled graphs: layers.fake_quantized_together)
    if use_triton(weights[0]) and not torch.compiler.is_compiling():
        # triton is optional (CUDA builds only) and imports at module level
        from rqat_sdk.ops.triton_fake_quant import (
            TritonWeightsFakeQuant,
            WeightsSpec,
            unflatten,
        )

        spec = WeightsSpec(len(weights), qmin, qmax, group, dtype, zero_points is not None)
        flat = TritonWeightsFakeQuant.apply(spec, *weights, *scales, *(zero_points or ()))
        return unflatten(flat, [w.shape for w in weights])
    per_weight: list[torch.Tensor | None] = list(zero_points) if zero_points else [None] * len(weights)
    return [
        _WeightFakeQuant.apply(w, s, z, qmin, qmax, group, dtype)
        for w, s, z in zip(weights, scales, per_weight, strict=True)
    ]


@torch.no_grad()
def fake_quantize_weight_reference(
    weight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, num_bits: int, group_size: int | None
) -> torch.Tensor:
    """The plain forward computation, in the weight's dtype, without autograd: the reference for tests."""
    group = group_size or weight.shape[-1]
    _, q = quantization_levels(weight, scale, zero_point, num_bits, group_size)
    return _dequantize(q, scale, zero_point, group, weight.dtype, weight.shape)


@torch.no_grad()
def quantization_levels(
    weight: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    num_bits: int,
    group_size: int | None,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each weight sits on its grid, grouped as (out, groups, group): ``u = w / s + z`` computed in
    ``dtype`` (default: the weight's), and the integer level ``round(clamp(u))`` the checkpoint stores."""
    qmin, qmax = int_range(num_bits)
    u, q, _ = _quantize(weight, scale, zero_point, qmin, qmax, group_size or weight.shape[-1], dtype or weight.dtype)
    return u, q


def _grouped(t: torch.Tensor, group: int) -> torch.Tensor:
    return t.unflatten(-1, (t.shape[-1] // group, group))


def _quantize(w, scale, zero_point, qmin, qmax, group, dtype):
    """Return (u, q, s): pre-rounding values, integer levels (as floats) and the scale, grouped."""
    s = scale.to(dtype).unsqueeze(-1)
    u = _grouped(w.to(dtype), group) / s
    if zero_point is not None:
        u = u + zero_point.to(dtype).unsqueeze(-1)
    q = torch.round(torch.clamp(u, qmin, qmax))
    return u, q, s


def _dequantize(q, scale, zero_point, group, dtype, shape):
    s = scale.to(dtype).unsqueeze(-1)
    out = q
    if zero_point is not None:
        out = out - zero_point.to(dtype).unsqueeze(-1)
    return (out * s).flatten(-2).reshape(shape)


class _WeightFakeQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, weight, scale, zero_point, qmin, qmax, group, dtype):
        u, q, _ = _quantize(weight, scale, zero_point, qmin, qmax, group, dtype)
        ctx.save_for_backward(weight, scale, zero_point)
        ctx.constants = (qmin, qmax, group, dtype)
        return _dequantize(q, scale, zero_point, group, dtype, weight.shape)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        weight, scale, zero_point = ctx.saved_tensors
        qmin, qmax, group, dtype = ctx.constants
        u, q, s = _quantize(weight, scale, zero_point, qmin, qmax, group, dtype)
        inside = (u >= qmin) & (u <= qmax)
        g = _grouped(grad, group).float()
        grad_weight = (g * inside).flatten(-2).reshape(weight.shape).to(weight.dtype)
        grad_scale = grad_zero = None
        if ctx.needs_input_grad[1]:
            z = zero_point.to(dtype).unsqueeze(-1).float() if zero_point is not None else 0.0
            slope = torch.where(inside, q.float() - u.float(), q.float() - z)
            grad_scale = (g * slope).sum(-1).to(scale.dtype)
        if zero_point is not None and ctx.needs_input_grad[2]:
            grad_zero = (g * (~inside) * -s.float()).sum(-1).to(zero_point.dtype)
        return grad_weight, grad_scale, grad_zero, None, None, None, None


def fake_quantize_activation(x: torch.Tensor, args: Any) -> torch.Tensor:
    """Dynamic activation fake quantization with an identity straight-through gradient.

    The forward value is compressed-tensors' own (same dynamic scales, same rounding), computed without
    gradient; the backward passes the gradient through unchanged (dynamic min/max ranges clip nothing),
    unlike compressed-tensors' forward, which runs under ``no_grad`` and cuts the gradient to the layer.
    """
    return _ActivationFakeQuant.apply(x, args)


class _ActivationFakeQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, args: Any) -> torch.Tensor:
        from compressed_tensors.quantization.lifecycle.forward import fake_quantize
        from compressed_tensors.quantization.utils import compute_dynamic_scales_and_zp

        if _symmetric_int_per_token(x, args):
            return symmetric_per_token_fake_quant(x, args.num_bits)
        scale, zero_point = compute_dynamic_scales_and_zp(value=x, args=args, module=torch.nn.Module())
        return fake_quantize(x, scale, zero_point, args)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        return grad, None


def _symmetric_int_per_token(x: torch.Tensor, args: Any) -> bool:
    """The activation scheme rqat's W4A4/W4A4KV4 presets use, on (batch, tokens, features) inputs, where
    compressed-tensors' ``token`` strategy is one scale per token (on 2-D inputs it is one per tensor)."""
    from compressed_tensors.quantization import QuantizationStrategy, QuantizationType

    return (x.ndim == 3 and args.strategy == QuantizationStrategy.TOKEN and args.type == QuantizationType.INT
            and args.symmetric and args.scale_dtype is None)


def symmetric_per_token_fake_quant(x: torch.Tensor, num_bits: int) -> torch.Tensor:
    """compressed-tensors' dynamic symmetric per-token fake quantization in five operations instead of about
    twenty (bit-identical, tested): ``s = max|x| / ((qmax - qmin) / 2)`` per token, a zero scale replaced by
    the dtype's epsilon, then ``round(clamp(x / s, qmin, qmax)) * s``, all in ``x``'s dtype."""
    qmin, qmax = int_range(num_bits)
    scale = x.abs().amax(-1, keepdim=True) / ((qmax - qmin) / 2)
    scale = torch.where(scale == 0, torch.finfo(scale.dtype).eps, scale)
    return torch.clamp(x / scale, qmin, qmax).round() * scale


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` forward, identity backward: learnable zero points stay on the integer grid."""
    return _RoundSTE.apply(x)


def clamp_ste(x: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """``clamp(x)`` forward, identity backward, so a factor pushed past a bound can come back."""
    return _ClampSTE.apply(x, low, high)


class _RoundSTE(torch.autograd.Function):
    # A Function rather than ``x + (round(x) - x).detach()``, whose forward value can differ from round(x)
    # in the last bit.
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        return grad


class _ClampSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, low: float, high: float) -> torch.Tensor:
        return torch.clamp(x, low, high)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        return grad, None, None
