"""The options of a run, defined once: ``oneshot`` and :class:`~rqat_sdk.session.Session` take them as
keywords and ``rqat run`` as flags (``--output-dir``, ``--keep-checkpoints``, ...), defaults included."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, get_args

from rqat_sdk.errors import OutputDirError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

    from rqat_sdk.data import DatasetInput

KeepCheckpoints = Literal["all", "last", "none"]
DtypeName = Literal["auto", "bfloat16", "float16", "float32"]


@dataclass
class RunOptions:
    """Everything about a run but the recipe and the model.

    The model is :class:`~rqat_sdk.session.Session`'s (and ``oneshot``'s) own argument, not an option: None
    runs on the model the recipe names (its ``model`` field, ``rqat run`` without ``--model``), and a hub model
    ``ORG/NAME[@REVISION]`` is downloaded once at the commit its revision names before anything loads it;
    run.json records that commit, and where a recipe read from a repository came from."""

    dataset: DatasetInput | None = None
    """Data for stages that name none: ``reasoning-gym:TASK``, a ``.jsonl`` path, a saved dataset directory,
    ``hf:ORG/NAME`` or a ``datasets.Dataset``."""
    output_dir: Path | None = None
    """Where the checkpoint goes (a ``str`` or ``os.PathLike`` is taken as a path); the run works in
    ``<output_dir>.partial`` until it finishes. None: the result stays in memory."""
    tokenizer: str | os.PathLike | PreTrainedTokenizerBase | None = None
    """Defaults to the model's own."""
    overwrite: bool = False
    """Replace an existing output directory (a previous rqat output only, and only once the new run has
    finished)."""
    resume: bool = False
    """Continue an interrupted run from its last finished stage."""
    allow_code: bool = False
    """Let the recipe import the Python code it names (recipes are untrusted by default)."""
    device: str | torch.device | None = "auto"
    """``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda:1"``, ..."""
    dtype: DtypeName = "auto"
    """``"auto"``: the checkpoint's (float32 for a half dtype the device only emulates)."""
    keep_checkpoints: KeepCheckpoints = "last"
    """Stage checkpoints to keep in the output: ``"all"``, ``"last"`` or ``"none"``."""

    def __post_init__(self) -> None:
        if self.keep_checkpoints not in get_args(KeepCheckpoints):
            raise OutputDirError(
                f"keep_checkpoints {self.keep_checkpoints!r} is not one of {', '.join(get_args(KeepCheckpoints))}"
            )
        if self.output_dir is not None:
            self.output_dir = Path(self.output_dir).expanduser()  # also from a str or os.PathLike
