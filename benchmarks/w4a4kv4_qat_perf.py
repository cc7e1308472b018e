"""W4A4KV4 QAT-KD step time and memory against the weight-only QAT-KD step on the same model, on one GPU.

Qwen3-0.6B's shape with random weights (vocab 151,936), batch 4 x 2,048 tokens, every variant a real QAT-KD
step (``DistillationTrainer``: fake-quantized student, frozen bf16 teacher, forward KL) on the same data:

- ``w4_weight_only``: W4A4KV4's weights alone (int4 per channel, symmetric), round-to-nearest;
- ``w4a4``: plus int4 per-token activations (STE through the activation quantizer);
- ``w4a4kv4``: plus vLLM's int4 KV cache (Hadamard-rotated, per token and head), fused Triton kernel;
- ``w4a4kv4_pytorch_kv``: the same through the KV quantizer's PyTorch path (the kernel's baseline);
- ``w4a4kv4_flatquant``: W4A4KV4 after ``flatquant`` (1 epoch on 8 random sequences: the transforms'
  values do not matter for time and memory): its online Kronecker transforms and activation clipping
  train as their own parameter groups beside the weights, through the fused Triton kernels;
- ``w4a4kv4_flatquant_pytorch``: the same through the transforms' PyTorch path (the kernels' baseline);
- ``w4a4kv4_flatquant_gc``: ``w4a4kv4_flatquant`` with gradient checkpointing;
- ``w4a4kv4_flatquant_compiled``: ``w4a4kv4_flatquant`` with the student's blocks compiled (``compile_student``:
  the transforms' float32 work fused; the KV quantizer runs between graphs).

The issue's bound: transforms and clipping must not double training memory (``w4a4kv4_flatquant`` peak
< 2x ``w4_weight_only``).

``--profile VARIANT ...``: after every variant is timed, those variants are built again and their step's GPU
kernel time (``gpu_kernel_ms``) and costliest kernels recorded (``top_kernels_ms``), so that profiling cannot slow
the timed steps.

    python benchmarks/w4a4kv4_qat_perf.py --json docs/results/w4a4kv4_qat_perf.json
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import shlex
import sys
import time
from unittest import mock

import torch
from provenance import git_commit
from qat_kd_perf import (
    QWEN3_0_6B,
    _Tokenizer,
    cleanup,
    cuda_device,
    fresh_model,
    kernel_profile,
    measure,
    rqat_trainer,
    step_benchmark_parser,
    synthetic_batch,
)

from rqat_sdk.files import write_json_atomic

WEIGHTS_ONLY = {"weights": {"num_bits": 4, "group_size": None, "symmetric": True}}
VARIANTS = {
    "w4_weight_only": (WEIGHTS_ONLY, False, False, None, False),
    "w4a4": ("W4A4", False, False, None, False),
    "w4a4kv4": ("W4A4KV4", False, False, None, False),
    "w4a4kv4_pytorch_kv": ("W4A4KV4", False, False, "kv_cache", False),
    "w4a4kv4_flatquant": ("W4A4KV4", True, False, None, False),
    "w4a4kv4_flatquant_pytorch": ("W4A4KV4", True, False, "transforms", False),
    "w4a4kv4_flatquant_gc": ("W4A4KV4", True, True, None, False),
    "w4a4kv4_flatquant_compiled": ("W4A4KV4", True, False, None, True),
}
"""name: (scheme, flatquant first, gradient checkpointing, the fused kernel replaced by its PyTorch path
(``kv_cache``, ``transforms`` or None), student compiled)."""


@contextlib.contextmanager
def pytorch_path(kernel: str | None):
    """``kernel`` (``kv_cache``: the KV quantizer's; ``transforms``: FlatQuant's) through its PyTorch path."""
    if kernel is None:
        yield
        return
    # triton imports at module level (CUDA builds only)
    from rqat_sdk.ops import triton_affine_transform, triton_kv_cache

    module = {"kv_cache": triton_kv_cache, "transforms": triton_affine_transform}[kernel]
    with mock.patch.object(module, "supports", lambda *args: False):
        yield


def calibrate_flatquant(model, scheme: str, sequences: int, length: int) -> None:
    """Attach FlatQuant transforms as the ``flatquant`` modifier does, on random token sequences."""
    from datasets import Dataset

    from rqat_sdk.modifiers.ptq.flatquant import CalibrationOptions, calibrate
    from rqat_sdk.scheme import QuantScheme

    ids = synthetic_batch(sequences, length, QWEN3_0_6B["vocab_size"]).tolist()
    options = CalibrationOptions(transforms=("qkv", "o", "gate_up", "down"), epochs=1, learning_rate=5e-3,
                                 orthogonal_init=True, smoothing=True, weight_clipping=True, activation_clipping=True,
                                 seed=0)
    calibration = Dataset.from_list([{"input_ids": row} for row in ids])
    calibrate(model, calibration, QuantScheme.model_validate(scheme), options)


def bench(ids, scheme, flatquant: bool, checkpointing: bool, warmup: int, steps: int, *,
          compiled: bool = False, profile: bool = False) -> dict:
    """One variant's step time and peak memory (or, with ``profile``, its kernels' GPU time instead)."""
    import rqat_sdk
    from rqat_sdk.modifiers.layers import attach_fake_quant, detach_fake_quant, parameter_group

    model = fresh_model()
    teacher = copy.deepcopy(model).eval().requires_grad_(False)
    if flatquant:
        calibrate_flatquant(model, scheme, sequences=8, length=512)
    recipe = {"version": 1, "scheme": scheme, "stages": [{"name": "ptq", "modifiers": [{"type": "rtn"}]}]}
    model = rqat_sdk.oneshot(model, recipe, tokenizer=_Tokenizer()).model
    attach_fake_quant(model, dtype=torch.bfloat16, learn_scales=False, learn_clipping=False)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    groups: dict[str, int] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        groups[parameter_group(name)] = groups.get(parameter_group(name), 0) + parameter.numel()
    trainer, step = rqat_trainer(model, teacher, ids, "kd", compile_student=compiled)
    warmup += 2 * compiled  # the compile happens in the first steps
    if profile:
        measure(step, warmup, 1)
        result: dict = kernel_profile(step, steps=1, count=16)
    else:
        ms, gb = measure(step, warmup, steps)
        result = {"ms": ms, "peak_gb": gb, "trained_parameters": groups}
    detach_fake_quant(model)
    del model, teacher, trainer, step
    cleanup()
    return result


def table_rows(results: dict[str, dict], tokens: int) -> list[dict]:
    """The record's rows: each variant's time and memory, and both against the weight-only step."""
    base = results["w4_weight_only"]
    return [
        {"variant": name, "step_ms": round(r["ms"], 1), "tokens_per_s": round(tokens / r["ms"] * 1000),
         "peak_gb": round(r["peak_gb"], 2), "time_vs_weight_only": round(r["ms"] / base["ms"], 3),
         "memory_vs_weight_only": round(r["peak_gb"] / base["peak_gb"], 3),
         "trained_parameters": r["trained_parameters"]}
        for name, r in results.items()
    ]


def main() -> int:
    parser = step_benchmark_parser(__doc__)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                        help="which to run (w4_weight_only, the baseline, always runs)")
    parser.add_argument("--profile", nargs="+", choices=list(VARIANTS), default=[],
                        help="after the timings, record these variants' costliest GPU kernels")
    args = parser.parse_args()
    if unmeasured := sorted(set(args.profile) - set(args.variants) - {"w4_weight_only"}):
        parser.error(f"--profile {' '.join(unmeasured)}: not in --variants")
    device = cuda_device()
    if device is None:
        return 2

    ids = synthetic_batch(args.batch, args.seq, QWEN3_0_6B["vocab_size"]).cuda()
    tokens = ids.numel()
    results: dict[str, dict] = {}
    record = {
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "device": device,
        "date": datetime.date.today().isoformat(), "commit": git_commit(),
        "tokens_per_step": tokens,
        "rows": [],
    }
    for name, (scheme, flatquant, checkpointing, pytorch, compiled) in VARIANTS.items():
        if name != "w4_weight_only" and name not in args.variants:
            continue
        started = time.perf_counter()
        try:
            with pytorch_path(pytorch):
                results[name] = bench(ids, scheme, flatquant, checkpointing, args.warmup, args.steps,
                                      compiled=compiled)
        except torch.OutOfMemoryError:
            results[name] = {"ms": float("nan"), "peak_gb": float("nan"), "trained_parameters": {}}
            cleanup()
        print(f"{name}: {results[name]['ms']:.1f} ms, peak {results[name]['peak_gb']:.1f} GB "
              f"({time.perf_counter() - started:.0f} s)", flush=True)
        record["rows"] = rows = table_rows(results, tokens)
        if args.json:  # after every variant: a run cut short keeps what it measured
            write_json_atomic(args.json, record)

    base = results["w4_weight_only"]
    for row in rows:  # the profiler only after every timing (a process that has profiled can launch slower)
        if row["variant"] not in args.profile:
            continue
        if row["step_ms"] != row["step_ms"]:  # NaN: out of memory when timed
            print(f"{row['variant']}: not profiled (it ran out of memory)", flush=True)
            continue
        scheme, flatquant, checkpointing, pytorch, compiled = VARIANTS[row["variant"]]
        try:
            with pytorch_path(pytorch):
                row.update(bench(ids, scheme, flatquant, checkpointing, args.warmup, args.steps,
                                 compiled=compiled, profile=True))
        except torch.OutOfMemoryError:
            cleanup()
            print(f"{row['variant']}: not profiled (out of memory)", flush=True)
            continue
        print(f"{row['variant']} costliest kernels: {row['top_kernels_ms']}", flush=True)
        if args.json:
            write_json_atomic(args.json, record)
    print()
    print("| variant | step ms | tokens/s | peak GB | time / weight-only | memory / weight-only |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['variant']} | {row['step_ms']:.1f} | {row['tokens_per_s']:,} | {row['peak_gb']:.1f} | "
              f"{row['time_vs_weight_only']:.2f}x | {row['memory_vs_weight_only']:.2f}x |")
    if "w4a4kv4_flatquant" in results:
        flat = results["w4a4kv4_flatquant"]["peak_gb"] / base["peak_gb"]
        print(f"\nFlatQuant W4A4KV4 peak / weight-only peak: {flat:.2f} (the issue's bound: < 2)")
    for row in rows:
        print(f"  {row['variant']} trained parameters by group: {row['trained_parameters']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
