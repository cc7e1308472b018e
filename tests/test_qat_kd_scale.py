"""benchmarks/qat_kd_scale.py on the CPU: its shapes are Qwen3's sizes, its MFU counts 8 x parameters FLOPs per
token, and without GPUs it says so instead of measuring."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rqat_sdk.modifiers.layers import attach_fake_quant

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def scale():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import qat_kd_perf
        import qat_kd_scale

        yield qat_kd_scale, qat_kd_perf
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_the_shapes_have_qwen3s_parameter_counts(scale):
    _, perf = scale
    counts = {name: sum(p.numel() for p in perf.fresh_model(shape=shape, device="meta").parameters())
              for name, shape in perf.SHAPES.items()}
    assert counts == {"qwen3-0.6b": 596_049_920, "qwen3-1.7b": 1_720_574_976, "qwen3-4b": 4_022_468_096}


def test_mfu_counts_student_and_teacher(scale):
    module, _ = scale
    # 4B parameters at 10,000 tokens/s: 8 x 4e9 x 1e4 = 3.2e14 FLOP/s, a third of one 960-TFLOPS GPU
    assert module.mfu(10_000, 4_000_000_000, 1, 960.0) == pytest.approx(1 / 3)
    assert module.mfu(20_000, 4_000_000_000, 2, 960.0) == pytest.approx(1 / 3)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without GPUs")
def test_without_gpus_it_says_so():
    run = subprocess.run([sys.executable, "qat_kd_scale.py"], cwd=BENCHMARKS, capture_output=True, text=True)
    assert run.returncode == 2 and "needs 1 CUDA GPU (found 0)" in run.stdout


def test_qat_kd_perfs_record_holds_what_a_stopped_run_measured(scale):
    """qat_kd_perf.py rewrites its record after every variant: a part of the variants gives their keys and the
    ratios it can compute, nothing from what did not run."""
    _, perf = scale
    measured = perf.Measured(tokens=8192)
    measured.steps = {"bf16_ce": (180.0, 35.0), "qat_kd": (234.0, 28.4), "qat_kd_compiled": (182.0, 23.2)}
    record = measured.record()
    assert record["qat_kd_over_bf16_ce"] == 1.3 and record["qat_kd_compiled_over_bf16_ce"] == 1.011
    assert record["qat_kd_compiled_peak_gb"] == 23.2 and record["tokens_per_s"]["bf16_ce"] == 45511
    assert "fake_quant_overhead" not in record and record["breakdown_ms"] == {}
    assert "qat_kd_kernel_gpu_ms" not in record
    measured.steps |= {"no_fake_quant_ce": (184.0, 25.9), "fake_quant_ce": (190.8, 26.8),
                       "naive_kd": (float("nan"), float("nan"))}  # out of memory
    record = measured.record()
    assert record["fake_quant_overhead"] == round(6.8 / 234.0, 4) and record["tokens_per_s"]["naive_kd"] is None


TINY_SHAPE = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=32)


def tiny_step(perf, strategy: str = "ddp", micro_batches: int = 1) -> tuple:
    """``rqat_trainer``'s trainer and QAT-KD training step of the benchmarks' kind on a tiny Qwen3 shape, on the
    CPU in float32."""
    student = perf.fresh_model(shape=TINY_SHAPE, device="cpu", dtype=torch.float32)
    teacher = copy.deepcopy(student).eval().requires_grad_(False)
    student = perf.quantize_w3g128(student)
    attach_fake_quant(student, dtype=torch.float32, learn_scales=False, learn_clipping=False)
    ids = perf.synthetic_batch(4, 64, TINY_SHAPE["vocab_size"])
    return perf.rqat_trainer(student, teacher, ids, "kd", strategy, micro_batches=micro_batches)


def test_micro_batches_accumulate_into_the_same_step(scale):
    """--accumulate: the step's sequences in micro-batches whose gradients accumulate give one step's loss and
    gradient (to float32 summation order)."""
    _, perf = scale
    results = []
    for micro_batches in (1, 2):
        trainer, step = tiny_step(perf, micro_batches=micro_batches)
        assert len(trainer.batches.micro_batches(0, torch.device("cpu"))) == micro_batches
        loss, tokens = step()
        results.append((loss, tokens, trainer._grad_norm))
    (loss_one, tokens_one, norm_one), (loss_two, tokens_two, norm_two) = results
    assert tokens_one == tokens_two == 4 * 64
    assert loss_two == pytest.approx(loss_one, rel=1e-5)
    assert norm_two == pytest.approx(norm_one, rel=1e-4)


def test_host_profile_gives_fsdp2s_and_rqats_ranges_one_entry_each(scale, one_process_group, monkeypatch):
    """--profile's host ranges under FSDP2 (one rank, gloo): FSDP2's hooks, the optimizer and rqat's weight
    quantization, each one entry however many layers it ran for, and the profiled step's wall time."""
    _, perf = scale
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)  # the benchmark's GPU sync; nothing to wait for
    _, step = tiny_step(perf, "fsdp")
    step()
    profiled = perf.host_profile(step)
    ranges = profiled["host_ranges_ms"]
    named = ("FSDP::pre_forward", "FSDP::post_backward_reduce", "rqat::fake_quantize_weights")
    assert all(ranges.get(name, 0) > 0 for name in named), ranges
    assert any(name.startswith("Optimizer.step#") for name in ranges)
    assert not any(" (" in name or " for " in name for name in ranges)  # per-layer labels summed
    assert profiled["host_profiled_step_ms"] >= max(ranges.values())
