"""GRPO variants from one KD checkpoint: does GRPO after QAT-KD raise pass@1 on the long-chain testbed?

``paper_tables.py`` runs every row from scratch (PTQ, KD, then GRPO). To compare several GRPO settings
against the same KD model, ``kd`` runs PTQ + QAT-KD once and evaluates BF16 and the KD model; each
``variant`` then resumes that run with a GRPO stage appended (the run's checkpoints stand in for the
finished PTQ and KD stages, so only GRPO trains) and evaluates the result. Variants may run at once, as
separate processes on one GPU. Every evaluation is pass@1 over 3 samples (temperature 0.6, top-p 0.95)
and greedy, on ``--problems`` held-out problems; results are appended to ``OUT/results.jsonl``.

    python benchmarks/grpo_from_kd.py kd runs/grpo --scheme W3G128 --init gptq --problems 2000
    python benchmarks/grpo_from_kd.py variant runs/grpo s250 --problems 2000 \\
        '{"data": "reasoning-gym:chain_sum(min_terms=4,max_terms=7,min_digits=2,max_digits=3)",
          "prompts_per_step": 32, "micro_batch_size": 256, "learning_rate": 1e-4, "steps": 250}'
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch
from paper_tables import INITS, SCHEMES

import rqat_sdk
from rqat_sdk.recipe import Recipe
from rqat_sdk.testbed.tasks import RESPONSE_TOKENS
from rqat_sdk.testbed.train import LONG

BENCHMARK = "testbed-long"
SEQUENCE = 320
GRPO_DEFAULTS = {"type": "grpo", "steps": 30, "prompts_per_step": 8, "group_size": 8, "micro_batch_size": 64,
                 "max_completion_length": RESPONSE_TOKENS[BENCHMARK], "learning_rate": 1e-4, "temperature": 1.0,
                 "save_steps": 10_000}
"""A variant's GRPO modifier, before its JSON overrides (``data`` in the JSON picks GRPO's prompts)."""


def ptq_and_kd(args: argparse.Namespace) -> list[dict]:
    return [
        {"name": "ptq", "data": {"source": BENCHMARK, "num_samples": 128, "max_seq_length": SEQUENCE},
         "modifiers": INITS[args.init]},
        {"name": "kd", "data": {"source": BENCHMARK, "num_samples": 8000, "max_seq_length": SEQUENCE},
         "modifiers": [{"type": "qat_kd", "steps": args.kd_steps, "batch_size": 32, "micro_batch_size": 32,
                        "learning_rate": args.kd_lr, "warmup_steps": 10, "logging_steps": 50, "save_steps": 10_000}]},
    ]


def evaluate(model, tokenizer, label: str, problems: int) -> dict:
    rows = {}
    for mode, greedy in (("T0.6", False), ("greedy", True)):
        report = rqat_sdk.evaluate(model, BENCHMARK, tokenizer=tokenizer, samples=3, num_examples=problems,
                                   max_new_tokens=RESPONSE_TOKENS[BENCHMARK], batch_size=500, label=label,
                                   dtype="float32", greedy=greedy)
        rows[mode] = {"pass": round(100 * report.pass_at_1, 2), "std": round(100 * report.std, 2)}
    return rows


def emit(out: Path, record: dict) -> None:
    print("RESULT " + json.dumps(record), flush=True)
    with open(out / "results.jsonl", "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


def run_kd(args: argparse.Namespace) -> None:
    from transformers import AutoTokenizer

    started = time.perf_counter()
    kd_dir = args.out / "kd"
    recipe = {"version": 1, "seed": 0, "scheme": SCHEMES[args.scheme], "stages": ptq_and_kd(args)}
    if not (kd_dir / "config.json").exists():
        rqat_sdk.oneshot(args.testbed, recipe, output_dir=kd_dir, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(kd_dir)
    emit(args.out, {"name": "BF16", **evaluate(str(args.testbed), tokenizer, "BF16", args.problems)})
    label = {"gptq": "GPTQ", "rtn": "RTN", "rotation+gptq": "Rotation+GPTQ"}.get(args.init, args.init) + "+KD"
    emit(args.out, {"name": label, **evaluate(str(kd_dir), tokenizer, label, args.problems),
                    "seconds": round(time.perf_counter() - started)})


def run_variant(args: argparse.Namespace) -> None:
    overrides = json.loads(args.grpo)
    data = overrides.pop("data", BENCHMARK)
    grpo = {**GRPO_DEFAULTS, **overrides}
    recipe = {"version": 1, "seed": 0, "scheme": SCHEMES[args.scheme], "stages": [
        *ptq_and_kd(args),
        {"name": "grpo", "data": {"source": data, "num_samples": 4000, "max_seq_length": SEQUENCE}, "modifiers": [grpo]},
    ]}
    # A run directory whose PTQ and KD stages are done: the KD checkpoint, and the PTQ stage's record.
    work, final = args.out / (args.name + ".partial"), args.out / args.name
    shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(final, ignore_errors=True)
    (work / "checkpoints" / "00-ptq").mkdir(parents=True)
    shutil.copytree(args.out / "kd" / "checkpoints" / "01-kd", work / "checkpoints" / "01-kd")
    parsed = Recipe.from_dict(recipe)
    (work / "checkpoints" / "00-ptq" / "stage.json").write_text(json.dumps({"fingerprint": parsed.fingerprint(0)}))
    parsed.save(work / "recipe.yaml")
    started = time.perf_counter()
    result = rqat_sdk.oneshot(args.testbed, recipe, output_dir=final, dtype="float32", resume=True)
    trained = round(time.perf_counter() - started)
    emit(args.out, {"name": args.name, **evaluate(result.model, result.tokenizer, args.name, args.problems),
                    "seconds": trained, "grpo": grpo, "data": data})
    log = final / "logs" / "02-grpo.jsonl"
    if log.is_file():
        shutil.copy(log, args.out / f"{args.name}.grpo.jsonl")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["kd", "variant"])
    parser.add_argument("out", type=Path, help="the shared work directory (the KD run lives in OUT/kd)")
    parser.add_argument("name", nargs="?", help="variant: its name")
    parser.add_argument("grpo", nargs="?", default="{}", help="variant: JSON overrides of the GRPO modifier")
    parser.add_argument("--testbed", type=Path, default=LONG)
    parser.add_argument("--scheme", choices=sorted(SCHEMES), default="W3G128")
    parser.add_argument("--init", choices=sorted(INITS), default="gptq")
    parser.add_argument("--kd-steps", type=int, default=200)
    parser.add_argument("--kd-lr", type=float, default=3e-4)
    parser.add_argument("--problems", type=int, default=1000)
    args = parser.parse_args()
    if args.mode == "variant" and not args.name:
        parser.error("variant needs a NAME")
    torch.set_num_threads(min(4, torch.get_num_threads()))
    args.out.mkdir(parents=True, exist_ok=True)
    if args.mode == "kd":
        run_kd(args)
    else:
        run_variant(args)


if __name__ == "__main__":
    main()
