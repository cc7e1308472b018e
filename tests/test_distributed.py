"""The same recipe under a multi-process launcher (torchrun, gloo on CPU): DDP and FSDP2."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import rqat_sdk

WORKER = Path(__file__).with_name("distributed_worker.py")


def launch(model: Path, output: Path, strategy: str) -> dict:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(WORKER),
               str(model), str(output), strategy]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (line,) = [line for line in done.stdout.splitlines() if line.startswith("RECORD ")]
    return json.loads(line.removeprefix("RECORD "))


def losses(output: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (output / "logs" / "01-qat.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def single_process(tiny_qwen3, tmp_path_factory):
    sys.path.insert(0, str(WORKER.parent))
    from distributed_worker import recipe

    output = tmp_path_factory.mktemp("single") / "out"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as torchrun gives each rank: GPTQ's Hessian sums depend on the thread count
    try:
        rqat_sdk.oneshot(tiny_qwen3, recipe("ddp"), "reasoning-gym:chain_sum", output)
    finally:
        torch.set_num_threads(threads)
    return output


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_train_like_one(tiny_qwen3, tmp_path, single_process, strategy):
    output = tmp_path / "out"
    record = launch(tiny_qwen3, output, strategy)
    assert record["status"] == "complete" and record["export"]["exact"] is True
    assert record["stages"][1]["metrics"]["qat_kd"]["steps"] == 4
    assert not Path(f"{output}.partial").exists()
    # Two ranks read the same global batch as one process, and gradient averaging keeps training on the
    # same course: the losses agree up to float summation order.
    assert losses(output) == pytest.approx(losses(single_process), rel=1e-3)
