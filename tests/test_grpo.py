"""GRPO on the fake-quantized model, through trl, on CPU."""

import json
import logging
import types

import pytest
import torch
from transformers import AutoModelForCausalLM, GenerationMixin

import rqat_sdk
from rqat_sdk import generation
from rqat_sdk.errors import RecipeError
from rqat_sdk.modifiers import layers
from rqat_sdk.modifiers.layers import QUANTIZATION_PARAMETERS, attach_fake_quant, detach_fake_quant
from rqat_sdk.modifiers.rl import ColdStartError, PolicyCollapseError
from rqat_sdk.modifiers.rl.trl_adapter import (
    RewardCollapseGuard,
    _checkpointing_every_n_layers,
    remove_mixed_precision_wrapper,
    sync_quantized_weights,
)
from rqat_sdk.recipe import Recipe

REWARD_MODULE = '''
def digits(prompts, completions, **kwargs):
    """A reward with variance even for an untrained model: the share of digits in the completion."""
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [sum(ch.isdigit() for ch in t) / max(len(t), 1) for t in texts]
'''


def recipe(**grpo):
    settings = {"type": "grpo", "steps": 2, "prompts_per_step": 2, "group_size": 4, "micro_batch_size": 4,
                "max_completion_length": 12, "learning_rate": 1e-3, "temperature": 1.0, **grpo}
    return {
        "version": 1,
        "scheme": "W4G128",
        "stages": [
            {"name": "ptq", "data": {"num_samples": 8, "max_seq_length": 64}, "modifiers": [{"type": "rtn"}]},
            {"name": "rl", "data": {"num_samples": 16, "max_seq_length": 96}, "modifiers": [settings]},
        ],
    }


