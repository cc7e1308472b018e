"""Swap compressed-tensors' fake-quantized Linear forward for a trainable one, and back.

compressed-tensors' forward quantizes weights by swapping ``weight.data`` (an identity gradient with no
clipping mask, no gradient for the scales) and quantizes activations under ``no_grad`` (no gradient to the
layer at all). During QAT each quantized Linear runs :func:`_qat_forward` instead, built on
:mod:`rqat_sdk.ops.fake_quant`: the same forward numbers, proper straight-through gradients.

Trainable quantization parameters live on the layer, in fp32:

- ``weight_scale`` itself (``learn_scales``), and ``rqat_zero_point``, a float copy of the integer zero
  point used through round-to-nearest (asymmetric schemes);
- ``rqat_clip``, a clipping factor per scale in [CLIP_MIN, 1] that shrinks the range (``learn_clipping``).

A model calibrated by ``flatquant`` also carries online transforms (:mod:`rqat_sdk.transforms`): their
factors train as the ``transforms`` group and their activation-clipping logits with ``clipping``. The
Linears hold the folded weights ``W T^{-T}`` and train them directly, so a step that moves ``T`` does not
refold: recomputing ``W T^{-T}`` in every forward would keep one more full-size weight per Linear alive
until the backward, doubling the weights' share of training memory.

:func:`detach_fake_quant` folds them back (``weight_scale = scale * clip``, ``weight_zero_point =
round(rqat_zero_point)``) and restores compressed-tensors' forward, which then computes exactly what
training computed.
"""

from __future__ import annotations

import contextlib
import types
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F

from rqat_sdk.generation import wrapped_generate
from rqat_sdk.ops.fake_quant import (
    clamp_ste,
    fake_quantize_activation,
    fake_quantize_weight,
    fake_quantize_weights,
    int_range,
    quantization_levels,
    round_ste,
)
from rqat_sdk.transforms import ACTIVATION_CLIP_PARAMETER, TRANSFORM_PARAMETERS, is_transform_parameter

if TYPE_CHECKING:
    from compressed_tensors.quantization import QuantizationScheme
    from transformers import PreTrainedModel

    class QuantizedLinear(torch.nn.Linear):
        """A Linear as compressed-tensors quantized it and QAT trains it, for the type checker only: the
        attributes both attach at run time, which ``torch.nn.Module.__getattr__`` types as ``Tensor | Module``."""

        quantization_scheme: QuantizationScheme
        weight_scale: torch.nn.Parameter
        weight_zero_point: torch.Tensor
        rqat_zero_point: torch.nn.Parameter
        rqat_clip: torch.nn.Parameter
        _rqat_dtype: torch.dtype

CLIP_MIN = 0.5
_SAVED_FORWARD = "_rqat_compressed_tensors_forward"
_PRECOMPUTED = "_rqat_fake_quantized_weight"


_GROUPS = {
    "weight_scale": "scales",
    "rqat_zero_point": "scales",
    "rqat_clip": "clipping",
    ACTIVATION_CLIP_PARAMETER: "clipping",
    **dict.fromkeys(TRANSFORM_PARAMETERS, "transforms"),
}


def parameter_group(name: str) -> str:
    """The optimizer group of a parameter, by its name: ``weights``, ``scales``, ``clipping`` or ``transforms``."""
    return _GROUPS.get(name.rsplit(".", 1)[-1], "weights")


def quantized_linears(model: torch.nn.Module) -> list[tuple[str, QuantizedLinear]]:
    """Linear layers carrying a compressed-tensors weight scheme (what the PTQ stage quantized)."""
    return [
        (name, cast("QuantizedLinear", module))
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
        and getattr(getattr(module, "quantization_scheme", None), "weights", None) is not None
    ]


def attach_fake_quant(model: torch.nn.Module, *, dtype: torch.dtype, learn_scales: bool, learn_clipping: bool) -> None:
    """Make every quantized Linear train through fake quantization computed in ``dtype``."""
    layers = quantized_linears(model)
    if not layers:
        raise ValueError("the model has no quantized Linear layers; a PTQ modifier (rtn, gptq, awq) must run first")
    for _, module in layers:
        module._rqat_dtype = dtype
        setattr(module, _SAVED_FORWARD, module.__dict__.get("forward"))
        module.weight_scale.requires_grad_(learn_scales)
        if learn_scales and not module.quantization_scheme.weights.symmetric:
            module.rqat_zero_point = torch.nn.Parameter(module.weight_zero_point.detach().float())
        if learn_clipping:
            module.rqat_clip = torch.nn.Parameter(torch.ones_like(module.weight_scale, dtype=torch.float32))
        # the instance's forward shadows the class's until detach_fake_quant deletes it (mypy: a method)
        module.forward = types.MethodType(_qat_forward, module)  # type: ignore[method-assign]


