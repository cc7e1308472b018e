"""Recipes shipped with rqat_sdk, installed as ``rqat_sdk.recipes``.

Anywhere a recipe is expected (``oneshot(recipe=...)``, ``rqat run``), a bundled one can be named by its file stem.
"""

from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).parent


def bundled() -> dict[str, Path]:
    """Bundled recipe names (file stems) and their paths."""
    return {path.stem: path for path in sorted(_HERE.glob("*.yaml"))}
