"""benchmarks/fp8_teacher_error.py's measurement on tiny Llama and Qwen3 models on the CPU: every row is measured,
the record names its provenance, the operand emulation computes the product's FP8 logits exactly, and bf16's own
rounding (the float32 row) is nearer to bf16 than FP8 is; GPTQ's e4m3 rounding stays on the product's grid and
beats round-to-nearest on the layer's outputs."""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

from rqat_sdk.ops.fp8 import E4M3, dequantize_rows, quantize_rows

SCRIPTS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def script(monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPTS))
    import fp8_teacher_error

    return fp8_teacher_error


def tiny(kind: str, width: int = 64):
    common: dict[str, Any] = dict(vocab_size=256, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=width // 4, max_position_embeddings=512)
    torch.manual_seed(0)
    model = (Qwen3ForCausalLM(Qwen3Config(**common, tie_word_embeddings=True)) if kind == "qwen3"
             else LlamaForCausalLM(LlamaConfig(**common)))
    with torch.no_grad():  # weights of a trained model's size, so that the logits are not all near zero
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.normal_(0, 2 / parameter.shape[1] ** 0.5)
    return model.eval()


def calibration() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    return [torch.randint(1, 256, (1, length), generator=generator) for length in (40, 32, 48)]


def batches() -> list:
    generator = torch.Generator().manual_seed(1)
    found = []
    for split, length in (("math", 24), ("math", 16), ("english", 20)):
        mask = torch.ones(length, dtype=torch.bool)
        mask[: 4 if split == "math" else 0] = False  # a prompt, not evaluated
        mask[-1] = False
        found.append((split, torch.randint(1, 256, (1, length), generator=generator), mask))
    return found


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_every_row_is_measured_and_fp8_is_further_than_float32(script, kind):
    float32 = tiny(kind)
    bf16 = copy.deepcopy(float32).to(torch.bfloat16)
    seen = []
    measured = script.measure(bf16, batches(), float32_model=lambda: float32,
                              on_row=lambda result: seen.append(len(result["rows"])), calibration=calibration())
    assert seen == list(range(1, len(script.ROWS) + 1))
    assert measured["tokens"] == {"math": 19 + 11, "english": 19}
    assert measured["emulation_vs_product_max_abs_diff"] == 0.0
    rows = {row["row"]: row for row in measured["rows"]}
    assert list(rows) == list(script.ROWS)
    keys = {"row", "description", "fp8_flop_share", "kl_math", "top1_math", "kl_english", "top1_english", "kl_all",
            "top1_all", "seconds"}
    assert all(set(row) == keys for row in rows.values())
    assert sum(rows[f"fp8_{c}"]["fp8_flop_share"] for c in script.CLASSES) == pytest.approx(1.0, abs=1e-3)
    assert 0 <= rows["float32"]["kl_all"] < rows["fp8"]["kl_all"]
    assert rows["fp8"]["top1_all"] <= 1.0
    assert rows["fp8_keep_qkv"]["fp8_flop_share"] == pytest.approx(1 - rows["fp8_qkv"]["fp8_flop_share"], abs=1e-3)
    assert measured["calibration_tokens"] == 40 + 32 + 48
    assert set(measured["gptq"]) == {"qkv+o+gate_up+down", "o+gate_up+down"}  # one GPTQ pass per set of classes
    assert measured["gptq"]["qkv+o+gate_up+down"]["rows"] == sum(m.out_features for m in script.decoder_linears(bf16))
    # every GPTQ-rounded row is what quantize_rows gives back from its dequantized weight
    assert all(entry["rows_reproduced"] == entry["rows"] for entry in measured["gptq"].values())

    record = script.record(argparse.Namespace(model=f"tiny {kind}"), measured)
    assert {"command", "device", "date", "commit", "model", "rows", "tokens"} <= set(record)


def test_a_subset_of_rows_and_an_unknown_row(script):
    bf16 = tiny("llama").to(torch.bfloat16)
    measured = script.measure(bf16, batches(), ["fp8", "fp8_down"])
    assert [row["row"] for row in measured["rows"]] == ["fp8", "fp8_down"]
    assert "emulation_vs_product_max_abs_diff" not in measured
    with pytest.raises(ValueError, match="unknown rows"):
        script.measure(bf16, batches(), ["fp16"])


def test_gptq_rows_need_calibration(script):
    with pytest.raises(ValueError, match="need calibration"):
        script.measure(tiny("llama").to(torch.bfloat16), batches(), ["fp8_gptq"])


def test_gptq_rounding_is_on_the_products_grid_and_beats_round_to_nearest(script):
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(1024, 64, generator=generator) @ torch.randn(64, 64, generator=generator)  # correlated
    inputs[:, 5] = 0  # an input that is always zero: a zero diagonal in the Hessian
    weight = torch.randn(48, 64, generator=generator)
    weight[3] = 0  # an all-zero row keeps its tiny scale and zeros
    values, scale = script.gptq_round_rows_e4m3(weight, 2 * inputs.T @ inputs / len(inputs))
    nearest, nearest_scale = quantize_rows(weight)
    assert values.dtype == E4M3 and values.shape == weight.shape
    assert torch.equal(scale, nearest_scale)  # each row's amax / 448
    rounded = dequantize_rows(values, scale)
    assert torch.equal((rounded / scale).to(E4M3).float() * scale, rounded)  # on the e4m3 grid times the row scale
    assert (values.float().abs().amax(1)[torch.arange(48) != 3] == 448).all() and (values[3].float() == 0).all()
    again, again_scale = quantize_rows(rounded)  # the product's quantizer gives the same values back
    assert torch.equal(again.view(torch.uint8), values.view(torch.uint8)) and torch.equal(again_scale, scale)
    assert not torch.equal(values.view(torch.uint8), nearest.view(torch.uint8))
    gptq_error = (inputs @ (weight - rounded).T).norm()
    nearest_error = (inputs @ (weight - dequantize_rows(nearest, nearest_scale)).T).norm()
    assert gptq_error < 0.9 * nearest_error
    # blocks of 16 columns spread each block's error over the later blocks lazily: the same values as one block
    blocked, _ = script.gptq_round_rows_e4m3(weight, 2 * inputs.T @ inputs / len(inputs), block=16)
    assert torch.equal(blocked.view(torch.uint8), values.view(torch.uint8))
