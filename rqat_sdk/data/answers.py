"""Answer extraction and checking: the last ``\\boxed{}``, math-verify equivalence, reasoning-gym scorers."""

from __future__ import annotations

import json

from rqat_sdk.data.reasoning_gym import score


def extract_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` in ``text`` (nested braces allowed), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, position = 0, start + len("\\boxed")
    for index in range(position, len(text)):
        char = text[index]
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[position + 1 : index].strip()
    return None


def math_equal(gold: str, response: str) -> bool:
    """math-verify's equivalence of the gold answer and the response's final answer."""
    from math_verify import parse, verify

    boxed = extract_boxed(response)
    candidate = parse(f"\\boxed{{{boxed}}}" if boxed is not None else response)
    reference = parse(gold if "\\boxed" in gold or "$" in gold else f"${gold}$")
    return bool(reference) and bool(candidate) and bool(verify(reference, candidate))


def score_response(response: str, gold: str, meta: str | None) -> float:
    """1.0 for a correct response, else 0.0.

    Generated tasks are checked by reasoning-gym's own scorer; only its full score counts as correct (some
    scorers give partial credit to near misses, which is a reward, not accuracy).
    """
    if meta:
        return 1.0 if score(json.loads(meta), extract_boxed(response)) >= 1.0 else 0.0
    return 1.0 if math_equal(gold, response) else 0.0

