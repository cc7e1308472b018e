"""Decoding without copies: PreallocatedCache decodes the dynamic cache's tokens, writes in place and never
concatenates the cache; grouped decode attention gives SDPA's tokens without expanding the cache per head."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import (
    DynamicCache,
    Gemma3TextConfig,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from rqat_sdk.generation import preallocated_kv_cache
from rqat_sdk.modifiers.layers import quantized_once_per_generate
from rqat_sdk.preallocated_cache import PreallocatedCache, PreallocatedLayer, grouped_decode_attention

NEW = 24
RETURNS = 2
PROMPT = 10


def tiny(kind: str):
    common = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=512, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = (Qwen3ForCausalLM(Qwen3Config(**common, tie_word_embeddings=True)) if kind == "qwen3"
             else LlamaForCausalLM(LlamaConfig(**common)))
    model.generation_config.eos_token_id = None  # every sequence decodes all NEW tokens
    model.generation_config.pad_token_id = 0
    return model.eval()


def prompts(padded: bool) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(1, 256, (3, PROMPT), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    if padded:  # left padding, as trl and rqat_sdk.generation batch prompts
        mask[0, :4] = 0
        mask[2, :2] = 0
        ids[mask == 0] = 0
    return ids, mask


def run(model, cache, *, padded: bool, sample: bool) -> torch.Tensor:
    ids, mask = prompts(padded)
    torch.manual_seed(123)
    # transformers refuses num_return_sequences > 1 without sampling: greedy is top_k=1
    settings = dict(max_new_tokens=NEW, min_new_tokens=NEW, num_return_sequences=RETURNS, do_sample=True,
                    temperature=1.0, **({"top_k": 0, "top_p": 0.9} if sample else {"top_k": 1}))
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, **settings)


class SequenceConcatenations(TorchDispatchMode):
    """Counts ``aten.cat`` along the sequence dimension of 4-D tensors: the dynamic cache's growth (rotary
    embeddings also concatenate 4-D tensors, along the last dimension, and are not counted)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten.cat.default:
            tensors, dim = args[0], (args[1] if len(args) > 1 else kwargs.get("dim", 0))
            self.count += bool(tensors) and tensors[0].dim() == 4 and dim in (2, -2)
        return func(*args, **kwargs)


@pytest.mark.parametrize("kind", ["qwen3", "llama"])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("sample", [False, True])
def test_the_same_tokens_as_the_dynamic_cache(kind, padded, sample):
    model = tiny(kind)
    reference = run(model, DynamicCache(config=model.config), padded=padded, sample=sample)
    cache = PreallocatedCache(model.config, max_new_tokens=NEW)
    out = run(model, cache, padded=padded, sample=sample)
    assert out.shape == (3 * RETURNS, PROMPT + NEW)
    assert torch.equal(out, reference)
    assert cache.get_seq_length() == PROMPT + NEW - 1  # generate feeds every token but the last sampled one
    assert cache.layers[0].get_max_length() == PROMPT + NEW


def test_written_in_place_and_never_concatenated(monkeypatch):
    model = tiny("qwen3")
    seen: list[tuple[int, int, int, int, int]] = []
    update = PreallocatedLayer.update

    def recording(self, *args, **kwargs):
        keys, values = update(self, *args, **kwargs)
        seen.append((self.key_buffer.data_ptr(), self.value_buffer.data_ptr(), keys.data_ptr(), values.data_ptr(),
                     keys.shape[-2]))
        return keys, values

    monkeypatch.setattr(PreallocatedLayer, "update", recording)
    with SequenceConcatenations() as cats:
        run(model, PreallocatedCache(model.config, max_new_tokens=NEW), padded=True, sample=True)
    layers = model.config.num_hidden_layers
    assert len(seen) == layers * NEW  # the prefill and NEW - 1 decoding steps, per layer
    for layer in range(layers):
        steps = seen[layer::layers]
        assert len({step[:2] for step in steps}) == 1, "a buffer was reallocated"
        assert all(step[2] == step[0] and step[3] == step[1] for step in steps), "attention got a copy, not a view"
        assert [step[4] for step in steps] == list(range(PROMPT, PROMPT + NEW))  # only the filled prefix
    assert cats.count == 0

    with SequenceConcatenations() as cats:
        run(model, DynamicCache(config=model.config), padded=True, sample=True)
    assert cats.count == 2 * layers * (NEW - 1)  # keys and values, every layer, every decoding step


