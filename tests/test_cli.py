import json
import subprocess
import sys

from rqat_sdk.cli import main
from rqat_sdk.recipes import bundled

BAD = "version: 1\nscheme: {weights: {num_bits: 9}}\nstages: [{name: a, modifiers: [{type: gptq, block_size: 0}]}]\n"


def test_validate_reports_a_valid_recipe(capsys):
    assert main(["validate", str(bundled()["gptq_w3g128"])]) == 0
    out = capsys.readouterr().out
    assert "recipe gptq_w3g128: valid" in out and "W3G128" in out and "pack-quantized" in out
    assert "stages[0] ptq: gptq; data: the run's --dataset, 128 samples" in out


def test_validate_accepts_bundled_names_and_prints_json(capsys):
    assert main(["validate", "rotation_gptq_w4a4", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [m["type"] for m in data["stages"][0]["modifiers"]] == ["rotation", "gptq"]


def test_validate_reports_every_problem_and_fails(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(BAD)
    assert main(["validate", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"invalid recipe in {path}" in err
    assert "scheme.weights.num_bits: 9 is not in 2..8" in err
    assert "stages[0].modifiers[0].block_size: 0 is below the minimum 1" in err
    assert "Traceback" not in err


def test_validate_notes_code_references(tmp_path, capsys):
    path = tmp_path / "code.yaml"
    path.write_text("version: 1\nscheme: W4A16\n"
                    "stages: [{name: a, data: {source: 'python:my.mod:load'}, modifiers: [{type: gptq}]}]\n")
    assert main(["validate", str(path)]) == 0
    expected = "stages[0].data.source names Python code (python:my.mod:load); running it needs --allow-code"
    assert expected in capsys.readouterr().out


def test_schema_command_writes_json_schema(tmp_path):
    assert main(["schema", "-o", str(tmp_path / "s.json")]) == 0
    schema = json.loads((tmp_path / "s.json").read_text())
    assert "stages" in schema["properties"] and schema["$schema"].endswith("schema")


def test_recipes_lists_bundled(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in bundled())


def test_run_writes_a_checkpoint_and_refuses_to_clobber(tiny_qwen3, tmp_path, capsys):
    args = ["run", "gptq_w4g128", "--model", str(tiny_qwen3), "--dataset", "reasoning-gym:chain_sum"]
    args += ["--output-dir", str(tmp_path / "out")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "identical logits" in out and "W4G128 (pack-quantized)" in out
    assert (tmp_path / "out" / "run.json").is_file()
    assert main(args) == 1
    assert "exists and is not empty; rerun with --overwrite" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 0


def test_run_with_a_missing_model_is_one_clear_line(tmp_path, capsys):
    args = ["run", "rtn_w3g128", "--model", "./missing/model", "--output-dir", str(tmp_path / "o")]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.strip() == "error: model path './missing/model' does not exist"


def test_run_takes_the_model_from_the_recipe(tiny_qwen3, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"version: 1\nmodel: {tiny_qwen3}\nscheme: W4G128\n"
                      f"stages: [{{name: ptq, modifiers: [{{type: rtn}}]}}]\n")
    assert main(["run", str(recipe), "--output-dir", str(tmp_path / "o")]) == 0
    model = json.loads((tmp_path / "o" / "run.json").read_text())["model"]
    assert model == {"source": str(tiny_qwen3), "format": "transformers", "path": str(tiny_qwen3.resolve())}
    assert main(["run", "rtn_w3g128", "--output-dir", str(tmp_path / "p")]) == 1
    assert "recipe rtn_w3g128 names no model (its `model` field); pass --model" in capsys.readouterr().err


def test_module_entry_point():
    done = subprocess.run([sys.executable, "-m", "rqat_sdk", "--help"], capture_output=True, text=True, check=True)
    assert "validate" in done.stdout and "run" in done.stdout


def test_demo_runs_reasoning_qat_on_the_embedded_testbed(tmp_path, capsys):
    assert main(["demo", "--output-dir", str(tmp_path / "demo"), "--problems", "30"]) == 0
    out = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): float(line.split("|")[3]) for line in out.splitlines()
            if line.startswith("| ") and "testbed" in line}
    assert rows["full precision"] > 80
    assert rows["Reasoning-QAT (W2G64)"] > rows["PTQ (W2G64)"] + 15
    assert (tmp_path / "demo" / "demo.png").is_file() and (tmp_path / "demo" / "README.md").is_file()


def test_rqat_run_takes_every_run_option_with_its_default():
    from dataclasses import asdict
    from pathlib import Path

    from rqat_sdk.cli import _parser, _run_options
    from rqat_sdk.session import RunOptions

    args = _parser().parse_args(["run", "recipe.yaml", "--output-dir", "out"])
    assert _run_options(args) == {**asdict(RunOptions()), "output_dir": Path("out")}
    args = _parser().parse_args(["run", "r.yaml", "--output-dir", "o", "--resume", "--keep-checkpoints", "all"])
    assert RunOptions(**_run_options(args)).resume and _run_options(args)["keep_checkpoints"] == "all"
