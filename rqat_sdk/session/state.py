"""The state one session shares with its modifiers. One instance per session; nothing here is global."""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rqat_sdk.data import describe_source, load_examples, tokenize_examples
from rqat_sdk.errors import DatasetError, ModelLoadError
from rqat_sdk.models import load_model
from rqat_sdk.ops.fp8 import linears_to_fp8_

if TYPE_CHECKING:
    import torch
    from datasets import Dataset
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from rqat_sdk.data import DatasetInput
    from rqat_sdk.recipe import QuantScheme, Recipe, Stage

log = logging.getLogger(__name__)


@dataclass
class SessionState:
    """What modifiers read and change: the model, its tokenizer, the recipe, the stage's data and paths."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    recipe: Recipe
    run_dataset: DatasetInput | None = None
    """The dataset given to the run; stages without a ``data.source`` of their own read it."""
    allow_code: bool = False
    original_model: str | os.PathLike | PreTrainedModel | None = None
    """The full-precision model the run started from (a path, a hub id, or an untouched copy): the teacher."""
    work_dir: Path | None = None
    """Where the run writes (``OUT.partial``); None when the run keeps everything in memory."""
    stage_index: int = 0
    stage_metrics: dict[str, Any] = field(default_factory=dict)
    """What the current stage's modifiers report (losses, throughput); copied into the run record."""
    applied: list[str] = field(default_factory=list)
    """Every modifier whose ``apply`` has started in this run, in order (``stages[i].modifiers[j] (type)``):
    what has changed ``model``, also when a stage then failed."""
    examples: dict[int, Dataset] = field(default_factory=dict, repr=False)
    """Each stage's examples by index, loaded once; the session loads training stages' before the model."""
    _data: dict[int, Dataset] = field(default_factory=dict, repr=False)
    _teachers: dict[tuple, PreTrainedModel] = field(default_factory=dict, repr=False)

    @property
    def scheme(self) -> QuantScheme:
        return self.recipe.scheme

    @property
    def stage(self) -> Stage:
        return self.recipe.stages[self.stage_index]

    def stage_label(self, index: int | None = None) -> str:
        index = self.stage_index if index is None else index
        return f"{index:02d}-{self.recipe.stages[index].name}"

    def progress_dir(self) -> Path | None:
        """Where a training modifier keeps its resumable mid-stage checkpoints."""
        return self.work_dir / "checkpoints" / f"{self.stage_label()}.progress" if self.work_dir else None

    def log_file(self) -> Path | None:
        """The stage's JSONL metrics log."""
        return self.work_dir / "logs" / f"{self.stage_label()}.jsonl" if self.work_dir else None

    def stage_source(self) -> DatasetInput | None:
        return self.stage.data.source if self.stage.data.source is not None else self.run_dataset

    def data_field(self) -> str:
        """Where the current stage's data comes from, as error messages name it (:func:`stage_data_field`)."""
        return stage_data_field(self.recipe, self.stage_index, self.run_dataset)

    def stage_examples(self) -> Dataset:
        """The current stage's examples (chats or text, with gold answers), loaded once per stage."""
        if self.stage_index not in self.examples:
            self.examples[self.stage_index] = load_stage_examples(
                self.recipe, self.stage_index, self.run_dataset, allow_code=self.allow_code
            )
        return self.examples[self.stage_index]

    def stage_data(self) -> Dataset:
        """The current stage's examples, tokenized with the chat template."""
        if self.stage_index not in self._data:
            examples = self.stage_examples()
            self._data[self.stage_index] = tokenize_examples(examples, self.tokenizer, self.stage.data.max_seq_length)
        return self._data[self.stage_index]

    def teacher(self, source: str | None, dtype: torch.dtype, *, fp8: bool = False) -> PreTrainedModel:
        """A frozen teacher on the student's device: ``source``, or the model the run started from.

        With ``fp8`` its Linear layers run in FP8 (:mod:`rqat_sdk.ops.fp8`), all but the LM head, whose weight
        the distillation loss reads directly (:func:`rqat_sdk.ops.distill.lm_head_loss`).
        """
        from transformers import PreTrainedModel

        origin = source if source is not None else self.original_model
        if origin is None:
            raise ModelLoadError(
                "the distillation teacher is the model the run started from, which this session does not have; "
                "set the modifier's teacher to a model directory or hub id"
            )
        key = (str(origin) if not isinstance(origin, PreTrainedModel) else id(origin), dtype, fp8)
        if key not in self._teachers:
            if isinstance(origin, PreTrainedModel):
                # FP8 replaces layers in place: a copy keeps the original whole for other stages' teachers
                model = copy.deepcopy(origin) if fp8 else origin
                # the ignore: the @wraps typing gap (pyproject.toml)
                teacher = model.to(device=self.model.device, dtype=dtype)  # type: ignore[call-arg]
            else:
                log.info("loading the teacher from %s", origin)
                teacher = load_model(origin, dtype=str(dtype).removeprefix("torch."), device=self.model.device)
            teacher.eval().requires_grad_(False)
            if fp8:
                linears_to_fp8_(teacher, keep=[teacher.get_output_embeddings()])
            self._teachers[key] = teacher
        return self._teachers[key]


def stage_data_field(recipe: Recipe, index: int, run_dataset: DatasetInput | None) -> str:
    """Where stage ``index``'s data comes from, as error messages name it: its recipe field or the run's dataset."""
    if recipe.stages[index].data.source is not None:
        return f"stages[{index}].data.source ({describe_source(recipe.stages[index].data.source)})"
    return f"dataset ({describe_source(run_dataset)})" if run_dataset is not None else "dataset"


def load_stage_examples(recipe: Recipe, index: int, run_dataset: DatasetInput | None, *, allow_code: bool) -> Dataset:
    """Stage ``index``'s examples (chats or text, with gold answers): its own source, else the run's dataset."""
    stage = recipe.stages[index]
    source = stage.data.source if stage.data.source is not None else run_dataset
    where = f"stages[{index}].data.source"
    if source is None:
        raise DatasetError(
            f"stage {stage.name!r} needs data: pass dataset= to oneshot (--dataset on the command line) or set "
            f"{where} in the recipe"
        )
    log.info("stage %r: loading %d examples from %s", stage.name, stage.data.num_samples, describe_source(source))
    return load_examples(
        source,
        num_samples=stage.data.num_samples,
        seed=recipe.seed,
        allow_code=allow_code,
        field=where if stage.data.source is not None else "dataset",
    )