def detach_fake_quant(model: torch.nn.Module) -> None:
    """Fold learned scales, zero points and clipping into the layers and restore their own forward."""
    for _, module in quantized_linears(model):
        if not hasattr(module, _SAVED_FORWARD):
            continue
        with torch.no_grad():
            module.weight_scale.data = effective_scale(module).detach().to(module.weight_scale.dtype)
            if hasattr(module, "rqat_zero_point"):
                learned = cast(torch.Tensor, effective_zero_point(module))  # not None: rqat_zero_point is set
                module.weight_zero_point.copy_(learned.to(module.weight_zero_point.dtype))
        for name in ("rqat_zero_point", "rqat_clip", "_rqat_dtype"):
            if hasattr(module, name):
                delattr(module, name)
        module.weight_scale.requires_grad_(False)
        saved = getattr(module, _SAVED_FORWARD)
        delattr(module, _SAVED_FORWARD)
        if saved is None:
            del module.forward
        else:
            module.forward = saved  # type: ignore[method-assign]  # the instance forward it had before


def finish_training(model: torch.nn.Module, *, dtype: torch.dtype, requires_grad: dict[str, bool]) -> None:
    """Leave a trained model as the exporter expects it: compressed-tensors' forward restored, parameters
    in the checkpoint ``dtype``, eval mode, the original ``requires_grad`` flags.

    Only parameters are cast: ``model.to(dtype)`` would also round fp32 buffers such as the rotary
    ``inv_freq`` to bf16, and the reloaded checkpoint (which recomputes them in fp32) would then differ.
    Online transforms stay fp32, as they are saved and reloaded.
    """
    detach_fake_quant(model)
    for name, parameter in model.named_parameters():
        if parameter.is_floating_point() and parameter.dtype != dtype and not is_transform_parameter(name):
            parameter.data = parameter.data.to(dtype)
    model.eval()
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(requires_grad.get(name, False))


QUANTIZATION_PARAMETERS = ("weight_scale", "weight_zero_point", "weight_g_idx", "rqat_zero_point", "rqat_clip")


@torch.no_grad()
def fake_quantized_weights(model: torch.nn.Module):
    """``(name, tensor)`` for every parameter a dense copy of the model needs, quantized layers' weights
    replaced by their fake-quantized values and quantization parameters left out: what a rollout engine
    serving the quantized policy in full precision must load."""
    quantized = dict(quantized_linears(model))
    for name, parameter in model.named_parameters():
        module_name, _, leaf = name.rpartition(".")
        if leaf in QUANTIZATION_PARAMETERS:
            continue
        module = quantized.get(module_name)
        if module is not None and leaf == "weight":
            args = module.quantization_scheme.weights
            dtype = getattr(module, "_rqat_dtype", parameter.dtype)
            yield name, fake_quantize_weight(
                parameter, effective_scale(module), effective_zero_point(module), args.num_bits, args.group_size, dtype
            )
        else:
            yield name, parameter.detach()


def effective_scale(module: QuantizedLinear) -> torch.Tensor:
    scale: torch.Tensor = module.weight_scale
    if hasattr(module, "rqat_clip"):
        scale = scale * clamp_ste(module.rqat_clip, CLIP_MIN, 1.0)
    return scale


def effective_zero_point(module: QuantizedLinear) -> torch.Tensor | None:
    args = module.quantization_scheme.weights
    if hasattr(module, "rqat_zero_point"):
        qmin, qmax = int_range(args.num_bits)
        return clamp_ste(round_ste(module.rqat_zero_point), qmin, qmax)
    return getattr(module, "weight_zero_point", None)


@contextlib.contextmanager
def fake_quantized_together(model: torch.nn.Module) -> Iterator[None]:
    """Inside the block, quantized Linears read weights fake-quantized up front, together: one kernel
    launch per scheme for the whole model instead of one per layer, and one for the backward.

    Run the forward and the backward inside it (a checkpointed layer recomputes its forward during the
    backward). The numbers and gradients are the per-layer ones. Sharded (FSDP2) weights are whole only while
    FSDP2 has gathered their block, so there each block quantizes its own weights together, at the start of each
    of its forwards (recomputes included), after FSDP2's gather: one launch per scheme and block, never inside a
    compiled block's graph, and the block's quantized weights held from its forward's start to its end rather
    than one layer's at a time. Quantized layers in no sharded block of ``model`` quantize their own weight.
    """
    from torch.distributed.tensor import DTensor

    named = [(name, m) for name, m in quantized_linears(model) if hasattr(m, _SAVED_FORWARD)]
    trained = [m for _, m in named]
    hooks: list[torch.utils.hooks.RemovableHandle] = []
    try:
        if any(isinstance(m.weight, DTensor) for m in trained):
            for unit, members in _by_sharded_unit(model, named).items():
                # appended after FSDP2's own pre-forward hook (which it prepends): the weights are gathered by then
                hooks.append(unit.register_forward_pre_hook(lambda _unit, _args, members=members: _precompute(members)))
                hooks.append(unit.register_forward_hook(lambda _unit, _args, _out, members=members: _release(members)))
        else:
            _precompute(trained)
        yield
    finally:
        for hook in hooks:
            hook.remove()
        _release(trained)


