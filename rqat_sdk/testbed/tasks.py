"""The testbed's reasoning tasks: three reasoning-gym math generators and worked solutions for each.

The testbed model learns to reason step by step: every training example is a reasoning-gym question and a
chain of thought that computes the answer one operation per line and ends in ``\\boxed{}``. The same
generators, with held-out seeds, are its benchmark (``testbed`` in ``rqat eval``), scored by reasoning-gym.
"""

from __future__ import annotations

import functools
import re
from typing import TYPE_CHECKING, Any

from rqat_sdk.data.reasoning_gym import HELD_OUT_SEED_OFFSET, generate_rows, parse_tasks
from rqat_sdk.data.sources import REASONING_INSTRUCTION, examples_dataset, register_source

if TYPE_CHECKING:
    from datasets import Dataset

MIXES = {
    "testbed": (
        "chain_sum(min_terms=2,max_terms=3,min_digits=1,max_digits=2),"
        "leg_counting(min_animals=1,max_animals=2,min_instances=1,max_instances=5),"
        "simple_equations(min_terms=2,max_terms=2,min_value=1,max_value=12)"
    ),
    "testbed-long": (
        "chain_sum(min_terms=4,max_terms=7,min_digits=2,max_digits=3),"
        "leg_counting(min_animals=3,max_animals=6,min_instances=1,max_instances=12),"
        "products(min_terms=2,max_terms=2,min_digits=2,max_digits=2)"
    ),
    "worked-math": (
        "chain_sum(min_terms=6,max_terms=8,min_digits=2,max_digits=3),"
        "leg_counting(min_animals=4,max_animals=6,min_instances=2,max_instances=12),"
        "products(min_terms=2,max_terms=2,min_digits=3,max_digits=3),"
        "gcd(min_numbers=2,max_numbers=2,min_value=1000,max_value=99999)"
    ),
}
"""The testbed mixes, as reasoning-gym specs. ``testbed`` is small enough for a model of a few hundred
thousand parameters (the short testbed). ``testbed-long`` needs chains of 5 to 12 worked steps: as in a
reasoning model's long chain of thought, one wrong digit anywhere makes the answer wrong, so small
per-token errors from quantization compound (the GPU testbed). ``worked-math`` is for pretrained models
fine-tuned into reasoning teachers (:mod:`rqat_sdk.testbed.teacher`): longer chains, 3-digit long
multiplication and Euclid's algorithm, with numbered steps."""
RESPONSE_TOKENS = {"testbed": 96, "testbed-long": 224, "worked-math": 384}
"""Generation budget per mix: enough for the longest worked solution, with room to ramble."""


def testbed_rows(
    *, num_samples: int, seed: int, field: str = "dataset", variant: str = "", mix: str = "testbed"
) -> list[dict[str, Any]]:
    """Chat rows with worked solutions (``variant`` ``""``), or held-out benchmark rows (``"heldout"``)."""
    if variant not in ("", "heldout"):
        raise ValueError(f"{field}: unknown testbed variant {variant!r}; use '{mix}' or '{mix}:heldout'")
    tasks = parse_tasks(MIXES[mix], field)
    if variant == "heldout":
        seed += HELD_OUT_SEED_OFFSET
    trace = numbered_solution if mix == "worked-math" else solution
    return generate_rows(tasks, num_samples=num_samples, seed=seed, instruction=REASONING_INSTRUCTION, trace=trace)


def register_sources() -> None:
    """Make each mix a dataset source: ``MIX`` (worked solutions) and ``MIX:heldout`` (held-out problems)."""
    for mix in MIXES:
        register_source(mix, functools.partial(_load_mix, mix), standalone=True)


def _load_mix(mix: str, spec: str, *, num_samples: int, seed: int, field: str) -> Dataset:
    return examples_dataset(testbed_rows(num_samples=num_samples, seed=seed, field=field, variant=spec, mix=mix))


def solution(task: str, entry: dict[str, Any]) -> str:
    """A worked solution for ``entry``, one arithmetic step per line, ending in ``\\boxed{answer}``."""
    steps = _SOLVERS[task](entry)
    text = "\n".join(steps[:-1] + [f"\\boxed{{{steps[-1]}}}"])
    if steps[-1] != str(entry["answer"]):
        raise AssertionError(f"{task}: worked solution gives {steps[-1]}, reasoning-gym says {entry['answer']}")
    return text


