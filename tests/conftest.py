"""Shared fixtures: tiny models built offline once per test session (no Hugging Face hub access)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One intra-op thread unless the caller chose otherwise (before torch is imported, so torch and every `rqat`
# subprocess read it): the tiny test models gain nothing from more, and on a shared machine (CI, a
# newcomer's laptop) threads that wait on a descheduled partner make the suite 10x slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")

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


def measure_float_output_change(path: Path, transform) -> tuple[float, bool]:
    """Apply ``transform(model, tokenizer)`` to the float model at ``path``: the largest change of its logits
    on a probe batch, relative to their largest value, and whether the q_proj weights changed (were folded)."""
    import torch

    from rqat_sdk.exporters import probe_batch
    from rqat_sdk.models import load_model, load_tokenizer

    model, tokenizer = load_model(path, dtype="float32", device="cpu"), load_tokenizer(path)
    probe = probe_batch(tokenizer, torch.device("cpu"))
    weight = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    with torch.no_grad():
        before = model(probe).logits
        transform(model, tokenizer)
        after = model(probe).logits
    changed = not torch.allclose(model.model.layers[0].self_attn.q_proj.weight, weight)
    return ((after - before).abs().max() / before.abs().max()).item(), changed


@pytest.fixture
def float_output_change():
    """How much a weight-folding transform changes a float model: ``float_output_change(path, transform)``."""
    return measure_float_output_change


@pytest.fixture
def one_process_group(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A one-rank gloo process group, in this process, for FSDP2 on the CPU."""
    import socket

    import torch.distributed as dist

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
