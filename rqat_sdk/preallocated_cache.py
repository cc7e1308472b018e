"""A KV cache for transformers' ``generate`` that allocates each layer's keys and values once and writes in place.

transformers' dynamic cache grows every layer's keys and values by ``torch.cat`` at every decoded token, so each
step copies the whole cache (read and write) on top of attention reading it; at rollout batch sizes (hundreds of
sequences of a thousand tokens) that copy is most of a decoding step's memory traffic. Its static cache writes in
place but hands attention its full preallocated length, and transformers compiles the forward for it on GPUs.
:class:`PreallocatedCache` writes in place and hands attention a view of the filled prefix only: the tokens are
those of the dynamic cache, without the copy and without compiling.

This file is the one contact with transformers' cache internals (``CacheLayerMixin``, ``Cache(layers=...)`` and
``get_layer_types_and_kwargs``, verified against :data:`VERIFIED_VERSION`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, get_layer_types_and_kwargs

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


def check_full_attention(config: Any) -> int:
    """The number of cached layers of ``config``; refuses, naming them, the layer types :class:`PreallocatedCache`
    cannot hold (sliding-window or chunked attention keep only a window of tokens). Runs call it before their
    work, not at their first rollout."""
    layer_types, _ = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
    others = sorted(set(layer_types) - {"full_attention"})
    if others:
        raise ValueError(f"cache_implementation preallocated needs full attention in every layer; "
                         f"{getattr(config, 'model_type', 'this model')} has {', '.join(others)} layers: "
                         f"use cache_implementation dynamic")
    return len(layer_types)
