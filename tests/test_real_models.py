"""Both packaged GGUF models through every stage on CPU: SmolLM2-135M-Instruct (Llama, hidden 576, so W3G128 needs
the per-layer group-size fallback) and Gemma 3 270M (Gemma3, hidden 640, vocabulary 262k).

The testbeds are Qwen3/Llama models built from configs; these are the real pretrained architectures, weights,
tokenizers and chat templates. To fit CI, each model is cut to its first two decoder layers (every weight kept as
the GGUF holds it) and every stage runs a few steps on a few rows.
"""

import json
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch
from transformers import GenerationConfig

import rqat_sdk
from rqat_sdk import gguf as rqat_gguf
from rqat_sdk.evaluation.benchmarks import load_benchmark
from rqat_sdk.generation import Sampling, generate
from rqat_sdk.models import load_model, load_tokenizer
from rqat_sdk.recipe import Recipe

pytestmark = pytest.mark.slow

SMOLLM2, GEMMA3 = "gguf:smollm2-135m-instruct", "gguf:gemma3-270m"
W3G128 = {"num_bits": 3, "group_size": 128, "symmetric": False}
SCHEMES = {
    SMOLLM2: {"weights": {**W3G128, "group_size_fallback": "largest_divisor"}},
    GEMMA3: {"weights": W3G128},
}
# In-features per projection: SmolLM2's 576 takes group 64 (576 = 9 x 64), its MLP's 1536 takes 128.
GROUP_SIZES = {SMOLLM2: {64, 128}, GEMMA3: {128}}
DATA = {"source": "worked-math", "num_samples": 4, "max_seq_length": 64}
PROMPT = "Question: what is 17 + 25? Answer step by step."

REWARD_MODULE = '''
def digits(prompts, completions, **kwargs):
    """A reward with variance even for a cut-down model: the share of digits in the completion."""
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [sum(ch.isdigit() for ch in t) / max(len(t), 1) for t in texts]
'''


@dataclass(frozen=True)
class RealModel:
    source: str
    directory: Path
    architecture: str

    @property
    def scheme(self) -> dict:
        return SCHEMES[self.source]


def packaged(source: str) -> str:
    entry = rqat_gguf.PACKAGED[source.removeprefix(rqat_gguf.PREFIX)]
    if find_spec(entry.module) is None or find_spec("gguf") is None:
        pytest.skip(f"{source} needs its package: {entry.install}")
    return source


@pytest.fixture(scope="module", params=[SMOLLM2, GEMMA3], ids=["smollm2", "gemma3"])
def real(request, tmp_path_factory) -> RealModel:
    """The GGUF's first two decoder layers (real weights, tokenizer, chat template), saved in float32."""
    source = packaged(request.param)
    model = load_model(source, dtype="float32", device="cpu")
    model.model.layers = model.model.layers[:2]
    model.config.num_hidden_layers = 2
    if getattr(model.config, "layer_types", None):  # Gemma 3: sliding/full attention per layer
        model.config.layer_types = model.config.layer_types[:2]
    directory = tmp_path_factory.mktemp("real") / source.removeprefix("gguf:")
    model.save_pretrained(directory)
    load_tokenizer(source).save_pretrained(directory)
    return RealModel(source, directory, type(model).__name__)


def one_stage(modifiers: list[dict], scheme: dict, data: dict | None = None) -> dict:
    stage = {"name": "ptq", "modifiers": modifiers, **({"data": data} if data else {})}
    return {"version": 1, "scheme": scheme, "stages": [stage]}


def expected_group_size(in_features: int) -> int:
    return 128 if in_features % 128 == 0 else 64


def levels_per_group(weight: torch.Tensor, group: int) -> int:
    """The most distinct values any group of ``group`` input columns holds (3 bits: at most 8)."""
    grouped = weight.reshape(weight.shape[0], -1, group)
    return max(len(torch.unique(row)) for row in grouped.reshape(-1, group)[:64])


def logits(model, tokenizer) -> torch.Tensor:
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(ids).logits


def special_ids(tokenizer) -> tuple:
    return tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, len(tokenizer)


