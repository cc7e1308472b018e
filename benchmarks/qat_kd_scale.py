"""QAT-KD at the seed's model sizes: tokens/s, peak memory and model FLOPs utilisation on one or two GPUs.

rqat's QAT-KD training step (``DistillationTrainer``: W3G128 fake-quantized student, frozen bf16 teacher, forward
KL on chunked LM-head logits) on Qwen3-0.6B-, 1.7B- and 4B-shaped models (random weights, the real 151,936-token
vocabulary), ``--batch`` sequences of ``--seq`` tokens per GPU, the student with gradient checkpointing where
``--checkpointing`` names its shape. Each shape runs on one GPU and, with ``--gpus 2``, under FSDP2 on two.

``--checkpoint-every n`` checkpoints only every n-th layer of those shapes (``gradient_checkpointing_every_n_layers``)
and ``--teacher-precision fp8`` runs the teacher's linear layers in FP8 (``teacher_precision``). ``--accumulate k``
runs each step as k micro-batches of ``--batch`` sequences per GPU whose gradients accumulate into one optimizer
step, as a recipe whose ``batch_size`` is k x ``micro_batch_size`` x GPUs does (the paper's batch of 32 is 16
micro-batches of 2 on one GPU). ``--fsdp-one-gpu`` adds a row per shape under FSDP2 with a process group of one
rank: FSDP2's hooks, casts and sharded optimizer without communication (for one rank FSDP2 also skips its
collectives' copy-in and copy-out and copies each parameter instead, so this is not the two-rank path minus the
links).
A row that fails (out of memory, say) is recorded with its error and the run goes on.

``--compile`` compiles the teacher's and the student's transformer blocks one by one (``compile_teacher``,
``compile_student``), ``--profile`` records each row's GPU kernel time per step (against its step
time: how busy the GPU is), its costliest kernels and, from a profile of the host alone, the host time of the
labelled ranges (FSDP2's hooks and collectives, the optimizer, rqat's weight quantization).

Model FLOPs utilisation counts 8 x parameters FLOPs per token (the student's forward and backward, 6, and the
teacher's forward, 2) against the GPU's dense bf16 peak (``--peak-tflops``, per GPU; 989 for an H100 or H200 SXM).

    python benchmarks/qat_kd_scale.py --gpus 1 2 --json docs/results/qat_kd_scale.json
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from provenance import git_commit
from qat_kd_multi_gpu import add_step_worker_options, launch_step, step_worker
from qat_kd_perf import SHAPES

from rqat_sdk.files import write_json_atomic

FLOPS_PER_PARAMETER_TOKEN = 8
"""The student's forward and backward (6) and the teacher's forward (2)."""


def mfu(tokens_per_s: float, parameters: int, gpus: int, peak_tflops: float) -> float:
    """Model FLOPs utilisation: the FLOPs the tokens needed, over what the GPUs could do at their bf16 peak."""
    return FLOPS_PER_PARAMETER_TOKEN * parameters * tokens_per_s / (gpus * peak_tflops * 1e12)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", nargs="?", choices=("run", "step-worker"), default="run")
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=["qwen3-0.6b", "qwen3-1.7b", "qwen3-4b"])
    parser.add_argument("--gpus", nargs="+", type=int, choices=(1, 2), default=[1])
    parser.add_argument("--batch", type=int, default=2, help="sequences per GPU")
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--checkpointing", nargs="*", choices=sorted(SHAPES), default=["qwen3-1.7b", "qwen3-4b"],
                        help="shapes whose student recomputes activations in the backward pass")
    parser.add_argument("--fsdp-one-gpu", action="store_true",
                        help="also run each shape under FSDP2 on one GPU (one rank)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 TFLOPS of one GPU")
    parser.add_argument("--json", type=Path)
    add_step_worker_options(parser)
    args = parser.parse_args()
    if args.mode == "step-worker":
        return step_worker(args)
    if torch.cuda.device_count() < max(args.gpus):
        needed = max(args.gpus)
        print(f"needs {needed} CUDA GPU{'s' if needed > 1 else ''} (found {torch.cuda.device_count()})")
        return 2
    device = torch.cuda.get_device_name()
    print(f"device: {torch.cuda.device_count()} x {device}; torch {torch.__version__}", flush=True)
    layouts = [(gpus, "fsdp" if gpus > 1 else "ddp") for gpus in args.gpus]
    if args.fsdp_one_gpu:
        layouts.insert(1, (1, "fsdp"))
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for shape in args.shapes:
            for gpus, strategy in layouts:
                started = time.perf_counter()
                checkpointing = shape in args.checkpointing
                label = "one GPU" if strategy == "ddp" else "FSDP2" if gpus > 1 else "FSDP2, one rank"
                row = {"shape": shape, "gpus": gpus, "strategy": label, "seq_len": args.seq,
                       "sequences_per_gpu": args.batch, "micro_batches_per_step": args.accumulate,
                       "gradient_checkpointing": checkpointing,
                       "checkpoint_every_n_layers": args.checkpoint_every if checkpointing else None,
                       "teacher_precision": args.teacher_precision}
                try:
                    result = launch_step(__file__, Path(scratch) / f"{shape}-{gpus}-{strategy}.json", gpus, strategy,
                                         shape=shape, batch=args.batch, seq=args.seq, warmup=args.warmup,
                                         steps=args.steps, gradient_checkpointing=checkpointing,
                                         checkpoint_every=args.checkpoint_every, compiled=args.compile,
                                         profile=args.profile, teacher_precision=args.teacher_precision,
                                         accumulate=args.accumulate)
                except subprocess.CalledProcessError as failed:  # the worker printed why (out of memory, say)
                    row["error"] = f"the step worker exited with {failed.returncode}"
                    rows.append(row)
                    print(f"{shape}, {row['strategy']}: {row['error']}", flush=True)
                else:
                    row.update({
                        "compile_teacher": result["compile_teacher"], "compile_student": result["compile_student"],
                        "parameters": result["parameters"], "step_ms": result["step_ms"],
                        "tokens_per_s": result["tokens_per_s"], "peak_gb": result["peak_gb_per_gpu"],
                        "mfu": round(mfu(result["tokens_per_s"], result["parameters"], gpus, args.peak_tflops), 4),
                        **{key: result[key] for key in ("gpu_kernel_ms", "top_kernels_ms", "host_profiled_step_ms",
                                                          "host_ranges_ms")
                           if key in result}})
                    rows.append(row)
                    print(f"{shape}, {row['strategy']}: {row['tokens_per_s']:,} tokens/s, MFU {row['mfu']:.1%}, "
                          f"peak {row['peak_gb']} GB per GPU ({time.perf_counter() - started:.0f} s)", flush=True)
                if args.json:  # after every row: a run stopped by a time limit keeps what finished
                    write_json_atomic(args.json, {
                        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv), "device": device,
                        "date": datetime.date.today().isoformat(), "commit": git_commit(),
                        "peak_tflops_per_gpu": args.peak_tflops, "rows": rows})
    print()
    print("| shape | GPUs | tokens/s | MFU | peak GB per GPU | checkpointing |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        checkpointed = f"every {row['checkpoint_every_n_layers']}" if row["gradient_checkpointing"] else "no"
        if "error" in row:
            print(f"| {row['shape']} | {row['strategy']} | {row['error']} | | | {checkpointed} |")
        else:
            print(f"| {row['shape']} | {row['strategy']} | {row['tokens_per_s']:,} | {row['mfu']:.1%} "
                  f"| {row['peak_gb']} | {checkpointed} |")
    for shape in args.shapes:
        one, two = ({r["strategy"]: r for r in rows if r["shape"] == shape and "error" not in r}.get(layout)
                    for layout in ("one GPU", "FSDP2"))
        if one and two:
            print(f"{shape}: two GPUs under FSDP2 give {two['tokens_per_s'] / one['tokens_per_s']:.2f}x one GPU's "
                  f"tokens/s (target >= 1.8)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
