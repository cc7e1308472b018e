"""FlatQuant's layer-wise calibration: learn each decoder layer's affine transforms and clipping factors.

For every decoder layer in turn (Sun et al., 2024, arXiv 2410.09426):

1. its inputs on the calibration set come from the float model (the first layer's are captured from a
   forward pass, each later layer's are the previous float layer's outputs), and its float outputs are the
   targets;
2. transforms (:class:`~rqat_sdk.transforms.KroneckerTransform`) go in front of the Linears that share an
   input (q/k/v, gate/up) and of o_proj and down_proj, plus a weight-clipping logit per quantization group
   of every quantized Linear of the layer;
3. AdamW with cosine decay trains them to minimise the MSE between the targets and the layer's output with
   transformed, fake-quantized activations and weights (the weights folded as ``W T^{-T}`` at every step,
   one layer's worth of temporary copies at a time);
4. the transforms' inverses are folded into the weights for good, the weights are clamped to their learned
   clipped ranges (so the quantizing modifier that follows reads the clipped scales from them), and the
   transforms stay in front of their Linears as online transforms.

The layer runs in float32 while it is calibrated, whatever the model's dtype.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import types
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F

from rqat_sdk.ops.affine_transform import CLIP_LOGIT_INIT, clamp_to_clipped_range, clip_factor, clipped_weight_qparams
from rqat_sdk.ops.fake_quant import fake_quantize_activation, fake_quantize_weight
from rqat_sdk.transforms import KroneckerTransform, attach_online_transform, input_transform

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedModel

    from rqat_sdk.scheme import QuantScheme

log = logging.getLogger(__name__)

TRANSFORM_INPUTS: dict[str, tuple[str, ...]] = {
    "qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "o": ("self_attn.o_proj",),
    "gate_up": ("mlp.gate_proj", "mlp.up_proj"),
    "down": ("mlp.down_proj",),
}
"""Each transform and the Linears (relative to a decoder layer) whose common input it transforms."""
_WEIGHT_CLIP = "rqat_weight_clip_logit"


@dataclass(frozen=True)
class CalibrationOptions:
    transforms: tuple[str, ...]
    epochs: int
    learning_rate: float
    orthogonal_init: bool
    smoothing: bool
    weight_clipping: bool
    activation_clipping: bool
    seed: int


def decoder_layers(model: PreTrainedModel) -> tuple[str, torch.nn.ModuleList]:
    """The decoder's layer list and its module name in ``model``."""
    decoder = model.get_decoder()
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ValueError(f"flatquant needs a decoder with a `layers` list; {type(decoder).__name__} has none")
    prefix = next(name for name, module in model.named_modules() if module is layers)
    return prefix, layers


def check_layers(model: PreTrainedModel, scheme: QuantScheme, transforms: tuple[str, ...]) -> None:
    """Refuse a model whose decoder layers lack a Linear a transform feeds, or leave it unquantized."""
    prefix, layers = decoder_layers(model)
    targeted = {name for name, _ in scheme.targeted_modules(model)}
    for index, layer in enumerate(layers):
        for key in transforms:
            for relative in TRANSFORM_INPUTS[key]:
                name = f"{prefix}.{index}.{relative}"
                module = layer.get_submodule(relative) if _has_submodule(layer, relative) else None
                if not isinstance(module, torch.nn.Linear):
                    raise ValueError(
                        f"flatquant transform {key!r} feeds {relative}, which decoder layer {prefix}.{index} "
                        f"({type(layer).__name__}) does not have; flatquant supports Llama-style layers"
                    )
                if name not in targeted:
                    raise ValueError(
                        f"flatquant transform {key!r} feeds {name}, which the scheme does not quantize "
                        f"(scheme.targets/ignore); drop {key!r} from the modifier's transforms"
                    )


def _has_submodule(module: torch.nn.Module, name: str) -> bool:
    try:
        module.get_submodule(name)
    except AttributeError:
        return False
    return True


