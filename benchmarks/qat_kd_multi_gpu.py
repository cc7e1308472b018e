"""QAT-KD on two GPUs (DDP and FSDP2) against one: the training step, and a whole recipe under accelerate.

Run on a machine with at least two GPUs; the script launches every multi-process part itself:

- ``step``: rqat's QAT-KD training step (``DistillationTrainer``: W3G128 fake-quantized student, frozen bf16
  teacher, forward KL on chunked LM-head logits) on Qwen3-0.6B's shape with random weights, 4 x 2,048 tokens
  per GPU, on one GPU, then under ``torchrun`` on two GPUs with DDP and with FSDP2. Reports the step time,
  tokens per second over all GPUs, the scaling efficiency against one GPU and the peak memory per GPU.
- ``recipe``: the bundled long-testbed recipe's GPTQ and QAT-KD stages run end to end by ``rqat run`` on one
  GPU and by ``accelerate launch --num_processes 2 -m rqat_sdk run`` with DDP and with FSDP2 (the same global
  batch of 32), each checkpoint exported and evaluated on held-out problems. The three should agree within
  sampling noise.

    python benchmarks/qat_kd_multi_gpu.py --out runs/multi_gpu --json docs/results/qat_kd_multi_gpu.json
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch
from provenance import git_commit
from qat_kd_perf import (
    SHAPES,
    fresh_model,
    host_profile,
    kernel_profile,
    measure,
    quantize_w3g128,
    rqat_trainer,
    synthetic_batch,
)

TESTBED = "rqat_sdk/testbed/long"
RECIPE = "testbed-long_w3g128_gptq_kd_grpo"
LAYOUTS = (("1 GPU", 1, "ddp"), ("2 GPUs, DDP", 2, "ddp"), ("2 GPUs, FSDP2", 2, "fsdp"))


def step_worker(args: argparse.Namespace) -> int:
    """One rank of a step benchmark (started by :func:`launch_step`); writes its result to ``args.result``."""
    from rqat_sdk import distributed
    from rqat_sdk.modifiers.layers import attach_fake_quant
    from rqat_sdk.ops.fp8 import linears_to_fp8_

    distributed.initialize()
    if args.strategy == "fsdp" and not torch.distributed.is_initialized():  # one rank: torchrun set the address
        torch.distributed.init_process_group("nccl", device_id=distributed.local_device())
    torch.backends.cuda.matmul.allow_tf32 = True
    world = distributed.world_size()
    shape = SHAPES[args.shape]
    ids = synthetic_batch(args.batch * args.accumulate * world, args.seq, shape["vocab_size"]).cuda()
    student = fresh_model(shape=shape)
    parameters = sum(p.numel() for p in student.parameters())  # before an FP8 teacher holds its weights as buffers
    teacher = copy.deepcopy(student).eval().requires_grad_(False)
    if args.teacher_precision == "fp8":
        linears_to_fp8_(teacher, keep=[teacher.get_output_embeddings()])  # as SessionState.teacher does
    student = quantize_w3g128(student)
    attach_fake_quant(student, dtype=torch.bfloat16, learn_scales=False, learn_clipping=False)
    if args.gradient_checkpointing:  # as a recipe's gradient_checkpointing (and _every_n_layers) does
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False},
                                              every_n_layers=args.checkpoint_every)
    trainer, step = rqat_trainer(student, teacher, ids, "kd", args.strategy, compile_teacher=args.compile,
                                 compile_student=args.compile, micro_batches=args.accumulate)
    if args.strategy == "fsdp" and not trainer.sharded:  # a row labelled FSDP2 must have run it
        raise SystemExit("the student is not sharded: FSDP2 needs a process group")
    step_ms, peak_gb = measure(step, args.warmup + 2 * args.compile, args.steps)
    step_ms = distributed.all_reduce_sum(torch.tensor(step_ms, device="cuda")).item() / world  # mean over ranks
    peak = torch.tensor(peak_gb, device="cuda")
    if world > 1:
        torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)
    # the profiler after the timing (a process that has profiled can launch slower)
    profile = {**kernel_profile(step, steps=1, count=16), **host_profile(step)} if args.profile else {}
    if distributed.is_main():
        Path(args.result).write_text(json.dumps({
            "gpus": world, "strategy": args.strategy, "sharded": trainer.sharded, "step_ms": round(step_ms, 1),
            "tokens_per_step": ids.numel(), "micro_batches_per_step": args.accumulate,
            "tokens_per_s": round(ids.numel() / step_ms * 1000),
            "peak_gb_per_gpu": round(peak.item(), 2),
            "parameters": parameters,
            "compile_teacher": args.compile, "compile_student": args.compile,
            "teacher_precision": args.teacher_precision,
            **profile,
        }))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


def launch_step(script: str, result: Path, gpus: int, strategy: str, *, shape: str, batch: int, seq: int,
                warmup: int, steps: int, gradient_checkpointing: bool = False, checkpoint_every: int = 1,
                compiled: bool = False, profile: bool = False, teacher_precision: str = "bf16",
                accumulate: int = 1) -> dict:
    """Run ``script``'s step worker on ``gpus`` GPUs and return its result: under torchrun beyond one GPU, and
    for FSDP2 on one (a process group of one rank: FSDP2's own costs without communication)."""
    worker = [script, "step-worker", "--strategy", strategy, "--result", str(result), "--shape", shape,
              "--batch", str(batch), "--seq", str(seq), "--warmup", str(warmup), "--steps", str(steps),
              *(["--gradient-checkpointing"] if gradient_checkpointing else []),
              "--checkpoint-every", str(checkpoint_every), "--teacher-precision", teacher_precision,
              "--accumulate", str(accumulate),
              *(["--compile"] if compiled else []), *(["--profile"] if profile else [])]
    launcher = [sys.executable] if gpus == 1 and strategy != "fsdp" else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}"]
    subprocess.run(launcher + worker, check=True)
    return json.loads(result.read_text())


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return int(text)


