"""benchmarks/fp8_teacher_error.py's measurement on tiny Llama and Qwen3 models on the CPU: every row is measured,
the record names its provenance, the operand emulation computes the product's FP8 logits exactly, and bf16's own
rounding (the float32 row) is nearer to bf16 than FP8 is."""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

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
                              on_row=lambda result: seen.append(len(result["rows"])))
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

    record = script.record(argparse.Namespace(model=f"tiny {kind}"), measured)
    assert {"command", "device", "date", "commit", "model", "rows", "tokens"} <= set(record)


def test_a_subset_of_rows_and_an_unknown_row(script):
    bf16 = tiny("llama").to(torch.bfloat16)
    measured = script.measure(bf16, batches(), ["fp8", "fp8_down"])
    assert [row["row"] for row in measured["rows"]] == ["fp8", "fp8_down"]
    assert "emulation_vs_product_max_abs_diff" not in measured
    with pytest.raises(ValueError, match="unknown rows"):
        script.measure(bf16, batches(), ["fp16"])
