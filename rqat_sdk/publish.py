"""Publish an exported checkpoint to a hub repository (``rqat push``): weights, tokenizer, model card, recipe and
run record, so that the repository carries the recipe that made it (``rqat run ORG/NAME``, ``rqat reproduce``).

Only a finished run's output is published: its run.json says the export's reload check passed. Stage
checkpoints (``checkpoints/``, latent weights kept for ``--resume``) and hidden files are left out.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rqat_sdk import hub
from rqat_sdk.errors import ExportError, RqatError
from rqat_sdk.exporters.model_card import base_model_name
from rqat_sdk.session.engine import CHECKPOINTS, PARTIAL_SUFFIX, RECIPE_FILE, RUN_RECORD, run_record

REQUIRED = ("config.json", RECIPE_FILE, RUN_RECORD, "README.md")
"""What a published repository must hold: the model's config, its recipe, its run record and its card."""


@dataclass(frozen=True)
class PushPlan:
    """What ``rqat push`` uploads: ``files`` (relative to ``directory``) into ``repo_id``."""

    directory: Path
    repo_id: str
    files: list[str]
    message: str

    @property
    def bytes(self) -> int:
        return sum((self.directory / name).stat().st_size for name in self.files)


def plan_push(directory: Path, repo_id: str) -> PushPlan:
    """Check that ``directory`` is a checkpoint whose reload check passed and list its files to upload."""
    ref = hub.parse_repo(repo_id)
    if ref is None or ref.revision is not None:
        raise RqatError(f"{repo_id!r} is not a repository to push to: write ORG/NAME")
    record = run_record(directory)
    if record is None:
        raise ExportError(f"{directory} is not a checkpoint rqat exported: it has no {RUN_RECORD} of an rqat run")
    if record["status"] == "export_failed":
        raise ExportError(f"{directory}: its export failed the reload check ({record.get('error')}), so it is not "
                          f"published; once the cause is fixed, `rqat run --resume` finishes the export")
    if record["status"] != "complete" or "export" not in record or directory.name.endswith(PARTIAL_SUFFIX):
        raise ExportError(f"{directory} holds an unfinished run (run.json status {record['status']!r}); only a "
                          f"finished checkpoint, whose reload check passed, is published")
    missing = [name for name in REQUIRED if not (directory / name).is_file()]
    if missing:
        raise ExportError(f"{directory} lacks {', '.join(missing)}; re-export it with `rqat run`")
    files = sorted(
        path.relative_to(directory).as_posix()
        for path in directory.rglob("*")
        if path.is_file()
        and path.relative_to(directory).parts[0] != CHECKPOINTS
        and not any(part.startswith(".") for part in path.relative_to(directory).parts)
    )
    message = f"rqat_sdk {record['rqat_sdk']}: {record['scheme']} checkpoint of {base_model_name(record['model'])}"
    return PushPlan(directory, ref.repo_id, files, message)


def push(plan: PushPlan, *, private: bool = False) -> str:
    """Upload the planned files in one commit; returns the commit's URL."""
    return hub.upload(plan.directory, plan.files, plan.repo_id, private=private, message=plan.message)
