"""Re-run the recipe a published checkpoint carries and say whether it gives the same checkpoint (``rqat reproduce``).

The checkpoint's ``recipe.yaml`` is the fully resolved recipe and its ``run.json`` records the base model (with
its hub commit), the run's dataset and the seed, so a deterministic recipe re-run on the same base model and
data gives the same weights bit for bit. Where it does not (training on another device or library version),
the recipe's own evaluation is compared instead: pass@1 within the published ± is a reproduction.
What cannot be re-run (a model or dataset that was given in memory, code the caller did not allow) is listed
instead of guessed at.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file

from rqat_sdk import hub
from rqat_sdk.errors import RqatError
from rqat_sdk.exporters.model_card import base_model_name
from rqat_sdk.recipe import Recipe
from rqat_sdk.session.engine import RECIPE_FILE, Session, run_record

Verdict = Literal["identical", "within spread", "differs", "not reproduced"]
IN_MEMORY = "<in-memory"
"""How run.json describes a model or dataset that was passed as a Python object."""


@dataclass
class Reproduction:
    """What ``rqat reproduce`` found: a verdict, why, and what could not be reproduced."""

    published: str
    verdict: Verdict
    findings: list[str] = field(default_factory=list)
    """How the new checkpoint compares with the published one."""
    not_reproduced: list[str] = field(default_factory=list)
    """What could not be re-run as published, each naming the run.json or recipe field at fault."""
    notes: list[str] = field(default_factory=list)
    """Differences of environment that may explain a mismatch (device, library versions)."""

    @property
    def reproduced(self) -> bool:
        return self.verdict in ("identical", "within spread")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def reproduce(
    source: str | os.PathLike,
    *,
    output_dir: str | os.PathLike | None = None,
    model: str | None = None,
    dataset: str | None = None,
    allow_code: bool = False,
    device: str = "auto",
) -> Reproduction:
    """Re-run the checkpoint ``source`` (a directory, or a hub repository ``ORG/NAME[@REVISION]``) and compare.

    ``model`` / ``dataset`` stand in for a base model or dataset that cannot be found as recorded (each is noted
    in the result); the new checkpoint is written to ``output_dir``, or to a temporary directory removed after the
    comparison.
    """
    published, label = _published(source)
    record = run_record(published)
    if record is None or record.get("status") != "complete":
        raise RqatError(f"{label} is not a finished checkpoint rqat exported (no run.json of a complete run)")
    recipe = Recipe.from_file(published / RECIPE_FILE, source=f"{label}/{RECIPE_FILE}")

    blockers = [f"{path}: names Python code ({ref}), which runs only with --allow-code"
                for path, ref in recipe.code_references() if not allow_code]
    notes = []
    base = model or _recorded_model(record.get("model"), blockers)
    if model is not None:
        notes.append(f"the base model was replaced by {model} (run.json records {base_model_name(record['model'])})")
    run_dataset = dataset or _recorded_dataset(record.get("dataset"), blockers)
    if dataset is not None:
        notes.append(f"the dataset was replaced by {dataset} (run.json records {record.get('dataset')})")
    if blockers:
        return Reproduction(label, "not reproduced", not_reproduced=blockers, notes=notes)

    target = Path(output_dir) if output_dir is not None else Path(tempfile.mkdtemp(prefix="rqat-reproduce-")) / "out"
    try:
        result = Session(recipe, base, dataset=run_dataset, output_dir=target, allow_code=allow_code,
                         device=device, dtype=_computed_dtype(published), keep_checkpoints="none").run()
        notes += _environment_changes(record, result.record)
        return _compare(label, published, target, record, result.record, notes)
    finally:
        if output_dir is None:
            shutil.rmtree(target.parent, ignore_errors=True)


def _published(source: str | os.PathLike) -> tuple[Path, str]:
    """The published checkpoint's local directory, and how to name it."""
    path = Path(str(source)).expanduser()
    if path.is_dir():
        return path, str(source)
    ref = hub.parse_repo(str(source))
    if ref is None:
        raise RqatError(f"{str(source)!r} is neither a checkpoint directory nor a hub repository (ORG/NAME[@REVISION])")
    snapshot = hub.download_repo(ref)
    return snapshot.path, f"{ref.repo_id}@{snapshot.commit or ref.revision or 'main'}"


