"""benchmarks/qat_kd_scale.py on the CPU: its shapes are Qwen3's sizes, its MFU counts 8 x parameters FLOPs per
token, and without GPUs it says so instead of measuring."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

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


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the message on a machine without GPUs")
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
