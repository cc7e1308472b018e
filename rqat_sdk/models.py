"""Loading models and tokenizers the Hugging Face way, with errors that say what is wrong, and the model
state that a checkpoint's config carries beyond compressed-tensors: KV-cache quantization (and learned online
transforms, :mod:`rqat_sdk.transforms`)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from rqat_sdk.errors import ModelLoadError
from rqat_sdk.transforms import restore_online_transforms

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from rqat_sdk.recipe.scheme import KVCacheQuant

_DTYPES = {"auto": "auto", "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``auto``: this process's GPU (``LOCAL_RANK`` under a launcher) when there is one, else the CPU."""
    if device in (None, "auto"):
        from rqat_sdk.distributed import local_device

        return local_device()
    return torch.device(device)


def load_model(
    source: str | os.PathLike,
    *,
    dtype: str = "auto",
    device: torch.device | str | None = None,
    allow_quantized: bool = False,
) -> PreTrainedModel:
    """A causal LM from a local directory or a Hub id: full precision, unless ``allow_quantized``."""
    from transformers import AutoModelForCausalLM

    if dtype not in _DTYPES:
        raise ModelLoadError(f"dtype {dtype!r} is not one of {', '.join(_DTYPES)}")
    location = _check_location(source)
    if location is not None and not allow_quantized:
        config = json.loads((location / "config.json").read_text())
        if "quantization_config" in config:
            method = config["quantization_config"].get("quant_method", "unknown")
            raise ModelLoadError(
                f"{location} is already quantized ({method}); rqat starts from the full-precision model. "
                f"To continue an interrupted run, pass resume=True (rqat run --resume) with the same output directory."
            )
    try:
        model = AutoModelForCausalLM.from_pretrained(str(source), dtype=_DTYPES[dtype])
    except OSError as exc:
        raise ModelLoadError(f"could not load model {str(source)!r}: {exc}") from None
    restore_kv_cache_quantization(model)
    restore_online_transforms(model, location)
    return model.to(resolve_device(device)).eval()


def load_tokenizer(source: str | os.PathLike) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(source))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"could not load a tokenizer from {str(source)!r}: {exc}. Pass tokenizer= (or --tokenizer) explicitly."
        ) from None


def _check_location(source: str | os.PathLike) -> Path | None:
    """The local directory ``source`` names, None for a Hub id; errors for paths that cannot be a model."""
    text = str(source)
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"model path {text!r} is a file; pass the directory that holds config.json")
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"model directory {text!r} has no config.json, so it is not a transformers model")
        return path
    looks_local = isinstance(source, os.PathLike) or text.startswith(("/", "./", "../", "~")) or text.count("/") > 1
    if looks_local:
        raise ModelLoadError(f"model path {text!r} does not exist")
    return None


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
            module._rqat_quantizes_cache_entries = True
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
        from rqat_sdk.ops.kv_cache import fake_quantize_kv

        return self._cache.update(fake_quantize_kv(key), fake_quantize_kv(value), *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cache, name)


def _quantize_on_cache_entry(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """Before each attention forward: route a cache passed by keyword through :class:`_QuantizingCache`, and
    tell the attention function (through the module) whether its keys and values arrive quantized."""
    cache = kwargs.get("past_key_values")
    module._rqat_kv_quantized_in_cache = cache is not None
    if cache is None:
        return None
    return args, {**kwargs, "past_key_values": _QuantizingCache(cache)}


def restore_kv_cache_quantization(model: PreTrainedModel) -> None:
    """Re-attach the KV-cache quantization a loaded checkpoint's config records, if any."""
    recorded = getattr(model.config, KV_CACHE_CONFIG_KEY, None)
    if recorded:
        from rqat_sdk.recipe.scheme import KVCacheQuant

        attach_kv_cache_quantization(model, KVCacheQuant.model_validate(recorded))


def _register_kv_attention(base: str) -> str:
    """Register (once) an attention function that quantizes K and V, then runs ``base`` attention."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    name = _KV_ATTENTION_PREFIX + base
    if name in AttentionInterface._global_mapping:
        return name
    if base not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        raise ModelLoadError(f"KV-cache quantization does not support attention implementation {base!r}; use sdpa or eager")

    def attention(module: torch.nn.Module, query, key, value, attention_mask, **kwargs: Any):
        from rqat_sdk.ops.kv_cache import fake_quantize_kv

        if base == "eager":  # every transformers model file defines its own eager attention
            inner = sys.modules[type(module).__module__].eager_attention_forward
        else:
            inner = AttentionInterface._global_mapping[base]
        if not getattr(module, "_rqat_kv_quantized_in_cache", False):
            key, value = fake_quantize_kv(key), fake_quantize_kv(value)
        return inner(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS._global_mapping[base])
    return name
