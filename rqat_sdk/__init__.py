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
from typing import TYPE_CHECKING

from rqat_sdk.errors import RqatError
from rqat_sdk.evaluation import EvalReport, evaluate
from rqat_sdk.recipe import QuantScheme, Recipe, load_recipe
from rqat_sdk.session import RunResult, Session
from rqat_sdk.session.engine import KeepCheckpoints
from rqat_sdk.testbed.tasks import register_sources

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

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
    *,
    tokenizer: str | os.PathLike | PreTrainedTokenizerBase | None = None,
    overwrite: bool = False,
    resume: bool = False,
    allow_code: bool = False,
    device: str | torch.device | None = "auto",
    dtype: str = "auto",
    keep_checkpoints: KeepCheckpoints = "last",
) -> RunResult:
    """Apply ``recipe`` to ``model`` and, given ``output_dir``, write a compressed-tensors checkpoint there.

    Args:
        model: a local directory, a Hub id (``ORG/NAME[@REVISION]``), or a loaded ``PreTrainedModel``; None: the
            model the recipe names (its ``model`` field).
        recipe: a :class:`Recipe`, a dict, a YAML file path, a bundled recipe's name, a YAML string, or the recipe
            a repository carries: a directory or ``hf:ORG/NAME[@REVISION]`` (see docs/recipes.md).
        dataset: data for stages that name none: ``reasoning-gym:TASK``, a ``.jsonl`` path, a saved dataset
            directory, ``hf:ORG/NAME`` or a ``datasets.Dataset``.
        output_dir: where the checkpoint goes; the run works in ``<output_dir>.partial`` until it finishes.
        tokenizer: defaults to the model's own.
        overwrite: replace an existing output directory (only once the new run has finished).
        resume: continue an interrupted run from its last finished stage.
        allow_code: let the recipe import the Python code it names (recipes are untrusted by default).
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda:1"``, ...
        dtype: ``"auto"`` (the checkpoint's), ``"bfloat16"``, ``"float16"`` or ``"float32"``.
        keep_checkpoints: stage checkpoints to keep in the output: ``"all"``, ``"last"`` or ``"none"``.
    """
    if recipe is None:
        raise TypeError("oneshot() needs a recipe")
    session = Session(
        recipe,
        model,
        dataset=dataset,
        output_dir=output_dir,
        tokenizer=tokenizer,
        overwrite=overwrite,
        resume=resume,
        allow_code=allow_code,
        device=device,
        dtype=dtype,
        keep_checkpoints=keep_checkpoints,
    )
    return session.run()


__all__ = [
    "EvalReport",
    "QuantScheme",
    "Recipe",
    "RqatError",
    "RunResult",
    "Session",
    "__version__",
    "evaluate",
    "load_recipe",
    "oneshot",
]