def test_rtn_exports_per_layer_group_sizes_and_reloads_exactly(real, tmp_path):
    out = tmp_path / "rtn"
    result = rqat_sdk.oneshot(real.directory, one_stage([{"type": "rtn"}], real.scheme), output_dir=out,
                              dtype="float32")
    assert result.record["export"]["exact"] is True

    groups = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]
    linears = {n: m for n, m in result.model.named_modules() if hasattr(m, "quantization_scheme")}
    assert {m.quantization_scheme.weights.group_size for m in linears.values()} == GROUP_SIZES[real.source]
    if len(GROUP_SIZES[real.source]) == 1:  # one group, targeting the class
        assert [(g["targets"], g["weights"]["group_size"]) for g in groups.values()] == [(["Linear"], 128)]
    else:  # one group per group size, each naming its layers
        exported = {name: g["weights"]["group_size"] for g in groups.values() for name in g["targets"]}
        assert exported == {name: expected_group_size(m.in_features) for name, m in linears.items()}
    for name, module in linears.items():
        size = expected_group_size(module.in_features)
        assert module.quantization_scheme.weights.group_size == size, name
        assert levels_per_group(module.weight.detach(), size) <= 8, name

    tokenizer = load_tokenizer(out)
    source_tokenizer = load_tokenizer(real.directory)
    assert special_ids(tokenizer) == special_ids(source_tokenizer)
    assert tokenizer.chat_template == source_tokenizer.chat_template is not None
    card = (out / "README.md").read_text()
    assert ("layers' group sizes 128, 64" in card) is (real.source == SMOLLM2)
    reloaded = load_model(out, dtype="float32", device="cpu", allow_quantized=True)
    assert torch.equal(logits(reloaded, tokenizer), logits(result.model, tokenizer))


def test_ptq_in_bf16_leaves_every_norm_weight_as_it_was(real):
    """llmcompressor holds Gemma's offset norms (``x * (1 + w)``) as ``1 + w`` during a run and converts them
    back after; in bf16 that round trip rounded every gain to bf16's spacing near 1 (2^-8 to 2^-7), though RTN
    changes no norm."""
    before = load_model(real.directory, dtype="bfloat16", device="cpu")
    norms = {name: weight.detach().clone() for name, weight in before.named_parameters() if "norm" in name}
    assert norms
    result = rqat_sdk.oneshot(real.directory, one_stage([{"type": "rtn"}], real.scheme), dtype="bfloat16")
    after = dict(result.model.named_parameters())
    changed = [name for name, weight in norms.items() if not torch.equal(after[name], weight)]
    assert changed == [] and {after[name].dtype for name in norms} == {torch.bfloat16}


def test_awq_smooths_and_attaches_per_layer_group_sizes(real):
    """AWQ (GPTQ runs in the pipeline test below): three grid points, the fewest it takes, keep it fast."""
    recipe = one_stage([{"type": "awq", "n_grid": 3}], real.scheme, DATA)
    result = rqat_sdk.oneshot(real.directory, recipe, dtype="float32")
    fallbacks = result.record["stages"][0]["metrics"].get("group_size_fallbacks", {})
    assert set(fallbacks.values()) == GROUP_SIZES[real.source] - {128}
    assert_group_scales(result.model)
    original = load_model(real.directory, dtype="float32", device="cpu")
    smoothed = result.model.model.layers[0].mlp.up_proj.weight
    assert not torch.equal(smoothed, original.model.layers[0].mlp.up_proj.weight)
    # llmcompressor's Gemma 3 mappings balance no q/k/v (Gemma 3 normalises their outputs), and under grouped-query
    # attention AWQ skips v_proj -> o_proj (their widths differ): those stay RTN, their weights as they were
    unbalanced = result.record["stages"][0]["metrics"]["awq"]["unbalanced_layers"]
    kinds = "qkvo" if real.source == GEMMA3 else "o"
    assert unbalanced == [f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in kinds]
    layers = dict(result.model.named_modules())
    originals = dict(original.named_modules())
    assert all(torch.equal(layers[name].weight, originals[name].weight) for name in unbalanced)


def assert_group_scales(model) -> None:
    """Every quantized layer has one scale per group of the group size its width takes."""
    for name, module in model.named_modules():
        if hasattr(module, "quantization_scheme"):
            groups = module.in_features // expected_group_size(module.in_features)
            assert tuple(module.weight_scale.shape) == (module.out_features, groups), name


