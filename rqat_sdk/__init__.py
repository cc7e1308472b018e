"""rqat_sdk: Reasoning-QAT for low-bit reasoning LLMs.

One verb does the whole job::

    import rqat_sdk
    result = rqat_sdk.oneshot(model="Qwen/Qwen3-0.6B", recipe="recipes/gptq_w3g128.yaml",
                              dataset="reasoning-gym:chain_sum", output_dir="out/qwen3-w3g128")

The layout follows the pipeline: ``recipe`` (what to do) -> ``session`` (the engine) -> ``modifiers``
(``ptq``, then training phases) -> ``exporters`` (the checkpoint), with ``data`` beside them.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from rqat_sdk.errors import RqatError
from rqat_sdk.evaluation import EvalReport, evaluate
from rqat_sdk.recipe import QuantScheme, Recipe, load_recipe
from rqat_sdk.session import RunResult, Session
from rqat_sdk.session.options import RunOptions
from rqat_sdk.testbed.tasks import register_sources

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from rqat_sdk.data import DatasetInput
    from rqat_sdk.recipe import RecipeInput

__version__ = "0.1.0"

# Every import of an rqat_sdk module runs this file first, so the testbed's mixes are dataset sources
# wherever data is loaded (the data layer below cannot import the testbed).
register_sources()


def oneshot(
    model: str | os.PathLike | PreTrainedModel | None = None,
    recipe: RecipeInput | None = None,
    dataset: DatasetInput | None = None,
    output_dir: str | os.PathLike | None = None,
    **options: Any,
) -> RunResult:
    """Apply ``recipe`` to ``model`` and, given ``output_dir``, write a compressed-tensors checkpoint there.

    Args:
        model: a local directory, a Hub id (``ORG/NAME[@REVISION]``), a ``.gguf`` file or ``gguf:NAME``, or a
            loaded ``PreTrainedModel``; None: the model the recipe names (its ``model`` field). A model given in
            memory is changed in place (the result's ``model`` is that object; pass a copy to keep the original).
            If the run fails, it keeps what the modifiers that ran did to it, with its own forward, dtype and
            flags restored, and the log names those modifiers.
        recipe: a :class:`Recipe`, a dict, a YAML file path, a bundled recipe's name, a YAML string, or the recipe
            a repository carries: a directory or ``hf:ORG/NAME[@REVISION]`` (see docs/recipes.md).
        dataset, output_dir, and the keyword options (``tokenizer``, ``overwrite``, ``resume``,
            ``allow_code``, ``device``, ``dtype``, ``keep_checkpoints``): the fields of :class:`RunOptions`.
    """
    if recipe is None:
        raise TypeError("oneshot() needs a recipe")
    return Session(recipe, model, dataset=dataset, output_dir=output_dir, **options).run()


__all__ = [
    "EvalReport",
    "QuantScheme",
    "Recipe",
    "RqatError",
    "RunOptions",
    "RunResult",
    "Session",
    "__version__",
    "evaluate",
    "load_recipe",
    "oneshot",
]
