"""Fused Triton kernels for weight fake quantization on CUDA: many weights in one launch, forward and back.

They compute the same numbers as :mod:`rqat_sdk.ops.fake_quant`'s PyTorch path: every step is done in
fp32 and rounded to the checkpoint dtype exactly where PyTorch's elementwise ops round (division with
IEEE rounding, round-half-to-even), so the forward output is bit-identical. The backward recomputes the
clipping mask from the latent weights instead of storing it, and reduces the scale and zero-point
gradients per group in the same pass.

Each weight (out, in) is viewed as ``units`` rows of ``group`` contiguous elements, one scale (and zero
point) per row: group-wise quantization is that view directly, per-channel is ``group = in``.

Why many at once: a 0.6B model has 196 quantized Linears, and a launch per layer costs tens of
microseconds of host time forward and again backward, more than the kernels' GPU time; the layers' GEMMs
are short enough that the host falls behind. One launch reads a table of the layers' addresses (weight,
scale, zero point) and writes every fake-quantized weight into one flat buffer; a second table maps each
program to its layer and first row, so no program straddles two layers.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

_TL_DTYPES = {
    torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16,
    torch.int8: tl.int8, torch.int32: tl.int32,
}
_TILE = 4096  # elements per program per loop step
_CACHE_LIMIT = 512


@triton.jit
def _locate(programs, layers, n_programs, n_layers, W_T: tl.constexpr, S_T: tl.constexpr, Z_T: tl.constexpr):
    """This program's layer: its weight, scale and zero-point pointers, row count, first flat row, and the
    first row this program handles."""
    pid = tl.program_id(0)
    layer = tl.load(programs + pid)
    first = tl.load(programs + n_programs + pid)
    w_ptr = tl.load(layers + layer).to(tl.pointer_type(W_T))
    s_ptr = tl.load(layers + n_layers + layer).to(tl.pointer_type(S_T))
    z_ptr = tl.load(layers + 2 * n_layers + layer).to(tl.pointer_type(Z_T))
    units = tl.load(layers + 3 * n_layers + layer)
    base = tl.load(layers + 4 * n_layers + layer)
    return w_ptr, s_ptr, z_ptr, units, base, first


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
    programs, layers, out_ptr, n_programs, n_layers,
    GROUP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    QMIN: tl.constexpr, QMAX: tl.constexpr, HAS_Z: tl.constexpr, DTYPE: tl.constexpr,
    W_T: tl.constexpr, S_T: tl.constexpr, Z_T: tl.constexpr,
):
    w_ptr, s_ptr, z_ptr, units, base, first = _locate(programs, layers, n_programs, n_layers, W_T, S_T, Z_T)
    rows = first + tl.arange(0, BLOCK_R)
    row_mask = rows < units
    s, z = _load_qparams(s_ptr, z_ptr, rows, row_mask, HAS_Z, DTYPE)
    for start in range(0, GROUP, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C)[None, :]
        offs = rows[:, None].to(tl.int64) * GROUP + cols
        mask = row_mask[:, None]
        u, q = _levels(w_ptr, s, z, offs, mask, QMIN, QMAX, HAS_Z, DTYPE)
        out = q
        if HAS_Z:
            out = (q - z[:, None]).to(DTYPE).to(tl.float32)
        flat = (base + rows[:, None].to(tl.int64)) * GROUP + cols
        tl.store(out_ptr + flat, (out * s[:, None]).to(DTYPE), mask=mask)


@triton.jit
def _backward_kernel(
    programs, layers, g_ptr, gw_ptr, gs_ptr, gz_ptr, n_programs, n_layers,
    GROUP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    QMIN: tl.constexpr, QMAX: tl.constexpr, HAS_Z: tl.constexpr, DTYPE: tl.constexpr,
    W_T: tl.constexpr, S_T: tl.constexpr, Z_T: tl.constexpr, NEED_S: tl.constexpr, NEED_Z: tl.constexpr,
):
    w_ptr, s_ptr, z_ptr, units, base, first = _locate(programs, layers, n_programs, n_layers, W_T, S_T, Z_T)
    rows = first + tl.arange(0, BLOCK_R)
    row_mask = rows < units
    s, z = _load_qparams(s_ptr, z_ptr, rows, row_mask, HAS_Z, DTYPE)
    acc_s = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc_z = tl.zeros([BLOCK_R], dtype=tl.float32)
    for start in range(0, GROUP, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C)[None, :]
        offs = rows[:, None].to(tl.int64) * GROUP + cols
        flat = (base + rows[:, None].to(tl.int64)) * GROUP + cols
        mask = row_mask[:, None]
        u, q = _levels(w_ptr, s, z, offs, mask, QMIN, QMAX, HAS_Z, DTYPE)
        g = tl.load(g_ptr + flat, mask=mask, other=0.0).to(tl.float32)
        inside = (u >= QMIN) & (u <= QMAX)
        tl.store(gw_ptr + flat, tl.where(inside, g, 0.0).to(W_T), mask=mask)
        if NEED_S:
            acc_s += tl.sum(g * tl.where(inside, q - u, q - z[:, None]), axis=1)
        if NEED_Z:
            acc_z += tl.sum(tl.where(inside, 0.0, -g * s[:, None]), axis=1)
    if NEED_S:
        tl.store(gs_ptr + base + rows, acc_s.to(S_T), mask=row_mask)
    if NEED_Z:
        tl.store(gz_ptr + base + rows, acc_z.to(Z_T), mask=row_mask)


class WeightsSpec(NamedTuple):
    """What one launch quantizes: ``num_weights`` weights sharing the integer range, group and dtype."""

    num_weights: int
    qmin: int
    qmax: int
    group: int
    dtype: torch.dtype
    has_zero: bool


def _blocks(group: int) -> tuple[int, int]:
    block_c = min(group & -group, 512)  # the largest power of two dividing the group, at most 512
    return max(1, _TILE // block_c), block_c


_program_tables: dict[tuple, torch.Tensor] = {}
_layer_tables: dict[tuple, torch.Tensor] = {}


def _cached(cache: dict, key: tuple, build) -> torch.Tensor:
    table = cache.get(key)
    if table is None:
        if len(cache) >= _CACHE_LIMIT:
            cache.clear()
        table = cache[key] = build()
    return table


def _program_table(device: torch.device, units: tuple[int, ...], block_r: int) -> torch.Tensor:
    """(2, programs) int32: each program's layer and first row. Depends on shapes only, so built once."""

    def build():
        counts = torch.tensor([triton.cdiv(n, block_r) for n in units])
        layer = torch.repeat_interleave(torch.arange(len(units)), counts)
        starts = torch.cumsum(counts, 0) - counts
        first = (torch.arange(int(counts.sum())) - starts[layer]) * block_r
        return torch.stack([layer, first]).to(torch.int32).to(device)

    return _cached(_program_tables, (device, units, block_r), build)


