"""Checks made before the first stage loads a model: whatever would otherwise fail after hours of training.

``rqat validate`` runs :func:`recipe_problems` too. A run also loads every stage's data before the model
(:meth:`rqat_sdk.session.engine.Session.run`) and resolves its device when the session is made.
"""

from __future__ import annotations

import os
from importlib.util import find_spec
from typing import TYPE_CHECKING

from rqat_sdk.errors import PreflightError, RqatError
from rqat_sdk.evaluation.benchmarks import check_benchmark
from rqat_sdk.models import check_model_source
from rqat_sdk.modifiers.qat.modifier import QATKDModifier
from rqat_sdk.modifiers.rl.modifier import GRPOModifier

if TYPE_CHECKING:
    from rqat_sdk.recipe import Recipe


def vllm_importable() -> bool:
    """Whether trl can start vLLM rollouts in this environment (found without importing vLLM, which is slow)."""
    return find_spec("vllm") is not None


def generation_problems(recipe: Recipe) -> list[str]:
    """GRPO stages that ask for vLLM rollouts where vLLM cannot be imported: they would fail after every earlier
    stage had run."""

    if vllm_importable():
        return []
    return [
        f"{at.path}.generation: {modifier.generation} runs trl's vLLM rollouts inside rqat's environment, where "
        f"vLLM is not importable (pip cannot install it beside llmcompressor: their compressed-tensors pins "
        f"differ). Set generation: transformers (rollouts by transformers: slower, sampled from the trained "
        f"policy itself; docs/training.md)"
        for at, modifier in recipe.positions()
        if isinstance(modifier, GRPOModifier) and modifier.generation != "transformers"
    ]


def teacher_problems(recipe: Recipe) -> list[str]:
    """Distillation teachers that name a missing path or GGUF (hub ids are not checked: that needs the network)."""

    problems = []
    for at, modifier in recipe.positions():
        if isinstance(modifier, QATKDModifier) and modifier.teacher is not None:
            try:
                check_model_source(modifier.teacher)
            except RqatError as exc:
                problems.append(f"{at.path}.teacher: {exc}")
    return problems


def benchmark_problems(recipe: Recipe) -> list[str]:
    """An ``export.evaluate.benchmark`` that does not load: it would fail after training and export."""

    if recipe.export.evaluate is None:
        return []
    try:
        check_benchmark(recipe.export.evaluate.benchmark, field="export.evaluate.benchmark")
    except RqatError as exc:
        return [str(exc)]
    return []


def recipe_problems(recipe: Recipe) -> list[str]:
    """What this environment cannot run in ``recipe``, found without a model or the stages' data."""
    return [*generation_problems(recipe), *teacher_problems(recipe), *benchmark_problems(recipe)]


def check_before_loading(recipe: Recipe, model: object) -> None:
    """Raise the model's own error when ``model`` is a path that cannot load, then :class:`PreflightError` with
    every problem of ``recipe``."""

    if isinstance(model, (str, os.PathLike)):
        check_model_source(model)
    if problems := recipe_problems(recipe):
        raise PreflightError(problems)
