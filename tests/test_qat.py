"""QAT with distillation on CPU: gradients, exact folding, training, resume, divergence."""

import contextlib
import copy
import json
import logging

import pytest
import torch
from transformers import AutoModelForCausalLM

import rqat_sdk
from rqat_sdk.errors import RecipeError
from rqat_sdk.exporters import probe_batch
from rqat_sdk.modifiers.layers import (
    _qat_forward,
    attach_fake_quant,
    detach_fake_quant,
    fake_quantized_together,
    grid_margin,
    quantized_linears,
    tracking_codes,
)
from rqat_sdk.modifiers.qat import trainer as trainer_module
from rqat_sdk.modifiers.qat.trainer import TrainingDiverged
from rqat_sdk.ops.fake_quant import fake_quantize_weight_reference
from rqat_sdk.recipe import Recipe

DATA = "reasoning-gym:chain_sum,basic_arithmetic"


def recipe(scheme="W3G128", ptq="rtn", **qat):
    settings = {"type": "qat_kd", "steps": 12, "batch_size": 4, "micro_batch_size": 2, "learning_rate": 1e-3,
                "logging_steps": 2, "save_steps": 4, **qat}
    return {
        "version": 1,
        "scheme": scheme,
        "stages": [
            {"name": "ptq", "data": {"num_samples": 8, "max_seq_length": 64}, "modifiers": [{"type": ptq}]},
            {"name": "qat", "data": {"num_samples": 24, "max_seq_length": 96}, "modifiers": [settings]},
        ],
    }


@pytest.fixture(scope="module")
def quantized(tiny_qwen3):
    """A tiny Qwen3 after asymmetric RTN W3G128, and the tokenizer."""
    ptq_only = {"version": 1, "scheme": "W3G128", "stages": [{"name": "ptq", "modifiers": [{"type": "rtn"}]}]}
    result = rqat_sdk.oneshot(tiny_qwen3, ptq_only)
    return result.model, result.tokenizer


def logits(model, tokenizer):
    with torch.no_grad():
        return model(probe_batch(tokenizer, torch.device("cpu"))).logits


def test_qat_forward_equals_compressed_tensors_forward_and_folds_exactly(quantized):
    model, tokenizer = quantized
    before = logits(model, tokenizer)
    attach_fake_quant(model, dtype=torch.float32, learn_scales=True, learn_clipping=True)
    try:
        assert torch.equal(logits(model, tokenizer), before)
        with torch.no_grad():  # move the learnable quantization parameters off their start
            for _, layer in quantized_linears(model):
                layer.rqat_clip.uniform_(0.6, 1.2)
                layer.weight_scale.mul_(1 + 0.2 * torch.rand_like(layer.weight_scale))
                layer.rqat_zero_point.add_(torch.rand_like(layer.rqat_zero_point) - 0.5)
        trained = logits(model, tokenizer)
        assert not torch.equal(trained, before)
    finally:
        detach_fake_quant(model)
    # compressed-tensors' own forward, after folding, computes exactly what training computed
    assert torch.equal(logits(model, tokenizer), trained)
    for _, layer in quantized_linears(model):
        assert vars(layer)["forward"].__func__ is not _qat_forward
        assert not hasattr(layer, "rqat_clip") and not hasattr(layer, "rqat_zero_point")


def test_gradients_reach_weights_and_scales_with_a_clipping_mask(tiny_qwen3):
    rtn = {"version": 1, "scheme": "W3G128", "stages": [{"name": "p", "modifiers": [{"type": "rtn"}]}]}
    model = rqat_sdk.oneshot(tiny_qwen3, rtn).model
    layer = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.weight[0, 0] = 10.0  # far outside its group's range: clipped
    attach_fake_quant(model, dtype=torch.float32, learn_scales=True, learn_clipping=False)
    x = torch.randint(0, 100, (2, 12))
    model(x).logits.float().pow(2).mean().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    assert layer.weight.grad[0, 0] == 0, "a clipped weight must get no gradient"
    assert layer.weight_scale.grad is not None and layer.weight_scale.grad.abs().sum() > 0
    assert layer.rqat_zero_point.grad is not None
    assert not any(hasattr(module, "rqat_clip") for _, module in quantized_linears(model))
    detach_fake_quant(model)


