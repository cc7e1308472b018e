"""Shared fixtures: tiny models built offline once per test session (no Hugging Face hub access)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from rqat_sdk.testbed import write_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny Qwen3 (tied embeddings) with a ChatML tokenizer."""
    return write_tiny_model(tmp_path_factory.mktemp("models") / "qwen3", "qwen3")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny Llama (untied embeddings)."""
    return write_tiny_model(tmp_path_factory.mktemp("models") / "llama", "llama")


def one_stage_recipe(modifiers: list[dict], scheme: object = "W4G128") -> dict:
    data = {"num_samples": 8, "max_seq_length": 64}
    return {"version": 1, "scheme": scheme, "stages": [{"name": "ptq", "data": data, "modifiers": modifiers}]}


@pytest.fixture
def ptq_recipe():
    """Build a one-stage recipe dict sized for CPU tests: ``ptq_recipe([{"type": "gptq"}], "W3G128")``."""
    return one_stage_recipe


@pytest.fixture
def w4a4kv4_recipe() -> dict:
    """Hadamard rotation + GPTQ at W4A4KV4, then four steps of QAT-KD: the W4A4KV4 pipeline, CPU-sized."""
    return {
        "version": 1, "scheme": "W4A4KV4",
        "stages": [
            {"name": "ptq", "data": {"num_samples": 8, "max_seq_length": 64},
             "modifiers": [{"type": "rotation"}, {"type": "gptq"}]},
            {"name": "qat", "data": {"num_samples": 16, "max_seq_length": 64},
             "modifiers": [{"type": "qat_kd", "steps": 4, "batch_size": 4, "learning_rate": 1e-4, "save_steps": 2}]},
        ],
    }
