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
from rqat_sdk.fields import Bits, PositiveInt, StrictModel

if TYPE_CHECKING:
    import torch
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

CONFIG_GROUP = "group_0"

VLLM_GROUP_SIZES = (128, 64, 32)
"""Group sizes vLLM's WNA16 kernels take on every GPU path, largest first. Marlin checks
``c.group_size not in MARLIN_SUPPORTED_GROUP_SIZES`` with ``MARLIN_SUPPORTED_GROUP_SIZES = [-1, 32, 64, 128]``
(-1: per channel) in ``vllm/model_executor/kernels/linear/mixed_precision/marlin.py`` and
``quantization/utils/marlin_utils.py``; Machete takes ``[-1, 64, 128]``; the Humming kernel (2/3/5/6/7 bits)
checks no group size. Marlin also needs each tensor-parallel shard's input width to be a multiple of it."""

GroupSizeFallback = Literal["error", "largest_divisor", "channel"]


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
    group_size_fallback: GroupSizeFallback = "error"
    """For a layer whose input width group_size does not divide: refuse the model ('error'); give that layer
    the largest of vLLM's group sizes 128/64/32 that is at most group_size and divides its width
    ('largest_divisor'); or quantize that layer per output channel ('channel'). The choice per layer is
    logged, recorded in run.json and written into the checkpoint's quantization_config."""

    @model_validator(mode="after")
    def _fallback_needs_groups(self) -> WeightQuant:
        if self.group_size is None and self.group_size_fallback != "error":
            raise ValueError("group_size_fallback is only used with a group_size (per-channel weights need none)")
        return self

    def to_args(self, group_size: int | None | Literal["scheme"] = "scheme") -> QuantizationArgs:
        """compressed-tensors' arguments, at the scheme's group size or at ``group_size`` (None: per channel)."""
        from compressed_tensors.quantization import QuantizationArgs

        group = self.group_size if group_size == "scheme" else group_size
        # llmcompressor's stateless min/max observer is what its GPTQ and RTN use for weights by default.
        observer = "memoryless_minmax" if self.observer == "minmax" else "memoryless_mse"
        return QuantizationArgs(
            num_bits=self.num_bits,
            type="int",
            symmetric=self.symmetric,
            strategy="group" if group else "channel",
            group_size=group,
            observer=observer,
        )

    def group_size_for(self, width: int) -> int | None | Literal["error"]:
        """The group size a layer of input ``width`` gets (None: per channel), or 'error' when none fits."""
        if not self.group_size or width % self.group_size == 0:
            return self.group_size
        if self.group_size_fallback == "channel":
            return None
        if self.group_size_fallback == "largest_divisor":
            fits = [g for g in VLLM_GROUP_SIZES if g <= self.group_size and width % g == 0]
            return fits[0] if fits else "error"
        return "error"


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
        if w.group_size and w.group_size_fallback != "error":
            other = "per channel" if w.group_size_fallback == "channel" else "the largest of 128/64/32 that fits"
            grouping += f", {other} where {w.group_size} does not divide a layer"
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

    def config_groups(self, model: torch.nn.Module | None = None) -> dict[str, QuantizationScheme]:
        """The compressed-tensors scheme that the PTQ modifiers attach and the exporter writes.

        Without ``model``, or when every targeted layer takes the scheme's group size, one group targets
        ``scheme.targets``. When some layers of ``model`` need another group size
        (:meth:`group_size_fallbacks`), there is one group per group size and every group lists its layers
        by name: vLLM matches a fused layer (qkv_proj, gate_up_proj) by class name before it tries the
        names of its parts, so a class-name target would win over a by-name exception.
        """
        from compressed_tensors.quantization import QuantizationScheme

        def group(targets: list[str], weights: QuantizationArgs) -> QuantizationScheme:
            acts = self.input_activations.to_args() if self.input_activations else None
            return QuantizationScheme(targets=targets, weights=weights, input_activations=acts)

        if model is None or not (fallbacks := self.group_size_fallbacks(model)):
            return {CONFIG_GROUP: group(list(self.targets), self.weights.to_args())}
        by_size: dict[int | None, list[str]] = {}
        for name, _ in self.targeted_modules(model):
            by_size.setdefault(fallbacks.get(name, self.weights.group_size), []).append(name)
        return {
            f"group_{i}": group(names, self.weights.to_args(size)) for i, (size, names) in enumerate(by_size.items())
        }

    def group_size_fallbacks(self, model: torch.nn.Module) -> dict[str, int | None]:
        """Targeted layers of ``model`` that take another group size than ``weights.group_size``, by name:
        the group size each gets (None: per output channel), as ``weights.group_size_fallback`` chose it.
        Empty when the scheme's group size divides every layer (or fallback is 'error': see check_model)."""
        chosen = {name: self.weights.group_size_for(width) for name, width in self._input_widths(model)}
        return {name: size for name, size in chosen.items() if size != self.weights.group_size and size != "error"}

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
        problems = [p for p in (self._weight_group_problem(model), self._activation_group_problem(modules)) if p]
        if problems:
            raise SchemeError("\n".join(problems))

    def _weight_group_problem(self, model: torch.nn.Module) -> str | None:
        w = self.weights
        bad = [(n, width) for n, width in self._input_widths(model) if w.group_size_for(width) == "error"]
        if not bad:
            return None
        fix = (
            "set scheme.weights.group_size_fallback to 'channel'"
            if w.group_size_fallback == "largest_divisor"
            else "set scheme.weights.group_size_fallback to 'largest_divisor' or 'channel'"
        )
        return (
            f"scheme.weights.group_size: {w.group_size} does not divide the input width of {len(bad)} layer(s)"
            f"{' and no smaller vLLM group size (64, 32) does' if w.group_size_fallback == 'largest_divisor' else ''}: "
            f"{_listed(bad)}. Use a group size that divides every targeted layer's in_features, {fix}, "
            f"or add those layers to scheme.ignore."
        )

    def _activation_group_problem(self, modules: list[tuple[str, torch.nn.Module]]) -> str | None:
        group = self._act_group()
        widths = [(n, getattr(m, "in_features", 0)) for n, m in modules]
        bad = [(n, width) for n, width in widths if group and width % group]
        if not bad:
            return None
        return (
            f"scheme.input_activations.group_size: {group} does not divide the input width of {len(bad)} "
            f"layer(s): {_listed(bad)}. Use a group size that divides every targeted layer's in_features, "
            f"or add those layers to scheme.ignore."
        )

    def _input_widths(self, model: torch.nn.Module) -> list[tuple[str, int]]:
        """``(name, in_features)`` of the targeted layers that have an input width."""
        modules = self.targeted_modules(model)
        return [(n, width) for n, m in modules if isinstance(width := getattr(m, "in_features", None), int)]

    def _act_group(self) -> int | None:
        return self.input_activations.group_size if self.input_activations else None


def _listed(layers: list[tuple[str, int]]) -> str:
    listed = ", ".join(f"{n} (in_features={w})" for n, w in layers[:8])
    return listed + (f" and {len(layers) - 8} more" if len(layers) > 8 else "")
