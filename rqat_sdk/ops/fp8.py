"""FP8 (e4m3) linear layers for the frozen distillation teacher: row-scaled weights, per-token activations.

A teacher only runs forward, so its Linear layers can run on Hopper's FP8 tensor cores. Each weight row (one
output channel) and each activation row (one token) gets its own scale, ``amax / 448`` (448 is e4m3's
largest value), so one outlier costs precision only in its own row.

:func:`fp8_linear` computes ``x W^T + b`` from the quantized operands two ways, giving the same numbers up to
accumulation order and the output's rounding:

- the reference: dequantize both operands and multiply in float32 (any device; the CPU path);
- ``torch._scaled_mm`` with row-wise scales (``scale_a`` (M, 1), ``scale_b`` (1, N)) and a bf16 output, on CUDA
  devices of compute capability 8.9 or newer when both weight dimensions are multiples of 16 (what the
  kernel requires).

``torch._scaled_mm`` is private, so this file is its only caller. Its signature was read from torch 2.13; rather
than refuse every other release of the range pyproject.toml allows, the first FP8 matmul on a device checks the
kernel against the reference on a small product, and a torch whose ``_scaled_mm`` takes other arguments or
computes otherwise is refused there with :class:`~rqat_sdk.errors.UpstreamVersionError`.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Collection

import torch

from rqat_sdk.errors import UpstreamVersionError
from rqat_sdk.ops import use_triton

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
_MIN_SCALE = 1e-12  # the scale of an all-zero row: positive, so dividing by it is safe
SELF_CHECK_TOLERANCE = 0.02
"""The largest relative difference the self-check accepts between ``_scaled_mm`` and the reference: both take
the same e4m3 operands, and they differ by accumulation order and the kernel's bf16 output rounding (2^-8)."""


