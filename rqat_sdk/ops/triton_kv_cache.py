"""A fused Triton kernel for KV-cache fake quantization on CUDA: one launch per key or value tensor.

It computes what :func:`rqat_sdk.ops.kv_cache.fake_quantize_kv`'s PyTorch path computes: rotate each
(token, head) vector with vLLM's randomized Hadamard transform, round it to the model dtype, quantize it to
uint4 with a per-row scale and zero point, and rotate it back. The PyTorch path takes about twenty
launches over fp32 copies of the tensor, twice per attention layer: on Qwen3-0.6B's shape that added 75-112
ms to a QAT-KD step (docs/performance.md). Here each row is read once in the model dtype and written once,
and both rotations run on the tensor cores.

Every step rounds where the PyTorch path rounds (IEEE division, multiplication and addition without fused
multiply-add, round half away from zero). The inverse rotation sums integers, exactly in any order. The
forward rotation's fp32 sums may differ from the CPU's in their last bits (another order), but in bf16 and
fp16 they are rounded to that dtype right after, which hides the difference except at a rounding tie: the
kernel and the CPU agree bit for bit on every row tested. In fp32 nothing hides it, and a row's min or max
may move by an ulp, and with it the stored scale.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from rqat_sdk.ops.kv_cache import _MIN_SCALE, LEVELS, rotation_constants

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
_BLOCK_N = 64  # rows per program
_LEVELS = tl.constexpr(float(LEVELS))
_MIN = tl.constexpr(_MIN_SCALE)


def supports(x: torch.Tensor) -> bool:
    """Whether the kernel serves ``x``: a floating-point dtype it knows and a power-of-two head dimension
    from 16 (``tl.dot``'s least) to 128 (the fp32 Hadamard matrix must fit in shared memory), so that vLLM's
    rotation is one block per row, and at most four dimensions. Other tensors take the PyTorch path."""
    dim = x.shape[-1]
    return x.dtype in _TL_DTYPES and 16 <= dim <= 128 and dim & (dim - 1) == 0 and x.numel() > 0 and x.dim() <= 4


@triton.jit
def _round_half_away(v):
    half = tl.full(v.shape, 0.5, tl.float32)
    return tl.where(v >= 0, libdevice.trunc(libdevice.add_rn(v, half)), libdevice.trunc(libdevice.sub_rn(v, half)))


@triton.jit
def _kv_fake_quant_kernel(
    x_ptr, out_ptr, signs_ptr, hadamard_ptr, n_rows, size1, size2,
    xs0, xs1, xs2, os0, os1, os2,
    DIM: tl.constexpr, BLOCK_N: tl.constexpr, DTYPE: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    rows64 = rows.to(tl.int64)
    i2 = rows64 % size2
    i1 = (rows64 // size2) % size1
    i0 = rows64 // (size1 * size2)
    cols = tl.arange(0, DIM)
    mask = row_mask[:, None]
    x = tl.load(x_ptr + (i0 * xs0 + i1 * xs1 + i2 * xs2)[:, None] + cols[None, :], mask=mask, other=0.0)
    signs = tl.load(signs_ptr + cols)
    hadamard = tl.load(hadamard_ptr + cols[:, None] * DIM + cols[None, :])

    # vLLM stores H (d * x), rounded to the model dtype. In bf16 or fp16, d * x is exact in the dtype itself,
    # so the tensor cores multiply exactly and sum in fp32; an fp32 model needs fp32 products.
    signed = x.to(tl.float32) * signs[None, :]
    if DTYPE == tl.float32:
        rotated = tl.dot(signed, hadamard, input_precision="ieee")
    else:
        rotated = tl.dot(signed.to(DTYPE), hadamard.to(DTYPE))
    rotated = rotated.to(DTYPE, fp_downcast_rounding="rtne").to(tl.float32)
    low, high = tl.min(rotated, axis=1), tl.max(rotated, axis=1)
    scale = tl.maximum(libdevice.div_rn(high - low, tl.full(high.shape, _LEVELS, tl.float32)), _MIN)
    zero = tl.minimum(tl.maximum(_round_half_away(libdevice.div_rn(-low, scale)), 0.0), _LEVELS)
    inverse = libdevice.div_rn(tl.full(scale.shape, 1.0, tl.float32), scale)
    shifted = libdevice.add_rn(libdevice.mul_rn(rotated, inverse[:, None]), zero[:, None])
    levels = tl.minimum(tl.maximum(_round_half_away(shifted), 0.0), _LEVELS)
    # the zero point lives in the scale's 4 low mantissa bits, so vLLM dequantizes with them cleared
    stored = (scale.to(tl.int32, bitcast=True) & -16).to(tl.float32, bitcast=True)
    # d * H (levels - zero): integers from -15 to 15 (exact in fp16, so on the tensor cores) summed to at most
    # 15 * DIM (exact in fp32), then one rounding for the scale
    restored = tl.dot((levels - zero[:, None]).to(tl.float16), hadamard.to(tl.float16)) * signs[None, :]
    restored = libdevice.mul_rn(restored, stored[:, None]) * (1.0 / DIM)
    out = restored.to(DTYPE, fp_downcast_rounding="rtne")
    tl.store(out_ptr + (i0 * os0 + i1 * os1 + i2 * os2)[:, None] + cols[None, :], out, mask=mask)


def _rows_view(t: torch.Tensor) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """Sizes and strides of ``t``'s leading dimensions as three (padding with size 1), so the kernel reads
    keys and values in whatever layout attention hands them (transformers' are transposed views)."""
    lead = list(zip(t.shape[:-1], t.stride()[:-1], strict=True))  # at most three (:func:`supports`)
    (s0, st0), (s1, st1), (s2, st2) = [(1, 0)] * (3 - len(lead)) + lead
    return (s0, s1, s2), (st0, st1, st2)


class TritonKVFakeQuant(torch.autograd.Function):
    """``fake_quantize_kv`` in one kernel; the gradient is the identity, as in the PyTorch path."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        if x.stride(-1) != 1:
            x = x.contiguous()
        out = torch.empty_like(x)
        dim = x.shape[-1]
        signs, hadamard = rotation_constants(dim, x.device)
        sizes, x_strides = _rows_view(x)
        _, out_strides = _rows_view(out)
        n_rows = sizes[0] * sizes[1] * sizes[2]
        _kv_fake_quant_kernel[(triton.cdiv(n_rows, _BLOCK_N),)](
            x, out, signs, hadamard, n_rows, sizes[1], sizes[2], *x_strides, *out_strides,
            DIM=dim, BLOCK_N=_BLOCK_N, DTYPE=_TL_DTYPES[x.dtype],
        )
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad
