"""The same recipe under a multi-process launcher (torchrun, gloo on CPU): DDP and FSDP2."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import rqat_sdk

WORKER = Path(__file__).with_name("distributed_worker.py")


def launch(model: Path, output: Path, strategy: str, *extra: str) -> dict:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(WORKER),
               str(model), str(output), strategy, *extra]
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


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_a_compiled_student_trains_like_one_process(tiny_qwen3, tmp_path, single_process, strategy):
    """compile_student under DDP and FSDP2 (each block on its own, under FSDP2 each sharded block): the same losses
    as one eager process, to the rounding of fused kernels."""
    output = tmp_path / "out"
    record = launch(tiny_qwen3, output, strategy, "compile")
    assert record["status"] == "complete" and record["export"]["exact"] is True
    assert losses(output) == pytest.approx(losses(single_process), rel=2e-2)


def test_cli_under_a_launcher_reports_once(tiny_qwen3, tmp_path):
    """`torchrun -m rqat_sdk run`: every rank trains, only the main rank exports and prints the summary."""
    import yaml

    sys.path.insert(0, str(WORKER.parent))
    from distributed_worker import recipe

    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe("ddp")))
    output = tmp_path / "out"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "rqat_sdk", "run",
               str(recipe_file), "--model", str(tiny_qwen3), "--dataset", "reasoning-gym:chain_sum",
               "--output-dir", str(output)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summaries = [line for line in done.stdout.splitlines() if line.startswith("reload check")]
    assert summaries == ["reload check  identical logits"]
    assert json.loads((output / "run.json").read_text())["status"] == "complete"


def test_fsdp_leaves_integer_parameters_whole(tiny_qwen3, monkeypatch):
    """torch 2.11's FSDP2 fails on integer parameters (compressed-tensors' zero points); they stay unsharded."""
    import socket

    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from rqat_sdk import distributed

    recipe = {"version": 1, "scheme": "W3G128", "stages": [{"name": "ptq", "modifiers": [{"type": "rtn"}]}]}
    model = rqat_sdk.oneshot(tiny_qwen3, recipe, dtype="float32").model
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        wrapped = distributed.wrap(model, "fsdp", list(model.model.layers), torch.float32)
        parameters = dict(wrapped.named_parameters())
        zero_points = [p for name, p in parameters.items() if name.endswith("weight_zero_point")]
        assert zero_points and all(not isinstance(p, DTensor) and p.dtype == torch.int8 for p in zero_points)
        assert isinstance(parameters["model.layers.0.mlp.down_proj.weight"], DTensor)
    finally:
        dist.destroy_process_group()
