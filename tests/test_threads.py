"""The CPU thread count rqat chooses: the user's when they set one, one thread for tiny models."""

from __future__ import annotations

import logging

import pytest
import torch

from rqat_sdk import threads
from rqat_sdk.threads import TINY_PARAMETERS, choose_threads, configure_threads

TINY, LARGE = 459_520, 135_000_000


def test_env_variable_is_honoured():
    count, why = choose_threads(TINY, current=2, default=2, env={"OMP_NUM_THREADS": "2"}, rqat_count=None)
    assert count == 2 and "OMP_NUM_THREADS=2" in why
    assert choose_threads(TINY, current=3, default=2, env={"MKL_NUM_THREADS": "3"}, rqat_count=None)[0] == 3


def test_explicit_set_num_threads_is_honoured():
    count, why = choose_threads(TINY, current=3, default=2, env={}, rqat_count=1)
    assert count == 3 and "set_num_threads" in why


def test_tiny_model_gets_one_thread():
    assert choose_threads(TINY, current=2, default=2, env={"OMP_NUM_THREADS": ""}, rqat_count=None)[0] == 1
    assert choose_threads(TINY_PARAMETERS - 1, current=4, default=4, env={}, rqat_count=None)[0] == 1


def test_larger_model_keeps_the_default_even_after_rqat_chose_one_thread():
    assert choose_threads(LARGE, current=2, default=2, env={}, rqat_count=None)[0] == 2
    assert choose_threads(TINY_PARAMETERS, current=1, default=4, env={}, rqat_count=1)[0] == 4


@pytest.fixture
def unset_threads(monkeypatch: pytest.MonkeyPatch):
    """No thread variables, torch at a pretended default of 2 threads; the real count comes back afterwards."""
    before = torch.get_num_threads()
    for name in threads.THREAD_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(threads, "torch_default_threads", lambda: 2)
    monkeypatch.setattr(threads, "_rqat_count", None)
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_configure_sets_one_thread_for_a_tiny_cpu_model_and_logs_it(unset_threads, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG, logger="rqat_sdk.threads")
    assert configure_threads(torch.nn.Linear(8, 8)) == 1
    assert torch.get_num_threads() == 1
    assert "CPU threads: 1 (0.00M parameters" in caplog.text
    monkeypatch.setattr(threads, "TINY_PARAMETERS", 10)  # the next model counts as large: back to the default
    assert configure_threads(torch.nn.Linear(8, 8)) == 2 and torch.get_num_threads() == 2


def test_configure_leaves_models_off_the_cpu_alone(unset_threads):
    assert configure_threads(torch.nn.Linear(8, 8, device="meta")) == 2
    assert torch.get_num_threads() == 2
