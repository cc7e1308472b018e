"""Post-training quantization modifiers: the initialisation step of Reasoning-QAT.

Each attaches the recipe's scheme (compressed-tensors scales and zero points) to the model through
llmcompressor; the algorithms live there and the calls live in :mod:`.llmcompressor_adapter`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import field_validator

from rqat_sdk.models import attach_kv_cache_quantization
from rqat_sdk.modifiers.base import Modifier
from rqat_sdk.modifiers.ptq import llmcompressor_adapter as adapter
from rqat_sdk.recipe.fields import FloatRange, IntRange

if TYPE_CHECKING:
    from rqat_sdk.recipe.recipe import Position, Recipe
    from rqat_sdk.session.state import SessionState


class _Quantizer(Modifier):
    quantizes = True

    def initialize(self, state: SessionState) -> None:
        state.scheme.check_model(state.model)

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
        adapter.quantize_rtn(state.model, state.tokenizer, scheme, calibration)


class GPTQModifier(_Quantizer):
    """GPTQ (Frantar et al., 2022): the seed paper's initialisation for low-bit weight-only QAT."""

    type: Literal["gptq"] = "gptq"
    needs_data = True
    block_size: IntRange(1, None) = 128
    """Columns quantized together before their error is propagated."""
    dampening_frac: FloatRange(0.0, 1.0) = 0.01
    """Fraction of the Hessian's mean diagonal added to its diagonal for numerical stability."""
    actorder: Literal["static", "group", "weight"] | None = "static"
    """Activation ordering: quantize columns in order of decreasing Hessian diagonal; null keeps the
    natural order."""

    def apply(self, state: SessionState) -> None:
        adapter.quantize_gptq(
            state.model,
            state.tokenizer,
            state.scheme,
            state.stage_data(),
            block_size=self.block_size,
            dampening_frac=self.dampening_frac,
            actorder=self.actorder,
        )


class AWQModifier(_Quantizer):
    """AWQ (Lin et al., 2023) scale search followed by round-to-nearest; weight-only schemes."""

    type: Literal["awq"] = "awq"
    needs_data = True
    duo_scaling: bool | Literal["both"] = True
    """Use activations and weights (true), activations only (false), or try both, to set the scales."""
    n_grid: IntRange(1, 1000) = 20
    """Grid points searched per layer group."""

    def check(self, recipe: Recipe, at: Position) -> list[str]:
        if not recipe.scheme.weight_only:
            return [f"{at.path}: awq is weight-only; scheme {recipe.scheme.label} quantizes activations or the KV cache"]
        return []

    def apply(self, state: SessionState) -> None:
        adapter.quantize_awq(
            state.model,
            state.tokenizer,
            state.scheme,
            state.stage_data(),
            duo_scaling=self.duo_scaling,
            n_grid=self.n_grid,
        )


class RotationModifier(Modifier):
    """Hadamard rotations fused into the weights (SpinQuant R1/R2), to spread outliers before quantizing."""

    type: Literal["rotation"] = "rotation"
    rotations: list[Literal["R1", "R2"]] = ["R1", "R2"]
    """R1 rotates the residual stream, R2 the attention value/output projections."""
    transform_type: Literal["hadamard", "random-hadamard"] = "hadamard"
    """A fixed Hadamard matrix, or one with random sign flips."""
    randomize: bool = False
    """Draw a fresh random matrix per layer instead of sharing one."""

    @field_validator("rotations")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("needs at least one of R1, R2")
        if len(set(value)) != len(value):
            raise ValueError(f"lists a rotation twice: {value}")
        return value

    def check(self, recipe: Recipe, at: Position) -> list[str]:
        quantizer = recipe.quantizer_position()
        if quantizer is not None and quantizer < at:
            return [f"{at.path}: rotation must come before the quantizing modifier at {quantizer.path}"]
        return []

    def apply(self, state: SessionState) -> None:
        adapter.rotate_spinquant(
            state.model,
            state.tokenizer,
            rotations=list(self.rotations),
            transform_type=self.transform_type,
            randomize=self.randomize,
        )


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
    epochs: IntRange(1, None) = 15
    """Passes over the calibration set per decoder layer."""
    learning_rate: FloatRange(0.0, 1.0) = 5e-3
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
        from rqat_sdk.errors import SchemeError
        from rqat_sdk.modifiers.ptq.flatquant import check_layers

        try:
            check_layers(state.model, state.scheme, tuple(self.transforms))
        except ValueError as exc:
            raise SchemeError(str(exc)) from None

    def apply(self, state: SessionState) -> None:
        from rqat_sdk.modifiers.ptq.flatquant import CalibrationOptions, calibrate

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
