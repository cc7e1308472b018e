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