def quantize_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 values and float32 scales (rows, 1) of a 2-D tensor, one scale per row: ``amax / 448``.

    For a weight (out, in) a row is an output channel; for activations (tokens, features) a token, quantized
    dynamically at each call. ``t ~= values * scale``. On CUDA a fused Triton kernel computes the same bits
    (:mod:`rqat_sdk.ops.triton_fp8`) in one launch.
    """
    if use_triton(t):
        # triton is optional (CUDA builds only) and imports at module level
        from rqat_sdk.ops import triton_fp8

        if triton_fp8.supports(t):
            return triton_fp8.quantize_rows(t)
    return quantize_rows_reference(t)


def quantize_rows_reference(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantize_rows` in PyTorch operations: the CPU path, and the reference for the CUDA kernel."""
    amax = t.abs().amax(-1, keepdim=True).float()
    # a tensor divisor: PyTorch's CUDA division by a Python number multiplies by its reciprocal instead
    scale = (amax / torch.full_like(amax, E4M3_MAX)).clamp(min=_MIN_SCALE)
    # the clamp keeps an amax that rounds a hair above 448 from becoming e4m3's NaN
    values = (t.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return values, scale


def dequantize_rows(values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The float32 tensor that :func:`quantize_rows`' output stands for."""
    return values.float() * scale


def fp8_linear(
    x: torch.Tensor, w_fp8: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``x W^T + b`` in ``x``'s dtype, with ``x`` (..., in) quantized per token and ``W`` given as
    :func:`quantize_rows` returns it: ``w_fp8`` (out, in) and ``w_scale`` (out, 1).

    Runs ``torch._scaled_mm`` where :func:`uses_scaled_mm` says so, else :func:`fp8_linear_reference`.
    """
    return _linear(x, quantize_tokens(x), w_fp8, w_scale, bias)


def quantize_tokens(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` (..., features) as :func:`quantize_rows` of its tokens: values (tokens, features) and scales."""
    return quantize_rows(x.reshape(-1, x.shape[-1]))


def _linear(x: torch.Tensor, quantized: tuple[torch.Tensor, torch.Tensor], w_fp8: torch.Tensor,
            w_scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """:func:`fp8_linear` of ``x``, whose tokens ``quantized`` holds (:func:`quantize_tokens`)."""
    if uses_scaled_mm(x.device) and w_fp8.shape[0] % 16 == 0 and w_fp8.shape[1] % 16 == 0:
        if not torch.compiler.is_compiling():  # a compiled teacher was checked when its layers were built
            _check_scaled_mm(x.device)
        return _shaped_like(x, _scaled_mm_product(*quantized, w_fp8, w_scale, bias))
    return _shaped_like(x, _reference_product(*quantized, w_fp8, w_scale, bias))


def fp8_linear_reference(
    x: torch.Tensor, w_fp8: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """:func:`fp8_linear` by dequantizing both operands and multiplying in float32: the reference, and the
    path wherever FP8 matmuls are not available."""
    return _shaped_like(x, _reference_product(*quantize_tokens(x), w_fp8, w_scale, bias))


def fp8_linear_scaled_mm(
    x: torch.Tensor, w_fp8: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """:func:`fp8_linear` through ``torch._scaled_mm`` with row-wise scales, output rounded to bf16 (the
    row-wise kernels write bf16), then to ``x``'s dtype. The bias is added after the matmul, in bf16."""
    _check_scaled_mm(x.device)
    return _shaped_like(x, _scaled_mm_product(*quantize_tokens(x), w_fp8, w_scale, bias))


def _shaped_like(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """A product over ``x``'s tokens (tokens, out) in ``x``'s dtype and leading shape."""
    return out.to(x.dtype).reshape(*x.shape[:-1], out.shape[-1])


def _reference_product(x_fp8: torch.Tensor, x_scale: torch.Tensor, w_fp8: torch.Tensor, w_scale: torch.Tensor,
                       bias: torch.Tensor | None) -> torch.Tensor:
    out = dequantize_rows(x_fp8, x_scale) @ dequantize_rows(w_fp8, w_scale).T
    return out + bias.float() if bias is not None else out


def _scaled_mm_product(x_fp8: torch.Tensor, x_scale: torch.Tensor, w_fp8: torch.Tensor, w_scale: torch.Tensor,
                       bias: torch.Tensor | None) -> torch.Tensor:
    # w_fp8.t() is column-major, as the kernel wants its second operand
    out = torch._scaled_mm(x_fp8, w_fp8.t(), scale_a=x_scale, scale_b=w_scale.reshape(1, -1), out_dtype=torch.bfloat16)
    return out + bias.to(out.dtype) if bias is not None else out


class SharedInputQuantizer:
    """Quantizes the inputs of one model's FP8 layers and hands the last result to the next layer that reads the
    same tensor: an attention block's query, key and value projections read one tensor, as do an MLP's gate and
    up projections, so a Llama-style layer quantizes four inputs instead of seven. It keeps a weak reference to
    the last input (a tensor freed since cannot match) and its version (nor can one changed in place). Inside
    ``torch.compile`` each layer quantizes its own input: the compiled graph holds no Python state, and the
    compiler may merge the identical computations."""

    def __init__(self) -> None:
        self._input: weakref.ref[torch.Tensor] | None = None
        self._version = -1
        self._quantized: tuple[torch.Tensor, torch.Tensor] | None = None

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if torch.compiler.is_compiling() or x.is_inference():  # inference: no version counter to go by
            return quantize_tokens(x)
        last = self._input() if self._input is not None else None
        if self._quantized is None or last is not x or x._version != self._version:
            self._input, self._version, self._quantized = weakref.ref(x), x._version, quantize_tokens(x)
        return self._quantized


_SCALED_MM: dict[torch.device, bool] = {}
""":func:`uses_scaled_mm`'s answers by device: a plain dict, which a compiled graph reads as a constant."""


def uses_scaled_mm(device: torch.device) -> bool:
    """Whether :func:`fp8_linear` runs FP8 matmuls on ``device``: CUDA with compute capability >= 8.9 (Ada,
    Hopper and newer have FP8 tensor cores); everywhere else it computes the same numbers in float32. Kept per
    device: :func:`fp8_linear` asks at every call."""
    known = _SCALED_MM.get(device)
    if known is None:
        known = _SCALED_MM[device] = device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)
    return known


@functools.cache
def _check_scaled_mm(device: torch.device) -> None:
    """Once per device: ``_scaled_mm`` on a small product against :func:`fp8_linear_reference`."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(32, 64, generator=generator).to(device, torch.bfloat16)
    w_fp8, w_scale = quantize_rows(torch.randn(48, 64, generator=generator).to(device))
    expected = fp8_linear_reference(x, w_fp8, w_scale).float()
    try:
        got = _scaled_mm_product(*quantize_tokens(x), w_fp8, w_scale, None).float()
    except (TypeError, RuntimeError) as error:
        raise UpstreamVersionError(
            f"rqat_sdk/ops/fp8.py calls torch._scaled_mm as torch 2.13 takes it, and torch {torch.__version__} "
            f"refused the call ({error}); use teacher_precision: bf16, or update that file for this torch"
        ) from error
    difference = ((got - expected).norm() / expected.norm()).item()
    if not difference <= SELF_CHECK_TOLERANCE:
        raise UpstreamVersionError(
            f"torch {torch.__version__}'s _scaled_mm differs from the FP8 reference by {difference:.3f} (relative) on "
            f"{device}, more than {SELF_CHECK_TOLERANCE}: use teacher_precision: bf16, or check rqat_sdk/ops/fp8.py "
            "against this torch"
        )


class FP8Linear(torch.nn.Module):
    """A frozen Linear whose weight is stored in e4m3 with a scale per output row, computed by :func:`fp8_linear`.

    Inference only: it holds buffers, not parameters, so no optimizer or gradient reaches it, and it keeps half
    the bytes of a bf16 weight. Build it with :meth:`from_linear` after the model has reached its device and
    dtype: ``module.to(dtype)`` would cast the e4m3 buffer as any floating-point buffer.
    """

    w_fp8: torch.Tensor
    w_scale: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, w_fp8: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                 inputs: SharedInputQuantizer | None = None):
        super().__init__()
        self.out_features, self.in_features = w_fp8.shape
        self.register_buffer("w_fp8", w_fp8)
        self.register_buffer("w_scale", w_scale)
        self.register_buffer("bias", bias)
        # quantizes this layer's input; linears_to_fp8_ gives every layer of a model the same one
        self.inputs = inputs if inputs is not None else SharedInputQuantizer()

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: torch.nn.Linear, inputs: SharedInputQuantizer | None = None) -> FP8Linear:
        w_fp8, w_scale = quantize_rows(linear.weight)
        return cls(w_fp8, w_scale, linear.bias.detach().clone() if linear.bias is not None else None, inputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _linear(x, self.inputs(x), self.w_fp8, self.w_scale, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def linears_to_fp8_(model: torch.nn.Module, keep: Collection[torch.nn.Module] = ()) -> int:
    """Replace every ``nn.Linear`` of ``model`` except those in ``keep`` by an :class:`FP8Linear`, in place;
    returns how many were replaced. Where the layers run FP8 matmuls, ``_scaled_mm`` is checked here, before
    any forward (a compiled one would not check it)."""
    kept = {id(module) for module in keep}
    targets = [(name, module) for name, module in model.named_modules()
               if isinstance(module, torch.nn.Linear) and id(module) not in kept]
    inputs = SharedInputQuantizer()
    for name, linear in targets:
        parent, _, attribute = name.rpartition(".")
        setattr(model.get_submodule(parent), attribute, FP8Linear.from_linear(linear, inputs))
    for device in {linear.weight.device for _, linear in targets}:
        if uses_scaled_mm(device):
            _check_scaled_mm(device)
    return len(targets)
