"""GRPO variants from one KD checkpoint: does GRPO after QAT-KD raise pass@1 on the long-chain testbed?

``paper_tables.py`` runs every row from scratch (PTQ, KD, then GRPO). To compare several GRPO settings
against the same KD model, ``kd`` runs PTQ + QAT-KD once and evaluates BF16 and the KD model; each
``variant`` then resumes that run with a GRPO stage appended (the run's checkpoints stand in for the
finished PTQ and KD stages, so only GRPO trains) and evaluates the result. Variants may run at once, as
separate processes on one GPU. Every evaluation is pass@1 over 3 samples (temperature 0.6, top-p 0.95)
and greedy, on ``--problems`` held-out problems of the testbed's mix, plus sampled pass@1 on each ``--also``
benchmark; each variant also records how far GRPO moved the quantized policy (:func:`policy_change`).
Results are appended to ``OUT/results.jsonl``, each row with the command, device, date and git commit that
wrote it (:func:`emit`).

    SUM='reasoning-gym:chain_sum(min_terms=4,max_terms=7,min_digits=2,max_digits=3)'
    python benchmarks/grpo_from_kd.py kd runs/grpo --scheme W3G128 --init gptq --problems 2000 --also "$SUM"
    python benchmarks/grpo_from_kd.py variant runs/grpo s250 \
        '{"data": "'"$SUM"'", "prompts_per_step": 32, "micro_batch_size": 256, "learning_rate": 1e-4, "steps": 250}' \
        --problems 2000 --also "$SUM"
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import shutil
import sys
import time
from pathlib import Path

import torch
from paper_tables import INITS, SCHEMES, device_name
from provenance import git_commit

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


def evaluate(model, tokenizer, label: str, args: argparse.Namespace) -> dict:
    """pass@1 on the testbed's mix and on each ``--also`` benchmark, sampled and greedy, with the mix per task."""
    def run(benchmark: str, greedy: bool) -> dict:
        report = rqat_sdk.evaluate(model, benchmark, tokenizer=tokenizer, samples=3, num_examples=args.problems,
                                   max_new_tokens=RESPONSE_TOKENS[BENCHMARK], batch_size=500, label=label,
                                   dtype="float32", greedy=greedy)
        by_task = {task: round(100 * value, 2) for task, value in report.pass_at_1_by_task().items()}
        return {"pass": round(100 * report.pass_at_1, 2), "std": round(100 * report.std, 2),
                **({"by_task": by_task} if len(by_task) > 1 else {})}

    rows = {"T0.6": run(BENCHMARK, False), "greedy": run(BENCHMARK, True)}
    if args.also:
        rows["also"] = {benchmark: {"T0.6": run(benchmark, False), "greedy": run(benchmark, True)}
                        for benchmark in args.also}
    return rows


