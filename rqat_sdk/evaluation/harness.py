"""pass@1 of a model on a benchmark, averaged over several samples, as the seed paper reports it.

Each problem is answered ``samples`` times (temperature 0.6, top-p 0.95 by default, as the seed paper's
reference harness does with three seeds); a response scores 1 when its final ``\\boxed{}`` answer is right
(math-verify equivalence, or the task's own reasoning-gym scorer). pass@1 is the mean score; its spread is
the sample standard deviation (:func:`sample_std`) of the per-sample pass@1 values. Mean response length and
the share of responses cut off at ``max_new_tokens`` are reported beside it: a quantized reasoning model that
rambles shows up there.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rqat_sdk.data.answers import score_response
from rqat_sdk.evaluation.benchmarks import load_benchmark
from rqat_sdk.evaluation.vllm_backend import generate_vllm
from rqat_sdk.files import write_json_atomic
from rqat_sdk.generation import CACHE_IMPLEMENTATIONS, CacheImplementation, Sampling, generate
from rqat_sdk.models import load_model, load_tokenizer
from rqat_sdk.modifiers.layers import weights_quantized_once
from rqat_sdk.threads import configure_threads

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def sample_std(values: Iterable[float]) -> float:
    """The spread every rqat report and results table gives as ``±``: the sample standard deviation (ddof=1,
    dividing by n - 1), which estimates the spread of the population that the values (one per sampling or
    training seed) were drawn from; 0.0 for fewer than two values."""
    values = list(values)
    return statistics.stdev(values) if len(values) > 1 else 0.0


@dataclass
class EvalReport:
    label: str
    benchmark: str
    pass_at_1: float
    std: float
    per_sample: list[float]
    mean_response_tokens: float
    truncation_rate: float
    num_problems: int
    samples: int
    sampling: dict[str, Any]
    seconds: float
    items: list[dict[str, Any]] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: str | os.PathLike) -> None:
        write_json_atomic(Path(path), self.to_dict())

    def pass_at_1_by_task(self) -> dict[str, float]:
        """pass@1 per generated task of a mixed benchmark (items without a task count as ``"-"``): a mix's
        average hides a gain on one task and a loss on another."""
        scores: dict[str, list[float]] = {}
        for item in self.items:
            scores.setdefault(item.get("task") or "-", []).extend(r["score"] for r in item["responses"])
        return {task: statistics.fmean(values) for task, values in sorted(scores.items())}

    @classmethod
    def load(cls, path: str | os.PathLike) -> EvalReport:
        return cls(**json.loads(Path(path).read_text()))


def evaluate(
    model: str | os.PathLike | PreTrainedModel,
    benchmark: str = "testbed",
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    samples: int = 3,
    num_examples: int = 200,
    max_new_tokens: int = 1024,
    temperature: float = 0.6,
    top_p: float = 0.95,
    greedy: bool = False,
    batch_size: int = 32,
    seed: int = 0,
    label: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    backend: str = "hf",
    cache_implementation: CacheImplementation = "dynamic",
) -> EvalReport:
    """Evaluate ``model`` (a loaded model, a directory, a compressed-tensors checkpoint or a hub id).

    ``num_examples`` caps the problems drawn (generated benchmarks draw exactly that many). ``greedy``
    decodes once per problem (``samples`` is then 1). ``backend="vllm"`` generates with vLLM in its own
    environment (``model`` must then be a directory); with the ``hf`` backend, ``cache_implementation`` is
    :attr:`~rqat_sdk.generation.Sampling.cache_implementation`. On CPU the process's thread count is set for the model
    (:func:`rqat_sdk.threads.configure_threads`: one thread below 20M parameters unless the user chose).
    """

    started = time.perf_counter()
    if backend not in ("hf", "vllm"):
        raise ValueError(f"backend {backend!r} is not one of hf, vllm")
    samples = 1 if greedy else samples
    problems = load_benchmark(benchmark, num_examples=num_examples, seed=seed)
    if cache_implementation not in CACHE_IMPLEMENTATIONS:
        raise ValueError(f"cache_implementation {cache_implementation!r} is not one of "
                         f"{', '.join(CACHE_IMPLEMENTATIONS)}")
    sampling = Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, greedy=greedy,
                        cache_implementation=cache_implementation)
    prompts = [p.prompt for p in problems]
    if backend == "vllm":
        if not isinstance(model, (str, os.PathLike)):
            raise ValueError("the vllm backend serves a checkpoint directory: pass its path as model")
        label = label or f"{model} (vLLM)"
        tokenizer = tokenizer or load_tokenizer(model)
        runs = generate_vllm(str(model), tokenizer, prompts, sampling, samples=samples, seed=seed)
    else:
        if isinstance(model, (str, os.PathLike)):
            label = label or str(model)
            tokenizer = tokenizer or load_tokenizer(model)
            model = load_model(model, device=device, dtype=dtype, allow_quantized=True)
        elif tokenizer is None:
            raise ValueError("evaluating a model object needs its tokenizer: pass tokenizer=")
        label = label or type(model).__name__
        configure_threads(model)
        with weights_quantized_once(model):  # a quantized model in memory: once, not at every token
            runs = [generate(model, tokenizer, prompts, sampling, batch_size=batch_size, seed=seed + k)
                    for k in range(samples)]
    items, per_sample = [], [0.0] * samples
    for index, problem in enumerate(problems):
        responses = []
        for k, run in enumerate(runs):
            completion = run[index]
            correct = score_response(completion.text, problem.answer, problem.meta)
            per_sample[k] += correct / len(problems)
            responses.append({"text": completion.text, "score": correct, "tokens": completion.tokens,
                              "truncated": completion.truncated})
        items.append({"question": problem.prompt[-1]["content"], "answer": problem.answer, "task": problem.task,
                      "responses": responses})
    completions = [c for run in runs for c in run]
    return EvalReport(
        label=label,
        benchmark=benchmark,
        pass_at_1=statistics.fmean(per_sample),
        std=sample_std(per_sample),
        per_sample=per_sample,
        mean_response_tokens=statistics.fmean(c.tokens for c in completions),
        truncation_rate=sum(c.truncated for c in completions) / len(completions),
        num_problems=len(problems),
        samples=samples,
        sampling=asdict(sampling),
        seconds=round(time.perf_counter() - started, 2),
        items=items,
    )


def markdown_table(reports: list[EvalReport], baseline: str | None = None) -> str:
    """A table of reports; with ``baseline`` (a label), each row also shows the share of its pass@1 kept."""
    base = next((r for r in reports if r.label == baseline), None)
    head = "| model | benchmark | pass@1 (%) | ± | kept vs " + (baseline or "-") + " | tokens | truncated |"
    lines = [head, "|---|---|---|---|---|---|---|"]
    for r in reports:
        kept = f"{r.pass_at_1 / base.pass_at_1:.0%}" if base and base.pass_at_1 else "-"
        lines.append(
            f"| {r.label} | {r.benchmark} | {100 * r.pass_at_1:.1f} | {100 * r.std:.1f} | {kept} | "
            f"{r.mean_response_tokens:.0f} | {r.truncation_rate:.0%} |"
        )
    return "\n".join(lines)


def plot(reports: list[EvalReport], path: str | os.PathLike, title: str | None = None) -> None:
    """A bar chart of pass@1 with the spread over samples, one bar per report."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(max(4.0, 1.2 * len(reports) + 1.5), 3.6), dpi=150)
    values = [100 * r.pass_at_1 for r in reports]
    errors = [100 * r.std for r in reports]
    bars = axis.bar(range(len(reports)), values, yerr=errors, capsize=4, color="#4C72B0")
    for bar, value in zip(bars, values, strict=True):
        axis.annotate(f"{value:.1f}", (bar.get_x() + bar.get_width() / 2, value), ha="center", va="bottom",
                      fontsize=8, xytext=(0, 2), textcoords="offset points")
    axis.set_xticks(range(len(reports)), [r.label for r in reports], rotation=20, ha="right", fontsize=8)
    axis.set_ylabel("pass@1 (%)")
    axis.set_ylim(0, 105)
    axis.set_title(title or f"{reports[0].benchmark}: pass@1 over {reports[0].samples} sample(s)", fontsize=9)
    axis.spines[["top", "right"]].set_visible(False)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
