"""Turn pydantic's validation errors into ``path: message`` lines that name the allowed values.

Pydantic reports locations as tuples that include discriminator tags and union members
(``('stages', 0, 'modifiers', 1, 'gptq', 'block_size')``); users write ``stages[0].modifiers[1].block_size``.
Walking the recipe's types alongside the location tells the two apart, and also tells which fields the
enclosing model allows when a key is unknown.
"""

from __future__ import annotations

import difflib
import reprlib
import types
import typing
from typing import Any

from pydantic import BaseModel
from pydantic_core import ErrorDetails


def shown(value: Any) -> str:
    """``repr(value)`` cut short: a recipe is untrusted input and an error message echoes part of it only."""
    short = reprlib.Repr()
    short.maxlevel, short.maxstring, short.maxother = 2, 80, 80
    short.maxlist = short.maxdict = short.maxtuple = 5
    return short.repr(value)


def describe(root: type[BaseModel], error: ErrorDetails) -> list[str]:
    path, model, node, union = _walk(root, error["loc"])
    kind = error["type"]
    value = error.get("input")
    if union is not None:  # one error per member of a plain union: report the union once
        return [f"{path}: {shown(value)} is not one of: {_describe_union(union)}"]
    if kind == "extra_forbidden":
        key = str(error["loc"][-1])
        allowed = list(model.model_fields) if model else []
        return [f"{path}: unknown field{_did_you_mean(key, allowed)} (allowed: {', '.join(allowed)})"]
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        tags = _union_tags(node)
        where = f"{path}.type" if path else "type"
        if kind == "union_tag_not_found":
            return [f"{where}: missing; one of: {', '.join(tags)}"]
        tag = error["ctx"]["tag"]
        return [f"{where}: {shown(tag)} is not one of: {', '.join(tags)}{_did_you_mean(tag, tags)}"]
    if kind == "missing":
        return [f"{path}: required field missing"]
    if kind == "literal_error":
        return [f"{path}: {shown(value)} is not one of: {error['ctx']['expected']}"]
    message = str(error["msg"])
    for prefix in ("Value error, ", "Assertion failed, "):
        message = message.removeprefix(prefix)
    if kind in ("value_error", "assertion_error"):
        # Model-level checks already prefix each line with its own path.
        lines = message.splitlines()
        return [line if not path or line.startswith(("stages", "scheme")) else f"{path}: {line}" for line in lines]
    message = message[0].lower() + message[1:] if message else message
    return [f"{path}: {message} (got {shown(value)})" if "input" in error else f"{path}: {message}"]


def _walk(root: type[BaseModel], loc: tuple) -> tuple[str, type[BaseModel] | None, Any, Any]:
    """Follow ``loc`` through the type tree.

    Returns the user-facing path, the innermost model, the node type at the end, and the plain (not
    discriminated) union the location went through, if any.
    """
    path = ""
    node: Any = root
    model: type[BaseModel] | None = root
    union = None
    for part in loc:
        node = _strip(node)
        if isinstance(part, int) and typing.get_origin(node) is list:
            path += f"[{part}]"
            node = typing.get_args(node)[0]
            continue
        if _is_union(node):
            member = _union_member(node, part)
            if member is typing.Any:
                union = node
            if member is not None:  # a discriminator tag or a union member's name: not part of the path
                node = member
                model = member if _is_model(member) else model
                continue
        if _is_model(node) and isinstance(part, str):
            model = node
            field = node.model_fields.get(part)
            path += f".{part}" if path else part
            node = field.annotation if field is not None else None
            continue
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
        node = None
    return path, model, node, union


def _strip(node: Any) -> Any:
    """Unwrap Annotated[...] and Optional[...]."""
    while True:
        if typing.get_origin(node) is typing.Annotated:
            node = typing.get_args(node)[0]
            continue
        if _is_union(node):
            members = [m for m in typing.get_args(node) if m is not type(None)]
            if len(members) == 1:
                node = members[0]
                continue
        return node


def _is_union(node: Any) -> bool:
    return typing.get_origin(node) in (typing.Union, types.UnionType)


def _is_model(node: Any) -> bool:
    return isinstance(node, type) and issubclass(node, BaseModel)


def _union_member(node: Any, part: Any) -> Any:
    for member in typing.get_args(node):
        if _is_model(member) and part in _tags(member):
            return member
    if isinstance(part, str) and not any(_is_model(m) and part in m.model_fields for m in typing.get_args(node)):
        return typing.Any  # pydantic names a non-model member (e.g. "bool", "literal['both']")
    return None


def _describe_union(node: Any) -> str:
    options: list[str] = []
    for member in typing.get_args(node):
        member = _strip(member)
        if member is bool:
            options += ["true", "false"]
        elif typing.get_origin(member) is typing.Literal:
            options += [repr(arg) for arg in typing.get_args(member)]
        elif member is not type(None):
            options.append(getattr(member, "__name__", str(member)))
    return ", ".join(options)


def _tags(model: type[BaseModel]) -> list[str]:
    field = model.model_fields.get("type")
    if field is None:
        return []
    return [str(arg) for arg in typing.get_args(field.annotation)]


def _union_tags(node: Any) -> list[str]:
    node = node if _is_union(node) else _strip(node)
    if typing.get_origin(node) is typing.Annotated:
        node = typing.get_args(node)[0]
    return [tag for member in typing.get_args(node) if _is_model(member) for tag in _tags(member)]


def _did_you_mean(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(str(word), options, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