def policy_change(before: Path, after: Path) -> dict:
    """How far GRPO moved the checkpoint: the share of quantized weight codes that differ, the largest
    relative change of a weight scale, and of an unquantized tensor (norms, embeddings).

    Latent weights move by about the learning rate per step, and a 3-bit code changes only when its weight
    crosses half a quantization step (~0.03 on the testbed), so a small rate can train for 250 steps
    without changing the quantized policy much.
    """
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from safetensors.torch import load_file

    first, second = load_file(before / "model.safetensors"), load_file(after / "model.safetensors")
    bits = json.loads((before / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
    num_bits = bits["weights"]["num_bits"]
    changed = total = 0
    other = 0.0
    for key, tensor in first.items():
        if key.endswith(".weight_packed"):
            shape = torch.Size(first[key.replace("_packed", "_shape")].tolist())
            codes = unpack_from_int32(tensor, num_bits, shape), unpack_from_int32(second[key], num_bits, shape)
            changed += (codes[0] != codes[1]).sum().item()
            total += codes[0].numel()
        elif tensor.is_floating_point() and not key.endswith(("_scale", "_zero_point")):
            other = max(other, ((second[key] - tensor).norm() / tensor.norm()).item())
    scales = max((((second[k] - t).abs() / t.abs()).max().item()
                  for k, t in first.items() if k.endswith("weight_scale")), default=0.0)
    return {"codes_changed": round(changed / max(total, 1), 5), "max_relative_scale_change": round(scales, 5),
            "max_relative_change_unquantized": round(other, 5)}


def quantization_steps(stage: Path) -> dict:
    """The mean quantization step (weight scale) of a stage checkpoint's quantized layers, and its range over
    layers: the distance a latent weight must travel to change its code is half a step."""
    from safetensors.torch import load_file

    steps = [scale.float().mean().item() for key, scale in load_file(stage / "model.safetensors").items()
             if key.endswith(".weight_scale")]
    return {"mean_step": round(sum(steps) / len(steps), 4), "step_range": [round(min(steps), 4), round(max(steps), 4)]}


def emit(out: Path, record: dict) -> None:
    """Append one result row, with the command, device, date and commit that measured it."""
    record = {**record, "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
              "device": device_name(), "date": datetime.date.today().isoformat(), "commit": git_commit()}
    print("RESULT " + json.dumps(record), flush=True)
    with open(out / "results.jsonl", "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


def run_kd(args: argparse.Namespace) -> None:
    from transformers import AutoTokenizer

    started = time.perf_counter()
    kd_dir = args.out / "kd"
    recipe = {"version": 1, "seed": args.seed, "scheme": SCHEMES[args.scheme], "stages": ptq_and_kd(args)}
    if not (kd_dir / "config.json").exists():
        rqat_sdk.oneshot(args.testbed, recipe, output_dir=kd_dir, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(kd_dir)
    emit(args.out, {"name": "BF16", **evaluate(str(args.testbed), tokenizer, "BF16", args)})
    label = {"gptq": "GPTQ", "rtn": "RTN", "rotation+gptq": "Rotation+GPTQ"}.get(args.init, args.init) + "+KD"
    kd = json.loads((kd_dir / "run.json").read_text())["stages"][1]["metrics"]["qat_kd"]
    emit(args.out, {"name": label, **evaluate(str(kd_dir), tokenizer, label, args),
                    "seconds": round(time.perf_counter() - started), "kd_codes_changed": kd["codes_changed"],
                    "latent_weights": {**quantization_steps(kd_dir / "checkpoints" / "01-kd"),
                                       **kd["grid_margin_at_end"]}})


def run_variant(args: argparse.Namespace) -> None:
    overrides = json.loads(args.grpo)
    data = overrides.pop("data", BENCHMARK)
    grpo = {**GRPO_DEFAULTS, **overrides}
    recipe = {"version": 1, "seed": args.seed, "scheme": SCHEMES[args.scheme], "stages": [
        *ptq_and_kd(args),
        {"name": "grpo", "data": {"source": data, "num_samples": 4000, "max_seq_length": SEQUENCE},
         "modifiers": [grpo]},
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
    emit(args.out, {"name": args.name, **evaluate(result.model, result.tokenizer, args.name, args),
                    "seconds": trained, "grpo": grpo, "data": data, **policy_change(args.out / "kd", final),
                    "skipped_steps": result.record["stages"][-1]["metrics"]["grpo"]["skipped_steps"]})
    log = final / "logs" / "02-grpo.jsonl"
    if log.is_file():
        shutil.copy(log, args.out / f"{args.name}.grpo.jsonl")


def plot(results: Path, png: Path) -> None:
    """Training reward of every GRPO variant over its steps, and pass@1 of KD and KD+GRPO per training seed,
    from a results JSON written from ``results.jsonl`` (rows with ``seed``, ``method``, ``variant``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = json.loads(results.read_text())["rows"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for row in rows:
        if row.get("training_curve"):
            steps, reward = zip(*row["training_curve"]["reward"], strict=True)
            left.plot(steps, reward, label=f"seed {row['seed']} {row['variant']}")
    left.set(xlabel="GRPO step", ylabel="mean reward (temperature 1.0, 10-step means)", title="training reward")
    left.legend(fontsize=7)
    labels, kd, grpo = [], [], []
    for row in rows:
        if row["method"] == "GPTQ+KD+GRPO":
            base = next(r for r in rows if r["method"] == "GPTQ+KD" and r["seed"] == row["seed"])
            labels.append(f"seed {row['seed']} {row['variant']}")
            kd.append(base["T0.6"]["pass"])
            grpo.append(row["T0.6"]["pass"])
    x = range(len(labels))
    right.bar([i - 0.2 for i in x], kd, 0.4, label="GPTQ+KD")
    bars = right.bar([i + 0.2 for i in x], grpo, 0.4, label="+ GRPO")
    right.bar_label(bars, fmt="%.1f", fontsize=7)
    right.set_xticks(list(x), labels, fontsize=7, rotation=30, ha="right")
    right.set_ylim(min(kd) - 4, max(kd + grpo) + 1.5)  # a collapsed variant's bar runs off the bottom
    right.set(ylabel="pass@1 (%), testbed-long mix", title="held-out pass@1 (3 samples, temperature 0.6)")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["kd", "variant", "plot"])
    parser.add_argument("out", type=Path,
                        help="the shared work directory (the KD run lives in OUT/kd); plot: a results JSON")
    parser.add_argument("name", nargs="?", help="variant: its name; plot: the PNG to write")
    parser.add_argument("grpo", nargs="?", default="{}", help="variant: JSON overrides of the GRPO modifier")
    parser.add_argument("--testbed", type=Path, default=LONG)
    parser.add_argument("--scheme", choices=sorted(SCHEMES), default="W3G128")
    parser.add_argument("--init", choices=sorted(INITS), default="gptq")
    parser.add_argument("--kd-steps", type=int, default=200)
    parser.add_argument("--kd-lr", type=float, default=3e-4)
    parser.add_argument("--problems", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0, help="the recipe seed (calibration and training data, order)")
    parser.add_argument("--also", nargs="*", default=[], metavar="BENCHMARK",
                        help="more benchmarks to evaluate every model on (sampled), e.g. GRPO's own task")
    args = parser.parse_args()
    if args.mode in ("variant", "plot") and not args.name:
        parser.error(f"{args.mode} needs a NAME")
    if args.mode == "plot":
        plot(args.out, Path(args.name))
        return
    torch.set_num_threads(min(4, torch.get_num_threads()))
    args.out.mkdir(parents=True, exist_ok=True)
    if args.mode == "kd":
        run_kd(args)
    else:
        run_variant(args)


if __name__ == "__main__":
    main()