def numbered_solution(task: str, entry: dict[str, Any]) -> str:
    """:func:`solution` with its steps numbered (``Step 1: ...``), as a pretrained chat model writes them."""
    *steps, last = solution(task, entry).split("\n")
    return "\n".join([f"Step {i}: {step}" for i, step in enumerate(steps, 1)] + [f"Answer: {last}"])


def _chain(values: list[int], operators: list[str]) -> tuple[list[str], int]:
    lines, total = [], values[0]
    for operator, value in zip(operators, values[1:], strict=True):
        result = total + value if operator == "+" else total - value
        lines.append(f"{total} {operator} {value} = {result}")
        total = result
    return lines, total


def _chain_sum(entry: dict[str, Any]) -> list[str]:
    tokens = entry["metadata"]["expression"].split()
    lines, total = _chain([int(t) for t in tokens[0::2]], tokens[1::2])
    return lines + [str(total)]


def _leg_counting(entry: dict[str, Any]) -> list[str]:
    from reasoning_gym.arithmetic.leg_counting import ANIMALS

    lines, totals = [], []
    for animal, count in entry["metadata"]["animals"].items():
        legs = ANIMALS[animal]
        totals.append(count * legs)
        lines.append(f"{animal}: {count} * {legs} = {count * legs}")
    more, total = _chain(totals, ["+"] * (len(totals) - 1))
    return lines + more + [str(total)]


_EQUATION = re.compile(r"^(?P<left>\S+) (?P<op>[+-]) (?P<right>\S+) = (?P<rhs>-?\d+)$")


def _simple_equations(entry: dict[str, Any]) -> list[str]:
    variable = entry["metadata"]["variable"]
    equation = entry["metadata"]["equation"]
    match = _EQUATION.match(equation)
    if match is None:  # a single term: a*x = c
        coefficient_text, rhs = equation.split(" = ")
        return _divide(coefficient_text, variable, int(rhs), [])
    left, op, right, rhs = match["left"], match["op"], match["right"], int(match["rhs"])
    if variable in left:
        term, constant = left, int(right)
        value = rhs - constant if op == "+" else rhs + constant
        step = f"{term} = {rhs} {'-' if op == '+' else '+'} {constant} = {value}"
    else:
        term, constant = right, int(left)
        value = rhs - constant if op == "+" else constant - rhs
        step = f"{term} = {rhs} - {constant} = {value}" if op == "+" else f"{term} = {constant} - {rhs} = {value}"
    return _divide(term, variable, value, [step])


def _divide(term: str, variable: str, value: int, lines: list[str]) -> list[str]:
    coefficient = int(term.removesuffix(f"*{variable}")) if term != variable else 1
    if coefficient == 1:
        return lines + [str(value)]
    return lines + [f"{variable} = {value} / {coefficient} = {value // coefficient}", str(value // coefficient)]


def _products(entry: dict[str, Any]) -> list[str]:
    """Long multiplication: the first factor times each digit of the second, shifted, then summed."""
    left, right = (int(t) for t in entry["metadata"]["expression"].split(" * "))
    lines, partials = [], []
    for place, digit in enumerate(reversed(str(right))):
        if digit == "0":
            continue
        product = left * int(digit)
        lines.append(f"{left} * {digit} = {product}")
        if place:
            lines.append(f"{left} * {digit}{'0' * place} = {product}{'0' * place}")
        partials.append(product * 10**place)
    more, total = _chain(partials, ["+"] * (len(partials) - 1))
    return lines + more + [str(total)]


def _gcd(entry: dict[str, Any]) -> list[str]:
    """Euclid's algorithm: divide with remainder until the remainder is 0; the last divisor is the GCD."""
    a, b = sorted(entry["metadata"]["numbers"], reverse=True)
    lines = []
    while b:
        lines.append(f"{a} = {a // b} * {b} + {a % b}")
        a, b = b, a % b
    return lines + [str(a)]


_SOLVERS = {"chain_sum": _chain_sum, "leg_counting": _leg_counting, "simple_equations": _simple_equations,
            "products": _products, "gcd": _gcd}
