"""Recipe modifiers, grouped by phase: ``ptq`` (initialisation), then training phases.

:data:`AnyModifier` is the discriminated union the recipe schema uses: a modifier's ``type`` key picks its
class. Adding a modifier means adding its class here.
"""

from typing import Annotated, Union

from pydantic import Field

from rqat_sdk.modifiers.base import Modifier
from rqat_sdk.modifiers.ptq import AWQModifier, FlatQuantModifier, GPTQModifier, RotationModifier, RTNModifier
from rqat_sdk.modifiers.qat import QATKDModifier
from rqat_sdk.modifiers.rl import GRPOModifier

AnyModifier = Annotated[
    Union[RTNModifier, GPTQModifier, AWQModifier, RotationModifier, FlatQuantModifier, QATKDModifier, GRPOModifier],
    Field(discriminator="type"),
]

__all__ = [
    "AWQModifier",
    "AnyModifier",
    "FlatQuantModifier",
    "GPTQModifier",
    "GRPOModifier",
    "Modifier",
    "QATKDModifier",
    "RTNModifier",
    "RotationModifier",
]