def test_weights_quantized_together_give_the_per_layer_loss_and_gradients(tiny_qwen3):
    ptq = {"version": 1, "scheme": "W3G128", "stages": [{"name": "p", "modifiers": [{"type": "rtn"}]}]}
    model = rqat_sdk.oneshot(tiny_qwen3, ptq).model
    attach_fake_quant(model, dtype=torch.float32, learn_scales=True, learn_clipping=True)
    with torch.no_grad():
        for _, layer in quantized_linears(model):
            layer.rqat_clip.uniform_(0.6, 1.0)
    x = torch.randint(0, 100, (2, 12))
    results = []
    for together in (False, True):
        model.zero_grad(set_to_none=True)
        with fake_quantized_together(model) if together else contextlib.nullcontext():
            loss = model(x).logits.float().pow(2).mean()
            loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.equal(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys() and any(n.endswith("rqat_clip") for n in grads_a)
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], rtol=1e-5, atol=1e-7), name
    # outside the block each layer quantizes its own weight again
    assert not any("_rqat_fake_quantized_weight" in vars(m) for _, m in quantized_linears(model))
    detach_fake_quant(model)


def test_grid_margin_and_changed_codes_are_measured_in_quantization_steps(tiny_qwen3):
    model = rqat_sdk.oneshot(tiny_qwen3, {**recipe(), "stages": recipe()["stages"][:1]}).model
    attach_fake_quant(model, dtype=torch.float32, learn_scales=False, learn_clipping=False)
    layers = quantized_linears(model)
    weights = sum(layer.weight.numel() for _, layer in layers)
    with torch.no_grad():  # every latent weight onto a grid point, then 0.45 step above it
        for _, layer in layers:
            steps = layer.weight_scale.repeat_interleave(layer.weight.shape[1] // layer.weight_scale.shape[1], 1)
            layer.weight.copy_(fake_quantize_weight_reference(
                layer.weight, layer.weight_scale, layer.weight_zero_point, 3, 128) + 0.45 * steps)
    assert grid_margin(model)["share_within_0.1_step_of_a_boundary"] > 0.95
    with tracking_codes(model) as record:
        with torch.no_grad():  # move every weight of one layer up by a whole step, the others by 0.02 step
            for index, (_, layer) in enumerate(layers):
                steps = layer.weight_scale.repeat_interleave(layer.weight.shape[1] // layer.weight_scale.shape[1], 1)
                layer.weight.add_(steps * (1.0 if index == 0 else 0.02))
    assert record["grid_margin_at_start"]["mean_distance_from_grid_in_steps"] == pytest.approx(0.45, abs=0.02)
    # only the first layer's codes move (all but those already at the top of the range); 0.47 steps rounds down
    first = layers[0][1].weight.numel() / weights
    assert 0.5 * first < record["codes_changed"] <= first
    detach_fake_quant(model)


def test_qat_kd_lowers_the_loss_and_exports_exactly(tiny_qwen3, tmp_path):
    result = rqat_sdk.oneshot(tiny_qwen3, recipe(), DATA, tmp_path / "out", keep_checkpoints="all")
    lines = [json.loads(line) for line in (tmp_path / "out" / "logs" / "01-qat.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in lines] == [2, 4, 6, 8, 10, 12]
    assert lines[-1]["loss"] < lines[0]["loss"] * 0.8
    assert lines[-1]["learning_rates"]["weights"] == 0.0  # cosine decays to zero
    assert result.record["export"]["exact"] is True
    metrics = result.record["stages"][1]["metrics"]["qat_kd"]
    assert metrics["steps"] == 12 and 0 < metrics["codes_changed"] < 1
    # RTN leaves the latent weights of a random model spread evenly over the grid: 0.25 step from it, 20% near a
    # boundary (grid_margin's docstring)
    assert metrics["grid_margin_at_start"] == {"mean_distance_from_grid_in_steps": pytest.approx(0.25, abs=0.02),
                                               "share_within_0.1_step_of_a_boundary": pytest.approx(0.2, abs=0.02)}
    assert metrics["grid_margin_at_end"] != metrics["grid_margin_at_start"]
    assert not (tmp_path / "out" / "checkpoints" / "01-qat.progress").exists()
    # The exported model is the trained one: it differs from plain RTN.
    rtn = rqat_sdk.oneshot(tiny_qwen3, {**recipe(), "stages": recipe()["stages"][:1]})
    assert not torch.equal(logits(result.model, result.tokenizer), logits(rtn.model, rtn.tokenizer))



def test_a_stage_that_moves_no_weight_code_says_so(tiny_qwen3, caplog):
    """At a rate too small to cross a grid boundary the quantized weights stay the initialisation's: the run warns."""
    with caplog.at_level(logging.WARNING, logger="rqat_sdk.modifiers.qat.modifier"):
        still = rqat_sdk.oneshot(tiny_qwen3, recipe(steps=2, learning_rate=1e-9), DATA)
    assert still.record["stages"][1]["metrics"]["qat_kd"]["codes_changed"] == 0
    assert "2 steps at learning_rate 1e-09 moved no weight code off its initial grid point" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rqat_sdk.modifiers.qat.modifier"):
        moved = rqat_sdk.oneshot(tiny_qwen3, recipe(steps=2), DATA)
    assert moved.record["stages"][1]["metrics"]["qat_kd"]["codes_changed"] > 0 and "moved no weight code" not in (
        caplog.text)

def test_bf16_model_keeps_fp32_buffers_and_exports_exactly(tiny_qwen3, tmp_path):
    # model.to(bf16) after training would round the rotary inv_freq buffer, which a reload recomputes in fp32
    result = rqat_sdk.oneshot(tiny_qwen3, recipe(steps=2, save_steps=2), DATA, tmp_path / "out", dtype="bfloat16")
    assert result.record["export"]["exact"] is True
    assert result.model.dtype == torch.bfloat16
    assert result.model.model.rotary_emb.inv_freq.dtype == torch.float32


@pytest.mark.parametrize("options", [{}, {"learn_scales": True, "learn_clipping": True}, {"objective": "sft"}])
def test_resume_mid_stage_is_bit_identical(tiny_qwen3, tmp_path, monkeypatch, options):
    full = rqat_sdk.oneshot(tiny_qwen3, recipe(**options), DATA, tmp_path / "full")

    original_step = trainer_module.DistillationTrainer.step

    def crash_at_step_ten(self, step):
        if step == 9:
            raise RuntimeError("simulated crash")
        return original_step(self, step)

    with monkeypatch.context() as patch:
        patch.setattr(trainer_module.DistillationTrainer, "step", crash_at_step_ten)
        with pytest.raises(RuntimeError, match="simulated crash"):
            rqat_sdk.oneshot(tiny_qwen3, recipe(**options), DATA, tmp_path / "out")
    progress = tmp_path / "out.partial" / "checkpoints" / "01-qat.progress"
    assert [p.name for p in progress.iterdir()] == ["step-0000008"]

    resumed = rqat_sdk.oneshot(tiny_qwen3, recipe(**options), DATA, tmp_path / "out", resume=True)
    assert resumed.record["stages"][1]["metrics"]["qat_kd"]["resumed_at_step"] == 8
    for (name, a), (_, b) in zip(full.model.state_dict().items(), resumed.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    log = [json.loads(line)["step"] for line in (tmp_path / "out" / "logs" / "01-qat.jsonl").read_text().splitlines()]
    assert log == [2, 4, 6, 8, 10, 12]


def test_the_teacher_on_its_own_thread_trains_bit_identically(tiny_qwen3, tmp_path, monkeypatch):
    # On a one-thread CPU the teacher's forward and the next step's batches are prepared on a second thread,
    # one step ahead; the trained weights must be those of the inline path, bit for bit.
    runs = {}
    for beside in (False, True):
        monkeypatch.setattr(trainer_module.DistillationTrainer, "_teacher_beside_student", lambda self, b=beside: b)
        runs[beside] = rqat_sdk.oneshot(tiny_qwen3, recipe(), DATA, tmp_path / str(beside)).model.state_dict()
    assert runs[True].keys() == runs[False].keys()
    for name, tensor in runs[False].items():
        assert torch.equal(tensor, runs[True][name]), name


def _scale_loss_from_step_7(monkeypatch, factor: float) -> None:
    """Multiply the loss by ``factor`` from the 13th call on: 2 micro-batches a step, so from step 7."""
    original = trainer_module.lm_head_loss
    calls = {"n": 0}

    def scaled(*args, **kwargs):
        calls["n"] += 1
        loss = original(*args, **kwargs)
        return loss * factor if calls["n"] > 12 else loss

    monkeypatch.setattr(trainer_module, "lm_head_loss", scaled)


def test_divergence_stops_the_stage_and_keeps_the_last_good_checkpoint(tiny_qwen3, tmp_path, monkeypatch):
    _scale_loss_from_step_7(monkeypatch, float("nan"))
    with pytest.raises(TrainingDiverged, match=r"stage 'qat' step 7: the loss is nan .*step-0000004.*--resume"):
        rqat_sdk.oneshot(tiny_qwen3, recipe(), DATA, tmp_path / "out")
    partial = tmp_path / "out.partial"
    assert (partial / "checkpoints" / "01-qat.progress" / "step-0000004" / "trainer.pt").is_file()
    assert (partial / "checkpoints" / "00-ptq" / "stage.json").is_file()
    assert not (tmp_path / "out").exists()


def test_an_exploding_loss_stops_the_stage_and_keeps_the_last_good_checkpoint(tiny_qwen3, tmp_path, monkeypatch):
    _scale_loss_from_step_7(monkeypatch, 1e4)
    with pytest.raises(TrainingDiverged, match=r"stage 'qat' step 7: the loss \S+ is more than max_loss_ratio 100 "
                       r"times the first step's \S+: training diverged; the weights were not updated.*step-0000004"):
        rqat_sdk.oneshot(tiny_qwen3, recipe(), DATA, tmp_path / "out")
    assert (tmp_path / "out.partial" / "checkpoints" / "01-qat.progress" / "step-0000004" / "trainer.pt").is_file()


def test_the_loss_guard_multiplies_a_floor_when_the_first_loss_is_near_zero():
    from rqat_sdk.modifiers.qat.trainer import loss_exploded

    assert loss_exploded(100.0, 1e-4, 100) and loss_exploded(300.0, 2.0, 100)  # the lr 1.0 case; SFT
    assert not loss_exploded(0.089, 5.5e-4, 100)  # KD after GPTQ at a high rate: 160x a near-zero start
    assert not loss_exploded(150.0, 2.0, 100) and not loss_exploded(1e9, 1.0, None)


def test_packing_gives_the_same_loss_as_padding(tiny_qwen3, tmp_path):
    padded = rqat_sdk.oneshot(tiny_qwen3, recipe(steps=1, logging_steps=1), DATA, tmp_path / "a")
    packed = rqat_sdk.oneshot(tiny_qwen3, recipe(steps=1, logging_steps=1, packing=True), DATA, tmp_path / "b")
    a = padded.record["stages"][1]["metrics"]["qat_kd"]["final_loss"]
    b = packed.record["stages"][1]["metrics"]["qat_kd"]["final_loss"]
    assert a == pytest.approx(b, rel=1e-4)
    def tokens(result: rqat_sdk.RunResult) -> int:
        return result.record["stages"][1]["metrics"]["qat_kd"]["tokens"]

    assert tokens(packed) < tokens(padded) * 1.01


def test_quantized_only_training_leaves_other_weights_alone(tiny_qwen3, tmp_path):
    result = rqat_sdk.oneshot(tiny_qwen3, recipe(train="quantized"), DATA, tmp_path / "out")
    original = AutoModelForCausalLM.from_pretrained(tiny_qwen3)
    assert torch.equal(result.model.model.embed_tokens.weight, original.model.embed_tokens.weight)
    assert torch.equal(result.model.model.norm.weight, original.model.norm.weight)
    assert all(p.requires_grad for p in result.model.model.embed_tokens.parameters())


def record_teachers(monkeypatch) -> list:
    """The teachers the session loads from now on, in order."""
    from rqat_sdk.session.state import SessionState

    teachers = []
    load_teacher = SessionState.teacher

    def recording_teacher(self, source, dtype, **options):
        teachers.append(load_teacher(self, source, dtype, **options))
        return teachers[-1]

    monkeypatch.setattr(SessionState, "teacher", recording_teacher)
    return teachers


def test_in_memory_model_is_its_own_teacher(tiny_qwen3, monkeypatch):
    from transformers import AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_qwen3)
    reference = AutoModelForCausalLM.from_pretrained(tiny_qwen3)
    teachers = record_teachers(monkeypatch)
    result = rqat_sdk.oneshot(model, recipe(steps=2), DATA, tokenizer=AutoTokenizer.from_pretrained(tiny_qwen3))
    assert result.model is model
    assert result.record["stages"][1]["metrics"]["qat_kd"]["final_loss"] > 0
    # trained in place, while the teacher was a frozen copy of the original, full-precision weights
    [teacher] = teachers
    assert teacher is not model and not any(p.requires_grad for p in teacher.parameters())
    assert teacher.state_dict().keys() == reference.state_dict().keys()  # no quantization parameters
    assert all(torch.equal(a, b)
               for a, b in zip(teacher.state_dict().values(), reference.state_dict().values(), strict=True))
    assert not torch.equal(model.model.layers[0].mlp.up_proj.weight, reference.model.layers[0].mlp.up_proj.weight)


def test_an_fp8_teacher_trains_and_leaves_the_original_model_whole(tiny_qwen3, monkeypatch):
    from transformers import AutoTokenizer

    from rqat_sdk.ops.fp8 import FP8Linear
    from rqat_sdk.session.state import SessionState

    model = AutoModelForCausalLM.from_pretrained(tiny_qwen3)
    originals = []
    load_teacher = SessionState.teacher

    def recording_teacher(self, source, dtype, **options):
        originals.append(self.original_model)
        return load_teacher(self, source, dtype, **options)

    monkeypatch.setattr(SessionState, "teacher", recording_teacher)
    result = rqat_sdk.oneshot(model, recipe(steps=4, teacher_precision="fp8"), DATA,
                              tokenizer=AutoTokenizer.from_pretrained(tiny_qwen3))
    metrics = result.record["stages"][1]["metrics"]["qat_kd"]
    assert metrics["teacher_precision"] == "fp8" and metrics["steps"] == 4 and 0 < metrics["final_loss"] < 1
    # the teacher was an FP8 copy: the original model the run keeps for teachers still has its Linear layers
    [original] = originals
    assert not any(isinstance(m, FP8Linear) for m in original.modules())
    assert not torch.equal(model.model.layers[0].mlp.up_proj.weight, original.model.layers[0].mlp.up_proj.weight)


def test_a_compiled_teacher_trains_as_the_eager_one(tiny_qwen3):
    """compile_teacher runs each of the teacher's transformer blocks through torch.compile: the same distillation
    (to the rounding of fused kernels), over batches of different lengths without a graph per length."""
    from torch._dynamo.utils import counters

    from rqat_sdk.modifiers.qat.trainer import hidden_states

    losses = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        counters.clear()
        result = rqat_sdk.oneshot(tiny_qwen3, recipe(steps=3, compile_teacher=compiled), DATA)
        losses[compiled] = result.record["stages"][1]["metrics"]["qat_kd"]["final_loss"]
        graphs = counters["stats"]["unique_graphs"]
        assert (graphs > 0) == compiled and graphs <= 2  # dynamic shapes: at most a recompile for the first length
    assert losses[True] == pytest.approx(losses[False], rel=0.02)

    teacher = AutoModelForCausalLM.from_pretrained(tiny_qwen3).eval()
    regional = copy.deepcopy(teacher)
    torch._dynamo.reset()
    counters.clear()
    with contextlib.ExitStack() as scope, torch.no_grad():
        trainer_module._compile_blocks(trainer_module._blocks(regional), scope)
        for length in (7, 19, 33):
            batch = {"input_ids": torch.randint(1, 200, (2, length), generator=torch.Generator().manual_seed(length))}
            torch.testing.assert_close(hidden_states(regional, batch), hidden_states(teacher, batch),
                                       rtol=1e-4, atol=1e-4)
    # the blocks did compile, into one graph for all of them and every length (dynamic shapes)
    assert counters["stats"]["unique_graphs"] == 1


def test_a_compiled_fp8_teacher_gives_the_eager_fp8_teachers_hidden_states(tiny_qwen3):
    """compile_teacher with teacher_precision fp8: inside the compiled graph each FP8 layer quantizes its own input
    (no shared Python state), with the eager FP8 teacher's numbers; a run with both decoders compiled trains as
    the eager one."""
    from torch._dynamo.utils import counters

    from rqat_sdk.modifiers.qat.trainer import hidden_states
    from rqat_sdk.ops.fp8 import linears_to_fp8_

    original = AutoModelForCausalLM.from_pretrained(tiny_qwen3).eval()
    teacher = copy.deepcopy(original)
    linears_to_fp8_(teacher, keep=[teacher.get_output_embeddings()])
    compiled = copy.deepcopy(teacher)
    torch._dynamo.reset()
    counters.clear()
    with contextlib.ExitStack() as scope, torch.no_grad():
        trainer_module._compile_blocks(trainer_module._blocks(compiled), scope)
        for length in (7, 19):
            batch = {"input_ids": torch.randint(1, 200, (2, length), generator=torch.Generator().manual_seed(length))}
            eager, fused, full = (hidden_states(teacher, batch), hidden_states(compiled, batch),
                                  hidden_states(original, batch))
            # fused kernels round a few values to the other side of an e4m3 step: a small share of FP8's own error
            assert (fused - eager).norm() < 0.1 * (eager - full).norm()
    assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"]

    losses = {}
    for compiled_run in (False, True):
        torch._dynamo.reset()
        result = rqat_sdk.oneshot(tiny_qwen3, recipe(steps=3, teacher_precision="fp8", compile_teacher=compiled_run,
                                                     compile_student=compiled_run), DATA)
        losses[compiled_run] = result.record["stages"][1]["metrics"]["qat_kd"]["final_loss"]
    assert losses[True] == pytest.approx(losses[False], rel=0.02)


def test_a_compiled_student_trains_as_the_eager_one(tiny_qwen3):
    """compile_student runs the student's blocks, forward and backward, through torch.compile: the same training
    (to the rounding of fused kernels), the fake-quantized weights still computed outside the graph; with gradient
    checkpointing too. The trained model's parameters keep their names."""
    from torch._dynamo.utils import counters

    results = {}
    for compiled, checkpointing in ((False, False), (True, False), (True, True)):
        torch._dynamo.reset()
        counters.clear()
        result = rqat_sdk.oneshot(tiny_qwen3, recipe(steps=3, compile_student=compiled,
                                                     gradient_checkpointing=checkpointing), DATA)
        results[compiled, checkpointing] = (result.record["stages"][1]["metrics"]["qat_kd"]["final_loss"],
                                            result.model.state_dict())
        graphs = counters["stats"]["unique_graphs"]
        assert (graphs > 0) == compiled
    (eager_loss, eager_state) = results[False, False]
    for key in ((True, False), (True, True)):
        loss, state = results[key]
        assert loss == pytest.approx(eager_loss, rel=0.02)
        assert state.keys() == eager_state.keys()
        torch.testing.assert_close(state["model.layers.0.mlp.up_proj.weight"],
                                   eager_state["model.layers.0.mlp.up_proj.weight"], rtol=1e-3, atol=1e-4)


def test_checkpointing_every_n_layers_recomputes_those_layers_only(tiny_qwen3):
    """gradient_checkpointing_every_n_layers: 2 recomputes layer 0 of the two in the backward pass and keeps layer
    1's activations: layer 0 runs twice per micro-batch with gradients on, layer 1 once, as without checkpointing;
    the losses are those of full checkpointing and of none. Afterwards no layer checkpoints."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen3)
    runs = {}
    for name, settings in (("none", {}), ("every layer", {"gradient_checkpointing": True}),
                           ("every 2nd", {"gradient_checkpointing": True, "gradient_checkpointing_every_n_layers": 2})):
        model = AutoModelForCausalLM.from_pretrained(tiny_qwen3)
        calls = [0] * len(model.model.layers)

        def count(calls, index):
            def hook(module, args):
                calls[index] += torch.is_grad_enabled()  # training forwards and recomputes, not evaluation
            return hook

        for index, layer in enumerate(model.model.layers):
            layer.register_forward_pre_hook(count(calls, index))
        result = rqat_sdk.oneshot(model, recipe(steps=3, **settings), DATA, tokenizer=tokenizer)
        runs[name] = calls, result.record["stages"][1]["metrics"]["qat_kd"]["final_loss"]
        assert not result.model.is_gradient_checkpointing
    micro_batches = 3 * 2
    assert runs["none"][0] == [micro_batches, micro_batches]
    assert runs["every layer"][0] == [2 * micro_batches, 2 * micro_batches]
    assert runs["every 2nd"][0] == [2 * micro_batches, micro_batches]
    assert runs["every layer"][1] == pytest.approx(runs["none"][1], rel=1e-5)
    assert runs["every 2nd"][1] == pytest.approx(runs["none"][1], rel=1e-5)


def test_a_compiled_stage_leaves_the_student_and_the_teacher_eager(tiny_qwen3, monkeypatch):
    """compile_student and compile_teacher compile the blocks in place for the stage only: afterwards the trained
    model and the teacher, which other stages reuse, run eagerly (nothing left for dynamo to compile once its
    caches are cleared), and the recompile limit is torch's again."""
    from torch._dynamo.utils import counters
    from transformers import AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_qwen3)
    teachers = record_teachers(monkeypatch)
    limit = torch.compiler.config.recompile_limit
    torch._dynamo.reset()
    counters.clear()
    result = rqat_sdk.oneshot(model, recipe(steps=2, compile_teacher=True, compile_student=True), DATA,
                              tokenizer=AutoTokenizer.from_pretrained(tiny_qwen3))
    assert counters["stats"]["unique_graphs"] > 0 and torch.compiler.config.recompile_limit == limit
    [teacher] = teachers
    torch._dynamo.reset()
    counters.clear()
    batch = {"input_ids": torch.randint(1, 200, (2, 13), generator=torch.Generator().manual_seed(0))}
    with torch.no_grad():
        for trained_or_teacher in (result.model, teacher):
            trained_or_teacher(**batch, use_cache=False)
    assert not counters["stats"]["unique_graphs"]


def test_qat_recipe_checks():
    with pytest.raises(RecipeError, match=r"stages\[0\].modifiers\[0\]: qat_kd trains the quantized model"):
        Recipe.from_dict({"version": 1, "scheme": "W3G128",
                          "stages": [{"name": "a", "modifiers": [{"type": "qat_kd"}, {"type": "rtn"}]}]})
    with pytest.raises(RecipeError, match=r"stages\[0\].modifiers\[0\]: grpo trains the quantized model"):
        Recipe.from_dict({"version": 1, "scheme": "W3G128",
                          "stages": [{"name": "a", "modifiers": [{"type": "grpo"}, {"type": "rtn"}]}]})
    with pytest.raises(RecipeError, match="batch_size 30 is not a multiple of micro_batch_size 4"):
        Recipe.from_dict(recipe(batch_size=30, micro_batch_size=4))
    with pytest.raises(RecipeError, match=r"stages\[1\].modifiers\[0\]: teacher_precision fp8 sets the teacher's "
                                          r"precision, and objective sft has no teacher"):
        Recipe.from_dict(recipe(objective="sft", teacher_precision="fp8"))
    with pytest.raises(RecipeError, match=r"compile_teacher compiles the teacher of objective kd, and objective "
                                          r"sft has no teacher"):
        Recipe.from_dict(recipe(compile_teacher=True, objective="sft"))
    with pytest.raises(RecipeError, match=r"stages\[1\].modifiers\[0\]: gradient_checkpointing_every_n_layers is 2 "
                                          r"but gradient_checkpointing is false"):
        Recipe.from_dict(recipe(gradient_checkpointing_every_n_layers=2))
    with pytest.raises(RecipeError, match=r"gradient_checkpointing_every_n_layers"):
        Recipe.from_dict(recipe(gradient_checkpointing=True, gradient_checkpointing_every_n_layers=0))
    Recipe.from_dict(recipe(compile_teacher=True, teacher_precision="fp8"))
    Recipe.from_dict(recipe(compile_student=True, distributed="fsdp"))
    defaults = Recipe.from_dict(recipe()).stages[1].modifiers[0]
    assert defaults.betas == (0.9, 0.95) and defaults.divergence == "forward_kl"
    assert defaults.teacher_precision == "bf16"


def test_the_trainer_config_and_the_teacher_must_agree(quantized):
    from rqat_sdk.modifiers.qat.trainer import DistillationTrainer, TrainerConfig, TrainerPaths
    from rqat_sdk.ops.distill import LossSpec

    model, _ = quantized
    common = dict(device=torch.device("cpu"), paths=TrainerPaths(None, None), fingerprint="f", stage="s")
    with pytest.raises(ValueError, match="config.loss.divergence 'forward_kl' needs a teacher"):
        DistillationTrainer(TrainerConfig(), model, None, None, **common)
    with pytest.raises(ValueError, match="config.loss.divergence 'ce' takes no teacher"):
        DistillationTrainer(TrainerConfig(loss=LossSpec(divergence="ce")), model, model, None, **common)