def calibrate(
    model: PreTrainedModel, calibration: Dataset, scheme: QuantScheme, options: CalibrationOptions
) -> list[dict[str, Any]]:
    """Calibrate, fold and attach every decoder layer's transforms; per layer, the output MSE of the
    quantized layer without transforms (``mse_before``) and with the learned ones (``mse_after``)."""
    prefix, layers = decoder_layers(model)
    targeted = {name for name, _ in scheme.targeted_modules(model)}
    weight_args = scheme.weights.to_args()
    activation_args = scheme.input_activations.to_args() if scheme.input_activations is not None else None
    generator = torch.Generator().manual_seed(options.seed)
    inputs, kwargs = _first_layer_inputs(model, calibration)
    metrics = []
    for index, layer in enumerate(layers):
        name = f"{prefix}.{index}"
        quantized = {n: m for n, m in layer.named_modules()
                     if f"{name}.{n}" in targeted and isinstance(m, torch.nn.Linear)}
        with _in_float32(layer):
            with torch.no_grad():
                targets = [_layer(layer, x, kw) for x, kw in zip(inputs, kwargs, strict=True)]
            with _quantized_forward(quantized, weight_args, activation_args):
                before = _mse(layer, inputs, kwargs, targets)
                trained = _add_trainables(model, name, layer, quantized, options, generator, weight_args)
                _train(layer, inputs, kwargs, targets, trained, options, generator)
                after = _mse(layer, inputs, kwargs, targets)
            _fold(quantized, weight_args)
        metrics.append({"layer": name, "mse_before": before, "mse_after": after})
        log.info("flatquant %s: quantized output MSE %.4g without transforms, %.4g with", name, before, after)
        if after >= before:
            log.warning(
                "flatquant %s: the learned transforms did not lower the layer's quantized output error (%.4g -> %.4g); "
                "more epochs or calibration samples may help", name, before, after,
            )
        inputs = targets
    return metrics


class _Captured(Exception):
    """Stops the forward pass once the first decoder layer's inputs are recorded."""


def _first_layer_inputs(model: PreTrainedModel, data: Dataset) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """The first decoder layer's hidden states and keyword arguments for each example, in float32.

    One example per forward pass: no padding, so no attention mask to carry.
    """
    _, layers = decoder_layers(model)
    inputs: list[torch.Tensor] = []
    kwargs: list[dict[str, Any]] = []

    def record(module: torch.nn.Module, args: tuple, keywords: dict[str, Any]) -> None:
        keywords = dict(keywords)
        hidden = args[0] if args else keywords.pop("hidden_states")
        inputs.append(hidden.detach().float())
        kwargs.append({k: _float32(v) for k, v in keywords.items() if k not in ("past_key_values", "use_cache")})
        raise _Captured

    device = next(model.parameters()).device
    handle = layers[0].register_forward_pre_hook(record, with_kwargs=True)
    try:
        with torch.no_grad():
            for ids in data["input_ids"]:
                with contextlib.suppress(_Captured):
                    model(input_ids=torch.tensor([ids], device=device), use_cache=False)
    finally:
        handle.remove()
    return inputs, kwargs


