"""The commit a benchmark record names, so that every figure in docs/ traces to the code that measured it."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def git_commit() -> str | None:
    """The checkout's commit, ``+dirty`` when tracked files differ from it (the record is then not exactly
    that commit); None outside a git checkout. ``RQAT_COMMIT`` overrides it for a copied working tree whose
    ``.git`` is not the one it came from (a GPU machine's copy)."""
    if os.environ.get("RQAT_COMMIT"):
        return os.environ["RQAT_COMMIT"]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
