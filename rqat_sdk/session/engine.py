"""The session engine: apply a recipe's stages to a model, checkpoint after each, export at the end.

A run with an output directory ``OUT`` works in ``OUT.partial``::

    OUT.partial/
      recipe.yaml                      the fully resolved recipe
      run.json                         the run record (status "running")
      checkpoints/00-ptq/              one stage checkpoint per finished stage, each written atomically:
        config.json, model.safetensors,  latent weights + scales (compressed-tensors "dense"),
        tokenizer files, stage.json      which stage, which recipe fingerprint, timings

When every stage has run, the compressed checkpoint is exported into ``OUT.partial``, checked by reloading
it, and ``OUT.partial`` is renamed to ``OUT``: ``OUT`` is either absent or complete. ``resume=True``
continues from the last stage checkpoint whose recipe fingerprint still matches.
"""

from __future__ import annotations

import copy
import datetime
import json
import logging
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from rqat_sdk import distributed
from rqat_sdk.data import check_trainable, describe_source
from rqat_sdk.errors import (
    CodeExecutionNotAllowed,
    ExportError,
    ModelLoadError,
    OutputDirError,
    PreflightError,
    RqatError,
)
from rqat_sdk.evaluation import evaluate
from rqat_sdk.exporters import export_checkpoint, reload_checkpoint, save_dense
from rqat_sdk.exporters.model_card import model_card
from rqat_sdk.exporters.vllm import serving_context
from rqat_sdk.files import (
    TMP_MARK,
    atomic_directory,
    check_writable,
    remove_temporaries,
    replace_directory,
    write_json_atomic,
    write_text_atomic,
)
from rqat_sdk.models import describe_model_source, download_hub_model, load_model, load_tokenizer, resolve_device
from rqat_sdk.recipe import Recipe, RecipeInput, load_recipe
from rqat_sdk.session.options import RunOptions
from rqat_sdk.session.preflight import check_before_loading
from rqat_sdk.session.state import SessionState, load_stage_examples, stage_data_field
from rqat_sdk.threads import configure_threads

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from rqat_sdk.hub import Snapshot
    from rqat_sdk.modifiers.base import Modifier
    from rqat_sdk.recipe.recipe import EvaluationConfig

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
STAGE_RECORD = "stage.json"
RUN_RECORD = "run.json"
RECIPE_FILE = "recipe.yaml"
EVALUATION_FILE = "evaluation.json"
PARTIAL_SUFFIX = ".partial"


