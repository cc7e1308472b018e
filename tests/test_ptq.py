"""Every PTQ modifier at every weight-only preset, through oneshot, exported and reloaded on CPU."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import rqat_sdk
from rqat_sdk.exporters import probe_batch
from rqat_sdk.recipe import Recipe

MODIFIERS = {"rtn": ["rtn"], "gptq": ["gptq"], "awq": ["awq"], "rotation+gptq": ["rotation", "gptq"]}
SCHEMES = {"W4G128": (4, 128), "W3G128": (3, 128), "W2G64": (2, 64)}


def levels_per_group(weight: torch.Tensor, group: int) -> int:
    """The most distinct values any group of ``group`` input columns holds."""
    rows, cols = weight.shape
    groups = weight.reshape(rows, cols // group, group)
    return max(len(torch.unique(g)) for g in groups.reshape(-1, group)[:64])


@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize("modifiers", list(MODIFIERS))
def test_oneshot_quantizes_exports_and_reloads(tiny_qwen3, tmp_path, ptq_recipe, modifiers, scheme):
    bits, group = SCHEMES[scheme]
    recipe = ptq_recipe([{"type": t} for t in MODIFIERS[modifiers]], scheme)
    out = tmp_path / "out"
    result = rqat_sdk.oneshot(tiny_qwen3, recipe, dataset="reasoning-gym:chain_sum", output_dir=out)

    assert result.output_dir == out and not out.with_name("out.partial").exists()
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    weights = config["config_groups"]["group_0"]["weights"]
    assert config["format"] == "pack-quantized" and config["quant_method"] == "compressed-tensors"
    assert (weights["num_bits"], weights["group_size"], weights["strategy"]) == (bits, group, "group")
    assert Recipe.from_file(out / "recipe.yaml") == Recipe.from_dict(recipe)
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "complete" and record["export"]["exact"] is True
    assert record["versions"]["llmcompressor"] == "0.14.0.1"

    # Quantization really happened: every group of the exported weights holds at most 2**bits levels.
    q_proj = result.model.model.layers[0].self_attn.q_proj.weight.detach()
    assert 2 < levels_per_group(q_proj, group) <= 2**bits

    # transformers loads the checkpoint by itself, and it computes what the in-memory model computes.
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    probe = probe_batch(result.tokenizer, torch.device("cpu"))
    with torch.no_grad():
        assert torch.equal(reloaded(probe).logits, result.model(probe).logits)


@pytest.mark.parametrize("modifiers", [["gptq"], ["awq"], ["rotation", "gptq"]])
def test_untied_llama(tiny_llama, tmp_path, ptq_recipe, modifiers):
    result = rqat_sdk.oneshot(
        tiny_llama, ptq_recipe([{"type": t} for t in modifiers], "W3G128"), "reasoning-gym:chain_sum", tmp_path / "o"
    )
    assert result.record["export"]["exact"] is True
    assert levels_per_group(result.model.model.layers[1].mlp.down_proj.weight.detach(), 128) <= 8


@pytest.mark.parametrize(("scheme", "fmt"), [("W8A8", "int-quantized"), ("W4A4", "pack-quantized")])
def test_activation_schemes_export_in_their_format(tiny_qwen3, tmp_path, ptq_recipe, scheme, fmt):
    recipe = ptq_recipe([{"type": "gptq"}], scheme)
    result = rqat_sdk.oneshot(tiny_qwen3, recipe, "reasoning-gym:chain_sum", tmp_path / "o")
    config = json.loads((tmp_path / "o" / "config.json").read_text())["quantization_config"]
    assert config["format"] == fmt
    assert config["config_groups"]["group_0"]["input_activations"]["dynamic"] is True
    assert result.record["export"]["max_abs_logit_diff"] <= 1e-3 * 30


def test_w4a4_weights_are_packed_not_stored_as_int8(tiny_qwen3, tmp_path, ptq_recipe):
    from safetensors import safe_open

    rqat_sdk.oneshot(tiny_qwen3, ptq_recipe([{"type": "rtn"}], "W4A4"), output_dir=tmp_path / "o")
    with safe_open(tmp_path / "o" / "model.safetensors", "pt") as f:
        packed = f.get_tensor("model.layers.0.self_attn.q_proj.weight_packed")
    assert packed.dtype == torch.int32 and packed.shape == (256, 256 // 8)  # eight 4-bit values per int32


def test_rtn_needs_no_dataset_and_gptq_names_the_missing_one(tiny_qwen3, tmp_path, ptq_recipe):
    result = rqat_sdk.oneshot(tiny_qwen3, ptq_recipe([{"type": "rtn"}], "W3G128"), output_dir=tmp_path / "rtn")
    assert result.record["export"]["exact"] is True
    match = r"stage 'ptq' needs data: pass dataset= .* set stages\[0\].data.source"
    with pytest.raises(rqat_sdk.RqatError, match=match):
        rqat_sdk.oneshot(tiny_qwen3, ptq_recipe([{"type": "gptq"}], "W3G128"), output_dir=tmp_path / "gptq")
    assert not (tmp_path / "gptq").exists()


@pytest.mark.parametrize("transform_type", ["hadamard", "random-hadamard"])
@pytest.mark.parametrize("architecture", ["tiny_qwen3", "tiny_llama"])
def test_rotations_leave_the_float_model_unchanged(request, float_output_change, architecture, transform_type):
    from rqat_sdk.modifiers.ptq.llmcompressor_adapter import rotate_spinquant

    def rotate(model, tokenizer):
        rotate_spinquant(model, tokenizer, rotations=["R1", "R2"], transform_type=transform_type, randomize=False)

    change, rotated = float_output_change(request.getfixturevalue(architecture), rotate)
    assert rotated and change <= 1e-4


@pytest.fixture(scope="module")
def odd_llama(tmp_path_factory):
    """A Llama whose hidden width (192) 128 does not divide, while its MLP's (512) it does; head_dim 48."""
    from rqat_sdk.testbed import build_model, build_tokenizer

    directory = tmp_path_factory.mktemp("models") / "odd-llama"
    tokenizer = build_tokenizer(vocab_size=512, corpus_size=80)
    build_model(tokenizer, "llama", hidden_size=192, intermediate_size=512).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def w3g128_with(fallback: str) -> dict:
    return {"weights": {"num_bits": 3, "group_size": 128, "symmetric": False, "group_size_fallback": fallback}}