def _recorded_model(model: Any, blockers: list[str]) -> str | None:
    """The base model as run.json records it, pinned to its commit when it came from the hub."""
    if not isinstance(model, dict):
        blockers.append("run.json model: the base model was given in memory; pass --model")
        return None
    if model.get("format") == "hub":
        at = model.get("commit") or model.get("revision")
        return f"{model['source']}@{at}" if at else model["source"]
    location = str(model.get("path", model["source"]))
    if not Path(location).exists():
        blockers.append(f"run.json model: {location} does not exist here; pass --model")
        return None
    return location


def _recorded_dataset(dataset: Any, blockers: list[str]) -> str | None:
    if isinstance(dataset, str) and dataset.startswith(IN_MEMORY):
        blockers.append(f"run.json dataset: the run read {dataset}, which was not saved; pass --dataset")
        return None
    return dataset


def _computed_dtype(checkpoint: Path) -> str:
    """The dtype the published run computed in, which its exported config records."""
    config = json.loads((checkpoint / "config.json").read_text())
    return config.get("dtype") or config.get("torch_dtype") or "auto"


def _environment_changes(published: dict[str, Any], rerun: dict[str, Any]) -> list[str]:
    """Device and library versions that differ from the published run's."""
    changes = []
    before, after = published.get("host", {}).get("device"), rerun["host"]["device"]
    if before != after:
        changes.append(f"device: published on {before}, re-run on {after}")
    for name, version in rerun["versions"].items():
        recorded = published.get("versions", {}).get(name)
        if recorded != version:
            changes.append(f"{name}: published with {recorded}, re-run with {version}")
    return changes


def _compare(
    label: str, published: Path, rerun: Path, record: dict[str, Any], new_record: dict[str, Any], notes: list[str]
) -> Reproduction:
    """Bit-identical weights, else pass@1 within the published ± (when the recipe evaluates), else a mismatch."""
    def tensors(directory: Path) -> dict[str, torch.Tensor]:
        return {name: tensor for path in sorted(directory.glob("*.safetensors"))
                for name, tensor in load_file(path).items()}

    old, new = tensors(published), tensors(rerun)
    differing = sorted(name for name in old.keys() & new.keys() if not _same(old[name], new[name]))
    findings = [f"tensor {name}: only in the {where} checkpoint"
                for where, names in (("published", old.keys() - new.keys()), ("re-run", new.keys() - old.keys()))
                for name in sorted(names)]
    if differing:
        findings.append(f"{len(differing)} of {len(old)} tensors differ, first {differing[0]}")
    if not findings:
        return Reproduction(label, "identical", [f"all {len(old)} tensors are bit-identical"], notes=notes)
    before, after = record.get("evaluation"), new_record.get("evaluation")
    if before is None or after is None:
        findings.append("the recipe evaluates nothing (export.evaluate), so pass@1 cannot be compared")
        return Reproduction(label, "differs", findings, notes=notes)
    gap = abs(after["pass_at_1"] - before["pass_at_1"])
    findings.append(f"pass@1 on {after['benchmark']}: published {100 * before['pass_at_1']:.1f} ± "
                    f"{100 * before['std']:.1f}, re-run {100 * after['pass_at_1']:.1f}")
    return Reproduction(label, "within spread" if gap <= before["std"] else "differs", findings, notes=notes)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit: the same dtype, shape and bytes (so that NaNs and signed zeros count as stored)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bytes(a), _bytes(b))


def _bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().reshape(-1).view(torch.uint8)

