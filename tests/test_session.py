"""The session engine: checkpoints, resume, overwrite, isolation, bad model input."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import rqat_sdk
from rqat_sdk.errors import CodeExecutionNotAllowed, ExportError, ModelLoadError, OutputDirError
from rqat_sdk.exporters import probe_batch
from rqat_sdk.modifiers.ptq import GPTQModifier, RotationModifier

TWO_STAGES = {
    "version": 1,
    "seed": 3,
    "scheme": "W3G128",
    "stages": [
        {"name": "rotate", "modifiers": [{"type": "rotation"}]},
        {"name": "ptq", "data": {"num_samples": 8, "max_seq_length": 64}, "modifiers": [{"type": "gptq"}]},
    ],
}
DATA = "reasoning-gym:chain_sum"


def logits(model, tokenizer):
    with torch.no_grad():
        return model(probe_batch(tokenizer, torch.device("cpu"))).logits


def crash(*args, **kwargs):
    raise RuntimeError("simulated crash")


def test_stage_checkpoints_are_written_and_pruned(tiny_qwen3, tmp_path):
    out = tmp_path / "out"
    result = rqat_sdk.oneshot(tiny_qwen3, TWO_STAGES, DATA, out, keep_checkpoints="all")
    stages = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert stages == ["00-rotate", "01-ptq"]
    record = json.loads((out / "checkpoints" / "01-ptq" / "stage.json").read_text())
    assert record["name"] == "ptq" and record["data"] == DATA and record["modifiers"][0]["type"] == "gptq"
    # A stage checkpoint is itself loadable and holds the quantized model (latent weights + scales).
    stage_model = AutoModelForCausalLM.from_pretrained(out / "checkpoints" / "01-ptq")
    assert torch.equal(logits(stage_model, result.tokenizer), logits(result.model, result.tokenizer))
    assert not list(tmp_path.glob("**/.*tmp-*"))

    last = rqat_sdk.oneshot(tiny_qwen3, TWO_STAGES, DATA, tmp_path / "last")
    assert [p.name for p in (tmp_path / "last" / "checkpoints").iterdir()] == ["01-ptq"]
    rqat_sdk.oneshot(tiny_qwen3, TWO_STAGES, DATA, tmp_path / "none", keep_checkpoints="none")
    assert not (tmp_path / "none" / "checkpoints").exists()
    assert torch.equal(logits(last.model, last.tokenizer), logits(result.model, result.tokenizer))  # seeded


def test_resume_after_a_crash_continues_from_the_last_stage(tiny_qwen3, tmp_path, monkeypatch):
    reference = rqat_sdk.oneshot(tiny_qwen3, TWO_STAGES, DATA, tmp_path / "reference")
    out = tmp_path / "out"

    with monkeypatch.context() as patch:
        patch.setattr(GPTQModifier, "apply", crash)
        with pytest.raises(RuntimeError, match="simulated crash"):
            rqat_sdk.oneshot(tiny_qwen3, TWO_STAGES, DATA, out)
    assert not out.exists(), "an interrupted run must not leave a half-written output"
    partial = tmp_path / "out.partial"
    assert (partial / "checkpoints" / "00-rotate" / "stage.json").is_file()
    assert not (partial / "checkpoints" / "01-ptq").exists()
    assert json.loads((partial / "run.json").read_text())["status"] == "running"

    with pytest.raises(OutputDirError, match="holds an unfinished run; rerun with --resume"):
        rqat_sdk.oneshot(tiny_qwen3, TWO_STAGES, DATA, out)

    with monkeypatch.context() as patch:
        patch.setattr(RotationModifier, "apply", crash)  # the finished stage must not run again
        resumed = rqat_sdk.oneshot(tiny_qwen3, TWO_STAGES, DATA, out, resume=True)
    assert resumed.record["resumed_at_stage"] == 1
    assert [s["name"] for s in resumed.record["stages"]] == ["rotate", "ptq"]
    assert not partial.exists() and (out / "model.safetensors").is_file()
    assert torch.equal(logits(resumed.model, resumed.tokenizer), logits(reference.model, reference.tokenizer))


def test_a_failed_export_keeps_the_trained_model_and_resume_finishes_it(tiny_qwen3, tmp_path, monkeypatch, caplog):
    from rqat_sdk.session import engine

    def refused(*args, **kwargs):
        raise ExportError("simulated refusal")

    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        patch.setattr(engine, "export_checkpoint", refused)
        with pytest.raises(ExportError, match=r"simulated refusal\. The trained model is kept in .*01-ptq: once the "
                           r"cause is fixed, `rqat run --resume` finishes the export"):
            rqat_sdk.oneshot(tiny_qwen3, TWO_STAGES, DATA, out)
    partial = tmp_path / "out.partial"
    assert not out.exists()
    assert (partial / "checkpoints" / "01-ptq" / "stage.json").is_file()
    assert not any(partial.glob(".export*")), "the failed export's files are removed, the checkpoints kept"
    record = json.loads((partial / "run.json").read_text())
    assert record["status"] == "export_failed" and record["error"].startswith("simulated refusal. The trained model")

    with monkeypatch.context() as patch, caplog.at_level("INFO", logger="rqat_sdk.session.engine"):
        patch.setattr(RotationModifier, "apply", crash)  # no stage runs again
        patch.setattr(GPTQModifier, "apply", crash)
        resumed = rqat_sdk.oneshot(tiny_qwen3, TWO_STAGES, DATA, out, resume=True)
    assert "all 2 stages done; exporting" in caplog.text and "stage 3 of 2" not in caplog.text
    assert resumed.record["resumed_at_stage"] == 2 and resumed.record["export"]["exact"]
    assert [s["name"] for s in resumed.record["stages"]] == ["rotate", "ptq"]
    assert not partial.exists() and (out / "model.safetensors").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(logits(reloaded, resumed.tokenizer), logits(resumed.model, resumed.tokenizer))


def test_resume_refuses_checkpoints_of_another_recipe(tiny_qwen3, tmp_path, monkeypatch):
    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        patch.setattr(GPTQModifier, "apply", crash)
        with pytest.raises(RuntimeError):
            rqat_sdk.oneshot(tiny_qwen3, TWO_STAGES, DATA, out)
    changed = {**TWO_STAGES, "seed": 4}
    with pytest.raises(OutputDirError, match=r"00-rotate was written by a different recipe .* rerun with --overwrite"):
        rqat_sdk.oneshot(tiny_qwen3, changed, DATA, out, resume=True)
    fresh = rqat_sdk.oneshot(tiny_qwen3, changed, DATA, out, overwrite=True)
    assert fresh.record["resumed_at_stage"] is None and fresh.record["seed"] == 4


def test_resume_of_a_finished_run_loads_it(tiny_qwen3, tmp_path, monkeypatch):
    first = rqat_sdk.oneshot(tiny_qwen3, TWO_STAGES, DATA, tmp_path / "out")
    monkeypatch.setattr(RotationModifier, "apply", crash)
    again = rqat_sdk.oneshot(tiny_qwen3, TWO_STAGES, DATA, tmp_path / "out", resume=True)
    assert again.record == first.record
    assert torch.equal(logits(again.model, again.tokenizer), logits(first.model, first.tokenizer))


def test_existing_output_is_refused_and_replaced_only_when_the_new_run_finishes(tiny_qwen3, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(OutputDirError, match="exists and is not empty; rerun with --overwrite"):
        rqat_sdk.oneshot(tiny_qwen3, TWO_STAGES, DATA, out)
    (out / "precious.txt").unlink()
    first = rqat_sdk.oneshot(tiny_qwen3, TWO_STAGES, DATA, out)
    with monkeypatch.context() as patch:
        patch.setattr(GPTQModifier, "apply", crash)
        with pytest.raises(RuntimeError):
            rqat_sdk.oneshot(tiny_qwen3, TWO_STAGES, DATA, out, overwrite=True)
    assert json.loads((out / "run.json").read_text()) == first.record
    again = rqat_sdk.oneshot(tiny_qwen3, TWO_STAGES, DATA, out, overwrite=True)
    assert json.loads((out / "run.json").read_text()) == again.record != first.record
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputDirError, match="is a file"):
        rqat_sdk.oneshot(tiny_qwen3, TWO_STAGES, DATA, tmp_path / "file")


def test_two_sessions_in_one_process_do_not_interfere(tiny_qwen3, tiny_llama, tmp_path, monkeypatch):
    from llmcompressor.core import active_session

    qwen = {**TWO_STAGES, "scheme": "W4A16"}
    llama = {**TWO_STAGES, "scheme": "W2G64"}
    alone_a = rqat_sdk.oneshot(tiny_qwen3, qwen, DATA, tmp_path / "alone-a")
    alone_b = rqat_sdk.oneshot(tiny_llama, llama, DATA, tmp_path / "alone-b")

    # Interleave: session A stops after its first stage, session B runs whole, then A finishes.
    session_a = rqat_sdk.Session(qwen, tiny_qwen3, dataset=DATA, output_dir=tmp_path / "a")
    session_b = rqat_sdk.Session(llama, tiny_llama, dataset=DATA, output_dir=tmp_path / "b")
    with monkeypatch.context() as patch:
        patch.setattr(GPTQModifier, "apply", crash)
        with pytest.raises(RuntimeError):
            session_a.run()
    b = session_b.run()
    session_a.options.resume = True
    a = session_a.run()

    assert torch.equal(logits(a.model, a.tokenizer), logits(alone_a.model, alone_a.tokenizer))
    assert torch.equal(logits(b.model, b.tokenizer), logits(alone_b.model, alone_b.tokenizer))
    bits = {n: json.loads((tmp_path / n / "config.json").read_text())["quantization_config"] for n in "ab"}
    assert bits["a"]["config_groups"]["group_0"]["weights"]["num_bits"] == 4
    assert bits["b"]["config_groups"]["group_0"]["weights"]["num_bits"] == 2
    # llmcompressor's process-global session saw none of it.
    lifecycle = active_session().lifecycle
    assert lifecycle.recipe.modifiers == [] and lifecycle.state.model is None


def test_in_memory_model_with_empty_name_and_no_output_dir(tiny_qwen3):
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen3)
    model.config._name_or_path = ""  # llmcompressor's oneshot fails on this unless the adapter steps in
    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen3)
    result = rqat_sdk.oneshot(model, TWO_STAGES, DATA, tokenizer=tokenizer)
    assert result.output_dir is None and result.model is model
    assert model.config._name_or_path == ""
    assert "save_pretrained" not in vars(model), "llmcompressor's save_pretrained wrapper must not stay behind"
    assert model.model.layers[0].self_attn.q_proj.quantization_scheme.weights.num_bits == 3


def test_bad_model_inputs_fail_clearly(tiny_qwen3, tmp_path):
    with pytest.raises(ModelLoadError, match=r"model path '\./no/such/model' does not exist"):
        rqat_sdk.oneshot("./no/such/model", TWO_STAGES, DATA)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="has no config.json"):
        rqat_sdk.oneshot(tmp_path / "empty", TWO_STAGES, DATA)
    with pytest.raises(ModelLoadError, match="is a file"):
        rqat_sdk.oneshot(tiny_qwen3 / "config.json", TWO_STAGES, DATA)
    with pytest.raises(ModelLoadError, match="could not load model 'nobody/nothing'"):
        rqat_sdk.oneshot("nobody/nothing", TWO_STAGES, DATA)
    rqat_sdk.oneshot(tiny_qwen3, TWO_STAGES, DATA, tmp_path / "quantized")
    with pytest.raises(ModelLoadError, match="is already quantized \\(compressed-tensors\\)"):
        rqat_sdk.oneshot(tmp_path / "quantized", TWO_STAGES, DATA)
    with pytest.raises(ModelLoadError, match="dtype 'fp8' is not one of"):
        rqat_sdk.oneshot(tiny_qwen3, TWO_STAGES, DATA, dtype="fp8")


def test_code_in_a_recipe_is_refused_before_the_model_loads(tmp_path):
    recipe = {**TWO_STAGES, "stages": [{**TWO_STAGES["stages"][1], "data": {"source": "python:mod:load"}}]}
    with pytest.raises(CodeExecutionNotAllowed, match=r"stages\[0\].data.source: python:mod:load.*allow_code=True"):
        rqat_sdk.oneshot("./model/that/does/not/exist", recipe, output_dir=tmp_path / "o")
    assert not (tmp_path / "o.partial").exists()