@pytest.mark.parametrize(
    ("method", "fallback", "narrow"),
    [("rtn", "largest_divisor", 64), ("gptq", "largest_divisor", 64), ("gptq", "channel", None)],
)
def test_group_size_fallback_is_attached_exported_and_reloaded(odd_llama, tmp_path, ptq_recipe, method, fallback,
                                                              narrow):
    recipe = ptq_recipe([{"type": method}], w3g128_with(fallback))
    result = rqat_sdk.oneshot(odd_llama, recipe, "reasoning-gym:chain_sum", tmp_path / "o")
    assert result.record["export"]["exact"] is True
    layers = result.model.model.layers
    hidden_wide = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                   "mlp.up_proj")
    narrow_names = [f"model.layers.{i}.{p}" for i in range(2) for p in hidden_wide]
    assert result.record["stages"][0]["metrics"]["group_size_fallbacks"] == dict.fromkeys(narrow_names, narrow)

    # The model carries the per-layer choice, and the checkpoint's quantization_config says the same by name.
    assert layers[0].self_attn.q_proj.quantization_scheme.weights.group_size == narrow
    assert layers[0].mlp.down_proj.quantization_scheme.weights.group_size == 128
    groups = json.loads((tmp_path / "o" / "config.json").read_text())["quantization_config"]["config_groups"]
    by_size = {g["weights"]["group_size"]: (g["weights"]["strategy"], sorted(g["targets"])) for g in groups.values()}
    assert by_size == {128: ("group", ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]),
                       narrow: ("group" if narrow else "channel", sorted(narrow_names))}
    assert levels_per_group(layers[0].self_attn.q_proj.weight.detach(), narrow or 192) <= 8
    assert levels_per_group(layers[0].mlp.down_proj.weight.detach(), 128) <= 8

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "o")
    assert reloaded.model.layers[1].self_attn.o_proj.quantization_scheme.weights.group_size == narrow
    probe = probe_batch(result.tokenizer, torch.device("cpu"))
    with torch.no_grad():
        assert torch.equal(reloaded(probe).logits, result.model(probe).logits)


def test_mixed_group_sizes_train_with_qat_and_export_exactly(odd_llama, tmp_path):
    recipe = {
        "version": 1, "scheme": w3g128_with("largest_divisor"),
        "stages": [
            {"name": "ptq", "data": {"num_samples": 8, "max_seq_length": 64}, "modifiers": [{"type": "gptq"}]},
            {"name": "qat", "data": {"num_samples": 16, "max_seq_length": 64},
             "modifiers": [{"type": "qat_kd", "steps": 3, "batch_size": 4, "learning_rate": 1e-2}]},
        ],
    }
    before = rqat_sdk.oneshot(odd_llama, {**recipe, "stages": recipe["stages"][:1]}, "reasoning-gym:chain_sum")
    result = rqat_sdk.oneshot(odd_llama, recipe, "reasoning-gym:chain_sum", tmp_path / "o")
    assert result.record["export"]["exact"] is True
    for name, group in (("self_attn.q_proj", 64), ("mlp.down_proj", 128)):
        trained = result.model.get_submodule(f"model.layers.0.{name}").weight.detach()
        assert not torch.equal(trained, before.model.get_submodule(f"model.layers.0.{name}").weight.detach())
        assert 2 < levels_per_group(trained, group) <= 8


