"""Post-training quantization modifiers: the initialisation step of Reasoning-QAT.

Each attaches the recipe's scheme (compressed-tensors scales and zero points) to the model through
llmcompressor; the algorithms live there and the calls live in :mod:`.llmcompressor_adapter`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import field_validator
from safetensors import safe_open

from rqat_sdk.errors import SchemeError
from rqat_sdk.fields import FloatRange, IntRange
from rqat_sdk.models import attach_kv_cache_quantization
from rqat_sdk.modifiers.base import Modifier
from rqat_sdk.modifiers.ptq import llmcompressor_adapter as adapter
from rqat_sdk.modifiers.ptq.flatquant import CalibrationOptions, calibrate, check_layers

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from rqat_sdk.recipe.recipe import Position, Recipe
    from rqat_sdk.session.state import SessionState

log = logging.getLogger(__name__)

ROTATION_ARCHITECTURES = ("LlamaForCausalLM", "Qwen3ForCausalLM")
"""Architectures whose float output the rotation modifier leaves unchanged (tested). llmcompressor 0.14's
SpinQuant maps LlamaForCausalLM and Cohere2MoeForCausalLM by name (``spinquant/mappings.py``; Cohere2-MoE
needs its experts linearised first) and gives every other class Llama's module names and norm placement.
Gemma 3 does not fit that: its scaled embedding is an Embedding subclass that compressed-tensors refuses to
transform (NotImplementedError), and its norms on the attention and MLP outputs sit inside the residual
stream, where R1 cannot be fused."""


RANDOM_HADAMARD_HINT = "; transform_type 'random-hadamard' takes it"


class _Quantizer(Modifier):
    quantizes = True

    def initialize(self, state: SessionState) -> None:
        state.scheme.check_model(state.model)
        fallbacks = state.scheme.group_size_fallbacks(state.model)
        if fallbacks:
            log.info(
                "scheme.weights.group_size_fallback %r: %d layer(s) take another group size than %s: %s",
                state.scheme.weights.group_size_fallback, len(fallbacks), state.scheme.weights.group_size,
                ", ".join(f"{name}={size or 'channel'}" for name, size in fallbacks.items()),
            )
            state.stage_metrics["group_size_fallbacks"] = fallbacks

    def _record(self, state: SessionState, calibration: dict[str, Any]) -> None:
        state.stage_metrics[self.type] = {"calibration": calibration}

    def _seed(self, state: SessionState) -> int:
        return state.recipe.seed + state.stage_index

    def finalize(self, state: SessionState) -> None:
        # The KV cache is quantized at run time, so there is nothing to calibrate: attention starts reading
        # it quantized from here on, through every later stage and into the checkpoint.
        if state.scheme.kv_cache is not None:
            attach_kv_cache_quantization(state.model, state.scheme.kv_cache)


class RTNModifier(_Quantizer):
    """Round-to-nearest. Data-free for weight-only and dynamic-activation schemes."""

    type: Literal["rtn"] = "rtn"

    def apply(self, state: SessionState) -> None:
        scheme = state.scheme
        static_scales = scheme.input_activations is not None and not scheme.input_activations.dynamic
        calibration = state.stage_data() if static_scales else None
        record = adapter.quantize_rtn(state.model, state.tokenizer, scheme, calibration, seed=self._seed(state))
        self._record(state, record)


class GPTQModifier(_Quantizer):
    """GPTQ (Frantar et al., 2022): the seed paper's initialisation for low-bit weight-only QAT."""

    type: Literal["gptq"] = "gptq"
    needs_data = True
    block_size: Annotated[int, IntRange(1, None)] = 128
    """Columns quantized together before their error is propagated."""
    dampening_frac: Annotated[float, FloatRange(0.0, 1.0)] = 0.01
    """Fraction of the Hessian's mean diagonal added to its diagonal for numerical stability."""
    actorder: Literal["static", "group", "weight"] | None = "static"
    """Activation ordering: quantize columns in order of decreasing Hessian diagonal; null keeps the
    natural order."""

    def apply(self, state: SessionState) -> None:
        calibration = adapter.quantize_gptq(
            state.model,
            state.tokenizer,
            state.scheme,
            state.stage_data(),
            seed=self._seed(state),
            block_size=self.block_size,
            dampening_frac=self.dampening_frac,
            actorder=self.actorder,
        )
        self._record(state, calibration)


