"""mypy with exporters/ and recipes/ checked under the names they install as (``python .ci/typecheck.py``).

setuptools installs the top-level folders exporters/ and recipes/ as ``rqat_sdk.exporters`` and
``rqat_sdk.recipes`` (pyproject's [tool.setuptools.package-dir]). mypy names a file's module by its path alone,
so plain ``mypy`` checks them as top-level ``exporters`` and ``recipes`` and cannot find ``rqat_sdk.exporters``
(an editable install reaches it through an import hook mypy does not run): under ``ignore_missing_imports``
every import of it becomes ``Any`` and nothing that calls into it is checked. This runs mypy with pyproject's
[tool.mypy] and gives those sources their installed names, so every use of them is type-checked. Arguments
are mypy's. It calls ``mypy.main``'s ``process_options`` and ``run_build``, which are not a public API:
mypy is pinned in pyproject's test extra, and a new release must be checked here.
"""

from __future__ import annotations

import sys
import time
import tomllib
from pathlib import Path

from mypy import util
from mypy.fscache import FileSystemCache
from mypy.main import process_options, run_build
from mypy.modulefinder import BuildSource
from mypy.version import __version__

ROOT = Path(__file__).resolve().parents[1]
TESTED_WITH = "2.4.1"


def installed_names() -> dict[str, str]:
    """Each remapped folder (``exporters``) and the package it installs as (``rqat_sdk.exporters``)."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    return {folder: package for package, folder in setuptools.get("package-dir", {}).items() if package}


def renamed(sources: list[BuildSource], names: dict[str, str]) -> list[BuildSource]:
    """``sources`` with the remapped folders' modules under their installed names. A checkout that links
    rqat_sdk/exporters to exporters/ (to import from the tree without installing) finds those files twice: the
    folder's copy is kept."""
    by_module: dict[str, BuildSource] = {}
    for source in sources:
        head, dot, rest = source.module.partition(".")
        if head in names:
            module = names[head] + dot + rest
            by_module[module] = BuildSource(source.path, module, source.text, source.base_dir, source.followed)
        else:
            by_module.setdefault(source.module, source)
    return list(by_module.values())


def main(args: list[str]) -> int:
    if __version__ != TESTED_WITH:
        print(f"{__file__}: written against mypy {TESTED_WITH}, found {__version__}: check that process_options "
              "and run_build still behave as this script expects, then update TESTED_WITH", file=sys.stderr)
        return 2
    fscache = FileSystemCache()
    sources, options = process_options(args, stdout=sys.stdout, stderr=sys.stderr, fscache=fscache)
    sources = renamed(sources, installed_names())
    _, messages, blockers = run_build(sources, options, fscache, time.time(), sys.stdout, sys.stderr)
    formatter = util.FancyFormatter(sys.stdout, sys.stderr, options.hide_error_codes)
    n_errors, n_notes, n_files = util.count_stats(messages)
    if n_errors:
        print(formatter.format_error(n_errors, n_files, len(sources), blockers=blockers,
                                     use_color=options.color_output))
    else:
        print(formatter.format_success(len(sources), options.color_output))
    return (2 if blockers else 1) if messages and n_notes < len(messages) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
