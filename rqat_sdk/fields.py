"""Building blocks shared by every recipe model: strict models and bounded numbers.

Bounded numbers use a validator of their own rather than pydantic's ``ge``/``le`` so that an error can name
the whole allowed range (``9 is not in 2..8``) and the JSON Schema still carries ``minimum``/``maximum``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, GetCoreSchemaHandler, GetJsonSchemaHandler, WithJsonSchema
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema


class StrictModel(BaseModel):
    """A recipe node: unknown keys are errors and assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)


def _range_checker(lo: float | None, hi: float | None) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        too_low = lo is not None and value < lo
        too_high = hi is not None and value > hi
        if too_low or too_high:
            if lo is not None and hi is not None:
                raise ValueError(f"{value} is not in {lo}..{hi}")
            if lo is not None:
                raise ValueError(f"{value} is below the minimum {lo}")
            raise ValueError(f"{value} is above the maximum {hi}")
        return value

    return check


def _bounds_schema(json_type: str, lo: float | None, hi: float | None) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": json_type}
    if lo is not None:
        schema["minimum"] = lo
    if hi is not None:
        schema["maximum"] = hi
    return schema


@dataclass(frozen=True)
class Bounds:
    """``Annotated`` metadata for a number in ``lo..hi`` (either bound may be open): the range check with its
    own message, and a JSON Schema of ``json_type`` with ``minimum``/``maximum``. Written through
    :func:`IntRange` and :func:`FloatRange`: ``steps: Annotated[int, IntRange(1, None)] = 100``."""

    json_type: str
    lo: float | None
    hi: float | None

    @property
    def json_schema(self) -> dict[str, Any]:
        """The field's JSON Schema (as pydantic's ``WithJsonSchema`` names it; the recipe reference reads it)."""
        return _bounds_schema(self.json_type, self.lo, self.hi)

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        return AfterValidator(_range_checker(self.lo, self.hi)).__get_pydantic_core_schema__(source, handler)

    def __get_pydantic_json_schema__(self, schema: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        return WithJsonSchema(self.json_schema).__get_pydantic_json_schema__(schema, handler)


def IntRange(lo: int | None = None, hi: int | None = None) -> Bounds:
    """The bounds of an ``int`` field: ``Annotated[int, IntRange(lo, hi)]``."""
    return Bounds("integer", lo, hi)


def FloatRange(lo: float | None = None, hi: float | None = None) -> Bounds:
    """The bounds of a ``float`` field: ``Annotated[float, FloatRange(lo, hi)]``."""
    return Bounds("number", lo, hi)


Bits = Annotated[int, IntRange(2, 8)]
PositiveInt = Annotated[int, IntRange(1, None)]


def mixture_problem(weights: Mapping[str, float]) -> str | None:
    """What is wrong with a data mixture (sources and their relative shares), or None: the one check that
    recipes (``data.source``) and the Python API (``dataset=``) share."""
    if not weights:
        return "a mixture needs at least one source"
    for name, weight in weights.items():
        if not isinstance(name, str) or not name.strip():
            return f"{name!r} is not a source name"
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight < math.inf:
            return f"{name}: a share must be a positive number, got {weight!r}"
    return None
