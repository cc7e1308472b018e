"""The one file that talks to reasoning-gym: task specs, generation and scoring.

A spec names one or more tasks, each optionally with generator settings::

    reasoning-gym:chain_sum
    reasoning-gym:chain_sum(max_terms=3,max_digits=2),leg_counting(max_animals=2)

Generation is procedural and seeded: task ``t`` of a spec draws from seed ``seed + t``. Evaluation uses
seeds offset by :data:`HELD_OUT_SEED_OFFSET`, so benchmark problems come from generators that training
never ran (small problem spaces can still repeat a problem). Every row keeps ``meta`` (task, settings,
seed, index) so that reasoning-gym's own scorer can check an answer against the exact entry.
"""

from __future__ import annotations

import difflib
import functools
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rqat_sdk.errors import DatasetError

HELD_OUT_SEED_OFFSET = 10_000_019
_TASK = re.compile(r"\s*(?P<name>[A-Za-z_][\w]*)\s*(?:\((?P<args>[^()]*)\))?\s*(?:,|$)")


@dataclass(frozen=True)
class TaskSpec:
    name: str
    config: dict[str, Any] = field(default_factory=dict)

    def __hash__(self) -> int:
        return hash((self.name, json.dumps(self.config, sort_keys=True)))


def parse_tasks(spec: str, where: str = "dataset") -> list[TaskSpec]:
    """``chain_sum(max_terms=3),leg_counting`` -> task specs, checked against reasoning-gym's registry."""
    from reasoning_gym.factory import DATASETS

    tasks, position = [], 0
    spec = spec.strip()
    while position < len(spec):
        match = _TASK.match(spec, position)
        if match is None or match.end() == position:
            raise DatasetError(f"{where}: cannot read reasoning-gym tasks from {spec!r} at {spec[position:]!r}")
        name = match["name"]
        if name not in DATASETS:
            close = difflib.get_close_matches(name, list(DATASETS), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else "; see reasoning_gym.factory.DATASETS"
            raise DatasetError(f"{where}: reasoning-gym has no task {name!r}{hint}")
        tasks.append(TaskSpec(name, _parse_settings(match["args"] or "", name, where)))
        position = match.end()
    if not tasks:
        raise DatasetError(f"{where}: name at least one reasoning-gym task, e.g. reasoning-gym:chain_sum")
    return tasks


def _parse_settings(text: str, task: str, where: str) -> dict[str, Any]:
    settings: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, raw = item.partition("=")
        if not sep:
            raise DatasetError(f"{where}: setting {item!r} of task {task!r} is not key=value")
        settings[key.strip()] = _literal(raw.strip())
    return settings


def _literal(raw: str) -> Any:
    lowered = raw.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            pass
    return raw.strip("'\"")


@functools.lru_cache(maxsize=64)
def _dataset(task: TaskSpec, seed: int, size: int):
    import reasoning_gym

    try:
        return reasoning_gym.create_dataset(task.name, size=size, seed=seed, **task.config)
    except (TypeError, AssertionError, ValueError) as exc:
        raise DatasetError(f"reasoning-gym task {task.name!r} rejects settings {task.config}: {exc}") from None


Trace = Callable[[str, dict[str, Any]], str]
"""Given a task name and a reasoning-gym entry, the assistant's reply (a worked solution ending in \\boxed{})."""


def generate_rows(
    tasks: list[TaskSpec], *, num_samples: int, seed: int, instruction: str, trace: Trace | None = None
) -> list[dict[str, Any]]:
    """``num_samples`` chat rows, tasks interleaved; the reply is ``trace`` or just the boxed answer."""
    per_task = -(-num_samples // len(tasks))
    rows = []
    for t, task in enumerate(tasks):
        dataset = _dataset(task, seed + t, per_task)
        for index in range(per_task):
            entry = dataset[index]
            reply = trace(task.name, entry) if trace is not None else f"\\boxed{{{entry['answer']}}}"
            meta = {"task": task.name, "config": task.config, "seed": seed + t, "size": per_task, "index": index}
            rows.append(
                {
                    "messages": [
                        {"role": "user", "content": f"{entry['question']}\n{instruction}"},
                        {"role": "assistant", "content": reply},
                    ],
                    "text": None,
                    "answer": str(entry["answer"]),
                    "meta": json.dumps(meta),
                }
            )
    order = sorted(range(len(rows)), key=lambda i: (i % per_task, i // per_task))
    return [rows[i] for i in order][:num_samples]


def score(meta: dict[str, Any], answer: str | None) -> float:
    """reasoning-gym's own score (0 to 1) of ``answer`` for the entry ``meta`` points at."""
    if answer is None:
        return 0.0
    task = TaskSpec(meta["task"], meta["config"])
    dataset = _dataset(task, meta["seed"], meta["size"])
    return float(dataset.score_answer(answer, dataset[meta["index"]]))
