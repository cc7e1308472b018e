"""The modifier lifecycle under failure: every initialize before any apply, finalize after a failed apply,
and a caller's in-memory model left usable (its own forward, dtype, eval mode, flags) and reported."""

import logging

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import rqat_sdk
from rqat_sdk.exporters import probe_batch
from rqat_sdk.modifiers.layers import quantized_linears
from rqat_sdk.modifiers.ptq import RotationModifier, RTNModifier
from rqat_sdk.modifiers.qat import QATKDModifier
from rqat_sdk.modifiers.qat.trainer import TrainingDiverged
from rqat_sdk.modifiers.rl import ColdStartError
from rqat_sdk.recipe import Recipe

DATA = "reasoning-gym:chain_sum"
PTQ = {"name": "ptq", "data": {"num_samples": 8, "max_seq_length": 64}, "modifiers": [{"type": "rtn"}]}
QAT = {"name": "qat", "data": {"num_samples": 8, "max_seq_length": 64}, "modifiers": [
    {"type": "qat_kd", "steps": 2, "batch_size": 4, "micro_batch_size": 2, "learning_rate": 1e-3}]}


def recipe_with(stages: list[dict], replace: dict[tuple[int, int], object]) -> Recipe:
    """A W3G128 recipe whose modifiers at ``(stage, index)`` are replaced by the given instances."""
    recipe = Recipe.from_dict({"version": 1, "scheme": "W3G128", "stages": stages})
    for (stage, index), modifier in replace.items():
        recipe.stages[stage].modifiers[index] = modifier
    return recipe


def in_memory(path, dtype=torch.float32):
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype), AutoTokenizer.from_pretrained(path)


def assert_usable(model, tokenizer, dtype):
    """The model's own (compressed-tensors) forward runs: no training forward, gradient or mode left behind."""
    layers = quantized_linears(model)
    assert layers and not any(hasattr(m, "_rqat_compressed_tensors_forward") for _, m in layers)
    assert not any(hasattr(m, name) for _, m in layers for name in ("rqat_clip", "rqat_zero_point"))
    assert not model.training and model.dtype == dtype
    assert all(p.dtype == dtype for p in model.parameters() if p.is_floating_point())
    assert not model.is_gradient_checkpointing
    with torch.no_grad():
        assert torch.isfinite(model(probe_batch(tokenizer, torch.device("cpu"))).logits).all()


def test_every_initialize_runs_before_any_apply_and_finalize_follows_each_apply(tiny_qwen3):
    calls = []

    def recording(cls):
        class Recording(cls):
            def initialize(self, state):
                calls.append(f"{self.type}.initialize")
                super().initialize(state)

            def apply(self, state):
                calls.append(f"{self.type}.apply")
                super().apply(state)

            def finalize(self, state):
                calls.append(f"{self.type}.finalize")
                super().finalize(state)

        return Recording()

    stage = {"name": "ptq", "modifiers": [{"type": "rotation"}, {"type": "rtn"}]}
    recipe = recipe_with([stage], {(0, 0): recording(RotationModifier), (0, 1): recording(RTNModifier)})
    rqat_sdk.oneshot(tiny_qwen3, recipe)
    assert calls == ["rotation.initialize", "rtn.initialize", "rotation.apply", "rotation.finalize", "rtn.apply",
                     "rtn.finalize"]


def test_a_failed_check_of_a_later_modifier_leaves_the_model_untouched(tiny_qwen3, caplog):
    class RefusingRTN(RTNModifier):
        def initialize(self, state):
            raise rqat_sdk.RqatError("refused")

    model, tokenizer = in_memory(tiny_qwen3)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    stage = {"name": "ptq", "modifiers": [{"type": "rotation"}, {"type": "rtn"}]}
    with caplog.at_level(logging.WARNING), pytest.raises(rqat_sdk.RqatError, match="refused"):
        rqat_sdk.oneshot(model, recipe_with([stage], {(0, 1): RefusingRTN()}), tokenizer=tokenizer)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    assert "failed before any modifier's apply: the model given in memory is unchanged" in caplog.text


def test_a_diverged_qat_stage_leaves_the_callers_model_usable_and_says_what_changed_it(tiny_qwen3, caplog):
    class DivergingQAT(QATKDModifier):
        """Trains for real, with gradient checkpointing and learned scales and clipping, then fails the way a
        diverged loss does: with the training forward still attached."""

        def apply(self, state):
            super().apply(state)
            raise TrainingDiverged("simulated divergence")

    qat = DivergingQAT(steps=2, batch_size=4, micro_batch_size=2, learning_rate=1e-3, learn_scales=True,
                       learn_clipping=True, gradient_checkpointing=True)
    model, tokenizer = in_memory(tiny_qwen3, torch.bfloat16)
    with caplog.at_level(logging.INFO), pytest.raises(TrainingDiverged, match="simulated divergence"):
        rqat_sdk.oneshot(model, recipe_with([PTQ, QAT], {(1, 0): qat}), DATA, tokenizer=tokenizer)
    assert_usable(model, tokenizer, torch.bfloat16)
    # the requires_grad flags are those the PTQ stage left, as after a run without the QAT stage
    ptq_only = rqat_sdk.oneshot(in_memory(tiny_qwen3, torch.bfloat16)[0], recipe_with([PTQ], {}), tokenizer=tokenizer)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    assert flags == {name: p.requires_grad for name, p in ptq_only.model.named_parameters()}
    assert not flags["model.layers.0.mlp.up_proj.weight_scale"] and flags["model.layers.0.mlp.up_proj.weight"]
    assert "the model given in memory is changed in place" in caplog.text
    assert ("changed in place by stages[0].modifiers[0] (rtn), stages[1].modifiers[0] (qat_kd) (the last may "
            "have stopped part-way)") in caplog.text


def test_a_cold_start_restores_the_dtype_grpo_trained_in(tiny_qwen3):
    model, tokenizer = in_memory(tiny_qwen3, torch.bfloat16)
    grpo = {"name": "rl", "data": {"num_samples": 8, "max_seq_length": 64}, "modifiers": [
        {"type": "grpo", "steps": 1, "prompts_per_step": 2, "group_size": 2, "micro_batch_size": 4,
         "max_completion_length": 4, "probe_size": 2, "gradient_checkpointing": True}]}
    recipe = {"version": 1, "scheme": "W3G128", "stages": [PTQ, grpo]}
    with pytest.raises(ColdStartError):  # the untrained tiny model never answers correctly
        rqat_sdk.oneshot(model, recipe, "testbed", tokenizer=tokenizer)
    assert_usable(model, tokenizer, torch.bfloat16)  # GRPO trains in float32


def test_a_failing_finalize_does_not_hide_the_apply_error(tiny_qwen3):
    class BrokenRTN(RTNModifier):
        def apply(self, state):
            raise RuntimeError("apply failed")

        def finalize(self, state):
            raise RuntimeError("finalize failed")

    with pytest.raises(RuntimeError, match="apply failed") as failure:
        rqat_sdk.oneshot(tiny_qwen3, recipe_with([PTQ], {(0, 0): BrokenRTN()}))
    assert any("rtn.finalize also failed while cleaning up after it" in note for note in failure.value.__notes__)