def test_a_capacity_too_small_grows_once_and_keeps_the_tokens(caplog):
    model = tiny("qwen3")
    reference = run(model, DynamicCache(config=model.config), padded=True, sample=False)
    out = run(model, PreallocatedCache(model.config, max_new_tokens=2), padded=True, sample=False)
    assert torch.equal(out, reference)
    assert "exceed its capacity" in caplog.text


def test_trl_style_rollouts_under_both_generate_wrappers(monkeypatch):
    """trl's GRPOTrainer calls ``generate(input_ids=, attention_mask=, generation_config=)`` with each group
    repeated in the batch; GRPO's rollouts wrap it twice (weights quantized once, and this cache): the same
    tokens, through the preallocated cache, and both wrappers are undone after."""
    model = tiny("qwen3")  # unquantized: test_grpo runs both wrappers on a quantized policy
    ids, mask = (t.repeat_interleave(RETURNS, 0) for t in prompts(padded=True))
    config = GenerationConfig(max_new_tokens=NEW, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                              pad_token_id=0, eos_token_id=None, disable_compile=True)
    torch.manual_seed(5)
    with torch.no_grad():
        reference = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    updates = []
    update = PreallocatedLayer.update
    monkeypatch.setattr(PreallocatedLayer, "update",
                        lambda self, *a, **k: updates.append(self) or update(self, *a, **k))
    with quantized_once_per_generate(model), preallocated_kv_cache(model, NEW), torch.no_grad():
        torch.manual_seed(5)
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    assert "generate" not in model.__dict__ and model.config._attn_implementation == "sdpa"
    assert torch.equal(out, reference)
    assert len(updates) == model.config.num_hidden_layers * NEW
    assert updates[0].get_max_length() == PROMPT + NEW


def test_sliding_window_models_are_refused_by_name():
    config = Gemma3TextConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8)
    with pytest.raises(ValueError, match="gemma3_text has sliding_attention layers: use cache_implementation dynamic"):
        PreallocatedCache(config, max_new_tokens=NEW)


@pytest.mark.parametrize("kind", ["qwen3", "llama"])
def test_grouped_decode_attention_gives_sdpas_tokens_without_expanding_the_cache(kind, monkeypatch):
    """Left-padded prompts (a mask at every step) under grouped-query attention (4 query heads, 2 key/value
    heads): transformers' SDPA expands keys and values per query head at every layer and step; the grouped
    decoding step does not, and decodes the same tokens. The model's own attention comes back after."""
    from transformers.integrations import sdpa_attention

    model = tiny(kind)
    expansions = []
    repeat_kv = sdpa_attention.repeat_kv
    monkeypatch.setattr(sdpa_attention, "repeat_kv", lambda *a: expansions.append(1) or repeat_kv(*a))
    reference = run(model, DynamicCache(config=model.config), padded=True, sample=False)
    layers = model.config.num_hidden_layers
    assert len(expansions) == 2 * layers * NEW  # keys and values, every layer, prefill and every step
    expansions.clear()
    with grouped_decode_attention(model):
        assert model.config._attn_implementation == "rqat_grouped_sdpa"
        out = run(model, PreallocatedCache(model.config, max_new_tokens=NEW), padded=True, sample=False)
    assert torch.equal(out, reference)
    assert len(expansions) == 2 * layers  # the prefill only
    assert model.config._attn_implementation == "sdpa"


def test_grouped_decode_attention_leaves_other_implementations_alone():
    model = tiny("qwen3")
    model.set_attn_implementation("eager")
    with grouped_decode_attention(model):
        assert model.config._attn_implementation == "eager"
    assert model.config._attn_implementation == "eager"