def _precompute(modules: list[QuantizedLinear]) -> None:
    """Fake-quantize the modules' weights, one call per scheme, for their forwards to read (a range of its own
    in a profile: ``rqat::fake_quantize_weights``)."""
    from torch.distributed.tensor import DTensor

    with torch.profiler.record_function("rqat::fake_quantize_weights"):
        sharded = [module for module in modules if isinstance(module.weight, DTensor)]
        if sharded:  # FSDP2 gathers before the hooks that call this run: its own pre-forward hook is prepended
            raise RuntimeError(f"{len(sharded)} quantized layers' weights are still sharded at their block's "
                               "forward: FSDP2 no longer gathers them before rqat's hook (a torch change?)")
        families: dict[tuple, list[tuple[QuantizedLinear, tuple]]] = defaultdict(list)
        for module in modules:
            weight, scale, zero_point, num_bits, group_size, dtype = _quantizer_inputs(module)
            key = (num_bits, group_size or weight.shape[-1], dtype, weight.dtype, scale.dtype,
                   None if zero_point is None else zero_point.dtype)
            families[key].append((module, (weight, scale, zero_point)))
        for (num_bits, group, dtype, *_), members in families.items():
            weights, scales, zero_points = zip(*(inputs for _, inputs in members), strict=True)
            shared_zero_points = None if zero_points[0] is None else list(zero_points)
            quantized = fake_quantize_weights(list(weights), list(scales), shared_zero_points, num_bits, group, dtype)
            for (module, _), tensor in zip(members, quantized, strict=True):
                setattr(module, _PRECOMPUTED, tensor)


def _release(modules: list[QuantizedLinear]) -> None:
    """Drop what :func:`_precompute` attached (autograd keeps what the backward still needs)."""
    for module in modules:
        module.__dict__.pop(_PRECOMPUTED, None)


def _by_sharded_unit(
    model: torch.nn.Module, named: list[tuple[str, QuantizedLinear]]
) -> dict[torch.nn.Module, list[QuantizedLinear]]:
    """The ``(name, module)`` Linears of ``model`` grouped by the innermost FSDP2-sharded module of ``model`` that
    holds them (whose forward gathers their weights); those in none are left out."""
    from torch.distributed.fsdp import FSDPModule

    units = {name: module for name, module in model.named_modules() if isinstance(module, FSDPModule)}
    grouped: dict[torch.nn.Module, list[QuantizedLinear]] = defaultdict(list)
    for name, module in named:
        holders = [unit for unit in units if unit == "" or name.startswith(unit + ".")]
        if holders:
            grouped[cast(torch.nn.Module, units[max(holders, key=len)])].append(module)
    return grouped


@contextlib.contextmanager
def weights_quantized_once(model: torch.nn.Module) -> Iterator[None]:
    """Inside the block (without gradients: for generation), every quantized layer reads a weight fake-quantized
    once, up front, instead of quantizing it at every forward, which in generation means at every decoded token in
    every layer. QAT's layers (:func:`attach_fake_quant`) read them from :func:`fake_quantized_together`;
    compressed-tensors' own layers hold theirs, quantized by compressed-tensors' ``forward_quantize`` and the layer
    marked compressed, which its forward reads as "the weight is already quantized" (activations are quantized as
    before). The outputs are the same; a second copy of the weights is held until the block ends."""
    with torch.no_grad(), fake_quantized_together(model), _compressed_tensors_weights_up_front(model):
        yield


def quantized_once_per_generate(model: PreTrainedModel) -> contextlib.AbstractContextManager[None]:
    """Inside the block, each ``model.generate`` call runs under :func:`weights_quantized_once`: a rollout's
    weights do not change while it decodes, so they are quantized once per call, not at every token."""

    def wrap(original: Callable[..., Any]) -> Callable[..., Any]:
        def generate(*args: Any, **kwargs: Any) -> Any:
            with weights_quantized_once(model):
                return original(*args, **kwargs)
        return generate

    return wrapped_generate(model, wrap)


