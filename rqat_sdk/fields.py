"""Building blocks shared by every recipe model: strict models and bounded numbers.

Bounded numbers use a validator of their own rather than pydantic's ``ge``/``le`` so that an error can name
the whole allowed range (``9 is not in 2..8``) and the JSON Schema still carries ``minimum``/``maximum``.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, WithJsonSchema


class StrictModel(BaseModel):
    """A recipe node: unknown keys are errors and assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)


def _range_checker(lo: float | None, hi: float | None):
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


def IntRange(lo: int | None = None, hi: int | None = None) -> Any:
    """An ``int`` in ``lo..hi`` (either bound may be open)."""
    return Annotated[int, AfterValidator(_range_checker(lo, hi)), WithJsonSchema(_bounds_schema("integer", lo, hi))]


def FloatRange(lo: float | None = None, hi: float | None = None) -> Any:
    """A ``float`` in ``lo..hi`` (either bound may be open)."""
    return Annotated[float, AfterValidator(_range_checker(lo, hi)), WithJsonSchema(_bounds_schema("number", lo, hi))]


Bits = IntRange(2, 8)
PositiveInt = IntRange(1, None)
