"""KV-cache fake quantization: the quantizer of vLLM's ``int4_per_token_head`` cache, with STE gradients.

vLLM serves a 4-bit KV cache one way (``--kv-cache-dtype int4_per_token_head``, vLLM 0.32): each key (after
RoPE) and value vector of one token and one KV head is rotated by a fixed randomized Hadamard transform,
``y = H (d * x)`` (``H`` the unnormalised Sylvester Hadamard matrix, ``d`` deterministic signs), rounded to
the model dtype, then quantized asymmetrically to 0..15 with ``scale = max((max - min) / 15, 1e-6)`` and
``zero = clamp(round(-min / scale), 0, 15)``, rounding half away from zero. The zero point is stored in the
4 low mantissa bits of the fp32 scale, so the scale used to dequantize has those bits cleared. Queries are
rotated the same way, so attention sees ``d * H dequant(y) / b`` with ``b`` the rotation's block size.

:func:`fake_quantize_kv` computes exactly that value in PyTorch (vLLM's kernels may order the floating-point
work differently, so a value at a rounding tie can land on the neighbouring level). It is checked against
vLLM's own rotation in the serving tests. The gradient is the identity: the range is dynamic, so nothing
is clipped, and the rotation cancels.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from rqat_sdk.ops import use_triton

LEVELS = 15  # uint4: 0..15
_MIN_SCALE = 1e-6
_SIGN_SEED = 0x9E3779B9  # vLLM's seed for the first (only) rotation round


def rotation_block(head_dim: int) -> int:
    """The Hadamard block size: the largest power of two dividing ``head_dim`` (vLLM rotates block-wise)."""
    return head_dim & -head_dim


@functools.cache
def _signs(block: int) -> torch.Tensor:
    generator = torch.Generator(device="cpu").manual_seed(_SIGN_SEED)
    return 2.0 * torch.bernoulli(torch.full((block,), 0.5), generator=generator) - 1.0


@functools.cache
def _hadamard(block: int) -> torch.Tensor:
    h = torch.ones(1, 1)
    while h.shape[0] < block:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


@functools.cache
def rotation_constants(block: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotation's signs and Hadamard matrix (fp32) on ``device``, copied there once."""
    return _signs(block).to(device), _hadamard(block).to(device)


def random_hadamard(x: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """vLLM's ``single_rht`` on the last dimension, in fp32: ``H (d * x)``, or ``d * (H x)`` when ``inverse``.

    Unnormalised: applying it and then its inverse multiplies by the block size.
    """
    dim = x.shape[-1]
    block = rotation_block(dim)
    blocks = x.float().reshape(*x.shape[:-1], dim // block, block)
    signs, hadamard = rotation_constants(block, x.device)
    out = blocks @ hadamard * signs if inverse else (blocks * signs) @ hadamard
    return out.reshape(x.shape)


def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= 0, torch.trunc(x + 0.5), torch.trunc(x - 0.5))


def _without_low_bits(scale: torch.Tensor) -> torch.Tensor:
    """The fp32 scale with its 4 low mantissa bits cleared, as vLLM reads it back."""
    return (scale.view(torch.int32) & -16).view(torch.float32)


def quantize_kv(rotated: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Integer levels (as floats), stored scale and zero point of rotated fp32 rows (one per token and head)."""
    low, high = rotated.amin(-1, keepdim=True), rotated.amax(-1, keepdim=True)
    # a tensor divisor: PyTorch's CUDA division by a Python number multiplies by its reciprocal instead,
    # which can land an ulp away from vLLM's (and the CPU's) division
    scale = torch.clamp((high - low) / torch.full_like(high, LEVELS), min=_MIN_SCALE)
    zero = torch.clamp(_round_half_away(-low / scale), 0, LEVELS)
    levels = torch.clamp(_round_half_away(rotated * (1.0 / scale) + zero), 0, LEVELS)
    return levels, _without_low_bits(scale), zero


def fake_quantize_kv(x: torch.Tensor) -> torch.Tensor:
    """What attention reads back for keys or values ``x`` (..., head_dim) stored in vLLM's int4 cache.

    On CUDA a fused Triton kernel computes it (:mod:`rqat_sdk.ops.triton_kv_cache`) for head dimensions it
    supports; elsewhere this PyTorch path does.
    """
    if torch.compiler.is_compiling():
        # torch.compile (2.13) fails tracing these autograd functions under dynamic shapes: they run eagerly,
        # between two graphs
        return torch.compiler.disable(_fake_quantize_kv)(x)
    return _fake_quantize_kv(x)


def _fake_quantize_kv(x: torch.Tensor) -> torch.Tensor:
    if use_triton(x):
        # triton is optional (CUDA builds only) and imports at module level
        from rqat_sdk.ops.triton_kv_cache import TritonKVFakeQuant, supports

        if supports(x):
            return TritonKVFakeQuant.apply(x)
    return _KVFakeQuant.apply(x)


class _KVFakeQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        rotated = random_hadamard(x).to(x.dtype).float()  # vLLM stores the rotated vector in the model dtype
        levels, scale, zero = quantize_kv(rotated)
        # rotating the integer levels back is exact in fp32 (and in TF32); the scale then rounds once
        restored = random_hadamard(levels - zero, inverse=True) * scale / rotation_block(x.shape[-1])
        return restored.to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad
