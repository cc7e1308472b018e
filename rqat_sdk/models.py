"""Loading models and tokenizers the Hugging Face way (or from a GGUF file, :mod:`rqat_sdk.gguf`), with errors
that say what is wrong, and the model state that a checkpoint's config carries beyond compressed-tensors:
KV-cache quantization (and learned online transforms, :mod:`rqat_sdk.transforms`)."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from rqat_sdk import hub
from rqat_sdk.distributed import local_device
from rqat_sdk.errors import DeviceError, ModelLoadError
from rqat_sdk.gguf import build_tokenizer, describe_gguf, is_gguf_source, load_gguf_model, resolve_gguf
from rqat_sdk.ops.kv_cache import fake_quantize_kv
from rqat_sdk.scheme import KVCacheQuant
from rqat_sdk.transforms import restore_online_transforms

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
"""The dtypes a model loads in by name, besides ``auto``."""
_HALF = (torch.bfloat16, torch.float16)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``auto``: this process's GPU (``LOCAL_RANK`` under a launcher) when there is one, else the CPU."""
    if device in (None, "auto"):
        return local_device()
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise DeviceError(f"--device {device!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"--device {device}: this machine has no CUDA device that torch can use; use --device cpu "
                          f"(or auto, which picks CUDA when there is one)")
    if resolved.type == "cuda" and (resolved.index or 0) >= torch.cuda.device_count():
        raise DeviceError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return resolved


def load_model(
    source: str | os.PathLike,
    *,
    dtype: str = "auto",
    device: torch.device | str | None = None,
    allow_quantized: bool = False,
) -> PreTrainedModel:
    """A causal LM from a local directory, a Hub id, a ``.gguf`` file or ``gguf:<name>`` (dequantized): full
    precision, unless ``allow_quantized``. ``dtype="auto"``: :func:`choose_dtype`, :func:`choose_gguf_dtype`."""
    from transformers import AutoModelForCausalLM

    if dtype != "auto" and dtype not in _DTYPES:
        raise ModelLoadError(f"dtype {dtype!r} is not one of {', '.join(['auto', *_DTYPES])}")
    target = resolve_device(device)
    if is_gguf_source(source):
        model = load_gguf_model(resolve_gguf(source), choose_gguf_dtype(dtype, target))
        return model.to(target).eval()  # type: ignore[arg-type]  # @wraps typing gap (pyproject)
    location = _check_location(source)
    config = read_config(location) if location is not None else {}
    if "quantization_config" in config and not allow_quantized:
        method = config["quantization_config"].get("quant_method", "unknown")
        raise ModelLoadError(
            f"{location} is already quantized ({method}); rqat starts from the full-precision model. "
            f"To continue an interrupted run, rerun `rqat run` with --resume and the same output directory."
        )
    chosen = choose_dtype(dtype, target, stored=_stored_dtype(config))
    try:
        model = AutoModelForCausalLM.from_pretrained(str(source), dtype=chosen)
    except OSError as exc:
        raise ModelLoadError(f"could not load model {str(source)!r}: {exc}") from None
    restore_kv_cache_quantization(model)
    restore_online_transforms(model, location)
    return model.to(target).eval()  # type: ignore[arg-type]  # @wraps typing gap (pyproject)


def load_tokenizer(source: str | os.PathLike) -> PreTrainedTokenizerBase:
    """The tokenizer of a directory, a Hub id or a GGUF (rebuilt from the file's metadata, :mod:`rqat_sdk.gguf`)."""
    from transformers import AutoTokenizer

    if is_gguf_source(source):
        return build_tokenizer(resolve_gguf(source))
    if _looks_local(source) and not Path(str(source)).expanduser().exists():
        raise ModelLoadError(f"path {str(source)!r} does not exist")
    try:
        return AutoTokenizer.from_pretrained(str(source))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"could not load a tokenizer from {str(source)!r}: {exc}. If the model has no tokenizer files, pass "
            f"one explicitly (tokenizer=, or --tokenizer of rqat run)."
        ) from None


def download_hub_model(source: str) -> hub.Snapshot | None:
    """A hub model ``ORG/NAME[@REVISION]``'s config, weights and tokenizer, downloaded at the commit the revision
    names now (:func:`rqat_sdk.hub.download_model`); None for local paths, GGUFs and ids without an org, which
    load as they are."""
    if is_gguf_source(source) or _check_location(source) is not None:
        return None
    ref = hub.parse_repo(source)
    if ref is None:
        return None
    try:
        return hub.download_model(ref)
    except hub.HubError as exc:
        raise ModelLoadError(f"could not load model {source!r}: {exc}") from None


def describe_model_source(source: str | os.PathLike, dtype: torch.dtype | None = None) -> dict[str, Any]:
    """What the run started from, for run.json: a GGUF's file, sha256, quantization type and architecture
    (and ``dtype``, what it was dequantized to); a directory's path; a Hub id."""
    if is_gguf_source(source):
        return {"source": str(source), **describe_gguf(resolve_gguf(source), dtype)}
    location = _check_location(source)
    if location is None:
        return {"source": str(source), "format": "hub"}
    return {"source": str(source), "format": "transformers", "path": str(location.resolve())}


def choose_dtype(requested: str, device: torch.device, stored: torch.dtype | None) -> torch.dtype | str:
    """The dtype to load a checkpoint saved in ``stored`` in. ``auto`` keeps the saved dtype (``"auto"`` for
    transformers), except a half dtype that ``device`` only emulates (bf16 on a CPU without native bf16 is many
    times slower than float32), which becomes float32 (logged)."""
    if requested != "auto":
        return _DTYPES[requested]
    fast, reason = fast_dtype(device)
    if stored in _HALF and fast == torch.float32:
        log.info("dtype auto: float32 instead of the checkpoint's %s (%s)", str(stored).removeprefix("torch."), reason)
        return torch.float32
    return "auto"


def choose_gguf_dtype(requested: str, device: torch.device) -> torch.dtype:
    """The dtype to dequantize a GGUF to: ``auto`` is what ``device`` computes fast (:func:`fast_dtype`),
    since the file's own weights are quantized (logged)."""
    if requested != "auto":
        return _DTYPES[requested]
    fast, reason = fast_dtype(device)
    log.info("dtype auto: %s (%s)", str(fast).removeprefix("torch."), reason)
    return fast


def fast_dtype(device: torch.device) -> tuple[torch.dtype, str]:
    """bf16 where ``device`` computes it natively (a CUDA GPU with bf16, a CPU with AVX512-BF16 or AMX), else
    float32; and the reason, for the log."""
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, f"{torch.cuda.get_device_name(device)} computes bf16 natively"
        return torch.float32, f"{torch.cuda.get_device_name(device)} has no native bf16"
    if device.type == "cpu":
        if cpu_has_native_bf16():
            return torch.bfloat16, "this CPU computes bf16 natively (AVX512-BF16 or AMX)"
        return torch.float32, "this CPU has no native bf16 (no AVX512-BF16 or AMX), so bf16 would be emulated"
    return torch.float32, f"no bf16 rule for device type {device.type!r}"


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bf16 matrix products natively here (AVX512-BF16 or AMX)."""
    try:
        return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _stored_dtype(config: dict[str, Any]) -> torch.dtype | None:
    """The dtype a saved config records (``dtype``, or ``torch_dtype`` in older files)."""
    name = config.get("dtype") or config.get("torch_dtype")
    return getattr(torch, name, None) if isinstance(name, str) else None


def check_model_source(source: str | os.PathLike) -> None:
    """Fail now, not after hours of training, on a model that cannot load: a missing path or GGUF, a directory
    without a readable config.json. Hub ids are not checked (that needs the network)."""
    if is_gguf_source(source):
        resolve_gguf(source)
    elif (location := _check_location(source)) is not None:
        read_config(location)


def read_config(directory: Path) -> dict[str, Any]:
    """A model directory's config.json, with an error naming the file when it is not a JSON object."""
    path = directory / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path} cannot be read as JSON ({exc}); the model directory is damaged") from None
    if not isinstance(config, dict):
        raise ModelLoadError(f"{path} holds {type(config).__name__}, not a JSON object; the model directory is damaged")
    return config


def _check_location(source: str | os.PathLike) -> Path | None:
    """The local directory ``source`` names, None for a Hub id; errors for paths that cannot be a model."""
    text = str(source)
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(
                f"model path {text!r} is a file but not a .gguf file; pass the directory that holds config.json, "
                f"or a .gguf file"
            )
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"model directory {text!r} has no config.json, so it is not a transformers model")
        return path
    if _looks_local(source):
        raise ModelLoadError(f"model path {text!r} does not exist")
    return None


def _looks_local(source: str | os.PathLike) -> bool:
    """Whether ``source`` is meant as a local path rather than a Hub id (``ORG/NAME``)."""
    text = str(source)
    return isinstance(source, os.PathLike) or text.startswith(("/", "./", "../", "~")) or text.count("/") > 1


KV_CACHE_CONFIG_KEY = "rqat_kv_cache"
"""The config.json entry that records a model's KV-cache quantization (the recipe's ``scheme.kv_cache``).

compressed-tensors' ``kv_cache_scheme`` cannot hold it: vLLM refuses int4 there and quantizes its int4 cache
itself (``--kv-cache-dtype int4_per_token_head``), so the checkpoint's quantization config leaves the cache
out and this entry tells rqat (and the model card's serve command) to quantize it.
"""
_KV_ATTENTION_PREFIX = "rqat_int4_kv_"


def attach_kv_cache_quantization(model: PreTrainedModel, kv_cache: KVCacheQuant) -> None:
    """Make every attention layer read keys and values as vLLM's int4 cache returns them (with STE
    gradients, so QAT trains through it), and record it in ``model.config`` for the checkpoint."""
    base = model.config._attn_implementation or "eager"
    if not base.startswith(_KV_ATTENTION_PREFIX):
        model.set_attn_implementation(_register_kv_attention(base))
    for module in model.modules():
        if _is_attention(module) and not getattr(module, "_rqat_quantizes_cache_entries", False):
            module.register_forward_pre_hook(_quantize_on_cache_entry, with_kwargs=True)
            module._rqat_quantizes_cache_entries = True  # type: ignore[assignment]  # torch: Module attributes
    setattr(model.config, KV_CACHE_CONFIG_KEY, kv_cache.model_dump())


def _is_attention(module: torch.nn.Module) -> bool:
    """transformers' attention layers: the modules that write the KV cache (``past_key_values.update``)."""
    return type(module).__name__.endswith("Attention") and hasattr(module, "layer_idx")


class _QuantizingCache:
    """The model's KV cache as one attention layer sees it: keys and values are quantized once, as they enter.

    The quantizer works on each (token, head) vector alone, so storing quantized entries gives attention the
    same keys and values as quantizing the whole cache at every step, at the cost of the new tokens only
    (re-quantizing the cache took most of W4A4KV4 generation's time on a CPU; benchmarks/kv_cache_generation_perf.py).
    """

    def __init__(self, cache: Any) -> None:
        self._cache = cache

    def update(self, key: torch.Tensor, value: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return self._cache.update(fake_quantize_kv(key), fake_quantize_kv(value), *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cache, name)


def _quantize_on_cache_entry(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """Before each attention forward: route a cache passed by keyword through :class:`_QuantizingCache`, and
    tell the attention function (through the module) whether its keys and values arrive quantized."""
    cache = kwargs.get("past_key_values")
    module._rqat_kv_quantized_in_cache = cache is not None  # type: ignore[assignment]  # torch: Module attributes
    if cache is None:
        return None
    return args, {**kwargs, "past_key_values": _QuantizingCache(cache)}


def restore_kv_cache_quantization(model: PreTrainedModel) -> None:
    """Re-attach the KV-cache quantization a loaded checkpoint's config records, if any."""
    recorded = getattr(model.config, KV_CACHE_CONFIG_KEY, None)
    if recorded:
        attach_kv_cache_quantization(model, KVCacheQuant.model_validate(recorded))


def _register_kv_attention(base: str) -> str:
    """Register an attention function that quantizes K and V, then runs ``base`` attention: once per process, as
    transformers' registry is process-wide and the function (vLLM's fixed int4 quantizer) serves every model."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    name = _KV_ATTENTION_PREFIX + base
    if name in ALL_ATTENTION_FUNCTIONS:
        return name
    if base not in ALL_MASK_ATTENTION_FUNCTIONS:
        raise ModelLoadError(
            f"KV-cache quantization does not support attention implementation {base!r}; use sdpa or eager"
        )

    def attention(module: torch.nn.Module, query, key, value, attention_mask, **kwargs: Any):
        if base == "eager":  # every transformers model file defines its own eager attention
            inner = sys.modules[type(module).__module__].eager_attention_forward
        else:
            inner = ALL_ATTENTION_FUNCTIONS[base]
        if not getattr(module, "_rqat_kv_quantized_in_cache", False):
            key, value = fake_quantize_kv(key), fake_quantize_kv(value)
        return inner(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    return name
