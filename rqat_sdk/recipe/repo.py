"""The recipe a model repository carries: a local directory (a clone, or a checkpoint rqat exported) or a
Hugging Face repository ``ORG/NAME[@REVISION]``.

A repository's recipe is the first of :data:`RECIPE_FILES` it holds; nothing else of the repository is
fetched to read it. Where it came from (the repository, the revision asked for, the commit that revision
resolved to) travels with the loaded :class:`~rqat_sdk.recipe.Recipe` into the run record.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rqat_sdk import hub
from rqat_sdk.errors import RecipeError

RECIPE_FILES = ("recipe.yaml", "recipe.yml")
"""The names looked up in a repository, in order; rqat's exports write ``recipe.yaml``."""


@dataclass(frozen=True)
class RecipeOrigin:
    """Where a recipe was read from: a hub repository at a commit, or a local directory."""

    repository: str
    """``ORG/NAME`` for the hub, else the local directory."""
    file: str
    """Which of :data:`RECIPE_FILES` it is."""
    from_hub: bool
    revision: str | None = None
    """The revision asked for (``ORG/NAME@REVISION``); None for the default branch."""
    commit: str | None = None
    """The commit the revision resolved to (hub repositories)."""

    @property
    def label(self) -> str:
        """How errors name the file: ``hf:ORG/NAME@COMMIT/recipe.yaml`` or ``DIR/recipe.yaml``."""
        if not self.from_hub:
            return str(Path(self.repository) / self.file)
        at = self.commit or self.revision
        return f"{hub.HUB_PREFIX}{self.repository}{f'@{at}' if at else ''}/{self.file}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def names_repository(source: str | os.PathLike) -> bool:
    """Whether ``source`` names a repository rather than a recipe file: an existing directory, ``hf:ORG/NAME``, or
    ``ORG/NAME[@REVISION]`` that is no local path and has no YAML suffix."""
    text = str(source)
    if Path(text).expanduser().is_dir() or text.startswith(hub.HUB_PREFIX):
        return True
    return (
        isinstance(source, str)
        and not Path(text).expanduser().exists()
        and not text.endswith((".yaml", ".yml"))
        and hub.parse_repo(text) is not None
    )


def find_recipe(source: str | os.PathLike) -> tuple[Path, RecipeOrigin]:
    """The recipe file of the repository ``source`` names (see :func:`names_repository`), and its origin."""
    directory = Path(str(source)).expanduser()
    if directory.is_dir():
        for name in RECIPE_FILES:
            if (directory / name).is_file():
                return directory / name, RecipeOrigin(str(directory.resolve()), name, from_hub=False)
        raise RecipeError([f"directory {str(source)!r} holds no recipe: looked for {', '.join(RECIPE_FILES)}"],
                          str(source))
    ref = hub.parse_repo(str(source))
    if ref is None:
        raise RecipeError([f"{str(source)!r} is not a hub repository: write hf:ORG/NAME or hf:ORG/NAME@REVISION"],
                          str(source))
    for name in RECIPE_FILES:
        try:
            snapshot = hub.download_file(ref, name)
        except hub.HubError as exc:
            if not str(source).startswith(hub.HUB_PREFIX):  # perhaps meant as a file: say it is not one either
                exc.add_note(f"  (and no local file or directory {str(source)!r} exists)")
            raise
        if snapshot is not None:
            return snapshot.path, RecipeOrigin(ref.repo_id, name, from_hub=True, revision=ref.revision,
                                               commit=snapshot.commit)
    raise RecipeError([f"repository {ref} holds no recipe: looked for {', '.join(RECIPE_FILES)}"],
                      f"{hub.HUB_PREFIX}{ref}")
