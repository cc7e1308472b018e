"""Issue 18: rqat never loses the user's work, and refuses runs that would do nothing or ruin the model."""

import json

import pytest

import rqat_sdk
from rqat_sdk.cli import main
from rqat_sdk.errors import DatasetError, OutputDirError, RecipeError, RqatError
from rqat_sdk.modifiers.ptq import RotationModifier, RTNModifier
from rqat_sdk.recipe import Recipe
from rqat_sdk.session import engine

RTN = {"version": 1, "scheme": "W4G128", "stages": [{"name": "ptq", "modifiers": [{"type": "rtn"}]}]}
TWO = {
    "version": 1, "scheme": "W4G128",
    "stages": [{"name": "rotate", "modifiers": [{"type": "rotation"}]},
               {"name": "ptq", "modifiers": [{"type": "rtn"}]}],
}
QAT_KD = {"type": "qat_kd", "steps": 2, "batch_size": 2, "micro_batch_size": 2, "logging_steps": 1}
QAT = {**RTN, "stages": [*RTN["stages"], {"name": "qat", "data": {"num_samples": 4, "max_seq_length": 64},
                                          "modifiers": [QAT_KD]}]}


def failing(*args, **kwargs):
    raise RqatError("simulated failure")


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_overwrite_replaces_only_a_previous_rqat_output_and_says_so(tiny_qwen3, tmp_path, caplog):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(OutputDirError, match=r"out was not written by rqat .*so --overwrite does not replace it"):
        rqat_sdk.oneshot(tiny_qwen3, RTN, output_dir=out, overwrite=True)
    assert (out / "precious.txt").read_text() == "keep me" and not (tmp_path / "out.partial").exists()

    (out / "precious.txt").unlink()
    rqat_sdk.oneshot(tiny_qwen3, RTN, output_dir=out)  # an empty directory is not replaced, only filled
    with caplog.at_level("WARNING", logger="rqat_sdk.session.engine"):
        rqat_sdk.oneshot(tiny_qwen3, RTN, output_dir=out, overwrite=True)
    assert f"--overwrite: replacing {out}, the complete run of recipe (unnamed) (W4G128) started" in caplog.text

    stray = tmp_path / "other.partial"
    stray.mkdir()
    (stray / "notes.txt").write_text("mine")
    with pytest.raises(OutputDirError, match=r"other.partial was not written by rqat .*--overwrite does not remove it"):
        rqat_sdk.oneshot(tiny_qwen3, RTN, output_dir=tmp_path / "other", overwrite=True)
    assert (stray / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("where", ["model", "parent", "inside"])
def test_the_model_directory_is_never_an_output(tiny_qwen3, where):
    out = {"model": tiny_qwen3, "parent": tiny_qwen3.parent, "inside": tiny_qwen3 / "w4"}[where]
    with pytest.raises(OutputDirError, match=r"is, holds or lies inside the model .*choose an output directory"):
        rqat_sdk.oneshot(str(tiny_qwen3) + "/", RTN, output_dir=out, overwrite=True)
    assert (tiny_qwen3 / "model.safetensors").is_file() and not (tiny_qwen3 / "w4").exists()


def test_demo_refuses_a_folder_it_did_not_write_before_evaluating(tmp_path, capsys, monkeypatch):

    monkeypatch.setattr(engine, "evaluate", failing)
    (tmp_path / "mine.txt").write_text("x")
    assert main(["demo", "--output-dir", str(tmp_path)]) == 1
    assert "was not written by rqat" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["mine.txt"]


def test_a_failed_run_leaves_nothing_when_it_did_nothing_else_says_resume(tiny_qwen3, tmp_path, monkeypatch, capsys):
    recipe = tmp_path / "two.yaml"
    recipe.write_text(json.dumps(TWO))
    args = ["run", str(recipe), "--model", str(tiny_qwen3), "--output-dir", str(tmp_path / "out")]
    with monkeypatch.context() as patch:
        patch.setattr(RotationModifier, "apply", failing)
        assert main(args) == 1
    assert "simulated failure" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["two.yaml"], "nothing done: nothing left behind"

    with monkeypatch.context() as patch:
        patch.setattr(RTNModifier, "apply", failing)
        assert main(args) == 1
    err = capsys.readouterr().err
    assert "error: simulated failure\n" in err
    assert "out.partial keeps the finished work: `rqat run --resume` with the same output directory" in err
    assert (tmp_path / "out.partial" / "checkpoints" / "00-rotate" / "stage.json").is_file()
    assert main(args) == 1
    assert "holds an unfinished run; rerun with --resume to continue it, or with --overwrite" in capsys.readouterr().err


def test_training_data_without_responses_is_refused_before_the_model_loads(tiny_qwen3, tmp_path, monkeypatch):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"messages": [{"role": "user", "content": "2+2?"}]}] * 4)
    with monkeypatch.context() as patch:
        patch.setattr(engine, "load_model", failing)
        with pytest.raises(DatasetError, match=r"^dataset \(.*prompts.jsonl\): none of its 4 examples has a response"):
            rqat_sdk.oneshot(tiny_qwen3, QAT, prompts, tmp_path / "out")
    assert not (tmp_path / "out.partial").exists()

    long = [{"messages": [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "4"}]}] * 4
    with pytest.raises(DatasetError, match=r"long.jsonl\): truncated to max_seq_length 64 tokens, no example keeps"):
        rqat_sdk.oneshot(tiny_qwen3, QAT, write_jsonl(tmp_path / "long.jsonl", long))


