"""Decoding replayed from a CUDA graph, on the CPU (the same steps, eager): generate's greedy tokens, padding and
trimming; transformers' warpers' scores; samples drawn with the warped distribution; the calls it hands back to
generate, and the models it refuses."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LogitsProcessorList,
    MinNewTokensLengthLogitsProcessor,
    Qwen3Config,
    Qwen3ForCausalLM,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

import rqat_sdk
from rqat_sdk.cuda_graph_decoding import (
    STOP_CHECK_EVERY,
    DecodingSettings,
    _Decoder,
    choose_tokens,
    decode,
    decoding_settings,
    graph_decoding_problem,
    warp_logits,
)
from rqat_sdk.generation import cuda_graph_decoding
from rqat_sdk.modifiers.layers import attach_fake_quant, quantized_once_per_generate
from rqat_sdk.preallocated_cache import PreallocatedLayer, resolved_generation_config

NEW = 20
PROMPT = 9


def tiny(kind: str = "qwen3", attention: str = "sdpa", width: int = 64):
    common = dict(vocab_size=256, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=width // 4, max_position_embeddings=512,
                  attn_implementation=attention)
    torch.manual_seed(0)
    model = (Qwen3ForCausalLM(Qwen3Config(**common, tie_word_embeddings=True)) if kind == "qwen3"
             else LlamaForCausalLM(LlamaConfig(**common)))
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.eval()


def prompts(rows: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(1, 256, (rows, PROMPT), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding, as trl and rqat_sdk.generation batch prompts
    mask[-1, :2] = 0
    ids[mask == 0] = 0
    return ids, mask


def greedy_reference(model, ids, mask, **options) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, do_sample=False, **options)


@pytest.mark.parametrize("kind", ["qwen3", "llama"])
def test_greedy_tokens_are_generates(kind):
    model = tiny(kind)
    ids, mask = prompts()
    reference = greedy_reference(model, ids, mask, max_new_tokens=NEW)
    out = decode(model, ids, mask, DecodingSettings(max_new_tokens=NEW, greedy=True))
    assert out.shape == (3, PROMPT + NEW)
    assert torch.equal(out, reference)


def test_raw_logits_are_generates():
    """``return_dict_in_generate`` with ``output_logits``: each step's logits before warping, as generate keeps
    them (what a greedy check compares where tokens differ)."""
    model = tiny()
    ids, mask = prompts()
    reference = greedy_reference(model, ids, mask, max_new_tokens=NEW, return_dict_in_generate=True,
                                 output_logits=True)
    with cuda_graph_decoding(model), torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
                             return_dict_in_generate=True, output_logits=True)
    assert torch.equal(out.sequences, reference.sequences) and len(out.logits) == NEW
    torch.testing.assert_close(torch.stack(out.logits), torch.stack(reference.logits))


def test_end_of_sequence_pads_and_trims_as_generate_does():
    """A row that ends is padded after its end token while the others decode on; ``min_new_tokens`` bars the
    end token before it."""
    model = tiny()
    ids, mask = prompts()
    free = greedy_reference(model, ids, mask, max_new_tokens=NEW)[:, PROMPT:]
    stop = int(free[1, 0])  # row 1's first token ends it; the other rows never emit it
    for minimum in (0, 7):
        reference = greedy_reference(model, ids, mask, max_new_tokens=NEW, eos_token_id=stop, pad_token_id=3,
                                     min_new_tokens=minimum)
        out = decode(model, ids, mask, DecodingSettings(max_new_tokens=NEW, greedy=True, eos_token_ids=(stop,),
                                                        pad_token_id=3, min_new_tokens=minimum))
        assert torch.equal(out, reference)
        assert (reference[1, PROMPT + max(minimum, 1):] == 3).all() != bool(minimum)


def test_warped_scores_are_transformers_processors():
    scores = torch.randn(6, 256, generator=torch.Generator().manual_seed(2)) * 3
    eos = torch.tensor([5, 9])
    settings = DecodingSettings(max_new_tokens=8, min_new_tokens=4, temperature=0.7, top_k=40, top_p=0.9,
                                eos_token_ids=(5, 9))
    reference = LogitsProcessorList([
        MinNewTokensLengthLogitsProcessor(prompt_length_to_skip=3, min_new_tokens=4, eos_token_id=[5, 9]),
        TemperatureLogitsWarper(0.7), TopKLogitsWarper(40), TopPLogitsWarper(0.9),
    ])
    for generated in (2, 4):
        ids = torch.zeros((6, 3 + generated), dtype=torch.long)
        expected = reference(ids, scores.clone())
        got = warp_logits(scores.clone(), settings, torch.tensor(generated), eos)
        assert torch.equal(torch.isinf(got), torch.isinf(expected))
        torch.testing.assert_close(got, expected)


def test_samples_follow_the_warped_distribution():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    scores = probs.log().expand(200_000, 4).clone()
    torch.manual_seed(0)
    tokens = choose_tokens(scores, DecodingSettings(max_new_tokens=1))
    frequencies = torch.bincount(tokens, minlength=4).float() / len(tokens)
    torch.testing.assert_close(frequencies, probs, atol=0.005, rtol=0)
    removed = scores.clone()
    removed[:, 0] = float("-inf")
    assert (choose_tokens(removed[:1000], DecodingSettings(max_new_tokens=1)) != 0).all()


def test_generate_calls_decode_through_it_with_the_weights_quantized_once(monkeypatch):
    """trl's call (``generate(input_ids=, attention_mask=, generation_config=)`` with the group repeated) on a
    fake-quantized policy: decoded by the loop, with every cache update writing at the device-held position after
    the prefill, under the once-per-call weights; greedy tokens are generate's. Both wrappers come off after."""
    rtn = {"version": 1, "scheme": "W3G128", "stages": [{"name": "ptq", "modifiers": [{"type": "rtn"}]}]}
    model = rqat_sdk.oneshot(tiny(width=128), rtn, tokenizer=SimpleNamespace(pad_token_id=0, chat_template=None)).model
    attach_fake_quant(model, dtype=torch.float32, learn_scales=False, learn_clipping=False)
    ids, mask = prompts()
    # transformers refuses num_return_sequences > 1 without sampling: greedy is top_k=1
    config = GenerationConfig(max_new_tokens=NEW, do_sample=True, top_k=1, num_return_sequences=2, pad_token_id=0,
                              eos_token_id=None, disable_compile=True)
    with quantized_once_per_generate(model), torch.no_grad():
        reference = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    writes = []
    update = PreallocatedLayer.update
    monkeypatch.setattr(PreallocatedLayer, "update",
                        lambda self, *a, **k: writes.append(self.write_index is not None) or update(self, *a, **k))
    with cuda_graph_decoding(model), quantized_once_per_generate(model), torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    assert "generate" not in model.__dict__
    assert torch.equal(out, reference)
    layers = model.config.num_hidden_layers
    assert writes == [False] * layers + [True] * layers * (NEW - 1)


