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
