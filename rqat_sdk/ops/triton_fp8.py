"""A fused Triton kernel for :func:`rqat_sdk.ops.fp8.quantize_rows` on CUDA: one launch per tensor.

The PyTorch path takes six launches over fp32 copies of the tensor (absolute value, row maximum, the scale,
an fp32 copy, the division and clamp, the cast to e4m3), at every FP8 teacher layer's input. Here each row is
read once in its own dtype, and its e4m3 values and scale are written once.

Every step rounds where the PyTorch path rounds: the row maximum is exact, the scale and the quotient use
IEEE division (``div_rn``), and the cast to e4m3 rounds to nearest even on values already clamped to
e4m3's range. The kernel and the PyTorch path agree bit for bit (tests/test_gpu.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from rqat_sdk.ops.fp8 import _MIN_SCALE, E4M3, E4M3_MAX

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MAX_FEATURES = 16384  # one block holds a row: wider rows take the PyTorch path
_MAX = tl.constexpr(E4M3_MAX)
_MIN = tl.constexpr(_MIN_SCALE)


def supports(t: torch.Tensor) -> bool:
    """Whether the kernel serves ``t``: a contiguous 2-D floating-point tensor whose rows fit one block."""
    return t.dim() == 2 and t.dtype in _DTYPES and t.is_contiguous() and 0 < t.shape[1] <= _MAX_FEATURES \
        and t.shape[0] > 0


@triton.jit
def _quantize_rows_kernel(t_ptr, values_ptr, scale_ptr, features, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < features
    t = tl.load(t_ptr + row * features + cols, mask=mask, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(t), axis=0)
    scale = tl.maximum(libdevice.div_rn(amax, _MAX), _MIN)
    values = tl.minimum(tl.maximum(libdevice.div_rn(t, scale), -_MAX), _MAX)
    tl.store(values_ptr + row * features + cols, values.to(tl.float8e4nv), mask=mask)
    tl.store(scale_ptr + row, scale)


def quantize_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`rqat_sdk.ops.fp8.quantize_rows` of a tensor :func:`supports` accepts, in one launch."""
    rows, features = t.shape
    values = torch.empty((rows, features), dtype=E4M3, device=t.device)
    scale = torch.empty((rows, 1), dtype=torch.float32, device=t.device)
    block = triton.next_power_of_2(features)
    _quantize_rows_kernel[(rows,)](t, values, scale, features, BLOCK=block, num_warps=4 if block <= 4096 else 8)
    return values, scale