def test_what_the_loop_does_not_implement_goes_to_generate(caplog):
    model = tiny()
    ids, mask = prompts()
    with cuda_graph_decoding(model), torch.no_grad(), caplog.at_level(logging.WARNING):
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                             repetition_penalty=1.3)
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, repetition_penalty=1.3)
    assert torch.equal(out, greedy_reference(model, ids, mask, max_new_tokens=4, repetition_penalty=1.3))
    assert caplog.text.count("repetition_penalty=1.3") == 1  # one warning per reason


def test_settings_resolve_generation_configs_as_generate_does():
    """Resolved as ``generate`` resolves them (the model's config, then transformers' defaults: top_k 50 where
    unset): trl's rollout config, evaluation's, and the options that need ``generate``."""
    model = tiny()

    def settings(**options):
        config, unknown = resolved_generation_config(model, GenerationConfig(**options), {})
        assert not unknown
        return decoding_settings(config)

    trl = settings(max_new_tokens=7, do_sample=True, pad_token_id=0, bos_token_id=None, eos_token_id=[2, 3],
                   temperature=1.0, top_p=1.0, top_k=None, min_p=None, repetition_penalty=1.0,
                   cache_implementation=None, disable_compile=True)
    assert trl == (DecodingSettings(max_new_tokens=7, top_k=50, eos_token_ids=(2, 3)), [])
    evaluation = settings(max_new_tokens=7, do_sample=True, temperature=0.6, top_p=0.95, top_k=0, eos_token_id=[2],
                          pad_token_id=None, num_return_sequences=8)
    # the call's pad token unset: the model's (0) fills it, as in generate
    assert evaluation == (DecodingSettings(max_new_tokens=7, temperature=0.6, top_p=0.95, eos_token_ids=(2,),
                                           pad_token_id=0, num_return_sequences=8), [])
    assert settings(max_new_tokens=4, do_sample=False, min_p=0.1)[1] == []  # greedy ignores sampling warpers
    assert settings(max_new_tokens=4, do_sample=True, min_p=0.1) == (None, ["min_p=0.1"])
    assert settings(max_length=12) == (None, ["max_length without max_new_tokens"])
    assert settings(max_new_tokens=4, num_beams=2, output_scores=True) == (None, ["num_beams=2", "output_scores=True"])