def _layer_table(weights, scales, zeros, units: tuple[int, ...]) -> torch.Tensor:
    """(5, layers) int64: weight, scale and zero-point addresses, row counts, first flat row. Rebuilt only
    when an address changes (the latent weights stay put from step to step)."""
    addresses = (
        tuple(t.data_ptr() for t in weights),
        tuple(t.data_ptr() for t in scales),
        tuple(t.data_ptr() for t in zeros) if zeros else tuple(t.data_ptr() for t in scales),
    )
    device = weights[0].device

    def build():
        bases = [0]
        for n in units[:-1]:
            bases.append(bases[-1] + n)
        host = torch.tensor([*addresses, units, bases], dtype=torch.int64)
        if device.type == "cuda":  # pinned, so the copy does not wait for the host
            host = host.pin_memory()
        return host.to(device, non_blocking=True)

    return _cached(_layer_tables, (device, addresses, units), build)


def _launch_args(spec: WeightsSpec, weights, scales, zeros):
    units = tuple(w.numel() // spec.group for w in weights)
    block_r, block_c = _blocks(spec.group)
    programs = _program_table(weights[0].device, units, block_r)
    layers = _layer_table(weights, scales, zeros, units)
    meta = dict(
        GROUP=spec.group, BLOCK_R=block_r, BLOCK_C=block_c, QMIN=spec.qmin, QMAX=spec.qmax,
        HAS_Z=spec.has_zero, DTYPE=_TL_DTYPES[spec.dtype],
        W_T=_TL_DTYPES[weights[0].dtype], S_T=_TL_DTYPES[scales[0].dtype],
        Z_T=_TL_DTYPES[(zeros or scales)[0].dtype],
    )
    return (programs.shape[1],), programs, layers, sum(units), meta


def _split(spec: WeightsSpec, tensors: tuple) -> tuple[list, list, list]:
    n = spec.num_weights
    return list(tensors[:n]), list(tensors[n:2 * n]), list(tensors[2 * n:]) if spec.has_zero else []


class TritonWeightsFakeQuant(torch.autograd.Function):
    """Fake-quantize ``num_weights`` weights in one launch; the result is one flat buffer of them all, in order.

    Arguments after the spec: the weights, then their scales, then (``has_zero``) their zero points.
    """

    @staticmethod
    def forward(ctx: Any, spec: WeightsSpec, *tensors: torch.Tensor) -> torch.Tensor:
        tensors = tuple(t.contiguous() for t in tensors)
        weights, scales, zeros = _split(spec, tensors)
        grid, programs, layers, total_units, meta = _launch_args(spec, weights, scales, zeros)
        out = torch.empty(total_units * spec.group, dtype=spec.dtype, device=weights[0].device)
        _forward_kernel[grid](programs, layers, out, programs.shape[1], spec.num_weights, **meta)
        ctx.save_for_backward(*tensors)
        ctx.spec = spec
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        spec = ctx.spec
        weights, scales, zeros = _split(spec, ctx.saved_tensors)
        grid, programs, layers, total_units, meta = _launch_args(spec, weights, scales, zeros)
        n = spec.num_weights
        need_s = any(ctx.needs_input_grad[1 + n:1 + 2 * n])
        need_z = spec.has_zero and any(ctx.needs_input_grad[1 + 2 * n:])
        device = grad.device
        grad_weights = torch.empty(total_units * spec.group, dtype=weights[0].dtype, device=device)
        grad_scales = torch.empty(total_units, dtype=scales[0].dtype, device=device) if need_s else grad_weights
        grad_zeros = torch.empty(total_units, dtype=zeros[0].dtype, device=device) if need_z else grad_weights
        _backward_kernel[grid](
            programs, layers, grad.contiguous(), grad_weights, grad_scales, grad_zeros, programs.shape[1], n,
            NEED_S=need_s, NEED_Z=need_z, **meta,
        )
        out: list[torch.Tensor | None] = [None]
        out += unflatten(grad_weights, [w.shape for w in weights])
        out += unflatten(grad_scales, [s.shape for s in scales]) if need_s else [None] * n
        if spec.has_zero:
            out += unflatten(grad_zeros, [z.shape for z in zeros]) if need_z else [None] * n
        return tuple(out)


def unflatten(flat: torch.Tensor, shapes: list[torch.Size]) -> list[torch.Tensor]:
    """Per-layer views of a flat buffer laid out layer after layer."""
    parts = flat.split([shape.numel() for shape in shapes])
    return [part.view(shape) for part, shape in zip(parts, shapes, strict=True)]
