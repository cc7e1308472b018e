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
    result = rqat_sdk.oneshot(tiny_qwen3, ptq_recipe([{"type": "gptq"}], scheme), "reasoning-gym:chain_sum", tmp_path / "o")
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
    with pytest.raises(rqat_sdk.RqatError, match=r"stage 'ptq' needs data: pass dataset= .* set stages\[0\].data.source"):
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