def test_all_rows_ending_stops_within_a_check_interval(monkeypatch):
    """Every row ends at its first token: the loop reads the finished flags every STOP_CHECK_EVERY steps and stops
    at the first read, with generate's output."""
    model = tiny()
    ids, mask = prompts()
    first = greedy_reference(model, ids, mask, max_new_tokens=1)[:, PROMPT]
    eos = tuple(int(t) for t in first.unique())
    steps = []
    step = _Decoder.step
    monkeypatch.setattr(_Decoder, "step", lambda self: steps.append(1) or step(self))
    out = decode(model, ids, mask, DecodingSettings(max_new_tokens=3 * STOP_CHECK_EVERY, greedy=True,
                                                    eos_token_ids=eos))
    assert torch.equal(out, greedy_reference(model, ids, mask, max_new_tokens=3 * STOP_CHECK_EVERY,
                                             eos_token_id=list(eos)))
    assert len(steps) == STOP_CHECK_EVERY


def test_a_call_without_an_attention_mask_goes_to_generate(caplog):
    """generate infers the padding from the pad token where no mask is given; the loop does not guess."""
    model = tiny()
    ids, _ = prompts()
    with cuda_graph_decoding(model), torch.no_grad(), caplog.at_level(logging.WARNING):
        out = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(out, greedy_reference(model, ids, None, max_new_tokens=4))
    assert "no attention_mask" in caplog.text


def test_models_it_cannot_decode_are_named():
    gemma = Gemma3ForCausalLM(Gemma3TextConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                               head_dim=16, sliding_window=8))
    assert "cache_implementation cuda_graph needs full attention" in graph_decoding_problem(gemma)
    assert "gemma3_text has sliding_attention layers" in graph_decoding_problem(gemma)
    assert "needs an SDPA attention implementation; the model uses 'eager'" in graph_decoding_problem(
        tiny(attention="eager"))
    dynamic = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa",
                                           rope_scaling={"rope_type": "dynamic", "factor": 2.0}))
    assert "cannot capture dynamic rotary embeddings" in graph_decoding_problem(dynamic)
    split = tiny()
    split.hf_device_map = {"model.layers.0": 0, "model.layers.1": 1}
    assert "needs the model on one device" in graph_decoding_problem(split)
    assert graph_decoding_problem(tiny()) is None


def test_garbage_in_the_unwritten_cache_never_reaches_the_tokens(monkeypatch):
    """The cache's buffers are allocated uninitialised and attention reads them at full length: a NaN left in
    the tail by an earlier tensor must not reach the output (a masked entry weighs zero, but 0 x NaN is NaN)."""
    model = tiny()
    ids, mask = prompts()
    reference = greedy_reference(model, ids, mask, max_new_tokens=NEW)
    initialize = PreallocatedLayer.lazy_initialization

    def poisoned(self, key_states, value_states):
        initialize(self, key_states, value_states)
        self.key_buffer.fill_(float("nan"))
        self.value_buffer.fill_(float("nan"))

    monkeypatch.setattr(PreallocatedLayer, "lazy_initialization", poisoned)
    assert torch.equal(decode(model, ids, mask, DecodingSettings(max_new_tokens=NEW, greedy=True)), reference)
