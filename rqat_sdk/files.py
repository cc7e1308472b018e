"""Atomic writes: a file or directory is complete when it appears under its final name, or absent.

Everything is first written under a temporary name in the same directory (same filesystem), then renamed.
An interrupted run leaves only ``*.tmp-*`` leftovers, which :func:`remove_temporaries` clears.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rqat_sdk.errors import OutputDirError

TMP_MARK = ".tmp-"


def _temporary_sibling(target: Path) -> Path:
    return target.with_name(f".{target.name}{TMP_MARK}{uuid.uuid4().hex[:8]}")


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_sibling(path)
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def check_writable(path: Path) -> None:
    """Fail before the work that produces ``path`` (an evaluation, a run), not after it: create its folder and a
    temporary file there."""

    if path.parent.exists() and not path.parent.is_dir():
        raise OutputDirError(f"cannot write {path}: {path.parent} is a file, not a directory")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _temporary_sibling(path)
        tmp.touch()
        tmp.unlink()
    except OSError as exc:
        raise OutputDirError(f"cannot write {path}: {exc.strerror} ({exc.filename}); choose a writable place") from None


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


@contextlib.contextmanager
def atomic_directory(target: Path) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``target`` only if the block finishes without error."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_sibling(target)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_directory(tmp, target)


def replace_directory(source: Path, target: Path) -> None:
    """Move ``source`` to ``target``; an existing ``target`` is kept aside until the move has happened."""
    publish_modes(source)
    old = None
    if target.exists():
        old = _temporary_sibling(target)
        os.replace(target, old)
    os.replace(source, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def publish_modes(directory: Path) -> None:
    """Give every file under ``directory`` the mode the umask gives a new file (0644 under umask 022).

    safetensors writes through a private temporary file and so leaves ``model.safetensors`` at 0600, unlike
    every other file of a checkpoint; others sharing the machine or the model directory could not read it.
    """
    mask = os.umask(0)
    os.umask(mask)
    for path in directory.rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(0o666 & ~mask)


def remove_temporaries(directory: Path) -> None:
    if not directory.is_dir():
        return
    for entry in directory.iterdir():
        if entry.name.startswith(".") and TMP_MARK in entry.name:
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