def min_awq_grid(duo_scaling: bool | Literal["both"]) -> int:
    """The fewest grid points llmcompressor's AWQ search takes: it spaces its ratios by ``n_grid - 2`` (duo
    scaling, after the identity), ``n_grid - 1`` (activations only) or ``n_grid // 2 - 1`` (both), and fewer
    points divide by zero mid-calibration."""
    if duo_scaling == "both":
        return 4
    return 3 if duo_scaling else 2


class AWQModifier(_Quantizer):
    """AWQ (Lin et al., 2023) scale search followed by round-to-nearest; weight-only schemes."""

    type: Literal["awq"] = "awq"
    needs_data = True
    duo_scaling: bool | Literal["both"] = True
    """Use activations and weights (true), activations only (false), or try both, to set the scales."""
    n_grid: Annotated[int, IntRange(1, 1000)] = 20
    """Grid points searched per layer group."""

    def check(self, recipe: Recipe, at: Position) -> list[str]:
        problems = []
        if not recipe.scheme.weight_only:
            problems.append(
                f"{at.path}: awq is weight-only; scheme {recipe.scheme.label} quantizes activations or the KV cache"
            )
        if self.n_grid < (least := min_awq_grid(self.duo_scaling)):
            problems.append(f"{at.path}.n_grid: {self.n_grid} is too small with duo_scaling {self.duo_scaling}; use "
                            f"at least {least}")
        return problems

    def apply(self, state: SessionState) -> None:
        unbalanced = adapter.awq_unbalanced_layers(state.model)
        if unbalanced:
            kinds = sorted({name.rpartition(".")[2] for name in unbalanced})
            log.warning(
                "awq: llmcompressor's mappings for %s balance no scales for %d layers (%s): they take plain "
                "round-to-nearest, which can cost far more than AWQ at low bits; gptq quantizes every layer from "
                "its calibration data", type(state.model).__name__, len(unbalanced), ", ".join(kinds),
            )
        calibration = adapter.quantize_awq(
            state.model,
            state.tokenizer,
            state.scheme,
            state.stage_data(),
            seed=self._seed(state),
            duo_scaling=self.duo_scaling,
            n_grid=self.n_grid,
        )
        self._record(state, calibration)
        state.stage_metrics[self.type]["unbalanced_layers"] = unbalanced


class RotationModifier(Modifier):
    """Hadamard rotations fused into the weights (SpinQuant R1/R2), to spread outliers before quantizing."""

    type: Literal["rotation"] = "rotation"
    rotations: list[Literal["R1", "R2"]] = ["R1", "R2"]
    """R1 rotates the residual stream, R2 the attention value/output projections."""
    transform_type: Literal["hadamard", "random-hadamard"] = "hadamard"
    """A fixed Hadamard matrix, or one with random sign flips."""
    randomize: bool = False
    """Draw a fresh random matrix per layer instead of sharing one (not implemented by llmcompressor 0.14)."""

    @field_validator("rotations")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("needs at least one of R1, R2")
        if len(set(value)) != len(value):
            raise ValueError(f"lists a rotation twice: {value}")
        return value

    def check(self, recipe: Recipe, at: Position) -> list[str]:
        problems = []
        quantizer = recipe.quantizer_position()
        if quantizer is not None and quantizer < at:
            problems.append(f"{at.path}: rotation must come before the quantizing modifier at {quantizer.path}")
        if self.randomize:
            problems.append(f"{at.path}.randomize: llmcompressor 0.14's SpinQuant does not implement it; set false")
        shape = _local_model_shape(recipe.model)
        if shape is not None:
            problems += [f"{at.path}: {p} (recipe.model {recipe.model})" for p in self._model_problems(*shape)]
        return problems

    def initialize(self, state: SessionState) -> None:
        from compressed_tensors.utils import get_head_dim

        config = state.model.config
        problems = self._model_problems(type(state.model).__name__, config.hidden_size, get_head_dim(config))
        if problems:
            raise SchemeError("; ".join(problems))
        quantizer = state.recipe.quantizer_position()
        following = dict(state.recipe.positions()).get(quantizer) if quantizer is not None else None
        if following is not None and following.type == "rtn" and (silenced := silenced_norm_channels(state.model)):
            name, channel, gain, median = silenced[0]
            model = state.original_model if isinstance(state.original_model, (str, Path)) else None
            model = f"{model or config._name_or_path or 'this model'} ({type(state.model).__name__})"
            raise SchemeError(
                f"rotation followed by rtn would wreck {model}: {len(silenced)} of its RMSNorm layers nearly "
                f"silence some residual channels (e.g. {name} channel {channel}: gain {gain:.2g}, median "
                f"{median:.2g}). Rotating needs those gains fused into the next Linears, and the rotation then "
                f"spreads RTN's data-blind rounding error over every channel, including the silenced ones, where "
                f"such models carry their largest activations; every layer's weight error falls, yet the model's "
                f"output degrades far more than under rtn alone. Use rtn without rotation, or gptq after the "
                f"rotation (docs/models.md, 'Rotation on pretrained models', measures it)"
            )

    def _model_problems(self, architecture: str, hidden_size: int, head_dim: int) -> list[str]:
        """Why this rotation cannot run on a model of ``architecture`` with these widths (empty if it can)."""
        problems = []
        if architecture not in ROTATION_ARCHITECTURES:
            problems.append(
                f"the rotation modifier does not support {architecture}; it supports "
                f"{', '.join(ROTATION_ARCHITECTURES)}"
            )
        sizes = {"R1": ("hidden_size", hidden_size), "R2": ("head_dim", head_dim)}
        for rotation in self.rotations:
            field, size = sizes[rotation]
            if not hadamard_exists(size, self.transform_type):
                need = "a power of two" if self.transform_type == "hadamard" else "a known Hadamard size x 2^n"
                problems.append(
                    f"the rotation modifier's {rotation} ({self.transform_type}) cannot rotate {architecture}'s "
                    f"{field} {size}: it must be {need}"
                    + (RANDOM_HADAMARD_HINT if hadamard_exists(size, "random-hadamard") else "")
                )
        return problems

    def apply(self, state: SessionState) -> None:
        adapter.rotate_spinquant(
            state.model,
            state.tokenizer,
            rotations=list(self.rotations),
            transform_type=self.transform_type,
            randomize=self.randomize,
        )


