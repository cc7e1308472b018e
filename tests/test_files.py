import pytest

from rqat_sdk.files import atomic_directory, remove_temporaries, replace_directory, write_text_atomic


def test_atomic_directory_appears_only_when_complete(tmp_path):
    target = tmp_path / "ckpt"
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as tmp:
            (tmp / "half").write_text("written")
            raise RuntimeError("interrupted")
    assert not target.exists() and list(tmp_path.iterdir()) == []
    with atomic_directory(target) as tmp:
        (tmp / "done").write_text("ok")
        assert not target.exists()
    assert (target / "done").read_text() == "ok"


def test_replacing_a_directory_keeps_the_old_one_until_the_new_is_in_place(tmp_path):
    old, new = tmp_path / "out", tmp_path / "new"
    old.mkdir()
    (old / "a").write_text("old")
    new.mkdir()
    (new / "b").write_text("new")
    replace_directory(new, old)
    assert [p.name for p in old.iterdir()] == ["b"] and not new.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_write_text_atomic_and_cleanup(tmp_path):
    path = tmp_path / "deep" / "file.txt"
    write_text_atomic(path, "one")
    write_text_atomic(path, "two")
    assert path.read_text() == "two"
    (tmp_path / ".stale.tmp-1234").mkdir()
    (tmp_path / ".x.tmp-99").write_text("")
    (tmp_path / "keep.tmp").write_text("")
    remove_temporaries(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deep", "keep.tmp"]


def test_a_published_checkpoint_is_readable_like_any_new_file(tmp_path):
    import os

    import torch
    from safetensors.torch import save_file

    mask = os.umask(0o022)
    try:
        with atomic_directory(tmp_path / "ckpt") as tmp:
            save_file({"w": torch.zeros(2)}, str(tmp / "model.safetensors"))  # safetensors itself writes 0600
            (tmp / "config.json").write_text("{}")
    finally:
        os.umask(mask)
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in (tmp_path / "ckpt").iterdir()}
    assert modes == {"model.safetensors": "0o644", "config.json": "0o644"}
