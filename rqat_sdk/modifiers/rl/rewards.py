"""Reward functions for GRPO, in trl's calling convention.

Each is called with the prompts, the completions and the dataset's other columns (``answer``, ``meta``) and
returns one float per completion. ``correctness`` is the seed paper's reward: 1 for a correct final
``\\boxed{}`` answer (math-verify, or the task's reasoning-gym scorer), else 0. ``format`` rewards a
response that ends its reasoning with a boxed answer. Anything else is a ``python:module:function`` the
recipe names, imported only with ``allow_code``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rqat_sdk.code import import_code_ref, is_code_ref
from rqat_sdk.data.answers import extract_boxed, score_response

RewardFunction = Callable[..., list[float]]


def completion_text(completion: Any) -> str:
    """A completion as text: trl passes conversational completions as a list of messages."""
    if isinstance(completion, list):
        return "".join(message.get("content", "") for message in completion if message.get("role") == "assistant")
    return str(completion)


def correctness(prompts: list, completions: list, answer: list[str], meta: list[str | None], **_: Any) -> list[float]:
    return [score_response(completion_text(c), gold, m) for c, gold, m in zip(completions, answer, meta, strict=True)]


def boxed_format(prompts: list, completions: list, **_: Any) -> list[float]:
    return [1.0 if extract_boxed(completion_text(c)) is not None else 0.0 for c in completions]


BUILTIN_REWARDS: dict[str, RewardFunction] = {"correctness": correctness, "format": boxed_format}


def resolve_rewards(names: list[str], *, allow_code: bool, field: str) -> list[RewardFunction]:
    functions = []
    for index, name in enumerate(names):
        if is_code_ref(name):
            functions.append(import_code_ref(name, allow_code=allow_code, field=f"{field}[{index}]"))
        else:
            functions.append(BUILTIN_REWARDS[name])
    return functions
