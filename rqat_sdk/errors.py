"""Every error the SDK raises on bad input derives from :class:`RqatError`.

Each names the field, file or layer at fault, so the CLI can print it without a traceback.
"""

from __future__ import annotations


class RqatError(Exception):
    """Base class of all user-facing errors."""


class RecipeError(RqatError):
    """A recipe could not be read or is invalid.

    ``problems`` holds one ``"path: message"`` line per problem, e.g.
    ``"stages[1].modifiers[0].dampening_frac: 1.5 is not in 0..1"``.
    """

    MAX_LINE = 500
    """Characters of one problem line: a recipe is untrusted input, and a line may quote part of it."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = [p if len(p) <= self.MAX_LINE else p[: self.MAX_LINE] + " [...]" for p in problems]
        self.source = source
        where = f" in {source}" if source else ""
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid recipe{where}:\n{lines}")


class CodeExecutionNotAllowed(RqatError):
    """A recipe names Python code and the caller did not opt in with ``allow_code``."""


class DatasetError(RqatError):
    """A dataset source could not be resolved, read or parsed."""


class ModelLoadError(RqatError):
    """A model or tokenizer could not be loaded."""


class SchemeError(RqatError):
    """A quantization scheme does not fit the model (e.g. a group size that does not divide a layer)."""


class OutputDirError(RqatError):
    """The output directory exists, is not resumable, or does not match the run."""


class ExportError(RqatError):
    """A checkpoint could not be exported, or its reload does not match the in-memory model."""


class PreflightError(RqatError):
    """A run would fail later on something checkable before the first stage (a missing teacher, an unknown
    benchmark, vLLM generation without vLLM): all such problems, one ``"field: message"`` line each."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"the run cannot start:\n{lines}")


class DeviceError(RqatError):
    """The requested device does not exist on this machine."""


class UpstreamVersionError(RqatError):
    """An installed dependency differs from the version whose private internals an adapter was verified against."""