def test_rotation_refuses_what_it_cannot_rotate_and_runs_random_hadamard_on_llama(real, tmp_path):
    hadamard = one_stage([{"type": "rotation"}, {"type": "rtn"}], real.scheme)
    random = one_stage([{"type": "rotation", "transform_type": "random-hadamard"}, {"type": "rtn"}], real.scheme)
    if real.source == GEMMA3:
        message = f"the rotation modifier does not support {real.architecture}; it supports LlamaForCausalLM"
        for recipe in (hadamard, random):
            with pytest.raises(rqat_sdk.RqatError, match=message):
                Recipe.from_dict({**recipe, "model": str(real.directory)})
            with pytest.raises(rqat_sdk.RqatError, match=message):
                rqat_sdk.oneshot(real.directory, recipe, dtype="float32")
        return
    message = r"R1 \(hadamard\) cannot rotate LlamaForCausalLM's hidden_size 576: it must be a"
    with pytest.raises(rqat_sdk.RqatError, match=message):
        Recipe.from_dict({**hadamard, "model": str(real.directory)})
    with pytest.raises(rqat_sdk.RqatError, match=message):
        rqat_sdk.oneshot(real.directory, hadamard, dtype="float32")
    # SmolLM2's norms silence residual channels: rotation then RTN is refused, rotation then GPTQ runs
    with pytest.raises(rqat_sdk.RqatError, match=r"rotation followed by rtn would wreck .*channel 247"):
        rqat_sdk.oneshot(real.directory, random, dtype="float32")
    random_gptq = one_stage([{"type": "rotation", "transform_type": "random-hadamard"}, {"type": "gptq"}], real.scheme,
                            DATA)
    result = rqat_sdk.oneshot(real.directory, random_gptq, output_dir=tmp_path / "random", dtype="float32")
    assert result.record["export"]["exact"] is True