def test_rotation_refuses_widths_a_hadamard_matrix_cannot_take(odd_llama, tmp_path, ptq_recipe):
    recipe = ptq_recipe([{"type": "rotation"}, {"type": "rtn"}], w3g128_with("largest_divisor"))
    message = r"rotation modifier's R1 \(hadamard\) cannot rotate LlamaForCausalLM's hidden_size 192: it must be a"
    with pytest.raises(rqat_sdk.RqatError, match=message) as info:
        rqat_sdk.oneshot(odd_llama, recipe, output_dir=tmp_path / "o")
    assert "R2 (hadamard) cannot rotate LlamaForCausalLM's head_dim 48" in str(info.value)
    assert "'random-hadamard' takes it" in str(info.value) and not (tmp_path / "o").exists()
    # Known without loading the model when the recipe names a local model directory.
    with pytest.raises(rqat_sdk.RqatError, match=r"stages\[0\].modifiers\[0\]: the rotation modifier's R1"):
        Recipe.from_dict({**recipe, "model": str(odd_llama)})
    random = [{"type": "rotation", "transform_type": "random-hadamard"}, {"type": "rtn"}]
    Recipe.from_dict({**recipe, "model": str(odd_llama), "stages": [{**recipe["stages"][0], "modifiers": random}]})


def test_rotation_refuses_gemma3_by_name(tmp_path, ptq_recipe):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from rqat_sdk.testbed import build_tokenizer

    tokenizer = build_tokenizer(vocab_size=400, corpus_size=40)
    config = Gemma3TextConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=64, sliding_window=32)
    Gemma3ForCausalLM(config).save_pretrained(tmp_path / "gemma3")
    tokenizer.save_pretrained(tmp_path / "gemma3")
    recipe = ptq_recipe([{"type": "rotation", "transform_type": "random-hadamard"}, {"type": "rtn"}])
    message = "the rotation modifier does not support Gemma3ForCausalLM; it supports LlamaForCausalLM, Qwen3ForCausalLM"
    with pytest.raises(rqat_sdk.RqatError, match=message):
        rqat_sdk.oneshot(tmp_path / "gemma3", recipe, output_dir=tmp_path / "o")
    with pytest.raises(rqat_sdk.RqatError, match=message):
        Recipe.from_dict({**recipe, "model": str(tmp_path / "gemma3")})


def test_rotation_then_rtn_refuses_a_model_whose_norms_silence_channels(tiny_llama, tmp_path, ptq_recipe):
    """Issue 23: SmolLM2's RMSNorm gains mute the residual channels holding its massive activations; fused into
    the weights and rotated, RTN's error reaches them (W3G64 perplexity 47 -> ~2,000). Refused before any work."""
    from rqat_sdk.models import load_model, load_tokenizer
    from rqat_sdk.modifiers.ptq.modifiers import silenced_norm_channels

    model = load_model(tiny_llama, dtype="float32", device="cpu")
    assert silenced_norm_channels(model) == []  # untrained gains: rotation+rtn runs (test_oneshot_*)
    with torch.no_grad():
        model.model.layers[1].post_attention_layernorm.weight[5] = 1e-4
    model.save_pretrained(tmp_path / "muted")
    load_tokenizer(tiny_llama).save_pretrained(tmp_path / "muted")
    assert silenced_norm_channels(model) == [("model.layers.1.post_attention_layernorm", 5, pytest.approx(1e-4), 1.0)]

    rotated_rtn = ptq_recipe([{"type": "rotation"}, {"type": "rtn"}], "W3G128")
    message = (r"rotation followed by rtn would wreck .*muted \(LlamaForCausalLM\): 1 of its RMSNorm layers nearly "
               r"silence .*model.layers.1.post_attention_layernorm channel 5: gain 0.0001.* gptq after the rotation")
    with pytest.raises(rqat_sdk.RqatError, match=message):
        rqat_sdk.oneshot(tmp_path / "muted", rotated_rtn, output_dir=tmp_path / "o")
    assert not (tmp_path / "o").exists()
    rqat_sdk.oneshot(tmp_path / "muted", ptq_recipe([{"type": "rtn"}], "W3G128"))  # rtn alone is fine


def test_rotation_randomize_is_refused_at_validate_time(ptq_recipe):
    with pytest.raises(rqat_sdk.RqatError, match=r"stages\[0\].modifiers\[0\].randomize: llmcompressor 0.14's"):
        Recipe.from_dict(ptq_recipe([{"type": "rotation", "randomize": True}, {"type": "rtn"}]))


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_calibrated_runs_are_reproducible(tiny_qwen3, tmp_path, ptq_recipe, method):
    recipe = ptq_recipe([{"type": method}], "W3G128")
    runs = [rqat_sdk.oneshot(tiny_qwen3, recipe, "reasoning-gym:chain_sum", tmp_path / str(run)) for run in range(2)]
    records = [run.record for run in runs]
    first, second = ((tmp_path / str(run) / "model.safetensors").read_bytes() for run in range(2))
    assert first == second
    calibration = records[0]["stages"][0]["metrics"][method]["calibration"]
    assert calibration == records[1]["stages"][0]["metrics"][method]["calibration"]
    assert calibration["torch_seed"] == 0 and calibration["samples"] == 8
    assert calibration["order"].startswith("as drawn") and len(calibration["tokens_sha256"]) == 64
