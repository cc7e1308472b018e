"""Code named by a recipe, and the opt-in that guards it.

Recipes are untrusted input (they live in model repositories), so a recipe string that names Python code
(``python:package.module:function``) is only imported when the caller passes ``allow_code=True``
(``--allow-code`` on the command line). Loading and validating a recipe never imports anything.
"""

from __future__ import annotations

import importlib
import re
from typing import Any

from rqat_sdk.errors import CodeExecutionNotAllowed, RqatError

CODE_PREFIX = "python:"
_CODE_REF = re.compile(r"^python:(?P<module>[A-Za-z_][\w.]*):(?P<attr>[A-Za-z_][\w.]*)$")


def is_code_ref(value: object) -> bool:
    return isinstance(value, str) and value.startswith(CODE_PREFIX)


def check_code_ref_syntax(value: str) -> None:
    if not _CODE_REF.match(value):
        raise ValueError(f"{value!r} is not of the form 'python:package.module:function'")


def import_code_ref(ref: str, *, allow_code: bool, field: str) -> Any:
    """Import the object that ``ref`` names; ``field`` is the recipe path that holds it, for errors."""
    if not allow_code:
        raise CodeExecutionNotAllowed(
            f"{field}: {ref!r} names Python code. Recipes are untrusted input, so rqat does not import code "
            f"they name unless you opt in: pass allow_code=True (rqat run --allow-code) if you trust this recipe."
        )
    match = _CODE_REF.match(ref)
    if match is None:
        raise RqatError(f"{field}: {ref!r} is not of the form 'python:package.module:function'")
    try:
        target: Any = importlib.import_module(match["module"])
    except ImportError as exc:
        raise RqatError(f"{field}: cannot import module {match['module']!r} named by {ref!r}: {exc}") from exc
    for part in match["attr"].split("."):
        if not hasattr(target, part):
            raise RqatError(f"{field}: {match['module']!r} has no attribute {match['attr']!r} (from {ref!r})")
        target = getattr(target, part)
    return target
