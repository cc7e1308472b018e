"""The recipe's one target quantization scheme.

A :class:`QuantScheme` is plain data written by users; :meth:`QuantScheme.config_groups` turns it into
compressed-tensors' ``QuantizationScheme``/``QuantizationArgs``, and those same objects are attached to the
model by the PTQ stage and written into the checkpoint's ``quantization_config``. There is no second
description of the scheme anywhere in the SDK.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import field_validator, model_validator

from rqat_sdk.errors import SchemeError
from rqat_sdk.recipe.fields import Bits, PositiveInt, StrictModel

if TYPE_CHECKING:
    import torch
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

CONFIG_GROUP = "group_0"


class WeightQuant(StrictModel):
    """Integer weight quantization."""

    num_bits: Bits
    """Bits per weight, 2 to 8."""
    group_size: PositiveInt | None = 128
    """Input columns that share one scale; null for one scale per output channel."""
    symmetric: bool = True
    """Symmetric (no zero point) or asymmetric (with an integer zero point)."""
    observer: Literal["minmax", "mse"] = "minmax"
    """How RTN and GPTQ choose scales: the min/max range, or the range that minimises squared error."""

    def to_args(self) -> QuantizationArgs:
        from compressed_tensors.quantization import QuantizationArgs

        # llmcompressor's stateless min/max observer is what its GPTQ and RTN use for weights by default.
        observer = "memoryless_minmax" if self.observer == "minmax" else "memoryless_mse"
        return QuantizationArgs(
            num_bits=self.num_bits,
            type="int",
            symmetric=self.symmetric,
            strategy="group" if self.group_size else "channel",
            group_size=self.group_size,
            observer=observer,
        )


class ActivationQuant(StrictModel):
    """Integer quantization of each targeted layer's input activations."""

    num_bits: Bits
    """Bits per activation, 2 to 8."""
    strategy: Literal["token", "group", "tensor"] = "token"
    """One scale per token, per group of channels, or per tensor."""
    group_size: PositiveInt | None = None
    """Channels per group; only with strategy 'group'."""
    symmetric: bool = True
    """Symmetric, or asymmetric with a zero point."""
    dynamic: bool = True
    """Compute scales at run time (true) or calibrate fixed scales (false)."""

    @model_validator(mode="after")
    def _group_size_matches_strategy(self) -> ActivationQuant:
        if self.strategy == "group" and self.group_size is None:
            raise ValueError("strategy 'group' needs a group_size")
        if self.strategy != "group" and self.group_size is not None:
            raise ValueError(f"group_size is only used with strategy 'group', not {self.strategy!r}")
        return self

    def to_args(self) -> QuantizationArgs:
        from compressed_tensors.quantization import QuantizationArgs

        return QuantizationArgs(
            num_bits=self.num_bits,
            type="int",
            symmetric=self.symmetric,
            strategy=self.strategy,
            group_size=self.group_size,
            dynamic=self.dynamic,
            observer=None if self.dynamic else "minmax",
        )


class KVCacheQuant(StrictModel):
    """4-bit key/value cache, as vLLM stores it with ``--kv-cache-dtype int4_per_token_head``: keys (after
    RoPE) and values rotated by a fixed randomized Hadamard transform, then quantized with one asymmetric
    scale and zero point per token and KV head, computed at run time (:mod:`rqat_sdk.ops.kv_cache`).

    vLLM reads no integer KV-cache scheme from a checkpoint (it takes fp8 there), so this one is what rqat
    trains through and exports: the checkpoint records it and the serve command asks vLLM for it.
    """

    num_bits: Literal[4] = 4
    """Bits per cached element: 4, vLLM's int4 cache."""
    strategy: Literal["token_head"] = "token_head"
    """One scale and zero point per token and KV head, computed at run time."""


def _preset(weights: dict[str, Any], activations: dict[str, Any] | None = None, kv: dict[str, Any] | None = None):
    return {"weights": weights, "input_activations": activations, "kv_cache": kv}


PRESETS: dict[str, dict[str, Any]] = {
    # Weight-only presets follow the seed paper's settings (asymmetric, as GPTQ initialises them).
    "W2G64": _preset({"num_bits": 2, "group_size": 64, "symmetric": False}),
    "W3G128": _preset({"num_bits": 3, "group_size": 128, "symmetric": False}),
    "W4G128": _preset({"num_bits": 4, "group_size": 128, "symmetric": False}),
    # llmcompressor's meaning of W4A16: symmetric 4-bit, group 128 (vLLM's Marlin kernels).
    "W4A16": _preset({"num_bits": 4, "group_size": 128, "symmetric": True}),
    "W8A8": _preset(
        {"num_bits": 8, "group_size": None, "symmetric": True}, {"num_bits": 8, "strategy": "token", "dynamic": True}
    ),
    "W4A4": _preset(
        {"num_bits": 4, "group_size": None, "symmetric": True}, {"num_bits": 4, "strategy": "token", "dynamic": True}
    ),
    # The seed paper's W4A4KV4, in the form vLLM serves: symmetric per-token activations, its int4 cache.
    "W4A4KV4": _preset(
        {"num_bits": 4, "group_size": None, "symmetric": True},
        {"num_bits": 4, "strategy": "token", "dynamic": True},
        {"num_bits": 4},
    ),
}


