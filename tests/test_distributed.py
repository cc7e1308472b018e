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


def rtn_w3g128(tiny_qwen3):
    recipe = {"version": 1, "scheme": "W3G128", "stages": [{"name": "ptq", "modifiers": [{"type": "rtn"}]}]}
    return rqat_sdk.oneshot(tiny_qwen3, recipe, dtype="float32").model


def test_fsdp_leaves_integer_parameters_whole(tiny_qwen3, one_process_group):
    """torch 2.11's FSDP2 fails on integer parameters (compressed-tensors' zero points); they stay unsharded."""
    from torch.distributed.tensor import DTensor

    from rqat_sdk import distributed

    model = rtn_w3g128(tiny_qwen3)
    wrapped = distributed.wrap(model, "fsdp", list(model.model.layers), torch.float32)
    parameters = dict(wrapped.named_parameters())
    zero_points = [p for name, p in parameters.items() if name.endswith("weight_zero_point")]
    assert zero_points and all(not isinstance(p, DTensor) and p.dtype == torch.int8 for p in zero_points)
    assert isinstance(parameters["model.layers.0.mlp.down_proj.weight"], DTensor)


class Root(torch.nn.Module):
    """A module around the model, as the trainer's objective is: FSDP2's root."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)


def test_sharded_blocks_quantize_their_weights_together_at_each_forward(tiny_qwen3, one_process_group, monkeypatch):
    """Under FSDP2, fake_quantized_together has each sharded block quantize its gathered weights up front, in one
    call, at every forward, the recompute of a checkpointed one included. As in the trainer, the root that FSDP2
    shards last wraps the model; here only layer 0 is a block of its own, so layer 1's Linears, in no sharded
    module of the model, quantize their own weights. The loss and the gradients are the unsharded model's, and
    nothing is left attached afterwards."""
    import copy

    from rqat_sdk import distributed
    from rqat_sdk.modifiers import layers
    from rqat_sdk.modifiers.layers import _PRECOMPUTED, attach_fake_quant, fake_quantized_together, quantized_linears

    model = rtn_w3g128(tiny_qwen3)
    attach_fake_quant(model, dtype=torch.float32, learn_scales=False, learn_clipping=False)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    sharded = copy.deepcopy(model)
    root = distributed.wrap(Root(sharded), "fsdp", [sharded.model.layers[0]], torch.float32)
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))

    read_precomputed: dict[str, list[bool]] = {name: [] for name, _ in quantized_linears(sharded)}
    for name, linear in quantized_linears(sharded):
        linear.register_forward_pre_hook(
            lambda module, args, name=name: read_precomputed[name].append(_PRECOMPUTED in module.__dict__))
    calls = []
    together = layers.fake_quantize_weights
    monkeypatch.setattr(layers, "fake_quantize_weights", lambda weights, *rest: calls.append(len(weights))
                        or together(weights, *rest))
    hooks_before = {id(m): len(m._forward_pre_hooks) + len(m._forward_hooks) for m in sharded.modules()}
    with fake_quantized_together(sharded):
        loss = root(ids, labels=ids).loss
        loss.backward()
    reference = model(ids, labels=ids).loss
    reference.backward()

    in_block = [name for name in read_precomputed if name.startswith("model.layers.0.")]
    assert len(in_block) == 7 and calls == [7, 7]  # one call for the block's 7 Linears: the forward, the recompute
    assert all(read_precomputed[name] == ([True] * 2 if name in in_block else [False] * 2) for name in read_precomputed)
    assert loss.item() == pytest.approx(reference.item(), rel=1e-6)
    for index in (0, 1):
        gradient = dict(sharded.named_parameters())[f"model.layers.{index}.mlp.down_proj.weight"].grad.full_tensor()
        torch.testing.assert_close(gradient, model.model.layers[index].mlp.down_proj.weight.grad)
    assert not any(_PRECOMPUTED in m.__dict__ for _, m in quantized_linears(sharded))
    assert {id(m): len(m._forward_pre_hooks) + len(m._forward_hooks) for m in sharded.modules()} == hooks_before