@pytest.fixture
def reward_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(REWARD_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "python:my_rewards:digits"


def test_grpo_steps_change_the_weights_and_export_exactly(tiny_qwen3, tmp_path, reward_module):
    before = rqat_sdk.oneshot(tiny_qwen3, {**recipe(), "stages": recipe()["stages"][:1]})
    result = rqat_sdk.oneshot(
        tiny_qwen3, recipe(rewards=[reward_module], cold_start_threshold=0.0), "testbed", tmp_path / "out",
        allow_code=True,
    )
    metrics = result.record["stages"][1]["metrics"]
    assert metrics["grpo"]["steps"] == 2 and metrics["cold_start_probe_reward"] > 0
    assert 0 < metrics["grpo"]["codes_changed"] < 1 and "grid_margin_at_end" in metrics["grpo"]
    assert result.record["export"]["exact"] is True
    after = result.model.state_dict()
    changed = [name for name, a in before.model.state_dict().items()
               if a.is_floating_point() and not torch.equal(a, after[name])]
    assert any("q_proj.weight" in name for name in changed)
    log = [json.loads(line) for line in (tmp_path / "out" / "logs" / "01-rl.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [1, 2]
    assert {"reward", "reward_std", "response_length", "entropy", "clip_ratio"} <= set(log[0])
    assert (tmp_path / "out" / "logs" / "01-rl.png").read_bytes()[:4] == b"\x89PNG"


def test_learn_scales_moves_the_scales_and_exports_exactly(tiny_qwen3, tmp_path, reward_module):
    grpo = recipe(rewards=[reward_module], cold_start_threshold=0.0, learn_scales=True, scale_learning_rate=1e-2)
    before = rqat_sdk.oneshot(tiny_qwen3, {**grpo, "stages": grpo["stages"][:1]})
    result = rqat_sdk.oneshot(tiny_qwen3, grpo, "testbed", tmp_path / "out", allow_code=True)
    assert result.record["export"]["exact"] is True
    after = result.model.state_dict()
    moved = {name for name, a in before.model.state_dict().items() if not torch.equal(a, after[name])}
    assert any(name.endswith("q_proj.weight_scale") for name in moved)



@pytest.mark.parametrize("cache", ["static", "preallocated"])
def test_rollouts_can_decode_with_a_static_or_preallocated_kv_cache(cache, tiny_qwen3, reward_module, monkeypatch):
    caches = []
    decode = GenerationMixin.generate

    def recording(self, *args, **kwargs):
        config = kwargs.get("generation_config") or self.generation_config
        given = kwargs.get("past_key_values")
        caches.append(type(given).__name__ if given is not None else
                      kwargs.get("cache_implementation") or config.cache_implementation)
        return decode(self, *args, **kwargs)

    monkeypatch.setattr(GenerationMixin, "generate", recording)
    grpo = recipe(rewards=[reward_module], cold_start_threshold=0.0, cache_implementation=cache)
    result = rqat_sdk.oneshot(tiny_qwen3, grpo, "testbed", allow_code=True)
    assert result.record["stages"][1]["metrics"]["grpo"]["steps"] == 2
    # trl's rollouts (the cold-start probe samples with rqat's own default)
    assert {"static": "static", "preallocated": "PreallocatedCache"}[cache] in caches
    with pytest.raises(RecipeError, match=f"cache_implementation {cache} is for generation transformers"):
        Recipe.from_dict(recipe(cache_implementation=cache, generation="vllm-colocate"))

def test_a_rollout_quantizes_the_weights_once_and_decodes_the_same_tokens(tiny_qwen3, monkeypatch):
    model = rqat_sdk.oneshot(tiny_qwen3, {**recipe(), "stages": recipe()["stages"][:1]}).model
    attach_fake_quant(model, dtype=torch.float32, learn_scales=False, learn_clipping=False)
    prompt = torch.tensor([[5, 17, 42, 8]])
    decode = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    per_token = model.generate(prompt, **decode)
    calls = []
    quantize = layers.fake_quantize_weight
    monkeypatch.setattr(layers, "fake_quantize_weight", lambda *a: calls.append(1) or quantize(*a))
    with layers.quantized_once_per_generate(model):
        once = model.generate(prompt, **decode)
    assert torch.equal(once, per_token) and calls == []  # no layer quantized its own weight per token
    assert "generate" not in vars(model)
    model.generate(prompt, **decode)
    assert calls  # outside the block each layer quantizes again
    detach_fake_quant(model)


def test_trl_rollouts_decode_with_the_weights_quantized_once(tiny_qwen3, reward_module, monkeypatch):
    held = []
    decode = GenerationMixin.generate

    def recording(self, *args, **kwargs):
        held.append(any(layers._PRECOMPUTED in vars(m) for _, m in layers.quantized_linears(self)))
        return decode(self, *args, **kwargs)

    monkeypatch.setattr(GenerationMixin, "generate", recording)
    result = rqat_sdk.oneshot(tiny_qwen3, recipe(rewards=[reward_module], cold_start_threshold=0.0), "testbed",
                              allow_code=True)
    assert result.record["stages"][1]["metrics"]["grpo"]["steps"] == 2
    assert True in held  # trl's rollouts (the cold-start probe decodes the model as evaluation does)


def test_the_optimizer_gives_scales_their_own_rate_and_no_weight_decay(tiny_qwen3):
    from rqat_sdk.modifiers.rl.modifier import GRPOModifier
    from rqat_sdk.modifiers.rl.trl_adapter import adamw

    model = rqat_sdk.oneshot(tiny_qwen3, {**recipe(), "scheme": "W3G128", "stages": recipe()["stages"][:1]}).model
    config = GRPOModifier(learning_rate=1e-4, scale_learning_rate=3e-3, weight_decay=0.1, learn_scales=True)
    attach_fake_quant(model, dtype=torch.float32, learn_scales=True, learn_clipping=False)
    weights, scales = adamw(model, config, fused=False).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert (weights["lr"], weights["weight_decay"], scales["lr"], scales["weight_decay"]) == (1e-4, 0.1, 3e-3, 0.0)
    assert {names[id(p)].rsplit(".", 1)[-1] for p in scales["params"]} == {"weight_scale", "rqat_zero_point"}
    assert any(names[id(p)].endswith("q_proj.weight") for p in weights["params"])
    detach_fake_quant(model)
    assert len(adamw(model, GRPOModifier(), fused=False).param_groups) == 1


def test_a_step_with_non_finite_gradients_is_skipped_and_counted():
    from rqat_sdk.modifiers.rl.trl_adapter import FiniteStepAdamW

    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = FiniteStepAdamW([weight], lr=0.1, weight_decay=0.0)
    weight.grad = torch.tensor([1.0, float("nan"), 1.0])
    optimizer.step()
    assert torch.equal(weight.detach(), torch.ones(3)) and optimizer.skipped_steps == 1 and not optimizer.state
    weight.grad = torch.tensor([1.0, float("inf"), 1.0])
    optimizer.step()
    weight.grad = torch.ones(3)
    optimizer.step()
    assert optimizer.skipped_steps == 2 and torch.allclose(weight.detach(), torch.full((3,), 0.9))


def test_the_trained_model_loses_the_bf16_autocast_that_mixed_precision_training_wraps_it_in(tiny_qwen3):
    """On GPUs trl trains with bf16=True, and accelerate leaves ``model.forward`` wrapped in bf16 autocast;
    the export check then saw logits 0.35 away from the reloaded checkpoint's."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    model = AutoModelForCausalLM.from_pretrained(tiny_qwen3, dtype=torch.float32)
    probe = torch.arange(1, 17).unsqueeze(0)
    with torch.no_grad():
        expected = model(probe).logits
    AcceleratorState._reset_state(reset_partial_state=True)  # a trainer earlier in the process set its own
    try:
        Accelerator(cpu=True, mixed_precision="bf16").prepare_model(model)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    with torch.no_grad():
        assert not torch.equal(model(probe).logits, expected)  # the wrapper computes in bf16
    remove_mixed_precision_wrapper(model)
    assert "forward" not in model.__dict__ and "_original_forward" not in model.__dict__
    with torch.no_grad():
        assert torch.equal(model(probe).logits, expected)


def test_cold_start_guard_stops_a_model_that_never_scores(tiny_qwen3, tmp_path):
    with pytest.raises(ColdStartError, match=r"mean reward on 4 probe prompts is 0.000.*Add a qat_kd stage"):
        rqat_sdk.oneshot(tiny_qwen3, recipe(probe_size=4), "testbed", tmp_path / "out")
    assert not (tmp_path / "out").exists() and (tmp_path / "out.partial" / "checkpoints" / "00-ptq").is_dir()


COLLAPSING_REWARD = '''
calls = 0


def fades(prompts, completions, **kwargs):
    """1 for every completion of the first call (the cold-start probe), 0 afterwards: a policy that collapses."""
    global calls
    calls += 1
    return [1.0 if calls == 1 else 0.0 for _ in completions]
'''


def test_the_collapse_guard_compares_a_window_of_rewards_with_the_start():
    guard = RewardCollapseGuard(reference=0.8, fraction=0.5, window=3)
    # Step 3 averages 0.57 (kept); step 4 averages (0.5 + 0.3 + 0.3) / 3 = 0.37 < 0.5 x 0.8, and it stays latched.
    assert [guard.observe(step, r) for step, r in enumerate([0.9, 0.5, 0.3, 0.3, 0.9], 1)] == [
        False, False, False, True, True]
    assert guard.collapsed == {"step": 4, "recent_reward": pytest.approx(1.1 / 3), "reference_reward": 0.8}
    off = RewardCollapseGuard(reference=0.8, fraction=None, window=1)
    assert not any(off.observe(step, 0.0) for step in range(1, 5)) and off.collapsed is None


def test_a_collapsing_policy_stops_the_stage_and_keeps_the_earlier_ones(tiny_qwen3, tmp_path, monkeypatch,
                                                                        reward_module):
    (tmp_path / "collapsing.py").write_text(COLLAPSING_REWARD)
    monkeypatch.syspath_prepend(str(tmp_path))
    grpo = recipe(steps=6, rewards=["python:collapsing:fades"], probe_size=2, collapse_window=2)
    with pytest.raises(PolicyCollapseError, match=r"'rl' stopped at step 2: the mean training reward of the last 2 "
                                                   r"logged steps is 0.000, below collapse_fraction 0.5 x the "
                                                   r"starting reward 1.000; GRPO was destroying the quantized "
                                                   r"policy, and had changed \d+\.\d\d% of its weight codes"
                                                   r".*rerun with --resume"):
        rqat_sdk.oneshot(tiny_qwen3, grpo, "testbed", tmp_path / "out", allow_code=True)
    partial = tmp_path / "out.partial"
    assert not (tmp_path / "out").exists() and (partial / "checkpoints" / "00-ptq").is_dir()
    logged = [json.loads(line)["step"] for line in (partial / "logs" / "01-rl.jsonl").read_text().splitlines()]
    assert logged == [1, 2]  # stopped long before the 6 planned steps
    assert (partial / "logs" / "01-rl.png").is_file()
    assert not (partial / "checkpoints" / "01-rl.progress").exists()  # the collapsing policy's checkpoints

    # A changed GRPO stage resumes from the kept PTQ stage and finishes.
    fixed = recipe(rewards=[reward_module], cold_start_threshold=0.0)
    result = rqat_sdk.oneshot(tiny_qwen3, fixed, "testbed", tmp_path / "out", allow_code=True, resume=True)
    assert result.record["status"] == "complete" and result.record["stages"][1]["metrics"]["grpo"]["steps"] == 2


def test_grpo_resumes_only_from_its_own_recipe_s_checkpoints(tiny_qwen3, tmp_path, reward_module):
    grpo = recipe(rewards=[reward_module], cold_start_threshold=0.0)
    with pytest.raises(ColdStartError):  # leaves an unfinished run whose PTQ stage is done
        rqat_sdk.oneshot(tiny_qwen3, recipe(probe_size=2), "testbed", tmp_path / "out")
    progress = tmp_path / "out.partial" / "checkpoints" / "01-rl.progress"
    (progress / "checkpoint-1").mkdir(parents=True)
    (progress / "recipe_fingerprint.txt").write_text("0123456789abcdef\n")  # another recipe's GRPO stage
    with pytest.raises(rqat_sdk.RqatError, match=r"01-rl.progress holds GRPO checkpoints of a different recipe"):
        rqat_sdk.oneshot(tiny_qwen3, grpo, "testbed", tmp_path / "out", allow_code=True, resume=True)


def test_reward_code_needs_allow_code(tiny_qwen3, reward_module):
    with pytest.raises(rqat_sdk.RqatError, match=r"stages\[1\].modifiers\[0\].rewards\[0\]: python:my_rewards:digits"):
        rqat_sdk.oneshot(tiny_qwen3, recipe(rewards=[reward_module]), "testbed")


def test_rollout_engine_receives_the_quantized_weights(tiny_qwen3, tmp_path):
    """trl's own colocate sync, pointed at a fake vLLM engine that records what it loads."""
    from trl.generation.vllm_generation import VLLMGeneration

    quantized = rqat_sdk.oneshot(tiny_qwen3, {**recipe(), "stages": recipe()["stages"][:1]}, output_dir=tmp_path / "q")
    model = quantized.model
    attach_fake_quant(model, dtype=torch.float32, learn_scales=False, learn_clipping=False)
    with torch.no_grad():  # as if training had moved the latent weights off the quantization grid
        model.model.layers[0].mlp.up_proj.weight.add_(torch.randn_like(model.model.layers[0].mlp.up_proj.weight) * 1e-3)
    received = {}
    engine = types.SimpleNamespace(load_weights=lambda weights: received.update({n: t.clone() for n, t in weights}))
    generation = object.__new__(VLLMGeneration)
    generation.mode, generation.enable_sleep_mode = "colocate", False
    generation.accelerator = types.SimpleNamespace(is_main_process=True)
    generation.llm = types.SimpleNamespace(
        llm_engine=types.SimpleNamespace(model_executor=types.SimpleNamespace(driver_worker=types.SimpleNamespace(
            model_runner=types.SimpleNamespace(model=engine)))),
        reset_prefix_cache=lambda: None,
    )
    sync_quantized_weights(generation, model)
    generation.sync_weights()

    assert not any(n.endswith(("weight_scale", "weight_zero_point")) for n in received)
    detach_fake_quant(model)
    from rqat_sdk.exporters import export_checkpoint

    export_checkpoint(model, quantized.tokenizer, quantized.recipe.scheme, tmp_path / "export")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    exported(torch.tensor([[1, 2, 3]]))  # decompress
    dequantized = dict(exported.named_parameters())
    for name in ("model.layers.0.mlp.up_proj.weight", "model.layers.1.self_attn.q_proj.weight"):
        assert torch.equal(received[name], dequantized[name]), name
    dense = {n for n in dequantized if n.rpartition(".")[2] not in QUANTIZATION_PARAMETERS}
    assert set(received) == dense


def test_grpo_recipe_checks_and_warnings():
    with pytest.raises(RecipeError, match=r"rewards: 'accuracy' is not one of: correctness, format"):
        Recipe.from_dict(recipe(rewards=["accuracy"]))
    with pytest.raises(RecipeError, match="reward_weights has 1 entries for 2 rewards"):
        Recipe.from_dict(recipe(rewards=["correctness", "format"], reward_weights=[1.0]))
    w3 = Recipe.from_dict({**recipe(), "scheme": "W3G128"})
    assert w3.warnings() == [
        "stages[1].modifiers[0]: grpo on a W3G128 model without a qat_kd stage before it: the seed paper finds "
        "cold-start GRPO after plain PTQ collapses; add a qat_kd stage first"
    ]
    with_kd = {**recipe(), "scheme": "W3G128"}
    with_kd["stages"] = [with_kd["stages"][0], {"name": "kd", "modifiers": [{"type": "qat_kd"}]}, with_kd["stages"][1]]
    assert Recipe.from_dict(with_kd).warnings() == []
    w4a4 = {**with_kd, "scheme": "W4A4KV4"}
    assert Recipe.from_dict(w4a4).warnings() == []
    grpo = {"type": "grpo", "generation": "vllm-colocate"}
    w4a4["stages"] = [*with_kd["stages"][:2], {**with_kd["stages"][2], "modifiers": [grpo]}]
    assert Recipe.from_dict(w4a4).warnings() == [
        "stages[2].modifiers[0].generation: vllm-colocate rollouts get the fake-quantized weights but run the "
        "activations and KV cache in full precision, so they sample from a neighbour of the W4A4KV4 policy (trl's "
        "importance-sampling correction weighs the gap); 'transformers' samples the trained policy itself"
    ]


def test_a_preallocated_cache_on_sliding_window_layers_is_refused_before_any_stage(tiny_qwen3):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rqat_sdk.errors import PreflightError

    model = AutoModelForCausalLM.from_pretrained(tiny_qwen3)
    layers = model.config.num_hidden_layers
    model.config.layer_types = ["sliding_attention"] * (layers - 1) + ["full_attention"]  # as Gemma 3's
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PreflightError, match=r"stages\[1\].modifiers\[0\].cache_implementation: cache_implementation "
                                             r"preallocated needs full attention in every layer; qwen3 has "
                                             r"sliding_attention layers: use cache_implementation dynamic"):
        rqat_sdk.oneshot(model, recipe(cache_implementation="preallocated"), "testbed",
                         tokenizer=AutoTokenizer.from_pretrained(tiny_qwen3))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the PTQ stage never ran


def test_rollouts_can_decode_with_cuda_graph_steps(tiny_qwen3, reward_module, monkeypatch, caplog):
    """``cache_implementation: cuda_graph``: trl's rollouts go through rqat's decoding loop (eager on the CPU),
    inside the weights' quantization once per call, and nothing falls back to ``generate``."""
    calls = []
    loop = generation.decode

    def recording(model, input_ids, attention_mask, settings):
        calls.append((settings, any(layers._PRECOMPUTED in vars(m) for _, m in layers.quantized_linears(model))))
        return loop(model, input_ids, attention_mask, settings)

    monkeypatch.setattr(generation, "decode", recording)
    grpo = recipe(rewards=[reward_module], cold_start_threshold=0.0, cache_implementation="cuda_graph")
    with caplog.at_level(logging.WARNING):
        result = rqat_sdk.oneshot(tiny_qwen3, grpo, "testbed", allow_code=True)
    assert result.record["stages"][1]["metrics"]["grpo"]["steps"] == 2
    assert calls and all(held for _, held in calls)
    settings = calls[-1][0]
    assert not settings.greedy and settings.num_return_sequences == 1  # trl repeats each prompt in the batch
    assert "runs transformers' generate instead" not in caplog.text


def test_every_n_layers_survives_trls_rollouts(tiny_qwen3):
    """trl switches gradient checkpointing off around each rollout and on again with its kwargs alone; during a
    GRPO stage with gradient_checkpointing_every_n_layers: 2 it comes back on every 2nd layer, as the Trainer
    first set it; afterwards the model's own method is back."""
    from trl.models.utils import disable_gradient_checkpointing

    model = AutoModelForCausalLM.from_pretrained(tiny_qwen3)
    kwargs = {"use_reentrant": False}

    def checkpointed():
        return [layer.gradient_checkpointing for layer in model.model.layers]

    with _checkpointing_every_n_layers(model, 2):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs, every_n_layers=1)  # the Trainer's
        assert checkpointed() == [True, False]
        with disable_gradient_checkpointing(model, kwargs):
            assert checkpointed() == [False, False]
        assert checkpointed() == [True, False]
    assert "gradient_checkpointing_enable" not in model.__dict__
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    assert checkpointed() == [True, True]