@pytest.fixture
def reward_module(tmp_path, monkeypatch):
    (tmp_path / "real_rewards.py").write_text(REWARD_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "python:real_rewards:digits"


def pipeline(scheme: dict, reward: str) -> dict:
    return {
        "version": 1,
        "scheme": scheme,
        "stages": [
            {"name": "ptq", "data": DATA, "modifiers": [{"type": "gptq"}]},
            {"name": "kd", "data": {**DATA, "max_seq_length": 160}, "modifiers": [{
                "type": "qat_kd", "steps": 3, "batch_size": 2, "micro_batch_size": 2, "learning_rate": 1e-4,
                "lr_scheduler": "constant", "logging_steps": 1,
            }]},
            {"name": "rl", "data": {**DATA, "max_seq_length": 160}, "modifiers": [{
                "type": "grpo", "steps": 1, "prompts_per_step": 2, "group_size": 2, "micro_batch_size": 4,
                "max_completion_length": 8, "learning_rate": 1e-4, "temperature": 1.0, "rewards": [reward],
                "cold_start_threshold": 0.0, "probe_size": 2,
            }]},
        ],
    }


def test_gptq_kd_grpo_export_reload_and_eval(real, tmp_path, reward_module):
    out = tmp_path / "out"
    result = rqat_sdk.oneshot(real.directory, pipeline(real.scheme, reward_module), output_dir=out,
                              dtype="float32", allow_code=True)
    stages = result.record["stages"]
    assert [s["name"] for s in stages] == ["ptq", "kd", "rl"]
    assert set(stages[0]["metrics"].get("group_size_fallbacks", {}).values()) == GROUP_SIZES[real.source] - {128}
    assert_group_scales(result.model)
    kd = stages[1]["metrics"]["qat_kd"]
    # GPTQ leaves every weight on its grid and 3 Adam steps at lr 1e-4 move the latents (the margin changes) by far
    # less than half a step, so (almost) no code changes: KD's early gain is the full-precision parameters'.
    assert kd["grid_margin_at_end"] != kd["grid_margin_at_start"] and kd["codes_changed"] < 1e-3
    assert stages[2]["metrics"]["grpo"]["steps"] == 1
    assert result.record["export"]["exact"] is True
    run = json.loads((out / "run.json").read_text())
    assert run["model"] == {"source": str(real.directory), "format": "transformers",
                            "path": str(real.directory.resolve())}

    tokenizer = load_tokenizer(out)
    assert special_ids(tokenizer) == special_ids(load_tokenizer(real.directory))
    # The same stop tokens (Gemma 3: <eos> and <end_of_turn>); trl's trainer rewrites the list ([1, 1, 106], [2]).
    stops = [set(torch.tensor(GenerationConfig.from_pretrained(d).eos_token_id).flatten().tolist())
             for d in (out, real.directory)]
    assert stops[0] == stops[1]
    reloaded = load_model(out, dtype="float32", device="cpu", allow_quantized=True)
    assert torch.equal(logits(reloaded, tokenizer), logits(result.model, tokenizer))

    report = rqat_sdk.evaluate(out, "worked-math", num_examples=2, samples=1, max_new_tokens=16, dtype="float32",
                               device="cpu")
    assert report.num_problems == 2 and 0 <= report.pass_at_1 <= 1


def test_a_gguf_run_is_recorded_and_a_gguf_teacher_loads(tmp_path, monkeypatch):
    """The full SmolLM2 from its GGUF as the run's model and as the qat_kd teacher (one layer quantized, to stay
    fast): run.json describes the file, and the teacher goes through the GGUF loader."""
    from rqat_sdk.session import state

    source = packaged(SMOLLM2)
    loaded = []
    monkeypatch.setattr(state, "load_model", lambda s, **kw: loaded.append((s, kw["dtype"])) or load_model(s, **kw))
    scheme = {**SCHEMES[SMOLLM2], "targets": [r"re:.*layers\.0\.mlp\.down_proj$"]}
    recipe = {"version": 1, "scheme": scheme, "stages": [
        {"name": "ptq", "modifiers": [{"type": "rtn"}]},
        {"name": "kd", "data": {**DATA, "num_samples": 1, "max_seq_length": 160}, "modifiers": [{
            "type": "qat_kd", "teacher": source, "steps": 1, "batch_size": 1, "micro_batch_size": 1,
            "learning_rate": 1e-4, "train": "quantized",
        }]},
    ]}
    out = tmp_path / "out"
    result = rqat_sdk.oneshot(source, recipe, output_dir=out, dtype="float32")
    assert result.record["export"]["exact"] is True
    assert loaded == [(source, "float32")]  # the teacher; the run's own model loads through the engine
    model = json.loads((out / "run.json").read_text())["model"]
    path = rqat_gguf.resolve_gguf(source)
    assert model == {"source": source, "format": "gguf", "path": str(path), "sha256": rqat_gguf.file_sha256(path),
                     "quantization": "Q4_1", "architecture": "llama", "dequantized_to": "float32",
                     "chat_template": "from the file"}
    assert special_ids(load_tokenizer(out)) == special_ids(load_tokenizer(source))


@pytest.mark.parametrize(("duo_scaling", "least"), [(True, 3), (False, 2), ("both", 4)])
def test_awq_refuses_a_grid_too_small_to_search(duo_scaling, least):
    """Found here: n_grid 2 with duo scaling died mid-calibration with llmcompressor's ZeroDivisionError."""
    awq = {"type": "awq", "duo_scaling": duo_scaling}
    with pytest.raises(rqat_sdk.RqatError, match=rf"stages\[0\].modifiers\[0\].n_grid: {least - 1} is too small"):
        Recipe.from_dict(one_stage([{**awq, "n_grid": least - 1}], "W4G128"))
    Recipe.from_dict(one_stage([{**awq, "n_grid": least}], "W4G128"))


def test_preallocated_decoding_gives_the_dynamic_caches_answers_or_is_refused(real):
    """On real weights and tokenizers, batched chat prompts of different lengths (left-padded): the preallocated
    cache with grouped decode attention answers as the default cache does; Gemma 3's sliding-window layers are
    refused by name."""
    model, tokenizer = load_model(real.directory, dtype="float32", device="cpu"), load_tokenizer(real.directory)
    prompts = [problem.prompt for problem in load_benchmark("worked-math", num_examples=6, seed=0)]
    answers = {}
    for cache in ("dynamic", "preallocated"):
        sampling = Sampling(max_new_tokens=24, greedy=True, cache_implementation=cache)
        if real.source == GEMMA3 and cache == "preallocated":
            with pytest.raises(ValueError, match="gemma3_text has sliding_attention layers"):
                generate(model, tokenizer, prompts, sampling, batch_size=6, seed=0)
            return
        answers[cache] = [c.text for c in generate(model, tokenizer, prompts, sampling, batch_size=6, seed=0)]
    assert answers["preallocated"] == answers["dynamic"] and any(answers["dynamic"])
    assert model.config._attn_implementation == "sdpa"
