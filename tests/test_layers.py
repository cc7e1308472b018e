"""The package layers: every rqat_sdk import, function-local ones included, points to a lower layer.

This is the check docs/architecture.md names: ``pytest tests/test_layers.py``. Imports under
``if TYPE_CHECKING:`` are left out: they never run, and a modifier's annotations name the recipe and session
state it is handed, which sit above it.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE_DIRS = {
    "rqat_sdk": ROOT / "rqat_sdk", "rqat_sdk.exporters": ROOT / "exporters", "rqat_sdk.recipes": ROOT / "recipes"
}
"""Where each package's files are (exporters/ and recipes/ install as rqat_sdk subpackages; pyproject.toml)."""

LAYERS: list[set[str]] = [
    {"errors", "logs", "recipes"},
    {"code", "fields", "files", "threads", "distributed", "upstream", "hub"},
    {"scheme", "ops"},
    {"data", "gguf", "transforms", "preallocated_cache"},
    {"models", "cuda_graph_decoding"},
    {"generation"},
    {"modifiers"},
    {"modifiers.ptq", "modifiers.qat", "modifiers.rl"},
    {"exporters"},
    {"recipe"},
    {"serving"},
    {"evaluation"},
    {"testbed"},
    {"session"},
    {"rqat_sdk", "reproduce", "publish"},
    {"cli"},
    {"__main__"},
]
"""Bottom to top: a unit (a subpackage, or a module of rqat_sdk itself) imports only units of lower layers, so
units of one layer are independent of each other. The recipe document sits above the modifiers and exporters
it validates against; the session runs all of them; the testbed trains with QAT's trainer; ``rqat_sdk`` itself
(``oneshot``) is the API that the command line wraps, beside the repository commands it runs (``reproduce``,
``publish``), which build on the session."""


def _modules() -> dict[str, Path]:
    found = {}
    for package, directory in PACKAGE_DIRS.items():
        for path in directory.rglob("*.py"):
            parts = list(path.relative_to(directory).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


MODULES = _modules()


def _unit(module: str) -> str:
    """``rqat_sdk.modifiers.ptq.modifiers`` -> ``modifiers.ptq``; ``rqat_sdk.models`` -> ``models``."""
    if module == "rqat_sdk":
        return module
    is_package = MODULES[module].name == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    return (package if package != "rqat_sdk" else module).removeprefix("rqat_sdk.")


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement that can run: module level and function-local, not under ``if TYPE_CHECKING``."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _targets(module: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The rqat_sdk modules ``node`` imports (``from rqat_sdk import distributed`` imports the module)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
            for _ in range(node.level - 1):
                package = package.rpartition(".")[0]
            base = f"{package}.{base}".rstrip(".")
        names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
    return [name for name in names if name == "rqat_sdk" or name.startswith("rqat_sdk.")]


def import_edges() -> list[tuple[str, str, str]]:
    """``(importing unit, imported unit, "file:line")`` for every runtime import between two units."""
    edges = []
    for module, path in MODULES.items():
        for node in _runtime_imports(ast.parse(path.read_text(encoding="utf-8"))):
            for target in _targets(module, node):
                if target not in MODULES:
                    where = f"{path.relative_to(ROOT)}:{node.lineno}"
                    raise AssertionError(f"{where} imports {target}, which does not exist")
                if _unit(module) != _unit(target):
                    edges.append((_unit(module), _unit(target), f"{path.relative_to(ROOT)}:{node.lineno}"))
    return edges


def test_every_unit_has_a_layer() -> None:
    declared = [unit for layer in LAYERS for unit in layer]
    assert len(declared) == len(set(declared)), "a unit is declared in two layers"
    missing = sorted({_unit(module) for module in MODULES} - set(declared))
    assert not missing, f"place these in LAYERS: {missing}"


def test_imports_point_down() -> None:
    layer = {unit: index for index, units in enumerate(LAYERS) for unit in units}
    upward = [f"{where}: {source} imports {target}" for source, target, where in import_edges()
              if layer[target] >= layer[source]]
    assert not upward, "imports that do not point to a lower layer:\n" + "\n".join(upward)


def test_the_check_sees_function_local_and_from_imports(tmp_path: Path) -> None:
    """The parser finds an import inside a function and resolves ``from rqat_sdk import module``."""
    tree = ast.parse(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from rqat_sdk.cli import main\n"
        "def f():\n    from rqat_sdk import distributed\n    import rqat_sdk.ops.distill\n"
    )
    found = [target for node in _runtime_imports(tree) for target in _targets("rqat_sdk.models", node)]
    assert found == ["rqat_sdk.distributed", "rqat_sdk.ops.distill"]


LAZY = {
    "transformers": "takes about a second to import",
    "datasets": "takes seconds to import",
    "compressed_tensors": "takes seconds to import",
    "llmcompressor": "takes seconds to import; PTQ only",
    "trl": "takes seconds to import; GRPO only",
    "accelerate": "GRPO only",
    "reasoning_gym": "takes seconds to import; generated tasks only",
    "math_verify": "takes a second to import; answer checking only",
    "matplotlib": "plots only",
    "gguf": ".gguf model sources only",
    "torch.distributed.checkpoint": "multi-process training only",
    "torch.distributed.fsdp": "multi-process training only",
    "torch.distributed.tensor": "multi-process training only",
    "torch.utils.tensorboard": "needs the optional tensorboard package",
    "triton": "optional: CUDA builds only",
    "vllm": "only in vLLM's own environment (serving/vllm_worker.py)",
}
"""Packages imported inside functions, and why: ``import rqat_sdk`` loads torch alone (a test checks it)."""


def _function_local_imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    return [node for function in ast.walk(tree) if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef))
            for node in _runtime_imports(function)]


def test_function_local_imports_have_a_reason() -> None:
    """A function-local import is of a package named in :data:`LAZY`, or a comment right above it says why."""
    unexplained = []
    for path in MODULES.values():
        lines = path.read_text(encoding="utf-8").splitlines()
        for node in _function_local_imports(ast.parse("\n".join(lines))):
            name = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
            lazy = any(name == package or name.startswith(package + ".") for package in LAZY)
            above = node.lineno - 2
            while above >= 0 and lines[above].strip().startswith(("import ", "from ")):
                above -= 1
            if not lazy and not lines[above].strip().startswith("#"):
                unexplained.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
    assert not unexplained, "import these at module level, or say why not:\n" + "\n".join(sorted(set(unexplained)))


def test_importing_rqat_sdk_loads_none_of_the_lazy_packages() -> None:
    code = f"import sys, rqat_sdk; print([p for p in {sorted(LAZY)!r} if p in sys.modules])"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"