@contextlib.contextmanager
def _compressed_tensors_weights_up_front(model: torch.nn.Module) -> Iterator[None]:
    from compressed_tensors.quantization import QuantizationStatus
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize

    swapped = []
    for module in model.modules():
        scheme = getattr(module, "quantization_scheme", None)
        status = getattr(module, "quantization_status", None)
        if (scheme is None or scheme.weights is None or status is None or status >= QuantizationStatus.COMPRESSED
                or not getattr(module, "quantization_enabled", True) or hasattr(module, _SAVED_FORWARD)
                or module.weight.device.type == "meta"):  # an offloaded weight is read in at each forward
            continue
        latent = module.weight.data
        module.weight.data = forward_quantize(module, latent, "weight", scheme.weights)
        module.quantization_status = QuantizationStatus.COMPRESSED
        swapped.append((module, latent, status))
    try:
        yield
    finally:
        for module, latent, status in swapped:
            module.weight.data = latent
            module.quantization_status = status


@torch.no_grad()
def grid_positions(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, u)`` for every quantized Linear under fake quantization: its latent weights measured in
    quantization steps (``w / s + z``, clamped to the integer range, in the layer's compute dtype); rounding
    ``u`` gives the codes the checkpoint will store. Under FSDP2 each rank sees its own rows."""
    from torch.distributed.tensor import DTensor

    local = lambda t: t.to_local() if isinstance(t, DTensor) else t  # noqa: E731
    for name, module in quantized_linears(model):
        if not hasattr(module, _SAVED_FORWARD):
            continue
        weight, scale, zero_point, num_bits, group_size, dtype = _quantizer_inputs(module)
        zero_point = None if zero_point is None else local(zero_point)
        u, _ = quantization_levels(local(weight), local(scale), zero_point, num_bits, group_size, dtype)
        qmin, qmax = int_range(num_bits)
        yield name, u.clamp(qmin, qmax)


def grid_margin(model: torch.nn.Module) -> dict[str, float]:
    """How far the latent weights sit from the rounding boundaries where an update flips their code, in
    quantization steps: the mean distance from the nearest grid point (0 to 0.5) and the share within 0.1
    step of a boundary. Weights spread evenly over the grid give 0.25 and 20%. A training stage whose
    updates are a fraction of a step flips only the codes near a boundary (docs/results.md)."""
    count = near = 0
    total = 0.0
    for _, u in grid_positions(model):
        distance = (u - u.round()).abs().float()
        count += distance.numel()
        total += distance.sum().item()
        near += int((distance > 0.4).sum())
    return {"mean_distance_from_grid_in_steps": round(total / max(count, 1), 4),
            "share_within_0.1_step_of_a_boundary": round(near / max(count, 1), 5)}


@contextlib.contextmanager
def tracking_codes(model: torch.nn.Module) -> Iterator[dict[str, Any]]:
    """Measure what a training stage does to the quantized weights: the yielded dict receives
    ``grid_margin_at_start``, and, when the block ends (also by an exception), ``codes_changed`` (the share
    of weight codes that differ from the start) and ``grid_margin_at_end``. The start's codes are kept on
    the CPU as int8, one byte per weight."""
    codes = {name: u.round().to(torch.int8).cpu() for name, u in grid_positions(model)}
    record: dict[str, Any] = {"grid_margin_at_start": grid_margin(model)}
    try:
        yield record
    finally:
        changed = total = 0
        for name, u in grid_positions(model):
            changed += int((codes[name] != u.round().to(torch.int8).cpu()).sum())
            total += codes[name].numel()
        record["codes_changed"] = round(changed / max(total, 1), 6)
        record["grid_margin_at_end"] = grid_margin(model)


def _quantizer_inputs(
    module: QuantizedLinear,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int, int | None, torch.dtype]:
    args = module.quantization_scheme.weights
    return (module.weight, effective_scale(module), effective_zero_point(module), args.num_bits, args.group_size,
            module._rqat_dtype)


def _qat_forward(self: QuantizedLinear, x: torch.Tensor) -> torch.Tensor:
    weight = self.__dict__.get(_PRECOMPUTED)
    if weight is None:
        weight = fake_quantize_weight(*_quantizer_inputs(self))
    if self.quantization_scheme.input_activations is not None:
        x = fake_quantize_activation(x, self.quantization_scheme.input_activations)
    if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
        x = x.to(weight.dtype)
    return F.linear(x, weight, self.bias)
