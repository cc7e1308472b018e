"""The Hugging Face hub: the only module that imports ``huggingface_hub``.

Everything rqat fetches from or publishes to a model repository goes through these few functions, so the rest
of the SDK (and its tests, which replace ``hf_hub_download``, ``snapshot_download`` and ``HfApi`` here) never
sees the hub's API or its errors. A repository is named ``ORG/NAME`` or ``ORG/NAME@REVISION`` (a branch, tag or
commit); downloads report the commit the revision resolved to, read from the cache's
``snapshots/<commit>/`` folder that ``huggingface_hub`` returns, so that the same works offline from the cache.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from rqat_sdk.errors import RqatError

HUB_PREFIX = "hf:"
_REPO = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")

MODEL_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken"]
"""What a model snapshot downloads: config, weights and tokenizer files, not a repository's other formats
(``original/*.pth``, ONNX, GGUF) that transformers would not read. Repositories without safetensors get
``*.bin`` as well (:func:`download_model`)."""

T = TypeVar("T")


class HubError(RqatError):
    """A repository, revision or file could not be fetched from, or published to, the Hugging Face hub."""


@dataclass(frozen=True)
class RepoRef:
    """A hub repository and, optionally, the revision (branch, tag or commit) to read."""

    repo_id: str
    revision: str | None = None

    def __str__(self) -> str:
        return f"{self.repo_id}@{self.revision}" if self.revision else self.repo_id

    def at(self, commit: str | None) -> RepoRef:
        """The same repository pinned to ``commit`` (unchanged when the commit is unknown)."""
        return RepoRef(self.repo_id, commit or self.revision)


def parse_repo(text: str) -> RepoRef | None:
    """``ORG/NAME`` or ``ORG/NAME@REVISION`` (``hf:`` in front optional) as a :class:`RepoRef`; None otherwise."""
    match = _REPO.match(text.removeprefix(HUB_PREFIX))
    return RepoRef(match["repo"], match["revision"]) if match else None


@dataclass(frozen=True)
class Snapshot:
    """Files of a repository at one commit, in the local cache."""

    ref: RepoRef
    path: Path
    commit: str | None


def download_file(ref: RepoRef, filename: str) -> Snapshot | None:
    """``filename`` of ``ref``: the snapshot holding it (``path`` is the file), or None when the repository has no
    such file."""
    try:
        path = Path(_call(ref, lambda: hf_hub_download(ref.repo_id, filename, revision=ref.revision)))
    except RemoteEntryNotFoundError:
        return None
    return Snapshot(ref, path, _commit_of(path.parent))


def download_model(ref: RepoRef) -> Snapshot:
    """The files transformers loads a model and its tokenizer from (:data:`MODEL_FILES`), at one commit."""
    path = Path(_call(ref, lambda: snapshot_download(ref.repo_id, revision=ref.revision, allow_patterns=MODEL_FILES)))
    commit = _commit_of(path)
    if not any(path.glob("*.safetensors")):  # an older repository with PyTorch pickles only
        pinned = ref.at(commit)
        path = Path(_call(ref, lambda: snapshot_download(ref.repo_id, revision=pinned.revision,
                                                         allow_patterns=["*.bin"])))
    return Snapshot(ref, path, commit)


def download_repo(ref: RepoRef) -> Snapshot:
    """Every file of ``ref`` at one commit (a published checkpoint, to compare with)."""
    path = Path(_call(ref, lambda: snapshot_download(ref.repo_id, revision=ref.revision)))
    return Snapshot(ref, path, _commit_of(path))


def upload(folder: Path, files: list[str], repo_id: str, *, private: bool, message: str) -> str:
    """Create ``repo_id`` if needed and upload exactly ``files`` (paths relative to ``folder``) in one commit;
    returns the commit's URL."""
    ref = RepoRef(repo_id)
    api = HfApi()
    _call(ref, lambda: api.create_repo(repo_id, private=private, exist_ok=True))
    info = _call(ref, lambda: api.upload_folder(repo_id=repo_id, folder_path=folder, allow_patterns=files,
                                                commit_message=message))
    return str(info.commit_url)


def _commit_of(snapshot: Path) -> str | None:
    """The commit of a cache snapshot folder (``.../snapshots/<commit>``)."""
    return snapshot.name if _COMMIT.match(snapshot.name) and snapshot.parent.name == "snapshots" else None


def _call(ref: RepoRef, action: Callable[[], T]) -> T:
    """Run one hub call, turning the hub's errors into :class:`HubError` naming the repository."""
    try:
        return action()
    except RepositoryNotFoundError:
        raise HubError(f"{ref.repo_id}: no such Hugging Face repository, or it is private or gated and no token "
                       f"with access is set (huggingface-cli login)") from None
    except RevisionNotFoundError:
        raise HubError(f"{ref}: {ref.repo_id} has no revision {ref.revision!r} (a branch, tag or commit)") from None
    except RemoteEntryNotFoundError:
        raise  # a missing file is an answer, not a failure: download_file says None
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as exc:
        raise HubError(f"{ref}: not in the local Hugging Face cache, and the hub cannot be reached (HF_HUB_OFFLINE is "
                       f"set or there is no network): {exc}") from None
    except HFValidationError as exc:
        raise HubError(f"{ref}: not a valid Hugging Face repository name: {exc}") from None
    except HfHubHTTPError as exc:
        raise HubError(f"{ref}: the Hugging Face hub answered {exc}") from None
