import json
import os

import torch

from rqat_sdk.testbed import train
from rqat_sdk.testbed.train import deterministic_algorithms, train_testbed

TINY = train.TestbedSize(
    mix="testbed", hidden_size=32, intermediate_size=64, num_layers=1, vocab_size=300, examples=64, steps=3,
    batch_size=8, micro_batch_size=8, learning_rate=1e-3, warmup_steps=1, weight_decay=0.0, max_seq_length=64,
)


def test_a_deterministic_build_records_itself_and_restores_torch(tmp_path):
    assert not torch.are_deterministic_algorithms_enabled()
    first = train_testbed(tmp_path / "a", TINY, seed=1, deterministic=True)
    again = train_testbed(tmp_path / "b", TINY, seed=1, deterministic=True)
    assert not torch.are_deterministic_algorithms_enabled()
    assert first["deterministic"] and first["train"]["final_loss"] == again["train"]["final_loss"]
    assert first["weights_sha256"] == again["weights_sha256"]  # the same teacher, bit for bit
    assert "--deterministic" in first["command"]
    assert json.loads((tmp_path / "a" / "testbed.json").read_text())["deterministic"] is True
    plain = train_testbed(tmp_path / "c", TINY, seed=1)
    assert plain["deterministic"] is False and "--deterministic" not in plain["command"]
    assert train_testbed(tmp_path / "d", TINY, seed=2)["weights_sha256"] != first["weights_sha256"]


def test_deterministic_algorithms_hold_only_within_the_block(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    with deterministic_algorithms(True):
        assert torch.are_deterministic_algorithms_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert not torch.are_deterministic_algorithms_enabled()
    with deterministic_algorithms(False):
        assert not torch.are_deterministic_algorithms_enabled()