def add_step_worker_options(parser: argparse.ArgumentParser) -> None:
    """What :func:`step_worker` reads, for the scripts that launch it."""
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-0.6b", help=argparse.SUPPRESS)
    parser.add_argument("--gradient-checkpointing", action="store_true", help=argparse.SUPPRESS)
    # qat_kd_scale.py's docstring describes it; qat_kd_multi_gpu.py's steps do not checkpoint
    parser.add_argument("--checkpoint-every", type=positive_int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--teacher-precision", choices=("bf16", "fp8"), default="bf16",
                        help="the teacher's linear layers in bf16 or FP8 (teacher_precision)")
    parser.add_argument("--accumulate", type=positive_int, default=1,
                        help="micro-batches of --batch sequences per GPU whose gradients accumulate into one optimizer "
                             "step (a recipe's batch_size / (micro_batch_size x GPUs))")
    parser.add_argument("--compile", action="store_true",
                        help="compile_teacher and compile_student")
    parser.add_argument("--profile", action="store_true",
                        help="record each step's GPU kernel time, its costliest kernels and its host time by range")
    parser.add_argument("--strategy", default="ddp", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)


def time_steps(args: argparse.Namespace, out: Path) -> list[dict]:
    rows = []
    for label, gpus, strategy in LAYOUTS:
        started = time.perf_counter()
        row = {"layout": label, **launch_step(__file__, out / f"step-{gpus}-{strategy}.json", gpus, strategy,
                                              shape="qwen3-0.6b", batch=args.batch, seq=args.seq,
                                              warmup=args.warmup, steps=args.steps, compiled=args.compile,
                                              profile=args.profile, teacher_precision=args.teacher_precision,
                                              accumulate=args.accumulate)}
        print(f"step, {label}: {row['step_ms']} ms, {row['tokens_per_s']:,} tokens/s, "
              f"{row['peak_gb_per_gpu']} GB per GPU ({time.perf_counter() - started:.0f} s)", flush=True)
        rows.append(row)
    single = rows[0]["tokens_per_s"]
    for row in rows:
        row["scaling_efficiency"] = round(row["tokens_per_s"] / (single * row["gpus"]), 3)
    return rows


