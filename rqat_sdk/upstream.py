"""The version check for code that relies on another package's private internals.

Each such contact lives in the one adapter file it belongs to (the llmcompressor and trl adapters), which names
the version it was verified against; pyproject.toml pins the same one. A private name can change in any
release, so the adapter refuses to run on another version rather than misbehave quietly.
"""

from __future__ import annotations

from importlib import metadata

from rqat_sdk.errors import UpstreamVersionError


def require_verified(package: str, verified: str, contact: str) -> None:
    """Raise :class:`UpstreamVersionError` unless ``package`` is installed at exactly ``verified``.

    ``contact`` says which private internals depend on it, so that the message tells a maintainer what to check.
    """
    installed = metadata.version(package)
    if installed != verified:
        raise UpstreamVersionError(
            f"{contact} relies on private internals of {package} {verified}, but {package} {installed} is installed. "
            f"Install {package}=={verified} (pyproject.toml pins it), or check that code against {package} "
            f"{installed} and update the version it names"
        )