class QuantScheme(StrictModel):
    """What to quantize and how: weights, optionally input activations and the KV cache.

    Write it out in full, or name a preset (``scheme: W3G128``); a preset is expanded on load and the
    expanded form is what gets saved beside the checkpoint.
    """

    weights: WeightQuant
    """Weight quantization of every targeted layer."""
    input_activations: ActivationQuant | None = None
    """Input-activation quantization of every targeted layer; null for weight-only."""
    kv_cache: KVCacheQuant | None = None
    """KV-cache quantization; null to keep the cache in the model's dtype."""
    targets: list[str] = ["Linear"]
    """Layers to quantize: class names or ``re:``-prefixed regular expressions over module names."""
    ignore: list[str] = ["lm_head"]
    """Layers to leave alone, in the same syntax. Embeddings are not Linear and are never targeted."""

    @model_validator(mode="before")
    @classmethod
    def _expand_preset(cls, value: Any) -> Any:
        if isinstance(value, str):
            key = value.strip().upper()
            if key not in PRESETS:
                raise ValueError(f"unknown preset {value!r}; presets are {', '.join(PRESETS)}")
            return dict(PRESETS[key])
        return value

    @field_validator("targets")
    @classmethod
    def _targets_not_empty(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("needs at least one target")
        return value

    @model_validator(mode="after")
    def _compressed_tensors_accepts(self) -> QuantScheme:
        # compressed-tensors is the source of truth: anything it would refuse is refused here, at load time.
        self.config_groups()
        return self

    @property
    def weight_only(self) -> bool:
        return self.input_activations is None and self.kv_cache is None

    @property
    def label(self) -> str:
        """A short name such as ``W3G128``, ``W8A8`` or ``W4A4KV4``."""
        w = self.weights
        text = f"W{w.num_bits}"
        if self.input_activations is None and w.group_size:
            text += f"G{w.group_size}"
        if self.input_activations is not None:
            text += f"A{self.input_activations.num_bits}"
        if self.kv_cache is not None:
            text += f"KV{self.kv_cache.num_bits}"
        return text

    def describe(self) -> str:
        """One line for people: ``int3 weights (asymmetric, group 128); int8 activations (per token, ...)``."""
        w = self.weights
        sym = "symmetric" if w.symmetric else "asymmetric"
        grouping = f"group {w.group_size}" if w.group_size else "per channel"
        parts = [f"int{w.num_bits} weights ({sym}, {grouping})"]
        if self.input_activations is not None:
            a = self.input_activations
            scope = f"group {a.group_size}" if a.strategy == "group" else f"per {a.strategy}"
            timing = "dynamic" if a.dynamic else "static"
            asym = "symmetric" if a.symmetric else "asymmetric"
            parts.append(f"int{a.num_bits} activations ({scope}, {timing}, {asym})")
        if self.kv_cache is not None:
            parts.append(f"int{self.kv_cache.num_bits} KV cache (per token and head, dynamic, Hadamard-rotated)")
        return "; ".join(parts)

    def config_groups(self) -> dict[str, QuantizationScheme]:
        """The compressed-tensors scheme that the PTQ modifiers attach and the exporter writes."""
        from compressed_tensors.quantization import QuantizationScheme

        scheme = QuantizationScheme(
            targets=list(self.targets),
            weights=self.weights.to_args(),
            input_activations=self.input_activations.to_args() if self.input_activations else None,
        )
        return {CONFIG_GROUP: scheme}

    def targeted_modules(self, model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
        """The (name, module) pairs this scheme quantizes, as compressed-tensors matches them."""
        from compressed_tensors.utils import match_named_modules

        return list(match_named_modules(model, self.targets, self.ignore))

    def check_model(self, model: torch.nn.Module) -> None:
        """Refuse a model that this scheme cannot quantize, naming the layers at fault."""
        modules = self.targeted_modules(model)
        if not modules:
            raise SchemeError(
                f"scheme.targets {self.targets} (minus ignore {self.ignore}) match no layer of "
                f"{type(model).__name__}"
            )
        problems = []
        for label, group in (("weights", self.weights.group_size), ("input_activations", self._act_group())):
            if not group:
                continue
            bad = [(n, m.in_features) for n, m in modules if getattr(m, "in_features", 0) % group]
            if bad:
                listed = ", ".join(f"{n} (in_features={w})" for n, w in bad[:8])
                more = f" and {len(bad) - 8} more" if len(bad) > 8 else ""
                problems.append(
                    f"scheme.{label}.group_size: {group} does not divide the input width of {len(bad)} "
                    f"layer(s): {listed}{more}. Use a group size that divides every targeted layer's "
                    f"in_features, or add those layers to scheme.ignore."
                )
        if problems:
            raise SchemeError("\n".join(problems))

    def _act_group(self) -> int | None:
        return self.input_activations.group_size if self.input_activations else None