def _float32(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.detach().float()
    if isinstance(value, tuple):
        return tuple(_float32(v) for v in value)
    return value


@contextlib.contextmanager
def _in_float32(layer: torch.nn.Module) -> Iterator[None]:
    """Run ``layer`` in float32, then give its own parameters back their dtype (the transforms stay float32)."""
    dtypes = {name: p.dtype for name, p in layer.named_parameters()}
    layer.float()
    try:
        yield
    finally:
        for name, parameter in layer.named_parameters():
            if name in dtypes:
                parameter.data = parameter.data.to(dtypes[name])


def _layer(layer: torch.nn.Module, x: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    out = layer(x, **kwargs)
    return out[0] if isinstance(out, tuple) else out


@contextlib.contextmanager
def _quantized_forward(linears: dict[str, torch.nn.Linear], weight_args: Any, activation_args: Any) -> Iterator[None]:
    """Inside the block, ``linears`` fake-quantize their (transformed) inputs and folded, clipped weights."""
    saved = {name: module.__dict__.get("forward") for name, module in linears.items()}
    forward = functools.partial(_calibration_forward, weight_args=weight_args, activation_args=activation_args)
    for module in linears.values():
        # the instance's forward shadows the class's until the block ends (mypy: a method)
        module.forward = types.MethodType(forward, module)  # type: ignore[method-assign]
    try:
        yield
    finally:
        for name, module in linears.items():
            if (forward_before := saved[name]) is None:
                del module.forward
            else:
                module.forward = forward_before  # type: ignore[method-assign]  # the instance forward it had


def _calibration_forward(
    self: torch.nn.Linear, x: torch.Tensor, *, weight_args: Any, activation_args: Any
) -> torch.Tensor:
    weight = self.weight
    transform = input_transform(self)
    if transform is not None:  # its pre-hook has transformed x; the layer is not quantized yet, so clip here
        weight = transform.fold(weight)
        if activation_args is not None:
            x = transform.clip(x, activation_args)
    if activation_args is not None:
        x = fake_quantize_activation(x, activation_args)
    clip_logit = getattr(self, _WEIGHT_CLIP, None)
    factor = clip_factor(clip_logit) if clip_logit is not None else torch.ones((), device=weight.device)
    scale, zero_point = clipped_weight_qparams(weight, factor, weight_args)
    weight = fake_quantize_weight(weight, scale, zero_point, weight_args.num_bits, weight_args.group_size)
    return F.linear(x, weight, self.bias)


def _add_trainables(
    model: PreTrainedModel,
    name: str,
    layer: torch.nn.Module,
    quantized: dict[str, torch.nn.Linear],
    options: CalibrationOptions,
    generator: torch.Generator,
    weight_args: Any,
) -> list[torch.nn.Parameter]:
    """Attach the layer's transforms and weight-clipping logits; the parameters to train."""
    device = next(layer.parameters()).device
    trained: list[torch.nn.Parameter] = []
    for key in options.transforms:
        members = TRANSFORM_INPUTS[key]
        transform = KroneckerTransform(
            cast(torch.nn.Linear, layer.get_submodule(members[0])).in_features,
            smoothing=options.smoothing,
            activation_clipping=options.activation_clipping,
            orthogonal=options.orthogonal_init,
            generator=generator,
        ).to(device)
        attach_online_transform(model, name, key, transform, [f"{name}.{m}" for m in members])
        trained += list(transform.parameters())
    if options.weight_clipping:
        for module in quantized.values():
            groups = module.in_features // (weight_args.group_size or module.in_features)
            logit = torch.full((module.out_features, groups), CLIP_LOGIT_INIT, device=device)
            setattr(module, _WEIGHT_CLIP, torch.nn.Parameter(logit))
            trained.append(getattr(module, _WEIGHT_CLIP))
    return trained


def _train(
    layer: torch.nn.Module,
    inputs: list[torch.Tensor],
    kwargs: list[dict[str, Any]],
    targets: list[torch.Tensor],
    trained: list[torch.nn.Parameter],
    options: CalibrationOptions,
    generator: torch.Generator,
) -> None:
    learned = {id(p) for p in trained}
    frozen = [p for p in layer.parameters() if id(p) not in learned and p.requires_grad]
    for parameter in frozen:
        parameter.requires_grad_(False)
    optimizer = torch.optim.AdamW(trained, lr=options.learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=options.epochs * len(inputs))
    try:
        with torch.enable_grad():
            for _ in range(options.epochs):
                for i in torch.randperm(len(inputs), generator=generator).tolist():
                    loss = F.mse_loss(_layer(layer, inputs[i], kwargs[i]), targets[i])
                    loss.backward()
                    optimizer.step()
                    schedule.step()
                    optimizer.zero_grad(set_to_none=True)
    finally:
        for parameter in frozen:
            parameter.requires_grad_(True)


@torch.no_grad()
def _mse(
    layer: torch.nn.Module, inputs: list[torch.Tensor], kwargs: list[dict[str, Any]], targets: list[torch.Tensor]
) -> float:
    """The mean squared error of the quantized layer's outputs, over every token of the calibration set."""
    total = sum(F.mse_loss(_layer(layer, x, kw), t, reduction="sum").item()
                for x, kw, t in zip(inputs, kwargs, targets, strict=True))
    return total / sum(t.numel() for t in targets)


@torch.no_grad()
def _fold(linears: dict[str, torch.nn.Linear], weight_args: Any) -> None:
    """Fold each transform's inverse into its Linears' weights and clamp them to the learned clipped range."""
    for module in linears.values():
        transform = input_transform(module)
        weight = transform.fold(module.weight) if transform is not None else module.weight
        clip_logit = getattr(module, _WEIGHT_CLIP, None)
        if clip_logit is not None:
            weight = clamp_to_clipped_range(weight, clip_factor(clip_logit), weight_args)
            delattr(module, _WEIGHT_CLIP)
        module.weight.data = weight.to(module.weight.dtype)
