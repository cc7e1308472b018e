"""The recipe format: a versioned, Pydantic-validated YAML document (see docs/recipes.md)."""

from rqat_sdk.recipe.recipe import (
    DataConfig,
    EvaluationConfig,
    ExportConfig,
    Position,
    Recipe,
    RecipeInput,
    Stage,
    load_recipe,
)
from rqat_sdk.scheme import PRESETS, ActivationQuant, KVCacheQuant, QuantScheme, WeightQuant

__all__ = [
    "PRESETS",
    "ActivationQuant",
    "DataConfig",
    "EvaluationConfig",
    "ExportConfig",
    "KVCacheQuant",
    "Position",
    "QuantScheme",
    "Recipe",
    "RecipeInput",
    "Stage",
    "WeightQuant",
    "load_recipe",
]
