"""Fused Triton kernels for weight fake quantization on CUDA: one pass forward, one pass backward.

They compute the same numbers as :mod:`rqat_sdk.ops.fake_quant`'s PyTorch path: every step is done in
fp32 and rounded to the checkpoint dtype exactly where PyTorch's elementwise ops round (division with
IEEE rounding, round-half-to-even), so the forward output is bit-identical. The backward recomputes the
clipping mask from the latent weights instead of storing it, and reduces the scale and zero-point
gradients per group in the same pass.

The weight (out, in) is viewed as ``units`` rows of ``group`` contiguous elements, one scale (and zero
point) per row: group-wise quantization is that view directly, per-channel is ``group = in``.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
_TILE = 4096  # elements per program per loop step


@triton.jit
def _levels(w_ptr, s, z, offs, mask, QMIN: tl.constexpr, QMAX: tl.constexpr, HAS_Z: tl.constexpr, DTYPE: tl.constexpr):
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(DTYPE).to(tl.float32)
    u = tl.math.div_rn(w, s[:, None]).to(DTYPE).to(tl.float32)
    if HAS_Z:
        u = (u + z[:, None]).to(DTYPE).to(tl.float32)
    q = libdevice.rint(tl.minimum(tl.maximum(u, QMIN), QMAX))
    return u, q


@triton.jit
def _load_qparams(s_ptr, z_ptr, rows, row_mask, HAS_Z: tl.constexpr, DTYPE: tl.constexpr):
    s = tl.load(s_ptr + rows, mask=row_mask, other=1.0).to(DTYPE).to(tl.float32)
    z = tl.zeros_like(s)
    if HAS_Z:
        z = tl.load(z_ptr + rows, mask=row_mask, other=0).to(tl.float32).to(DTYPE).to(tl.float32)
    return s, z


@triton.jit
def _forward_kernel(
    w_ptr, s_ptr, z_ptr, out_ptr, units,
    GROUP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    QMIN: tl.constexpr, QMAX: tl.constexpr, HAS_Z: tl.constexpr, DTYPE: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < units
    s, z = _load_qparams(s_ptr, z_ptr, rows, row_mask, HAS_Z, DTYPE)
    for start in range(0, GROUP, BLOCK_C):
        offs = rows[:, None].to(tl.int64) * GROUP + start + tl.arange(0, BLOCK_C)[None, :]
        mask = row_mask[:, None]
        u, q = _levels(w_ptr, s, z, offs, mask, QMIN, QMAX, HAS_Z, DTYPE)
        out = q
        if HAS_Z:
            out = (q - z[:, None]).to(DTYPE).to(tl.float32)
        tl.store(out_ptr + offs, (out * s[:, None]).to(DTYPE), mask=mask)


@triton.jit
def _backward_kernel(
    g_ptr, w_ptr, s_ptr, z_ptr, gw_ptr, gs_ptr, gz_ptr, units,
    GROUP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    QMIN: tl.constexpr, QMAX: tl.constexpr, HAS_Z: tl.constexpr, DTYPE: tl.constexpr,
    NEED_S: tl.constexpr, NEED_Z: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < units
    s, z = _load_qparams(s_ptr, z_ptr, rows, row_mask, HAS_Z, DTYPE)
    acc_s = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc_z = tl.zeros([BLOCK_R], dtype=tl.float32)
    for start in range(0, GROUP, BLOCK_C):
        offs = rows[:, None].to(tl.int64) * GROUP + start + tl.arange(0, BLOCK_C)[None, :]
        mask = row_mask[:, None]
        u, q = _levels(w_ptr, s, z, offs, mask, QMIN, QMAX, HAS_Z, DTYPE)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        inside = (u >= QMIN) & (u <= QMAX)
        tl.store(gw_ptr + offs, tl.where(inside, g, 0.0).to(gw_ptr.dtype.element_ty), mask=mask)
        if NEED_S:
            acc_s += tl.sum(g * tl.where(inside, q - u, q - z[:, None]), axis=1)
        if NEED_Z:
            acc_z += tl.sum(tl.where(inside, 0.0, -g * s[:, None]), axis=1)
    if NEED_S:
        tl.store(gs_ptr + rows, acc_s.to(gs_ptr.dtype.element_ty), mask=row_mask)
    if NEED_Z:
        tl.store(gz_ptr + rows, acc_z.to(gz_ptr.dtype.element_ty), mask=row_mask)


def _blocks(group: int) -> tuple[int, int]:
    block_c = min(group & -group, 512)  # the largest power of two dividing the group, at most 512
    return max(1, _TILE // block_c), block_c


def _launch_args(weight, scale, zero_point, qmin, qmax, group, dtype):
    units = weight.numel() // group
    block_r, block_c = _blocks(group)
    grid = (triton.cdiv(units, block_r),)
    meta = dict(
        GROUP=group, BLOCK_R=block_r, BLOCK_C=block_c, QMIN=qmin, QMAX=qmax,
        HAS_Z=zero_point is not None, DTYPE=_TL_DTYPES[dtype],
    )
    z = zero_point.contiguous() if zero_point is not None else scale
    return units, grid, meta, z


class TritonWeightFakeQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, weight, scale, zero_point, qmin, qmax, group, dtype):
        weight, scale = weight.contiguous(), scale.contiguous()
        units, grid, meta, z = _launch_args(weight, scale, zero_point, qmin, qmax, group, dtype)
        out = torch.empty(weight.shape, dtype=dtype, device=weight.device)
        _forward_kernel[grid](weight, scale, z, out, units, **meta)
        ctx.save_for_backward(weight, scale, zero_point)
        ctx.constants = (qmin, qmax, group, dtype)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        weight, scale, zero_point = ctx.saved_tensors
        qmin, qmax, group, dtype = ctx.constants
        units, grid, meta, z = _launch_args(weight, scale, zero_point, qmin, qmax, group, dtype)
        need_s = ctx.needs_input_grad[1]
        need_z = zero_point is not None and ctx.needs_input_grad[2]
        grad_weight = torch.empty_like(weight)
        grad_scale = torch.empty_like(scale) if need_s else None
        grad_zero = torch.empty_like(zero_point) if need_z else None
        _backward_kernel[grid](
            grad.contiguous(), weight, scale, z, grad_weight,
            grad_scale if need_s else scale, grad_zero if need_z else scale, units,
            NEED_S=need_s, NEED_Z=need_z, **meta,
        )
        return grad_weight, grad_scale, grad_zero, None, None, None, None