@dataclass
class RunResult:
    """What a run produced: the quantized model in memory and, with an output directory, its checkpoint."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    recipe: Recipe
    output_dir: Path | None
    record: dict[str, Any] = field(default_factory=dict)


class Session:
    """One run of one recipe on one model. Several can live in one process, run one after another (the
    process-wide state they share is listed in docs/architecture.md)."""

    def __init__(
        self, recipe: RecipeInput, model: str | os.PathLike | PreTrainedModel | None = None, **options: Any
    ):
        """``model``: None runs on the model the recipe names (its ``model`` field). ``options``: the fields of
        :class:`RunOptions` (``dataset``, ``output_dir``, ``resume``, ...)."""
        self.recipe = load_recipe(recipe)
        self.options = RunOptions(**options)
        model_input = model if model is not None else self.recipe.model
        if model_input is None:
            raise ModelLoadError(f"recipe {self.recipe.name or '(unnamed)'} names no model (its `model` field); pass "
                                 f"--model (model= in Python)")
        self.model_input: str | os.PathLike | PreTrainedModel = model_input
        self.model_snapshot: Snapshot | None = None
        """The hub snapshot a hub model was pinned to (:meth:`_pin_model`); None for other models."""
        self.device = resolve_device(self.options.device)

    @property
    def work_dir(self) -> Path | None:
        if self.options.output_dir is None:
            return None
        return self.options.output_dir.with_name(self.options.output_dir.name + PARTIAL_SUFFIX)

    @property
    def _output(self) -> Path:
        """The output directory, for the steps that only a run with one takes."""
        if self.options.output_dir is None:
            raise RuntimeError("this step needs an output directory, and the run has none")
        return self.options.output_dir

    @property
    def _work(self) -> Path:
        """The work directory, for the steps that only a run with an output directory takes."""
        return self._output.with_name(self._output.name + PARTIAL_SUFFIX)

    # --- the run ---------------------------------------------------------------------------------

    def run(self) -> RunResult:
        distributed.initialize()
        self._check_code_allowed()
        for warning in self.recipe.warnings():
            log.warning("recipe: %s", warning)
        if self._output_is_complete_run():
            return self._load_finished()
        check_before_loading(self.recipe, self.model_input)
        self._pin_model()
        first_stage, checkpoint = self._prepare_work_dir()
        try:
            return self._run_from(first_stage, checkpoint)
        except BaseException as exc:
            self._after_failure(exc)
            raise

    def _run_from(self, first_stage: int, checkpoint: Path | None) -> RunResult:
        examples = self._stage_examples(first_stage)
        model, tokenizer = self._load(checkpoint)
        positions = self.recipe.positions()
        if problems := [p for at, modifier in positions for p in modifier.model_problems(model.config, at)]:
            raise PreflightError(problems)  # before the first stage: a later one would fail after hours
        configure_threads(model)
        state = SessionState(
            model,
            tokenizer,
            self.recipe,
            run_dataset=self.options.dataset,
            allow_code=self.options.allow_code,
            original_model=self._original_model(model, checkpoint),
            work_dir=self.work_dir,
            examples=examples,
        )
        record = self._start_record(first_stage, model.dtype)
        in_place = self._changes_caller_model(checkpoint)
        if in_place:
            log.info("the model given in memory is changed in place (the result's model is that object); pass "
                     "a copy (copy.deepcopy) to keep the original")
        try:
            return self._stages_and_export(state, record, first_stage)
        except BaseException:
            if in_place:
                log.warning("%s", caller_model_after_failure(state.applied))
            raise

    def _stages_and_export(self, state: SessionState, record: dict[str, Any], first_stage: int) -> RunResult:
        for index in range(first_stage, len(self.recipe.stages)):
            record["stages"].append(self._run_stage(state, index))
            self._write_record(record)

        if self.work_dir is None:
            record["status"] = "complete"
            return RunResult(state.model, state.tokenizer, self.recipe, None, record)
        if distributed.is_main():
            try:
                record["export"] = self._export(state)
            except ExportError as exc:  # the record says why the finished stages have no checkpoint yet
                self._write_record({**record, "status": "export_failed", "error": str(exc)})
                raise
            if (evaluation := self.recipe.export.evaluate) is not None:
                record["evaluation"] = self._evaluate(state, evaluation)
            record["status"] = "complete"
            record["finished_at"] = _now()
            self._write_record(record)
            self._write_card(record)
            self._prune_checkpoints()
            output_dir = self._output
            if (replaced := run_record(output_dir)) is not None:
                log.warning("--overwrite: replacing %s, %s", output_dir, describe_run(replaced))
            replace_directory(self.work_dir, output_dir)
            log.info("wrote %s (%s, %s)", output_dir, self.recipe.scheme.label, record["export"]["format"])
        distributed.barrier()
        return RunResult(state.model, state.tokenizer, self.recipe, self.options.output_dir, record)

    def _changes_caller_model(self, checkpoint: Path | None) -> bool:
        """Whether the run works on the caller's in-memory model itself (a resumed run loads its checkpoint)."""
        from transformers import PreTrainedModel

        return checkpoint is None and isinstance(self.model_input, PreTrainedModel)

    def _after_failure(self, exc: BaseException) -> None:
        """Remove the work directory of a run that kept nothing; otherwise say how to continue it."""
        if self.work_dir is None or not self.work_dir.exists() or not distributed.is_main():
            return
        if holds_work(self.work_dir):
            if "--resume" not in str(exc):
                exc.add_note(f"{self.work_dir} keeps the finished work: `rqat run --resume` with the same output "
                             f"directory continues from it")
            return
        shutil.rmtree(self.work_dir, ignore_errors=True)
        log.info("removed %s: the run failed before it finished any stage or training step", self.work_dir)

    def _stage_examples(self, first_stage: int) -> dict[int, Dataset]:
        """The examples of every stage still to run that reads data, loaded before the model: a missing or
        unparsable source, or data with nothing to train on, would otherwise fail after the earlier stages."""
        examples = {}
        for index in range(first_stage, len(self.recipe.stages)):
            stage = self.recipe.stages[index]
            if any(modifier.needs_data for modifier in stage.modifiers):
                examples[index] = load_stage_examples(
                    self.recipe, index, self.options.dataset, allow_code=self.options.allow_code
                )
            if any(modifier.trains_on_responses for modifier in stage.modifiers):
                check_trainable(examples[index], stage_data_field(self.recipe, index, self.options.dataset))
        return examples

    def _run_stage(self, state: SessionState, index: int) -> dict[str, Any]:
        from transformers import set_seed

        stage = self.recipe.stages[index]
        state.stage_index = index
        set_seed(self.recipe.seed + index)
        total = len(self.recipe.stages)
        log.info("stage %d/%d %r: %s", index + 1, total, stage.name, ", ".join(m.type for m in stage.modifiers))
        started = time.perf_counter()
        state.stage_metrics = {}
        timings = run_stage(stage.modifiers, state)
        source = state.stage_source() if any(m.needs_data or m.quantizes for m in stage.modifiers) else None
        entry = {
            "index": index,
            "name": stage.name,
            "fingerprint": self.recipe.fingerprint(index),
            "data": describe_source(source) if source is not None else None,
            "modifiers": timings,
            "metrics": state.stage_metrics,
            "seconds": round(time.perf_counter() - started, 3),
        }
        log.info("stage %d/%d %r done in %.1f s", index + 1, total, stage.name, entry["seconds"])
        if self.work_dir is not None:
            self._save_stage_checkpoint(state, entry)
        return entry

    # --- checkpoints -----------------------------------------------------------------------------

    def _stage_dir(self, index: int) -> Path:
        return self._work / CHECKPOINTS / f"{index:02d}-{self.recipe.stages[index].name}"

    def _save_stage_checkpoint(self, state: SessionState, entry: dict[str, Any]) -> None:
        if distributed.is_main():
            with atomic_directory(self._stage_dir(entry["index"])) as tmp:
                save_dense(state.model, tmp)
                state.tokenizer.save_pretrained(tmp)
                write_json_atomic(tmp / STAGE_RECORD, entry)
            progress = state.progress_dir()
            if progress is not None and progress.exists():
                shutil.rmtree(progress)  # the stage is done: its mid-stage checkpoints are obsolete
        distributed.barrier()

    def _resume_point(self) -> tuple[int, Path | None]:
        """The first stage still to run and the checkpoint to start it from."""
        last: Path | None = None
        for index in range(len(self.recipe.stages)):
            directory = self._stage_dir(index)
            record_file = directory / STAGE_RECORD
            if not record_file.is_file():
                return index, last
            recorded = json.loads(record_file.read_text())
            recorded_current = recorded.get("fingerprint") == self.recipe.fingerprint(index)
            if not (recorded_current or self._saved_recipe_is_current(index)):
                raise OutputDirError(
                    f"{directory} was written by a different recipe ({self._what_changed(index)}), so the run "
                    f"cannot resume from it; rerun with --overwrite to start over"
                )
            last = directory
        return len(self.recipe.stages), last

    def _saved_recipe_is_current(self, index: int) -> bool:
        """Whether the recipe saved beside the stages, read by this rqat, is the current one up to stage ``index``.

        The saved recipe holds every field, defaults included. A stage written by an older rqat records the
        fingerprint of an older schema: a field added since (at the default that keeps the old behaviour) changes
        the fingerprint but not the work, and such a stage resumes; a changed default shows as a difference.
        """
        try:
            saved = Recipe.from_file(self._work / RECIPE_FILE)
        except RqatError:
            return False
        return saved.fingerprint(index) == self.recipe.fingerprint(index)

    def _what_changed(self, index: int) -> str:
        """The settings of stages ``0..index`` that differ from the saved recipe's, for a refused resume."""
        name = self.recipe.stages[index].name
        generic = f"stage {index} {name!r} or an earlier stage, the scheme or the seed changed"
        try:
            saved = Recipe.from_file(self._work / RECIPE_FILE)
        except RqatError:
            return generic
        changes = self.recipe.changes_from(saved, index)
        return f"changed since it was written: {'; '.join(changes)}" if changes else generic

    def _prepare_work_dir(self) -> tuple[int, Path | None]:
        """Check the output and work directories, decide where to start, then (main rank) set them up.

        Every rank decides from the same directory state: nothing is changed until all have looked.
        """
        if self.work_dir is None:
            return 0, None
        check_output_dir(self._output, self.model_input, overwrite=self.options.overwrite)
        resuming = self.work_dir.exists() and self.options.resume
        if self.work_dir.exists() and not self.options.resume and not self.options.overwrite:
            raise OutputDirError(
                f"{self.work_dir} holds an unfinished run; rerun with --resume to continue it, or with --overwrite "
                f"to start over"
            )
        if self.work_dir.exists() and not resuming and not _is_work_dir(self.work_dir):
            raise OutputDirError(
                f"{self.work_dir} was not written by rqat (it holds no {RUN_RECORD} or {RECIPE_FILE} of a run), so "
                f"--overwrite does not remove it; move it away or choose another output directory"
            )
        first, checkpoint = self._resume_point() if resuming else (0, None)
        distributed.barrier()
        if distributed.is_main():
            if resuming:
                remove_temporaries(self.work_dir)
                remove_temporaries(self.work_dir / CHECKPOINTS)
                # the kept stages match this recipe, so the output's recipe.yaml is the one that produces it
                self.recipe.save(self.work_dir / RECIPE_FILE)
            else:
                if self.work_dir.exists():
                    log.warning("--overwrite: removing the unfinished run in %s", self.work_dir)
                    shutil.rmtree(self.work_dir)
                check_writable(self.work_dir / RECIPE_FILE)
                self.recipe.save(self.work_dir / RECIPE_FILE)
        distributed.barrier()
        if resuming:
            log.info("resuming %s: %s", self.work_dir, _resume_point_text(first, len(self.recipe.stages)))
        elif self.options.resume:
            log.info("nothing to resume in %s; starting from the first stage", self.work_dir)
        return first, checkpoint

    def _prune_checkpoints(self) -> None:
        root = self._work / CHECKPOINTS
        if self.options.keep_checkpoints == "all" or not root.is_dir():
            return
        stages = sorted(p for p in root.iterdir() if p.is_dir())
        for directory in stages if self.options.keep_checkpoints == "none" else stages[:-1]:
            shutil.rmtree(directory)
        if self.options.keep_checkpoints == "none":
            root.rmdir()

    # --- loading ---------------------------------------------------------------------------------

    def _load(self, checkpoint: Path | None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
        from transformers import PreTrainedModel

        if checkpoint is not None:
            log.info("loading stage checkpoint %s", checkpoint)
            model = reload_checkpoint(checkpoint, dtype=_checkpoint_dtype(checkpoint), device=self.device)
            return model, load_tokenizer(checkpoint)
        if isinstance(self.model_input, PreTrainedModel):
            model = self.model_input.to(self.device)  # type: ignore[arg-type]  # @wraps typing gap (pyproject)
            tokenizer_source = self.options.tokenizer or model.config._name_or_path
        else:
            model = load_model(self.model_input, dtype=self.options.dtype, device=self.device)
            tokenizer_source = self.options.tokenizer or self.model_input
        if not tokenizer_source:
            raise ModelLoadError("the model was given in memory without a tokenizer; pass tokenizer=")
        tokenizer = tokenizer_source if not isinstance(tokenizer_source, (str, os.PathLike)) else load_tokenizer(
            tokenizer_source
        )
        return model, tokenizer

    def _pin_model(self) -> None:
        """Download a hub model once, at the commit its revision names now: every later load (the model, its
        tokenizer, the original model as a teacher) reads those files, and the run record names that commit."""
        if isinstance(self.model_input, str) and (snapshot := download_hub_model(self.model_input)) is not None:
            self.model_snapshot = snapshot
            self.model_input = snapshot.path

    def _original_model(self, model: PreTrainedModel, checkpoint: Path | None):
        """The full-precision model for teachers: its source, or a copy taken before any stage changes it."""
        if isinstance(self.model_input, (str, os.PathLike)):
            return self.model_input
        if checkpoint is not None:
            return self.model_input  # resuming: the model given in memory was not touched
        if any(modifier.wants_original_model() for _, modifier in self.recipe.positions()):
            return copy.deepcopy(model)
        return None

    def _output_is_complete_run(self) -> bool:
        output_dir = self.options.output_dir
        if not (self.options.resume and output_dir is not None and (output_dir / RUN_RECORD).is_file()):
            return False
        record = json.loads((output_dir / RUN_RECORD).read_text())
        fingerprint = record.get("recipe", {}).get("fingerprint")
        return record.get("status") == "complete" and fingerprint == self.recipe.fingerprint()

    def _load_finished(self) -> RunResult:
        output_dir = self._output
        log.info("%s already holds the finished run of this recipe; loading it", output_dir)
        model = reload_checkpoint(output_dir, dtype=_checkpoint_dtype(output_dir), device=self.device)
        record = json.loads((output_dir / RUN_RECORD).read_text())
        return RunResult(model, load_tokenizer(output_dir), self.recipe, output_dir, record)

    # --- records and checks ----------------------------------------------------------------------

    def _check_code_allowed(self) -> None:
        references = self.recipe.code_references()
        if references and not self.options.allow_code:
            listed = "; ".join(f"{path}: {ref}" for path, ref in references)
            raise CodeExecutionNotAllowed(
                f"the recipe names Python code ({listed}). Recipes are untrusted input, so rqat does not import "
                f"code they name unless you opt in: rerun with --allow-code (allow_code=True in Python) if you trust "
                f"it."
            )

    def _start_record(self, first_stage: int, dtype: torch.dtype) -> dict[str, Any]:
        """The run record, with the model source described as :func:`describe_model_source` does (``dtype``: what
        it was loaded in, which for a GGUF is what it was dequantized to)."""
        previous: list[dict[str, Any]] = []
        if first_stage and self.work_dir is not None and (self.work_dir / RUN_RECORD).is_file():
            previous = json.loads((self.work_dir / RUN_RECORD).read_text()).get("stages", [])[:first_stage]
        model: str | dict[str, Any] = "<in-memory model>"
        if isinstance(self.model_input, (str, os.PathLike)):
            model = describe_model_source(self.model_input, dtype)
        if self.model_snapshot is not None:
            snapshot = self.model_snapshot
            model = {"source": snapshot.ref.repo_id, "format": "hub", "revision": snapshot.ref.revision,
                     "commit": snapshot.commit}
        origin = self.recipe.origin
        return {
            "rqat_sdk": _version("rqat-sdk"),
            "status": "running",
            "started_at": _now(),
            "recipe": {"name": self.recipe.name, "fingerprint": self.recipe.fingerprint(),
                       "origin": origin.to_dict() if origin is not None else None},
            "scheme": self.recipe.scheme.label,
            "model": model,
            "dataset": describe_source(self.options.dataset) if self.options.dataset is not None else None,
            "seed": self.recipe.seed,
            "resumed_at_stage": first_stage if first_stage else None,
            "versions": {
                name: _version(name)
                for name in ("torch", "transformers", "llmcompressor", "compressed-tensors", "trl", "datasets")
            },
            "host": {
                "python": platform.python_version(),
                "platform": platform.platform(),
                "device": str(self.device),
                "gpu": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else None,
                "torch_threads": torch.get_num_threads(),
            },
            "stages": previous,
        }

    def _write_record(self, record: dict[str, Any]) -> None:
        if self.work_dir is not None and distributed.is_main():
            write_json_atomic(self.work_dir / RUN_RECORD, record)

    def _export(self, state: SessionState) -> dict[str, Any]:
        log.info("exporting %s checkpoint", self.recipe.scheme.label)
        tmp = Path(tempfile.mkdtemp(prefix=f".export{TMP_MARK}", dir=self.work_dir))
        try:
            report = export_checkpoint(state.model, state.tokenizer, self.recipe.scheme, tmp)
            for entry in tmp.iterdir():
                os.replace(entry, self._work / entry.name)
        except ExportError as exc:
            kept = self._stage_dir(len(self.recipe.stages) - 1)
            raise ExportError(
                f"{exc}. The trained model is kept in {kept}: once the cause is fixed, `rqat run --resume` "
                f"finishes the export from it without rerunning any stage"
            ) from exc
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info(
            "checkpoint check: reloaded logits %s (max |diff| %.3g)",
            "identical" if report.exact else "within tolerance",
            report.max_abs_logit_diff,
        )
        return report.to_dict()


    def _evaluate(self, state: SessionState, config: EvaluationConfig) -> dict[str, Any]:
        """pass@1 of the exported model (the in-memory one: the reload check proved them identical)."""
        log.info("evaluating on %s", config.benchmark)
        report = evaluate(
            state.model, config.benchmark, tokenizer=state.tokenizer, samples=config.samples,
            num_examples=config.num_examples, max_new_tokens=config.max_new_tokens, temperature=config.temperature,
            top_p=config.top_p, greedy=config.greedy, seed=self.recipe.seed, label=self.recipe.scheme.label,
        )
        report.save(self._work / EVALUATION_FILE)
        log.info("pass@1 %.1f%% on %s", 100 * report.pass_at_1, config.benchmark)
        summary = report.to_dict()
        summary.pop("items")
        return summary

    def _write_card(self, record: dict[str, Any]) -> None:
        config = json.loads((self._work / "config.json").read_text())
        card = model_card(self.recipe, record, serving_context(config))
        write_text_atomic(self._work / "README.md", card)


def run_stage(modifiers: Sequence[Modifier], state: SessionState) -> list[dict[str, Any]]:
    """Run one stage's modifiers under the contract of :mod:`rqat_sdk.modifiers.base`: every ``initialize``,
    then ``apply`` and ``finalize`` of each in turn. Returns each modifier's type and seconds (its ``apply``
    and ``finalize``).

    ``state.applied`` receives each modifier whose ``apply`` started, before it starts: what has changed
    ``state.model`` when a stage fails. An error of ``finalize`` after a failed ``apply`` is added to the
    ``apply`` error as a note, which stays the one raised.
    """
    for modifier in modifiers:
        modifier.initialize(state)
    timings = []
    for index, modifier in enumerate(modifiers):
        begin = time.perf_counter()
        state.applied.append(f"stages[{state.stage_index}].modifiers[{index}] ({modifier.type})")
        try:
            modifier.apply(state)
        except BaseException as exc:
            try:
                modifier.finalize(state)
            except Exception as cleanup:
                log.exception("%s: finalize failed after apply failed", modifier.type)
                exc.add_note(f"{modifier.type}.finalize also failed while cleaning up after it: {cleanup!r}")
            raise
        modifier.finalize(state)
        timings.append({"type": modifier.type, "seconds": round(time.perf_counter() - begin, 3)})
    return timings


def caller_model_after_failure(applied: list[str]) -> str:
    """What a failed run left in the model given in memory, for the log: which modifiers changed it."""
    if not applied:
        return "the run failed before any modifier's apply: the model given in memory is unchanged"
    return (f"the run failed; the model given in memory was changed in place by {', '.join(applied)} (the last "
            f"may have stopped part-way); each was finalized, so the model runs with its own forward")


def run_record(directory: Path) -> dict[str, Any] | None:
    """The run record rqat wrote in ``directory``, or None: how rqat recognises its own outputs."""
    try:
        record = json.loads((directory / RUN_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and {"rqat_sdk", "recipe", "status"} <= record.keys() else None


def describe_run(record: dict[str, Any]) -> str:
    """One line naming a run, for the log line that says what ``--overwrite`` replaces."""
    recipe = record["recipe"].get("name") if isinstance(record["recipe"], dict) else None
    return (f"the {record['status']} run of recipe {recipe or '(unnamed)'} ({record.get('scheme')}) started "
            f"{record.get('started_at')}")


def _is_work_dir(directory: Path) -> bool:
    """An unfinished run's directory: its run record, or, before the first stage finished, its recipe."""
    return run_record(directory) is not None or (directory / RECIPE_FILE).is_file()


def holds_work(work_dir: Path) -> bool:
    """Whether an unfinished run kept anything to resume from: a stage checkpoint or a mid-stage one."""
    root = work_dir / CHECKPOINTS
    return root.is_dir() and any(not entry.name.startswith(".") for entry in root.iterdir())


def _local_model(model: object) -> Path | None:
    """The local directory (or .gguf file) a model was given as, resolved; None for hub ids and in-memory models."""
    if not isinstance(model, (str, os.PathLike)) or not Path(model).expanduser().exists():
        return None
    return Path(model).expanduser().resolve()


def check_output_dir(output_dir: Path, model: object, *, overwrite: bool) -> None:
    """Refuse an output directory whose replacement would destroy the input model or files rqat did not write.

    ``--overwrite`` replaces only a previous rqat output (recognised by its run.json), never the model's
    directory, a directory holding it or one inside it.
    """
    source, target = _local_model(model), output_dir.expanduser().resolve()
    if source is not None and (target == source or target in source.parents or source in target.parents):
        raise OutputDirError(
            f"output directory {output_dir} is, holds or lies inside the model {source}; choose an output "
            f"directory outside the model's"
        )
    if output_dir.exists() and not output_dir.is_dir():
        raise OutputDirError(f"output directory {output_dir} is a file")
    if not output_dir.is_dir() or not any(output_dir.iterdir()):
        return
    if not overwrite:
        raise OutputDirError(
            f"output directory {output_dir} exists and is not empty; rerun with --overwrite to replace it once "
            f"the new run has finished (only a previous rqat output is replaced)"
        )
    if run_record(output_dir) is None:
        raise OutputDirError(
            f"output directory {output_dir} was not written by rqat (it has no {RUN_RECORD} of an rqat run), so "
            f"--overwrite does not replace it; choose another output directory, or empty it yourself"
        )


def _resume_point_text(first: int, total: int) -> str:
    """Where a resumed run starts, for the log: a stage, or only the export when every stage is done."""
    return f"all {total} stages done; exporting" if first == total else f"at stage {first + 1} of {total}"


def _checkpoint_dtype(directory: Path) -> torch.dtype:
    config = json.loads((directory / "config.json").read_text())
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return getattr(torch, name)


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
