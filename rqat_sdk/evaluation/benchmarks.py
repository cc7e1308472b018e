"""Benchmarks: the problems an evaluation asks, each with its gold answer (and scorer, for generated tasks).

A benchmark is named like a dataset (see :mod:`rqat_sdk.data.sources`), with two differences: generated
tasks (``reasoning-gym:...``, ``testbed``) draw from held-out seeds, never the training ones; and a few
standard Hub benchmarks have short names (they need network access, or a local copy saved with
``datasets.save_to_disk``).
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass

from rqat_sdk.data import load_examples
from rqat_sdk.data.reasoning_gym import HELD_OUT_SEED_OFFSET
from rqat_sdk.errors import DatasetError

HUB_BENCHMARKS = {
    "gsm8k": "hf:openai/gsm8k:main@test",
    "math500": "hf:HuggingFaceH4/MATH-500@test",
    "aime24": "hf:HuggingFaceH4/aime_2024@train",
}


@dataclass(frozen=True)
class Problem:
    prompt: list[dict[str, str]]
    """The chat up to the question (no assistant reply)."""
    answer: str
    meta: str | None = None
    """Set for generated tasks: which generator entry, for its own scorer."""

    @property
    def task(self) -> str | None:
        """The generated task's name (reasoning-gym's), or None for datasets."""
        return json.loads(self.meta).get("task") if self.meta else None


GENERATED_BENCHMARKS = ("testbed", "testbed-long", "worked-math")


def check_benchmark(spec: str, field: str) -> None:
    """Load two problems of ``spec`` so that a typo fails before training, not after it; a Hub benchmark is not
    checked (that needs the network). ``field`` names where ``spec`` came from in the error."""
    if spec in HUB_BENCHMARKS or spec.startswith("hf:"):
        return
    try:
        load_benchmark(spec, num_examples=2, field=field)
    except DatasetError as exc:
        close = difflib.get_close_matches(spec, [*HUB_BENCHMARKS, *GENERATED_BENCHMARKS], n=3)
        raise DatasetError(f"{exc}" + (f" Close benchmark names: {', '.join(close)}" if close else "")) from None


def load_benchmark(spec: str, *, num_examples: int, seed: int = 0, field: str = "benchmark") -> list[Problem]:
    source = HUB_BENCHMARKS.get(spec, spec)
    if source in GENERATED_BENCHMARKS:
        source += ":heldout"
    elif source.startswith("reasoning-gym:"):
        seed += HELD_OUT_SEED_OFFSET
    rows = load_examples(source, num_samples=num_examples, seed=seed, field=field)
    problems = []
    for index, row in enumerate(rows):
        if row["answer"] is None:
            raise DatasetError(f"benchmark {spec!r}, row {index}: no gold answer (an 'answer' column or field)")
        if row["messages"] is None:
            raise DatasetError(f"benchmark {spec!r}, row {index}: plain text rows have no question to ask")
        messages = row["messages"]
        prompt = messages[:-1] if messages[-1]["role"] == "assistant" else messages
        problems.append(Problem(prompt, _gold(row["answer"]), row["meta"]))
    return problems


def _gold(answer: str) -> str:
    """GSM8K writes its solution then ``#### 42``: keep the final answer."""
    return answer.rsplit("####", 1)[-1].strip() if "####" in answer else answer