def recipe_for(strategy: str, problems: int) -> dict:
    """The bundled long-testbed recipe without its GRPO stage, QAT-KD distributed with ``strategy``."""
    import yaml

    from rqat_sdk.recipes import bundled

    recipe = yaml.safe_load(Path(bundled()[RECIPE]).read_text())
    recipe["name"] = f"testbed-long_w3g128_gptq_kd_{strategy}"
    recipe["description"] = f"GPTQ W3G128, then QAT-KD ({strategy}) on the long-chain testbed's task mix."
    recipe["stages"] = [stage for stage in recipe["stages"] if stage["name"] != "grpo"]
    for stage in recipe["stages"]:
        for modifier in stage["modifiers"]:
            if modifier["type"] == "qat_kd":
                modifier["distributed"] = strategy
                modifier["micro_batch_size"] = 16  # 32 per step: one micro-batch per rank on two GPUs
    recipe["export"]["evaluate"]["num_examples"] = problems
    return recipe


def run_recipes(args: argparse.Namespace, out: Path) -> list[dict]:
    import yaml

    rows = []
    for label, gpus, strategy in LAYOUTS:
        directory = out / f"recipe-{gpus}-{strategy}"
        recipe_file = out / f"recipe-{gpus}-{strategy}.yaml"
        recipe_file.write_text(yaml.safe_dump(recipe_for(strategy, args.problems), sort_keys=False))
        command = ["-m", "rqat_sdk", "run", str(recipe_file), "--model", TESTBED, "--dtype", "float32",
                   "--output-dir", str(directory), "--overwrite"]
        launcher = [sys.executable] if gpus == 1 else [
            sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", f"--num_processes={gpus}",
            "--num_machines=1", "--mixed_precision=no", "--dynamo_backend=no"]
        started = time.perf_counter()
        subprocess.run(launcher + command, check=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        seconds = time.perf_counter() - started
        record = json.loads((directory / "run.json").read_text())
        kd = next(stage for stage in record["stages"] if stage["name"] == "kd")["metrics"]["qat_kd"]
        evaluation = record["evaluation"]
        row = {
            "layout": label, "gpus": gpus, "strategy": strategy, "run_seconds": round(seconds, 1),
            "kd_seconds": kd["seconds"], "kd_tokens_per_s": kd["tokens_per_s"], "kd_final_loss": kd["final_loss"],
            "pass_at_1": evaluation["pass_at_1"], "std": evaluation["std"],
            "export_format": record["export"]["format"],
        }
        print(f"recipe, {label}: KD loss {row['kd_final_loss']:.4f}, pass@1 {100 * row['pass_at_1']:.1f} "
              f"± {100 * row['std']:.1f} ({seconds:.0f} s)", flush=True)
        rows.append(row)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", nargs="?", choices=("all", "step", "recipe", "step-worker"), default="all")
    parser.add_argument("--out", type=Path, default=Path("runs/multi_gpu"), help="where runs and logs go")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--batch", type=int, default=4, help="sequences per GPU in the step benchmark")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--problems", type=int, default=1000, help="held-out problems per recipe evaluation")
    add_step_worker_options(parser)
    args = parser.parse_args()
    if args.mode == "step-worker":
        return step_worker(args)
    if torch.cuda.device_count() < 2:
        print(f"needs at least two CUDA GPUs (found {torch.cuda.device_count()})")
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    device = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()}"
    print(f"device: {device}; torch {torch.__version__}", flush=True)
    steps = time_steps(args, args.out) if args.mode in ("all", "step") else []
    recipes = run_recipes(args, args.out) if args.mode in ("all", "recipe") else []

    print()
    if steps:
        print("| QAT-KD step (Qwen3-0.6B shape) | step ms | tokens/s | scaling | peak GB per GPU |")
        print("|---|---|---|---|---|")
        for row in steps:
            print(f"| {row['layout']} | {row['step_ms']} | {row['tokens_per_s']:,} | {row['scaling_efficiency']:.0%} "
                  f"| {row['peak_gb_per_gpu']} |")
    if recipes:
        print("| recipe (long testbed, GPTQ + KD) | KD s | KD tokens/s | final KD loss | pass@1 |")
        print("|---|---|---|---|---|")
        for row in recipes:
            print(f"| {row['layout']} | {row['kd_seconds']:.0f} | {row['kd_tokens_per_s']:,.0f} "
                  f"| {row['kd_final_loss']:.4f} | {100 * row['pass_at_1']:.1f} ± {100 * row['std']:.1f} |")
    if args.json:
        record = {"command": "python " + " ".join(shlex.quote(a) for a in sys.argv), "device": device,
                  "date": datetime.date.today().isoformat(), "commit": git_commit(), "step": steps, "recipe": recipes}
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