def test_a_zero_learning_rate_warns_and_max_loss_ratio_is_validated():
    still = {**QAT, "stages": [QAT["stages"][0], {**QAT["stages"][1], "modifiers": [{**QAT_KD, "learning_rate": 0}]}]}
    assert Recipe.from_dict(still).warnings() == [
        "stages[1].modifiers[0].learning_rate: 0 leaves the weights unchanged; nothing trains and the stage changes "
        "nothing"
    ]
    low = {**QAT, "stages": [QAT["stages"][0], {**QAT["stages"][1], "modifiers": [{**QAT_KD, "max_loss_ratio": 0.5}]}]}
    with pytest.raises(RecipeError, match=r"stages\[1\].modifiers\[0\].max_loss_ratio"):
        Recipe.from_dict(low)


def test_small_losses_and_what_training_changed_are_shown(tiny_qwen3, tmp_path, capsys):
    from rqat_sdk.modifiers.qat.trainer import format_loss

    assert [format_loss(x) for x in (1.234e-4, 0.5, 0.0, 123.4)] == ["1.23e-04", "0.5000", "0.0000", "123.4000"]
    recipe = tmp_path / "qat.yaml"
    recipe.write_text(json.dumps(QAT))
    args = ["run", str(recipe), "--model", str(tiny_qwen3), "--dataset", "reasoning-gym:chain_sum"]
    assert main(args + ["--output-dir", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "training      qat (qat_kd): final loss " in out and "% of weight codes changed" in out


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith("rqat 0.")


def test_export_is_left_out_of_stage_fingerprints():
    evaluated = Recipe.from_dict({**TWO, "export": {"vllm_target": "cpu", "evaluate": {"benchmark": "gsm8k"}}})
    plain = Recipe.from_dict(TWO)
    assert [evaluated.fingerprint(i) for i in (0, 1)] == [plain.fingerprint(i) for i in (0, 1)]
    assert evaluated.fingerprint() != plain.fingerprint(), "the whole recipe's fingerprint (run.json) keeps export"


def test_a_refused_resume_says_what_changed_and_a_resume_saves_the_recipe_that_ran(tiny_qwen3, tmp_path, monkeypatch):
    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        patch.setattr(RTNModifier, "apply", failing)
        with pytest.raises(RqatError, match="simulated failure"):
            rqat_sdk.oneshot(tiny_qwen3, TWO, output_dir=out)
    reseeded = {**TWO, "seed": 4, "stages": [{**TWO["stages"][0], "data": {"num_samples": 9}}, TWO["stages"][1]]}
    with pytest.raises(OutputDirError, match=r"00-rotate was written by a different recipe \(changed since it was "
                       r"written: seed: 0 -> 4; stages\[0\].data.num_samples: 128 -> 9\), so the run cannot resume"):
        rqat_sdk.oneshot(tiny_qwen3, reseeded, output_dir=out, resume=True)

    # a stage recorded by an older rqat, whose recipe schema lacked a field added since: the recipe is the same
    record = out.with_name(out.name + ".partial") / "checkpoints" / "00-rotate" / "stage.json"
    record.write_text(json.dumps({**json.loads(record.read_text()), "fingerprint": "from-an-older-schema"}))
    edited = {**TWO, "export": {"vllm_target": "cpu"},
              "stages": [TWO["stages"][0], {**TWO["stages"][1], "data": {"num_samples": 7}}]}
    result = rqat_sdk.oneshot(tiny_qwen3, edited, output_dir=out, resume=True)
    assert result.record["resumed_at_stage"] == 1
    saved = Recipe.from_file(out / "recipe.yaml")
    assert saved == Recipe.from_dict(edited) and saved.fingerprint() == result.record["recipe"]["fingerprint"]


def test_what_would_fail_after_training_is_refused_before_any_model_loads(tiny_qwen3, tmp_path, monkeypatch):
    from rqat_sdk.errors import PreflightError

    late = {**QAT, "export": {"evaluate": {"benchmark": "gsm8kk"}},
            "stages": [QAT["stages"][0],
                       {**QAT["stages"][1], "modifiers": [{**QAT_KD, "teacher": str(tmp_path / "t")}]}]}
    monkeypatch.setattr(engine, "load_model", failing)
    with pytest.raises(PreflightError) as refused:
        rqat_sdk.oneshot(tiny_qwen3, late, "reasoning-gym:chain_sum", tmp_path / "out")
    assert refused.value.problems[0] == f"stages[1].modifiers[0].teacher: model path '{tmp_path / 't'}' does not exist"
    assert refused.value.problems[1].startswith("export.evaluate.benchmark: 'gsm8kk' is neither an existing file")
    assert refused.value.problems[1].endswith("Close benchmark names: gsm8k")
    assert not (tmp_path / "out.partial").exists()

    missing = {**RTN, "stages": [*RTN["stages"], {"name": "qat", "data": {"source": str(tmp_path / "kd.jsonl")},
                                                  "modifiers": [QAT_KD]}]}
    with pytest.raises(DatasetError, match=r"stages\[1\].data.source: .*kd.jsonl' is neither an existing file"):
        rqat_sdk.oneshot(tiny_qwen3, missing, output_dir=tmp_path / "out")
    grpo = {**RTN, "stages": [*RTN["stages"], {"name": "rl", "data": {"source": str(tmp_path / "rl.jsonl")},
                                               "modifiers": [{"type": "grpo"}]}]}
    with pytest.raises(DatasetError, match=r"stages\[1\].data.source: .*rl.jsonl' is neither"):
        rqat_sdk.oneshot(tiny_qwen3, grpo, output_dir=tmp_path / "out")


def test_a_cuda_device_without_cuda_is_refused(tiny_qwen3, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    out = str(tmp_path / "o")
    assert main(["run", "rtn_w3g128", "--model", str(tiny_qwen3), "--output-dir", out, "--device", "cuda"]) == 1
    assert capsys.readouterr().err == ("error: --device cuda: this machine has no CUDA device that torch can use; use "
                                       "--device cpu (or auto, which picks CUDA when there is one)\n")
    assert not any(tmp_path.iterdir())


def test_every_bundled_recipe_validates_as_shipped(capsys):
    from rqat_sdk.recipes import bundled

    for name in bundled():
        assert main(["validate", name]) == 0, capsys.readouterr().err
    assert "generation: vllm" not in "".join(path.read_text() for path in bundled().values())


def test_vllm_rollouts_without_vllm_are_refused_before_any_model_loads(tiny_qwen3, tmp_path, monkeypatch, capsys):
    from rqat_sdk.errors import PreflightError
    from rqat_sdk.session import preflight

    monkeypatch.setattr(preflight, "vllm_importable", lambda: False)
    monkeypatch.setattr(engine, "load_model", failing)
    grpo = {"name": "rl", "modifiers": [{"type": "grpo", "generation": "vllm-colocate"}]}
    vllm = {**QAT, "stages": [*QAT["stages"], grpo]}
    with pytest.raises(PreflightError, match=r"stages\[2\].modifiers\[0\].generation: vllm-colocate runs trl's vLLM "
                       r"rollouts inside rqat's environment, where vLLM is not importable .* "
                       r"Set generation: transformers"):
        rqat_sdk.oneshot(tiny_qwen3, vllm, "reasoning-gym:chain_sum", tmp_path / "out")
    recipe = tmp_path / "vllm.yaml"
    recipe.write_text(json.dumps(vllm))
    assert main(["validate", str(recipe)]) == 1
    assert "stages[2].modifiers[0].generation: vllm-colocate" in capsys.readouterr().err
    monkeypatch.setattr(preflight, "vllm_importable", lambda: True)
    assert main(["validate", str(recipe)]) == 0


def test_bad_inputs_get_a_message_not_a_traceback(tiny_qwen3, tmp_path, monkeypatch, capsys):
    import shutil

    def error(argv):
        assert main(argv) == 1
        return capsys.readouterr().err

    broken = tmp_path / "broken"
    shutil.copytree(tiny_qwen3, broken)
    (broken / "config.json").write_text('{"model_type": ')
    assert "broken/config.json cannot be read as JSON" in error(
        ["run", "rtn_w3g128", "--model", str(broken), "--output-dir", str(tmp_path / "o")])

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert f"error: dataset: {empty} holds no examples" in error(
        ["run", "gptq_w3g128", "--model", str(tiny_qwen3), "--dataset", str(empty),
         "--output-dir", str(tmp_path / "o")])

    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfeversion: 1")
    assert "byte 0 is not UTF-8: a recipe is a YAML text file" in error(["validate", str(binary)])
    assert f"directory '{tmp_path}' holds no recipe: looked for recipe.yaml, recipe.yml" in error(
        ["validate", str(tmp_path)])
    assert "recipe file 'gptq_w3g12' does not exist; bundled recipes with close names: gptq_w3g128" in error(
        ["validate", "gptq_w3g12"])

    a_file = tmp_path / "a_file"
    a_file.write_text("")
    assert f"cannot write {a_file}/o.partial/recipe.yaml: Not a directory" in error(
        ["run", "rtn_w3g128", "--model", str(tiny_qwen3), "--output-dir", str(a_file / "o")])

    monkeypatch.setattr(engine, "evaluate", failing)
    assert f"cannot write {a_file}/report.json: {a_file} is a file, not a directory" in error(
        ["eval", str(tiny_qwen3), "-o", str(a_file / "report.json")])
    monkeypatch.undo()
    missing = error(["eval", str(tmp_path / "missing"), "--num-examples", "1"])
    assert f"path '{tmp_path / 'missing'}' does not exist" in missing and "--tokenizer" not in missing