SILENCED_GAIN = 0.01
"""A norm gain below this fraction of its layer's median gain counts as silencing its channel."""


def silenced_norm_channels(model: PreTrainedModel) -> list[tuple[str, int, float, float]]:
    """The RMSNorms that R1 fuses into quantized Linears (each block's input and post-attention norms) whose
    smallest gain is below :data:`SILENCED_GAIN` of their median: ``(name, channel, gain, median |gain|)``,
    most silenced first. Trained models use such gains to mute the residual channels that hold their massive
    activations (SmolLM2-135M: channels 507 and 247, about half the normalised input's energy); a model that
    was never trained has gains of one."""
    found = []
    for name, module in model.named_modules():
        is_norm = name.endswith(("input_layernorm", "post_attention_layernorm"))
        if not is_norm or getattr(module, "weight", None) is None:
            continue
        gains = module.weight.detach().float().abs()
        median = float(gains.median())
        channel = int(gains.argmin())
        if median > 0 and float(gains[channel]) < SILENCED_GAIN * median:
            found.append((name, channel, float(module.weight.detach()[channel]), median))
    return sorted(found, key=lambda row: abs(row[2]) / row[3])


def hadamard_exists(size: int, transform_type: str) -> bool:
    """Whether compressed-tensors can build a ``transform_type`` Hadamard matrix of ``size``: 'hadamard'
    needs a power of two; 'random-hadamard' a size k * 2**m for a k whose matrix it ships (12, 20, 36, ...)."""
    from compressed_tensors.transform.utils.hadamard import REPO_PATH, is_pow2

    if transform_type == "hadamard":
        return is_pow2(size)
    with safe_open(REPO_PATH, framework="pt") as known:
        return any(size % int(k) == 0 and is_pow2(size // int(k)) for k in known.keys())


def _local_model_shape(model: str | None) -> tuple[str, int, int] | None:
    """(architecture, hidden_size, head_dim) from a local model directory's config.json, if there is one."""
    config_file = Path(model) / "config.json" if model else None
    if config_file is None or not config_file.is_file():
        return None
    config = json.loads(config_file.read_text())
    architectures, hidden = config.get("architectures") or [], config.get("hidden_size")
    heads = config.get("num_attention_heads")
    head_dim = config.get("head_dim") or (hidden // heads if hidden and heads else None)
    if not architectures or not hidden or not head_dim:
        return None
    return architectures[0], hidden, head_dim


class FlatQuantModifier(Modifier):
    """FlatQuant (Sun et al., 2024): learned affine transforms and clipping, calibrated layer by layer.

    Each decoder layer gets invertible transforms (a per-channel scale and a Kronecker product of two
    small matrices) in front of its Linears, trained on the calibration set to minimise the layer's
    quantized output error; their inverses are folded into the weights and the transforms run at inference
    (docs/flatquant.md). Put it before the quantizing modifier, which quantizes the folded weights.
    vLLM has no path for the online transforms: the checkpoint runs in this SDK (fake quantization).
    """

    type: Literal["flatquant"] = "flatquant"
    needs_data = True
    transforms: list[Literal["qkv", "o", "gate_up", "down"]] = ["qkv", "o", "gate_up", "down"]
    """Which inputs get a transform: q/k/v's (one shared), o_proj's, gate/up's (one shared), down_proj's."""
    init: Literal["orthogonal", "identity"] = "orthogonal"
    """Start the Kronecker factors as random orthogonal matrices (seeded) or as identities."""
    smoothing: bool = True
    """Learn a per-channel scale in front of each Kronecker product."""
    weight_clipping: bool = True
    """Learn a clipping factor per weight quantization group; the weights are clamped to it after calibration."""
    activation_clipping: bool = True
    """Learn a clipping factor per transform for the activations it feeds to the quantizer."""
    epochs: Annotated[int, IntRange(1, None)] = 15
    """Passes over the calibration set per decoder layer."""
    learning_rate: Annotated[float, FloatRange(0.0, 1.0)] = 5e-3
    """Peak AdamW learning rate of the transforms and clipping factors (cosine decay to zero)."""

    @field_validator("transforms")
    @classmethod
    def _distinct_transforms(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("needs at least one of qkv, o, gate_up, down")
        if len(set(value)) != len(value):
            raise ValueError(f"lists a transform twice: {value}")
        return value

    def check(self, recipe: Recipe, at: Position) -> list[str]:
        problems = []
        quantizer = recipe.quantizer_position()
        if quantizer is not None and quantizer < at:
            problems.append(f"{at.path}: flatquant must come before the quantizing modifier at {quantizer.path}")
        activations = recipe.scheme.input_activations
        if activations is None or not activations.dynamic:
            problems.append(
                f"{at.path}: flatquant learns transforms for activation quantization and needs dynamic activation "
                f"scales; scheme {recipe.scheme.label} has {'none' if activations is None else 'static ones'} "
                f"(for weight-only schemes use rotation, gptq or awq)"
            )
        for other_at, other in recipe.positions():
            if other.type == "flatquant" and other_at < at:
                problems.append(f"{at.path}: flatquant already runs at {other_at.path}; a recipe applies it once")
            if other.type == "rotation" and at < other_at:
                problems.append(f"{other_at.path}: rotation must come before flatquant at {at.path}")
            if at < other_at and getattr(other, "generation", "transformers") != "transformers":
                problems.append(
                    f"{other_at.path}.generation: vLLM cannot run flatquant's online transforms; use 'transformers'"
                )
        if recipe.export.unservable == "refuse":
            problems.append(
                f"{at.path}: vLLM has no path for flatquant's online transforms, and export.unservable is 'refuse'; "
                f"set export.unservable: warn"
            )
        return problems

    def warnings(self, recipe: Recipe, at: Position) -> list[str]:
        return [
            f"{at.path}: vLLM cannot serve flatquant's online transforms; the checkpoint runs in rqat's evaluator "
            f"(transformers, fake quantization)"
        ]

    def initialize(self, state: SessionState) -> None:
        try:
            check_layers(state.model, state.scheme, tuple(self.transforms))
        except ValueError as exc:
            raise SchemeError(str(exc)) from None
        if state.scheme.group_size_fallbacks(state.model):
            raise SchemeError(
                "flatquant calibrates every layer at one weight group size, and scheme.weights.group_size_fallback "
                "gives some layers another; use a group size that divides every layer"
            )

    def apply(self, state: SessionState) -> None:
        options = CalibrationOptions(
            transforms=tuple(self.transforms),
            epochs=self.epochs,
            learning_rate=self.learning_rate,
            orthogonal_init=self.init == "orthogonal",
            smoothing=self.smoothing,
            weight_clipping=self.weight_clipping,
            activation_clipping=self.activation_clipping,
            seed=state.recipe.seed + state.stage_index,
        )
        layers = calibrate(state.model, state.stage_data(), state.scheme, options)
        state.stage_metrics[self.type] = {"layers": layers}
