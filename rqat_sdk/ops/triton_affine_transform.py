"""Fused Triton kernels for FlatQuant's online transform on CUDA, forward and backward.

They compute what :func:`rqat_sdk.ops.affine_transform.transform_and_clip`'s PyTorch path computes:
``y = clip((x * smooth) (left ⊗ right))`` in float32, the clipping symmetric per token, rounded once to
``x``'s dtype. The PyTorch path runs a chain of launches over float32 copies of ``x`` (the smoothing product,
two batched products of small matrices, the range, the clamps, the cast), all again when the backward pass
recomputes them. Here one program takes ``_TOKENS`` tokens one at a time: it reads a token's ``n1 x n2``
block once in the model dtype, multiplies it by both factors (IEEE float32 products, so the result differs
from cuBLAS's only in the order of float32 sums; TF32 on the tensor cores where PyTorch's float32 matmul
precision allows it, as cuBLAS then does), clips it with its own range, and writes it once. The backward
kernel reads ``x`` and the incoming gradient once, recomputes the transform, and writes the input's gradient
and one partial sum per program of the factors', smoothing's and clipping factor's gradients (reduced in
PyTorch): nothing but ``x`` is saved between the passes.

Clipping's gradient is PyTorch's for ``minimum(maximum(z, -b), b)`` with ``b = factor * amax(|z|)``, ties
included (half the gradient each way where ``z`` meets a bound; ``amax``'s share split evenly between the
values equal to the maximum), so the kernel and autograd agree to float32 rounding.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

_TOKENS = 16
"""Tokens per program: enough to amortise loading the factors, few enough to fill the GPU at 2,048 tokens."""
_MAX_SIDE = 64
"""The largest padded factor: the backward keeps float32 tiles of ``n1 x n2``, ``n1 x n1`` and ``n2 x n2`` per
program, which past 64 x 64 no longer fit in registers."""
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _padded(size: int) -> int:
    """``tl.dot`` needs power-of-two dimensions of at least 16."""
    return max(16, triton.next_power_of_2(size))


def supports(x: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> bool:
    """Whether the kernels serve this transform: a dtype they know and a block that fits in registers."""
    return x.dtype in _DTYPES and max(_padded(left.shape[0]), _padded(right.shape[0])) <= _MAX_SIDE and x.numel() > 0


@triton.jit
def _load_factors(left_ptr, right_ptr, smooth_ptr, N1: tl.constexpr, N2: tl.constexpr, P1: tl.constexpr,
                  P2: tl.constexpr, HAS_SMOOTH: tl.constexpr):
    i = tl.arange(0, P1)
    j = tl.arange(0, P2)
    left = tl.load(left_ptr + i[:, None] * N1 + i[None, :], mask=(i[:, None] < N1) & (i[None, :] < N1), other=0.0)
    right = tl.load(right_ptr + j[:, None] * N2 + j[None, :], mask=(j[:, None] < N2) & (j[None, :] < N2), other=0.0)
    offsets = i[:, None] * N2 + j[None, :]
    mask = (i[:, None] < N1) & (j[None, :] < N2)
    if HAS_SMOOTH:
        smooth = tl.load(smooth_ptr + offsets, mask=mask, other=0.0)
    else:
        smooth = tl.full((P1, P2), 1.0, tl.float32)
    return left, right, smooth, offsets, mask


@triton.jit
def _forward_kernel(x_ptr, y_ptr, left_ptr, right_ptr, smooth_ptr, factor_ptr, n_tokens,
                    N1: tl.constexpr, N2: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr,
                    TOKENS: tl.constexpr, HAS_SMOOTH: tl.constexpr, CLIP: tl.constexpr, PRECISION: tl.constexpr):
    left, right, smooth, offsets, mask = _load_factors(left_ptr, right_ptr, smooth_ptr, N1, N2, P1, P2, HAS_SMOOTH)
    left_t = tl.trans(left)
    if CLIP:
        factor = tl.load(factor_ptr)
    for k in range(TOKENS):
        token = tl.program_id(0) * TOKENS + k
        rows = tl.where(token < n_tokens, N1, 0)  # a token past the last one: no rows
        in_range = (tl.arange(0, P1)[:, None] < rows) & mask
        base = token.to(tl.int64) * (N1 * N2)
        w = tl.load(x_ptr + base + offsets, mask=in_range, other=0.0).to(tl.float32) * smooth
        z = tl.dot(left_t, tl.dot(w, right, input_precision=PRECISION), input_precision=PRECISION)
        if CLIP:
            bound = factor * tl.max(tl.max(tl.abs(z), axis=1), axis=0)
            z = tl.minimum(tl.maximum(z, -bound), bound)
        tl.store(y_ptr + base + offsets, z.to(y_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=in_range)


@triton.jit
def _backward_kernel(x_ptr, grad_ptr, grad_x_ptr, left_ptr, right_ptr, smooth_ptr, factor_ptr,
                     grad_left_ptr, grad_right_ptr, grad_smooth_ptr, grad_factor_ptr, n_tokens,
                     N1: tl.constexpr, N2: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr,
                     TOKENS: tl.constexpr, HAS_SMOOTH: tl.constexpr, CLIP: tl.constexpr, PRECISION: tl.constexpr,
                     NEED_X: tl.constexpr, NEED_FACTORS: tl.constexpr):
    left, right, smooth, offsets, mask = _load_factors(left_ptr, right_ptr, smooth_ptr, N1, N2, P1, P2, HAS_SMOOTH)
    left_t = tl.trans(left)
    right_t = tl.trans(right)
    factor = 0.0
    if CLIP:
        factor = tl.load(factor_ptr)
    grad_left = tl.zeros((P1, P1), tl.float32)
    grad_right = tl.zeros((P2, P2), tl.float32)
    grad_smooth = tl.zeros((P1, P2), tl.float32)
    grad_factor = tl.zeros((1,), tl.float32)
    for k in range(TOKENS):
        token = tl.program_id(0) * TOKENS + k
        rows = tl.where(token < n_tokens, N1, 0)  # a token past the last one: no rows
        in_range = (tl.arange(0, P1)[:, None] < rows) & mask
        base = token.to(tl.int64) * (N1 * N2)
        x = tl.load(x_ptr + base + offsets, mask=in_range, other=0.0).to(tl.float32)
        w = x * smooth
        m = tl.dot(w, right, input_precision=PRECISION)  # z = left^T m
        z = tl.dot(left_t, m, input_precision=PRECISION)
        g = tl.load(grad_ptr + base + offsets, mask=in_range, other=0.0).to(tl.float32)
        if CLIP:
            magnitude = tl.abs(z)
            peak = tl.max(tl.max(magnitude, axis=1), axis=0)
            bound = factor * peak
            # y = minimum(u, bound) with u = maximum(z, -bound): PyTorch splits a tie's gradient in halves
            u = tl.maximum(z, -bound)
            grad_u = tl.where(u < bound, g, tl.where(u == bound, 0.5 * g, 0.0))
            grad_high = tl.where(u > bound, g, tl.where(u == bound, 0.5 * g, 0.0))
            grad_z = tl.where(z > -bound, grad_u, tl.where(z == -bound, 0.5 * grad_u, 0.0))
            grad_low = tl.where(z < -bound, grad_u, tl.where(z == -bound, 0.5 * grad_u, 0.0))
            grad_bound = tl.sum(tl.sum(grad_high - grad_low, axis=1), axis=0)  # low = -bound
            grad_factor += grad_bound * peak
            at_peak = (magnitude == peak) & in_range
            ties = tl.sum(tl.sum(at_peak.to(tl.float32), axis=1), axis=0)
            sign = tl.where(z > 0, 1.0, tl.where(z < 0, -1.0, 0.0))
            grad_z += tl.where(at_peak, grad_bound * factor / tl.maximum(ties, 1.0) * sign, 0.0)
        else:
            grad_z = g
        grad_m = tl.dot(left, grad_z, input_precision=PRECISION)
        grad_w = tl.dot(grad_m, right_t, input_precision=PRECISION)
        if NEED_FACTORS:
            grad_left += tl.dot(m, tl.trans(grad_z), input_precision=PRECISION)
            grad_right += tl.dot(tl.trans(w), grad_m, input_precision=PRECISION)
            grad_smooth += grad_w * x
        if NEED_X:
            grad_x = (grad_w * smooth).to(grad_x_ptr.dtype.element_ty, fp_downcast_rounding="rtne")
            tl.store(grad_x_ptr + base + offsets, grad_x, mask=in_range)
    if NEED_FACTORS:
        program = tl.program_id(0).to(tl.int64)
        i = tl.arange(0, P1)
        j = tl.arange(0, P2)
        tl.store(grad_left_ptr + program * N1 * N1 + i[:, None] * N1 + i[None, :], grad_left,
                 mask=(i[:, None] < N1) & (i[None, :] < N1))
        tl.store(grad_right_ptr + program * N2 * N2 + j[:, None] * N2 + j[None, :], grad_right,
                 mask=(j[:, None] < N2) & (j[None, :] < N2))
        if HAS_SMOOTH:
            tl.store(grad_smooth_ptr + program * N1 * N2 + offsets, grad_smooth, mask=mask)
        if CLIP:
            tl.store(grad_factor_ptr + program + tl.arange(0, 1), grad_factor)


def _launch_shape(x: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> dict[str, Any]:
    n1, n2 = left.shape[0], right.shape[0]
    p1, p2 = _padded(n1), _padded(n2)
    # float32 products as PyTorch's float32 matmuls make them: TF32 tensor cores where it allows them
    precision = "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    return {"N1": n1, "N2": n2, "P1": p1, "P2": p2, "TOKENS": _TOKENS, "PRECISION": precision,
            "num_warps": 8 if p1 * p2 > 1024 else 4}


class TritonKroneckerTransform(torch.autograd.Function):
    """``clip((x * smooth) (left ⊗ right))`` in ``x``'s dtype, one kernel each way.

    ``smooth`` and ``factor`` (the clipping factor, a 0-d float32 tensor) may be None: no smoothing, no
    clipping. ``left``, ``right`` and ``smooth`` are float32.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, left: torch.Tensor, right: torch.Tensor, smooth: torch.Tensor | None,
                factor: torch.Tensor | None) -> torch.Tensor:
        # the kernels index every tensor as row-major (random orthogonal factors are not: QR's are column-major)
        x, left, right = x.contiguous(), left.contiguous(), right.contiguous()
        smooth = None if smooth is None else smooth.contiguous()
        n_tokens = x.numel() // x.shape[-1]
        y = torch.empty_like(x)
        shape = _launch_shape(x, left, right)
        _forward_kernel[(triton.cdiv(n_tokens, _TOKENS),)](
            x, y, left, right, x if smooth is None else smooth, x if factor is None else factor, n_tokens,
            HAS_SMOOTH=smooth is not None, CLIP=factor is not None, **shape,
        )
        ctx.save_for_backward(x, left, right, smooth, factor)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, left, right, smooth, factor = ctx.saved_tensors
        need_x, *need = ctx.needs_input_grad
        need_factors = any(need)  # the factors, smoothing and clipping factor come from the same products
        grad = grad.contiguous()
        n_tokens = x.numel() // x.shape[-1]
        programs = triton.cdiv(n_tokens, _TOKENS)
        n1, n2 = left.shape[0], right.shape[0]
        grad_x = torch.empty_like(x) if need_x else None
        partial = {"device": x.device, "dtype": torch.float32}  # one sum per program
        grad_left = torch.empty(programs, n1, n1, **partial) if need_factors else None
        grad_right = torch.empty(programs, n2, n2, **partial) if need_factors else None
        grad_smooth = torch.empty(programs, n1 * n2, **partial) if need_factors and smooth is not None else None
        grad_factor = torch.empty(programs, **partial) if need_factors and factor is not None else None
        _backward_kernel[(programs,)](
            *(x if t is None else t for t in (x, grad, grad_x, left, right, smooth, factor, grad_left, grad_right,
                                              grad_smooth, grad_factor)),  # x: a placeholder the kernel never reads
            n_tokens, HAS_SMOOTH=smooth is not None, CLIP=factor is not None, NEED_X=need_x,
            NEED_FACTORS=need_factors, **_launch_shape(x, left, right),
        )
        sums = [None if t is None else t.sum(0) for t in (grad_left, grad_right, grad_smooth, grad_factor)]
        return grad_x, *(total if wanted else None for total, wanted in zip(sums, need, strict=True))
