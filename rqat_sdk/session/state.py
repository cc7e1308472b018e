"""The state one session shares with its modifiers. One instance per session; nothing here is global."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from rqat_sdk.data import describe_source, load_examples, tokenize_examples
from rqat_sdk.errors import DatasetError

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from rqat_sdk.data import DatasetInput
    from rqat_sdk.recipe import QuantScheme, Recipe, Stage

log = logging.getLogger(__name__)


@dataclass
class SessionState:
    """What modifiers read and change: the model, its tokenizer, the recipe, and the stage's data."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    recipe: Recipe
    run_dataset: DatasetInput | None = None
    """The dataset given to the run; stages without a ``data.source`` of their own read it."""
    allow_code: bool = False
    stage_index: int = 0
    _data: dict[int, Dataset] = field(default_factory=dict, repr=False)

    @property
    def scheme(self) -> QuantScheme:
        return self.recipe.scheme

    @property
    def stage(self) -> Stage:
        return self.recipe.stages[self.stage_index]

    def stage_source(self) -> DatasetInput | None:
        return self.stage.data.source if self.stage.data.source is not None else self.run_dataset

    def stage_data(self) -> Dataset:
        """The current stage's examples, tokenized with the chat template (loaded once per stage)."""
        if self.stage_index not in self._data:
            source = self.stage_source()
            where = f"stages[{self.stage_index}].data.source"
            if source is None:
                raise DatasetError(
                    f"stage {self.stage.name!r} needs data: pass dataset= to oneshot (--dataset on the command "
                    f"line) or set {where} in the recipe"
                )
            config = self.stage.data
            log.info("stage %r: loading %d examples from %s", self.stage.name, config.num_samples, describe_source(source))
            examples = load_examples(
                source,
                num_samples=config.num_samples,
                seed=self.recipe.seed,
                allow_code=self.allow_code,
                field=where if self.stage.data.source is not None else "dataset",
            )
            self._data[self.stage_index] = tokenize_examples(examples, self.tokenizer, config.max_seq_length)
        return self._data[self.stage_index]
