"""Decoding without copies of the KV cache: a cache written in place, and decode-step attention over grouped heads.

transformers' dynamic cache grows every layer's keys and values by ``torch.cat`` at every decoded token, so each
step copies the whole cache (read and write) on top of attention reading it; at rollout batch sizes (hundreds of
sequences of a thousand tokens) that copy is most of a decoding step's memory traffic. Its static cache writes in
place but hands attention its full preallocated length, and transformers compiles the forward for it on GPUs.
:class:`PreallocatedCache` writes in place and hands attention a view of the filled prefix only: the tokens are
those of the dynamic cache, without the copy and without compiling.

With grouped-query attention and a padding mask (rollouts of prompts of different lengths), transformers' SDPA
path also expands the keys and values to one copy per query head at every layer and step (``repeat_kv``).
:func:`grouped_decode_attention` has a one-token decoding step read the cache as it is instead: the query heads
that share a key/value head become that head's rows (:func:`grouped_decode_sdpa`), which is the same attention.

For decoding replayed from a CUDA graph (:mod:`rqat_sdk.cuda_graph_decoding`), :meth:`PreallocatedCache.write_at`
switches the cache to fixed shapes after the prefill: each step writes at a position held on the device and
attention reads the whole buffers under a full-length mask.

This file is the one contact with transformers' cache, attention and generation internals (``CacheLayerMixin``,
``Cache(layers=...)``, ``get_layer_types_and_kwargs``, the SDPA attention and mask functions and their
registries, ``generate``'s config resolution; verified against :data:`VERIFIED_VERSION`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin, get_layer_types_and_kwargs
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask

from rqat_sdk.upstream import require_verified

log = logging.getLogger(__name__)

VERIFIED_VERSION = "5.17.0"
"""The transformers release whose cache classes this file was checked against (pyproject.toml pins it)."""


class PreallocatedLayer(CacheLayerMixin):
    """One attention layer's keys and values in buffers of a fixed capacity, allocated at the first (prefill)
    update from its batch size, heads, dtype and device; ``keys``/``values`` are views of the filled prefix
    (``[batch, kv_heads, length, head_dim]``), what the dynamic cache would hold. A step beyond the capacity grows
    the buffers once (a copy and a warning): a wrong capacity costs speed, never correctness."""

    is_compileable = False  # generate neither compiles the forward nor builds a full-length mask for it
    is_sliding = False

    def __init__(self, max_new_tokens: int) -> None:
        super().__init__()
        self.max_new_tokens = max_new_tokens
        self.length = 0
        self.write_index: torch.Tensor | None = None
        """Set by :meth:`PreallocatedCache.write_at`: updates then write here and return the whole buffers."""
        self.key_buffer = torch.empty(0)
        self.value_buffer = torch.empty(0)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        batch, heads, prefill, _ = key_states.shape
        capacity = prefill + self.max_new_tokens
        self.key_buffer = key_states.new_empty((batch, heads, capacity, key_states.shape[-1]))
        self.value_buffer = value_states.new_empty((batch, heads, capacity, value_states.shape[-1]))
        self.length = 0
        self._refresh_views()
        self.is_initialized = True

    def _refresh_views(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.keys = keys = self.key_buffer[:, :, : self.length]
        self.values = values = self.value_buffer[:, :, : self.length]
        return keys, values

    def _grow(self, needed: int) -> None:
        capacity = max(needed, 2 * self.key_buffer.shape[-2])
        log.warning("KV cache: %d tokens exceed its capacity of %d; growing it to %d (one copy)",
                    needed, self.key_buffer.shape[-2], capacity)
        for name in ("key_buffer", "value_buffer"):
            old = getattr(self, name)
            new = old.new_empty((*old.shape[:2], capacity, old.shape[-1]))
            new[:, :, : self.length].copy_(old[:, :, : self.length])
            setattr(self, name, new)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if self.write_index is not None:  # fixed shapes, for a captured step: the position is read on the device
            self.key_buffer.index_copy_(2, self.write_index, key_states)
            self.value_buffer.index_copy_(2, self.write_index, value_states)
            return self.key_buffer, self.value_buffer
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start, end = self.length, self.length + key_states.shape[-2]
        if end > self.key_buffer.shape[-2]:
            self._grow(end)
        self.key_buffer[:, :, start:end].copy_(key_states)
        self.value_buffer[:, :, start:end].copy_(value_states)
        self.length = end
        return self._refresh_views()

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0  # the mask covers the filled prefix, as the dynamic cache's does

    def get_seq_length(self) -> int:
        return self.length  # a Python int: no device sync

    def get_max_length(self) -> int:
        return self.key_buffer.shape[-2] if self.is_initialized else -1

    def reset(self) -> None:
        self.length = 0
        if self.is_initialized:
            self._refresh_views()

    def crop(self, max_length: int) -> None:
        """Keep the first ``max_length`` tokens; a negative value drops that many (transformers' convention)."""
        self.length = max(self.length + max_length if max_length < 0 else min(max_length, self.length), 0)
        if self.is_initialized:
            self._refresh_views()

    def _reindex(self, select: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Batch reshuffles (beam search): the buffers are rebuilt once."""
        if self.is_initialized:
            self.key_buffer, self.value_buffer = select(self.key_buffer), select(self.value_buffer)
            self._refresh_views()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._reindex(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._reindex(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._reindex(lambda t: t[indices])


class PreallocatedCache(Cache):
    """One :class:`PreallocatedLayer` per decoder layer of ``config``, each sized for its prompt plus
    ``max_new_tokens``. Full attention only: a model with sliding-window or chunked layers (Gemma 3) is
    refused with its layer types. Pass a fresh one to each ``generate`` call as ``past_key_values``."""

    def __init__(self, config: Any, *, max_new_tokens: int) -> None:
        require_verified("transformers", VERIFIED_VERSION, "rqat_sdk/preallocated_cache.py (PreallocatedCache)")
        super().__init__(layers=[PreallocatedLayer(max_new_tokens) for _ in range(check_full_attention(config))])

    def write_at(self, index: torch.Tensor) -> None:
        """After the prefill: every layer writes each update's one token at ``index`` (a one-element device
        tensor the caller advances) and returns its whole buffers, which attention must then read under a mask
        of their full length. The unwritten tail is zeroed first: a masked entry weighs nothing, but garbage
        there (a NaN) would still poison the weighted sum."""
        for layer in self.layers:
            if not isinstance(layer, PreallocatedLayer) or not layer.is_initialized:
                raise RuntimeError("write_at needs a cache the prefill has filled")
            layer.key_buffer[:, :, layer.length:].zero_()
            layer.value_buffer[:, :, layer.length:].zero_()
            layer.write_index = index


def check_full_attention(config: Any, implementation: str = "preallocated") -> int:
    """The number of cached layers of ``config``; refuses, naming them and the cache ``implementation`` asked
    for, the layer types :class:`PreallocatedCache` cannot hold (sliding-window or chunked attention keep only a
    window of tokens). Runs call it before their work, not at their first rollout."""
    layer_types, _ = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
    others = sorted(set(layer_types) - {"full_attention"})
    if others:
        raise ValueError(f"cache_implementation {implementation} needs full attention in every layer; "
                         f"{getattr(config, 'model_type', 'this model')} has {', '.join(others)} layers: "
                         f"use cache_implementation dynamic")
    return len(layer_types)


def attention_implementation(model: Any) -> str:
    """The name of the attention implementation ``model`` runs (transformers keeps it in a private field)."""
    return str(model.config._attn_implementation)


def reads_sdpa_masks(model: Any) -> bool:
    """Whether ``model``'s attention takes the boolean masks transformers builds for SDPA (its own SDPA, the
    grouped decode attention below, or an implementation registered with SDPA's mask function)."""
    return ALL_MASK_ATTENTION_FUNCTIONS.get(attention_implementation(model)) is sdpa_mask


def resolved_generation_config(model: Any, generation_config: Any, kwargs: dict[str, Any]) -> tuple[Any, set[str]]:
    """The generation config a ``generate(generation_config=..., **kwargs)`` call runs with (the call's, then the
    model's, then transformers' defaults), and the names of the non-None ``kwargs`` that are not generation
    options (model inputs, logits processors, stopping criteria, streamers)."""
    require_verified("transformers", VERIFIED_VERSION, "rqat_sdk/preallocated_cache.py (resolved_generation_config)")
    config, model_kwargs = model._prepare_generation_config(generation_config, **kwargs)
    return config, {name for name, value in model_kwargs.items() if value is not None}


GROUPED_SDPA = "rqat_grouped_sdpa"
"""The attention implementation :func:`grouped_decode_attention` switches a model to (registered below)."""


def grouped_decode_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                        **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention, except for a one-token step with a mask under grouped-query attention: the
    query heads that share a key/value head (``repeat_kv``'s order: head ``i`` reads key/value head
    ``i // groups``) attend as that head's rows, so the cache is read as it is, not expanded per query head."""
    batch, heads, length, width = query.shape
    kv_heads = key.shape[1]
    if length != 1 or attention_mask is None or kv_heads == heads or dropout or kwargs.get("position_bias") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    grouped = query.reshape(batch, kv_heads, heads // kv_heads, width)
    mask = attention_mask[:, :, -1:, : key.shape[-2]]  # the one query row's mask, shared by every head
    output = F.scaled_dot_product_attention(grouped, key, value, attn_mask=mask, scale=scaling)
    return output.reshape(batch, heads, 1, width).transpose(1, 2), None


AttentionInterface.register(GROUPED_SDPA, grouped_decode_sdpa)
AttentionMaskInterface.register(GROUPED_SDPA, sdpa_mask)  # the masks SDPA gets


@contextlib.contextmanager
def grouped_decode_attention(model: Any) -> Iterator[None]:
    """Inside the block, a model on transformers' ``sdpa`` attention runs :func:`grouped_decode_sdpa`; any other
    implementation is left alone. The model's own implementation is restored after (training forwards, a GRPO
    policy's log-probabilities, run on it)."""
    require_verified("transformers", VERIFIED_VERSION, "rqat_sdk/preallocated_cache.py (grouped_decode_attention)")
    implementation = model.config._attn_implementation
    if implementation != "sdpa":
        yield
        return
    model.set_attn_implementation(GROUPED_SDPA)
    try:
        yield
    finally:
        model.set_attn_implementation(implementation)
