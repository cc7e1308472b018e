"""Recipes that live in model repositories: run, validate, reproduce, push and upgrade, offline.

The hub is faked at the boundary only: ``hf_hub_download``, ``snapshot_download`` and ``HfApi``'s
``create_repo``/``upload_folder`` in :mod:`rqat_sdk.hub`, which serve repositories kept as local folders and
return snapshot folders laid out as huggingface_hub's cache lays them out. Everything above is the real code.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from huggingface_hub.errors import RemoteEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

from rqat_sdk import hub
from rqat_sdk.cli import main
from rqat_sdk.data import describe_source

RTN_W4 = "version: 1\nname: tiny-rtn\n{model}scheme: W4G128\nstages: [{{name: ptq, modifiers: [{{type: rtn}}]}}]\n"


def _not_found(error: type[Exception], what: str) -> Exception:
    response = httpx.Response(404, request=httpx.Request("GET", f"https://huggingface.co/{what}"))
    return error(f"404: {what}", response=response)


class FakeHub:
    """Repositories as folders of files, one per commit; downloads copy into a cache-layout snapshot folder."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.refs: dict[str, dict[str, str]] = {}
        self.downloads: list[tuple[str, str]] = []
        self.uploads: list[dict] = []

    def add(self, repo_id: str, files: dict[str, str] | Path, revision: str = "main") -> str:
        """Commit ``files`` (names and texts, or a folder to copy) as ``revision`` of ``repo_id``; its commit."""
        commit = hashlib.sha1(f"{repo_id}@{revision}#{len(self.refs.get(repo_id, {}))}".encode()).hexdigest()
        tree = self.root / "remote" / commit
        if isinstance(files, Path):
            shutil.copytree(files, tree)
        else:
            tree.mkdir(parents=True)
            for name, text in files.items():
                (tree / name).write_text(text)
        self.refs.setdefault(repo_id, {})[revision] = commit
        return commit

    def _tree(self, repo_id: str, revision: str | None) -> tuple[str, Path]:
        if repo_id not in self.refs:
            raise _not_found(RepositoryNotFoundError, repo_id)
        revisions = self.refs[repo_id]
        commit = revisions.get(revision or "main") or (revision if revision in revisions.values() else None)
        if commit is None:
            raise _not_found(RevisionNotFoundError, f"{repo_id}@{revision}")
        return commit, self.root / "remote" / commit

    def _snapshot(self, repo_id: str, commit: str) -> Path:
        folder = self.root / "cache" / f"models--{repo_id.replace('/', '--')}" / "snapshots" / commit
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def hf_hub_download(self, repo_id: str, filename: str, *, revision: str | None = None, **_) -> str:
        commit, tree = self._tree(repo_id, revision)
        if not (tree / filename).is_file():
            raise _not_found(RemoteEntryNotFoundError, f"{repo_id}/{filename}")
        self.downloads.append((repo_id, filename))
        target = self._snapshot(repo_id, commit) / filename
        shutil.copy(tree / filename, target)
        return str(target)

    def snapshot_download(self, repo_id: str, *, revision: str | None = None, allow_patterns=None, **_) -> str:
        commit, tree = self._tree(repo_id, revision)
        folder = self._snapshot(repo_id, commit)
        for path in tree.rglob("*"):
            name = path.relative_to(tree).as_posix()
            if path.is_file() and (allow_patterns is None or any(fnmatch.fnmatch(name, p) for p in allow_patterns)):
                self.downloads.append((repo_id, name))
                (folder / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(path, folder / name)
        return str(folder)

    def upload_folder(self, *, repo_id: str, folder_path: Path, allow_patterns: list[str], commit_message: str, **_):
        self.uploads.append({"repo_id": repo_id, "files": allow_patterns, "message": commit_message})
        staged = self.root / "staged"
        shutil.rmtree(staged, ignore_errors=True)
        for name in allow_patterns:
            (staged / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(Path(folder_path) / name, staged / name)
        commit = self.add(repo_id, staged)
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/{commit}")


@pytest.fixture
def fake_hub(tmp_path, monkeypatch) -> FakeHub:
    fake = FakeHub(tmp_path / "hub")
    monkeypatch.setattr(hub, "hf_hub_download", fake.hf_hub_download)
    monkeypatch.setattr(hub, "snapshot_download", fake.snapshot_download)
    monkeypatch.setattr(hub.HfApi, "create_repo", lambda api, repo_id, **kwargs: fake.refs.setdefault(repo_id, {}))
    monkeypatch.setattr(hub.HfApi, "upload_folder", lambda api, **kwargs: fake.upload_folder(**kwargs))
    return fake


@pytest.fixture(scope="module")
def checkpoint(tiny_qwen3, tmp_path_factory) -> Path:
    """A deterministic tiny run (RTN, no data) exported by `rqat run DIR` from a directory carrying its recipe."""
    repo = tmp_path_factory.mktemp("recipe-repo")
    (repo / "recipe.yaml").write_text(RTN_W4.format(model=f"model: {tiny_qwen3}\n"))
    out = tmp_path_factory.mktemp("runs") / "out"
    assert main(["run", str(repo), "--output-dir", str(out)]) == 0
    return out


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_a_repository_without_a_recipe_says_which_names_it_looked_for(fake_hub, tmp_path, capsys):
    fake_hub.add("org/plain", {"config.json": "{}"})
    code, _, err = run(["validate", "org/plain"], capsys)
    assert code == 1
    assert "repository org/plain holds no recipe: looked for recipe.yaml, recipe.yml" in err
    code, _, err = run(["run", "hf:org/missing", "--output-dir", str(tmp_path / "o")], capsys)
    assert code == 1 and "org/missing: no such Hugging Face repository" in err
    code, _, err = run(["validate", "org/plain@v9"], capsys)
    assert code == 1 and "org/plain has no revision 'v9'" in err


def test_a_repository_recipe_naming_code_runs_nothing_and_downloads_only_the_recipe(fake_hub, tmp_path, capsys):
    recipe = ("version: 1\nmodel: org/base\nscheme: W4G128\n"
              "stages: [{name: ptq, data: {source: 'python:evil.mod:load'}, modifiers: [{type: gptq}]}]\n")
    commit = fake_hub.add("org/code", {"recipe.yaml": recipe, "model.safetensors": "weights"})
    code, out, _ = run(["validate", "org/code"], capsys)
    assert code == 0
    assert f"read from hf:org/code@{commit}/recipe.yaml (nothing else was downloaded)" in out
    assert "model: org/base" in out and "data: python:evil.mod:load, 128 samples" in out
    assert "stages[0].data.source names Python code (python:evil.mod:load); running it needs --allow-code" in out
    assert fake_hub.downloads == [("org/code", "recipe.yaml")]

    code, _, err = run(["run", "org/code", "--output-dir", str(tmp_path / "o")], capsys)
    assert code == 1 and "stages[0].data.source: python:evil.mod:load" in err and "--allow-code" in err
    assert fake_hub.downloads == [("org/code", "recipe.yaml")] * 2, "the base model must not be fetched"
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


def test_a_newer_recipe_format_is_refused_with_the_version_it_needs(fake_hub, tmp_path, capsys):
    fake_hub.add("org/future", {"recipe.yml": "version: 7\nscheme: W4G128\nplan: [new, fields]\n"})
    code, _, err = run(["validate", "hf:org/future"], capsys)
    assert code == 1
    assert ("version: 7 is a newer recipe format than this rqat_sdk reads (format version 1); install a release of "
            "rqat_sdk that reads format version 7") in err
    assert "plan" not in err, "a newer format's fields are not reported one by one"

    local = tmp_path / "future.yaml"
    local.write_text("version: 2\nscheme: W4G128\n")
    code, _, err = run(["upgrade-recipe", str(local)], capsys)
    assert code == 1 and "reads format version 2" in err


def test_upgrade_recipe_prints_the_diff_and_writes_the_resolved_form(tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text(RTN_W4.format(model=""))
    code, out, _ = run(["upgrade-recipe", str(path)], capsys)
    assert code == 0 and "+  weights:\n+    num_bits: 4\n" in out and "-scheme: W4G128\n" in out
    assert path.read_text() == RTN_W4.format(model=""), "without -o or --in-place nothing is written"
    assert run(["upgrade-recipe", str(path), "--in-place"], capsys)[0] == 0
    code, out, _ = run(["upgrade-recipe", str(path)], capsys)
    assert code == 0 and out == "", "an upgraded recipe upgrades to itself"


def test_a_pinned_revision_and_the_base_models_commit_are_recorded(fake_hub, tiny_qwen3, tmp_path, capsys):
    base = fake_hub.add("org/base", tiny_qwen3)
    pinned = fake_hub.add("org/recipe", {"recipe.yaml": RTN_W4.format(model="model: org/base\n")}, revision="v1")
    fake_hub.add("org/recipe", {"recipe.yaml": "version: 1\nscheme: W8A8\nstages: []\n"})  # main moved on
    out = tmp_path / "out"
    code, _, err = run(["run", "org/recipe@v1", "--output-dir", str(out)], capsys)
    assert code == 0, err
    record = json.loads((out / "run.json").read_text())
    assert record["recipe"]["origin"] == {"repository": "org/recipe", "file": "recipe.yaml", "from_hub": True,
                                          "revision": "v1", "commit": pinned}
    assert record["model"] == {"source": "org/base", "format": "hub", "revision": None, "commit": base}
    assert ("org/base", "model.safetensors") in fake_hub.downloads
    assert "base_model: org/base\n" in (out / "README.md").read_text()


def test_oneshot_takes_a_hub_recipe_and_the_model_it_names(fake_hub, tiny_qwen3, tmp_path):
    import rqat_sdk

    fake_hub.add("org/base", tiny_qwen3)
    commit = fake_hub.add("org/recipe", {"recipe.yaml": RTN_W4.format(model="model: org/base\n")})
    result = rqat_sdk.oneshot(recipe="hf:org/recipe", output_dir=tmp_path / "out")
    assert result.recipe.origin.commit == commit and result.record["model"]["source"] == "org/base"


def test_reproduce_of_a_deterministic_run_is_identical(checkpoint, tmp_path, capsys):
    report = tmp_path / "report.json"
    code, out, _ = run(["reproduce", str(checkpoint), "-o", str(report)], capsys)
    assert code == 0, out
    assert out.startswith(f"{checkpoint}: identical\n") and "tensors are bit-identical" in out
    assert json.loads(report.read_text())["verdict"] == "identical"

    from safetensors.torch import load_file, save_file

    changed = tmp_path / "changed"
    shutil.copytree(checkpoint, changed)
    tensors = load_file(changed / "model.safetensors")
    name = sorted(tensors)[0]
    tensors[name].view(-1)[0] += 1
    save_file(tensors, changed / "model.safetensors", metadata={"format": "pt"})
    code, out, _ = run(["reproduce", str(changed)], capsys)
    assert code == 1 and out.startswith(f"{changed}: differs\n")
    assert f"1 of {len(tensors)} tensors differ, first {name}" in out and "pass@1 cannot be compared" in out


def test_reproduce_names_what_it_cannot_rerun(checkpoint, tmp_path, capsys):
    from datasets import Dataset

    copy = tmp_path / "copy"
    shutil.copytree(checkpoint, copy)
    record = json.loads((copy / "run.json").read_text())
    record["dataset"] = describe_source(Dataset.from_dict({"text": ["a", "b"]}))  # what a run given a Dataset records
    record["model"] = "<in-memory model>"
    (copy / "run.json").write_text(json.dumps(record))
    code, out, _ = run(["reproduce", str(copy)], capsys)
    assert code == 1 and "not reproduced" in out.splitlines()[0]
    assert "run.json model: the base model was given in memory; pass --model" in out
    assert "run.json dataset: the run read <in-memory Dataset: 2 rows" in out


def test_push_dry_run_lists_the_files_and_uploads_nothing(fake_hub, checkpoint, capsys):
    code, out, _ = run(["push", str(checkpoint), "org/tiny-w4", "--dry-run"], capsys)
    assert code == 0
    listed = [line.strip() for line in out.splitlines()[1:]]
    assert {"config.json", "model.safetensors", "recipe.yaml", "run.json", "README.md", "tokenizer.json"} <= set(listed)
    assert not any(name.startswith("checkpoints/") for name in listed), "stage checkpoints are not published"
    assert out.startswith(f"would upload {len(listed)} files") and fake_hub.uploads == []


def test_push_publishes_a_checkpoint_that_reproduces_from_the_hub(fake_hub, checkpoint, tmp_path, capsys):
    code, out, _ = run(["push", str(checkpoint), "org/tiny-w4"], capsys)
    assert code == 0 and "pushed: https://huggingface.co/org/tiny-w4/commit/" in out
    base = json.loads((checkpoint / "run.json").read_text())["model"]["source"]
    assert fake_hub.uploads[0]["message"].endswith(f": W4G128 checkpoint of {base}")
    code, out, _ = run(["reproduce", "org/tiny-w4"], capsys)
    assert code == 0 and out.startswith(f"org/tiny-w4@{fake_hub.refs['org/tiny-w4']['main']}: identical")


def test_push_refuses_a_checkpoint_whose_reload_check_failed(fake_hub, checkpoint, tmp_path, capsys):
    failed = tmp_path / "failed"
    shutil.copytree(checkpoint, failed)
    record = json.loads((failed / "run.json").read_text())
    (failed / "run.json").write_text(json.dumps({**record, "status": "export_failed", "error": "logits differ"}))
    code, _, err = run(["push", str(failed), "org/tiny-w4", "--dry-run"], capsys)
    assert code == 1 and "its export failed the reload check (logits differ)" in err and fake_hub.uploads == []


def test_only_the_hub_adapter_imports_huggingface_hub():
    import re

    root = Path(__file__).resolve().parents[1]
    importing = re.compile(r"^\s*(from|import) huggingface_hub\b", re.M)
    files = [p for folder in ("rqat_sdk", "exporters", "recipes", "benchmarks") for p in (root / folder).rglob("*.py")]
    assert [p.relative_to(root).as_posix() for p in files if importing.search(p.read_text())] == ["rqat_sdk/hub.py"]
