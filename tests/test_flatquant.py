"""FlatQuant: Kronecker affine transforms, learnable clipping, layer-wise calibration, QAT, export and reload."""

import json

import pytest
import torch

import rqat_sdk
from rqat_sdk.exporters import probe_batch, reload_checkpoint
from rqat_sdk.ops.affine_transform import (
    clamp_to_clipped_range,
    clip_activation,
    clipped_weight_qparams,
    fold_into_weight,
    kronecker_apply,
    kronecker_inverse,
    kronecker_sizes,
    random_orthogonal,
    transform_activation,
)
from rqat_sdk.recipe import Recipe
from rqat_sdk.scheme import QuantScheme


def random_factors(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Well-conditioned but not orthogonal factors and a positive smoothing scale, as training leaves them."""
    generator = torch.Generator().manual_seed(seed)
    n1, n2 = kronecker_sizes(n)
    left = torch.eye(n1) + 0.2 * torch.randn(n1, n1, generator=generator)
    right = torch.eye(n2) + 0.2 * torch.randn(n2, n2, generator=generator)
    smooth = torch.rand(n, generator=generator) + 0.5
    return left, right, smooth


@pytest.mark.parametrize(
    ("width", "sizes"), [(256, (16, 16)), (512, (16, 32)), (96, (8, 12)), (7, (1, 7)), (1, (1, 1))]
)
def test_kronecker_sizes_are_as_square_as_the_width_allows(width, sizes):
    assert kronecker_sizes(width) == sizes


def test_kronecker_apply_is_multiplication_by_the_kronecker_product():
    left, right, _ = random_factors(96, seed=0)
    x = torch.randn(3, 5, 96, dtype=torch.float64)
    expected = x @ torch.kron(left.double(), right.double())
    torch.testing.assert_close(kronecker_apply(x, left.double(), right.double()), expected)


def test_the_inverse_of_a_transform_undoes_it_to_1e4_in_float32():
    left, right, smooth = random_factors(512, seed=1)
    inverse_left, inverse_right = kronecker_inverse(left, right)
    x = torch.randn(64, 512)
    round_trip = kronecker_apply(transform_activation(x, left, right, smooth), inverse_left, inverse_right) / smooth
    assert (round_trip - x).abs().max() <= 1e-4 * x.abs().max()


@pytest.mark.parametrize("smoothing", [True, False])
def test_a_folded_weight_reads_the_transformed_input_as_the_weight_reads_the_input(smoothing):
    left, right, smooth = random_factors(256, seed=2)
    smooth = smooth if smoothing else None
    weight, x = torch.randn(128, 256), torch.randn(32, 256)
    expected = x @ weight.T
    actual = transform_activation(x, left, right, smooth) @ fold_into_weight(weight, left, right, smooth).T
    assert (actual - expected).abs().max() <= 1e-4 * expected.abs().max()


def test_random_orthogonal_is_orthogonal():
    q = random_orthogonal(16, torch.Generator().manual_seed(0))
    torch.testing.assert_close(q @ q.T, torch.eye(16), atol=1e-5, rtol=0)


def test_activation_clipping_clamps_each_token_to_its_clipped_range():
    args = QuantScheme.model_validate("W4A4").input_activations.to_args()
    x = torch.tensor([[1.0, -4.0, 2.0], [0.5, 0.25, -0.125]])
    clipped = clip_activation(x, torch.tensor(0.5), args)
    torch.testing.assert_close(clipped, torch.tensor([[1.0, -2.0, 2.0], [0.25, 0.25, -0.125]]))


@pytest.mark.parametrize("preset", ["W4A4", "W4G128"])
def test_min_max_scales_of_the_clamped_weight_are_the_clipped_scales(preset):
    """What lets learned weight clipping survive RTN: its observer reads the clipped range from the weight."""
    from compressed_tensors.quantization.utils import calculate_qparams

    args = QuantScheme.model_validate(preset).weights.to_args()
    weight = torch.randn(8, 256)
    groups = 256 // (args.group_size or 256)
    factor = torch.rand(8, groups) * 0.5 + 0.5
    scale, zero_point = clipped_weight_qparams(weight, factor, args)
    grouped = clamp_to_clipped_range(weight, factor, args).unflatten(-1, (groups, -1))
    observed_scale, observed_zero = calculate_qparams(grouped.amin(-1), grouped.amax(-1), args)
    torch.testing.assert_close(scale, observed_scale)
    if zero_point is not None:
        torch.testing.assert_close(zero_point, observed_zero.round().float())


# --- transforms on a model -----------------------------------------------------------------------------


def attach_random_transforms(model, orthogonal: bool, seed: int = 0) -> None:
    """Attach every transform of every decoder layer with non-trivial factors and fold it, as calibration does."""
    from rqat_sdk.modifiers.ptq.flatquant import TRANSFORM_INPUTS
    from rqat_sdk.transforms import KroneckerTransform, attach_online_transform

    generator = torch.Generator().manual_seed(seed)
    for index, layer in enumerate(model.model.layers):
        for key, members in TRANSFORM_INPUTS.items():
            linears = [layer.get_submodule(m) for m in members]
            transform = KroneckerTransform(
                linears[0].in_features, smoothing=True, activation_clipping=True, orthogonal=orthogonal,
                generator=generator
            )
            if not orthogonal:  # far from orthogonal: the inverse matters
                left, right, smooth = random_factors(linears[0].in_features, seed=seed + index)
                factors = {"rqat_kron_left": left, "rqat_kron_right": right, "rqat_smooth": smooth}
                transform.load_state_dict(factors, strict=False)
            inputs_of = [f"model.layers.{index}.{m}" for m in members]
            attach_online_transform(model, f"model.layers.{index}", key, transform, inputs_of)
            with torch.no_grad():
                for linear in linears:
                    linear.weight.data = transform.fold(linear.weight)


def relative_difference(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


@pytest.mark.parametrize("orthogonal", [True, False])
@pytest.mark.parametrize("architecture", ["tiny_qwen3", "tiny_llama"])
def test_transforms_leave_the_float_model_unchanged(request, float_output_change, architecture, orthogonal):
    path = request.getfixturevalue(architecture)
    change, folded = float_output_change(path, lambda model, _: attach_random_transforms(model, orthogonal))
    assert folded and change <= 1e-4


def calibration_setup(path, num_samples: int = 4):
    from rqat_sdk.data import load_examples, tokenize_examples
    from rqat_sdk.models import load_model, load_tokenizer

    model, tokenizer = load_model(path, dtype="float32", device="cpu"), load_tokenizer(path)
    data = tokenize_examples(load_examples("reasoning-gym:chain_sum", num_samples=num_samples, seed=0), tokenizer, 48)
    return model, tokenizer, data


def test_calibration_lowers_the_layer_error_and_keeps_the_float_model(tiny_qwen3):
    """Without weight clipping (which clamps weights on purpose) calibration leaves the float model as it was."""
    from rqat_sdk.modifiers.ptq.flatquant import CalibrationOptions, calibrate

    model, tokenizer, data = calibration_setup(tiny_qwen3)
    probe = probe_batch(tokenizer, torch.device("cpu"))
    with torch.no_grad():
        before = model(probe).logits
    options = CalibrationOptions(
        transforms=("qkv", "o", "gate_up", "down"), epochs=2, learning_rate=5e-3, orthogonal_init=False,
        smoothing=True, weight_clipping=False, activation_clipping=True, seed=0,
    )
    metrics = calibrate(model, data, QuantScheme.model_validate("W4A4"), options)
    with torch.no_grad():
        after = model(probe).logits
    assert relative_difference(after, before) <= 1e-4
    transform = model.model.layers[0].rqat_transforms["qkv"]
    assert not torch.equal(transform.rqat_kron_left, torch.eye(16))  # trained away from the identity start
    assert [m["layer"] for m in metrics] == ["model.layers.0", "model.layers.1"]
    for layer in metrics:
        assert layer["mse_after"] < 0.95 * layer["mse_before"], layer


def training_flatquant_model(path, orthogonal: bool):
    """A W4A4 model with random transforms, in QAT's training mode with learnable clipping, and a probe batch."""
    from rqat_sdk.models import load_model, load_tokenizer
    from rqat_sdk.modifiers.layers import attach_fake_quant
    from rqat_sdk.modifiers.ptq.llmcompressor_adapter import quantize_rtn

    model, tokenizer = load_model(path, dtype="float32", device="cpu"), load_tokenizer(path)
    attach_random_transforms(model, orthogonal=orthogonal)
    quantize_rtn(model, tokenizer, QuantScheme.model_validate("W4A4"), None)
    attach_fake_quant(model, dtype=torch.float32, learn_scales=False, learn_clipping=True)
    model.train()
    return model, probe_batch(tokenizer, torch.device("cpu"))


def test_ste_gradients_reach_transforms_clipping_and_weights(tiny_qwen3):
    from rqat_sdk.modifiers.layers import parameter_group

    model, probe = training_flatquant_model(tiny_qwen3, orthogonal=True)
    model(probe).logits.float().pow(2).mean().backward()

    parameters = dict(model.named_parameters())
    prefix = "model.layers.0.rqat_transforms.gate_up."
    expected = {
        prefix + "rqat_kron_left": "transforms",
        prefix + "rqat_kron_right": "transforms",
        prefix + "rqat_smooth": "transforms",
        prefix + "rqat_act_clip_logit": "clipping",
        "model.layers.0.mlp.up_proj.rqat_clip": "clipping",
        "model.layers.0.mlp.up_proj.weight": "weights",
    }
    for name, group in expected.items():
        assert parameter_group(name) == group
        grad = parameters[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def saved_bytes_and_grads(model, probe) -> tuple[int, dict[str, torch.Tensor]]:
    """Bytes autograd saves for the backward during one training forward, and the gradients it then gives."""
    saved = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        saved += tensor.numel() * tensor.element_size()
        return tensor

    model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(probe).logits.float().pow(2).mean()
    loss.backward()
    return saved, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_linears_that_share_an_input_share_one_checkpointed_transform(tiny_qwen3, monkeypatch):
    """q/k/v (and gate/up) run their transform once per forward, autograd keeps none of its float32 work, and
    the gradients are those of transforming each Linear's input on its own."""
    import rqat_sdk.transforms as transforms

    model, probe = training_flatquant_model(tiny_qwen3, orthogonal=False)
    calls = []
    qkv = model.model.layers[0].rqat_transforms["qkv"]
    qkv.register_forward_pre_hook(lambda *_: calls.append(1))  # a recomputation may stop before its end
    shared_bytes, shared_grads = saved_bytes_and_grads(model, probe)
    forward_calls = len(calls)

    monkeypatch.setattr(transforms, "_shared_transform", lambda transform, x, activations: transform(x, activations))
    separate_bytes, separate_grads = saved_bytes_and_grads(model, probe)
    monkeypatch.setattr(transforms, "_shared_transform", lambda transform, x, activations: x)
    untransformed_bytes, _ = saved_bytes_and_grads(model, probe)

    assert forward_calls == 2  # once in the forward, once recomputed in the backward; not once per q, k, v
    added, added_separately = shared_bytes - untransformed_bytes, separate_bytes - untransformed_bytes
    assert added < 0.15 * added_separately, (added, added_separately)
    assert shared_grads.keys() == separate_grads.keys()
    for name, grad in separate_grads.items():
        torch.testing.assert_close(shared_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_qat_gives_transforms_their_own_learning_rate(tiny_qwen3):
    from rqat_sdk.models import load_model
    from rqat_sdk.modifiers.qat.modifier import QATKDModifier
    from rqat_sdk.modifiers.qat.trainer import _optimizer

    model = load_model(tiny_qwen3, dtype="float32", device="cpu")
    attach_random_transforms(model, orthogonal=True)
    config = QATKDModifier(transform_learning_rate=3e-5, clipping_learning_rate=4e-4, learning_rate=1e-6)
    optimizer = _optimizer(config.trainer_config(), model, torch.device("cpu"))
    groups = {group["name"]: group for group in optimizer.param_groups}
    assert groups["transforms"]["lr"] == 3e-5 and groups["clipping"]["lr"] == 4e-4 and groups["weights"]["lr"] == 1e-6
    assert len(groups["transforms"]["params"]) == 2 * 4 * 3  # two layers, four transforms, three tensors each
    assert len(groups["clipping"]["params"]) == 2 * 4  # one activation-clipping logit per transform
    # Memory: the transforms add well under 1% to the trained parameters (and so to their optimizer state).
    size = {name: sum(p.numel() for p in group["params"]) for name, group in groups.items()}
    assert size["transforms"] + size["clipping"] < 0.01 * size["weights"]


def test_finished_training_keeps_transforms_in_float32(tiny_qwen3):
    from rqat_sdk.models import load_model
    from rqat_sdk.modifiers.layers import finish_training

    model = load_model(tiny_qwen3, dtype="float32", device="cpu")
    attach_random_transforms(model, orthogonal=True)
    finish_training(model, dtype=torch.bfloat16, requires_grad={})
    layer = model.model.layers[0]
    assert layer.mlp.up_proj.weight.dtype == torch.bfloat16
    assert layer.rqat_transforms["gate_up"].rqat_kron_left.dtype == torch.float32


# --- the pipeline --------------------------------------------------------------------------------------


def test_flatquant_rtn_qat_exports_and_reloads_the_fake_quant_model(tiny_qwen3, tmp_path):
    from safetensors import safe_open

    from rqat_sdk.errors import ModelLoadError
    from rqat_sdk.exporters.vllm import engine_options, has_online_transforms
    from rqat_sdk.models import load_model

    recipe = {
        "version": 1, "scheme": "W4A4KV4",
        "stages": [
            {"name": "ptq", "data": {"num_samples": 4, "max_seq_length": 48},
             "modifiers": [{"type": "flatquant", "epochs": 1}, {"type": "rtn"}]},
            {"name": "qat", "data": {"num_samples": 8, "max_seq_length": 96},
             "modifiers": [{"type": "qat_kd", "steps": 2, "batch_size": 4, "learning_rate": 1e-4,
                            "transform_learning_rate": 1e-3}]},
        ],
    }
    out = tmp_path / "out"
    result = rqat_sdk.oneshot(tiny_qwen3, recipe, "reasoning-gym:chain_sum", out, keep_checkpoints="all")

    layers = result.record["stages"][0]["metrics"]["flatquant"]["layers"]  # one epoch: too short to judge them
    assert [sorted(layer) for layer in layers] == [["layer", "mse_after", "mse_before"]] * 2
    config = json.loads((out / "config.json").read_text())
    transforms = config["rqat_transforms"]["transforms"]
    assert transforms["model.layers.1.rqat_transforms.qkv"]["inputs_of"] == [
        f"model.layers.1.self_attn.{p}_proj" for p in "qkv"
    ]
    with safe_open(out / "model.safetensors", "pt") as weights:
        assert not [k for k in weights.keys() if "rqat" in k]  # the factors live in the sidecar only
    with safe_open(out / "rqat_transforms.safetensors", "pt") as final, \
            safe_open(out / "checkpoints" / "00-ptq" / "rqat_transforms.safetensors", "pt") as calibrated:
        name = "model.layers.0.rqat_transforms.qkv.rqat_kron_left"
        assert not torch.equal(final.get_tensor(name), calibrated.get_tensor(name))  # QAT trained the transforms

    # The exporter's own check passed; both loaders re-attach the transforms and reproduce the model.
    probe = probe_batch(result.tokenizer, torch.device("cpu"))
    with torch.no_grad():
        expected = result.model(probe).logits
        for reloaded in (reload_checkpoint(out, dtype=torch.float32, device=torch.device("cpu")),
                         load_model(out, device="cpu", allow_quantized=True)):
            assert relative_difference(reloaded(probe).logits, expected) <= 1e-3

    # vLLM has no path for the transforms, and says so.
    assert has_online_transforms(out)
    with pytest.raises(rqat_sdk.RqatError, match="no path for flatquant"):
        engine_options(out)
    card = (out / "README.md").read_text()
    assert "vLLM has no path for flatquant" in card and "load_model(" in card and "vllm serve" not in card
    (out / "rqat_transforms.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="rqat_transforms.safetensors is missing"):
        load_model(out, device="cpu", allow_quantized=True)


def test_a_compiled_student_trains_w4a4kv4_flatquant_as_the_eager_one(tiny_qwen3):
    """compile_student over online transforms, activation and KV-cache fake quantization: each Linear transforms its
    own input inside the graph and the KV quantizer runs eagerly between graphs; the loss is the eager one to the
    rounding of fused kernels (int4 activations turn that rounding into a little more), and the transforms train."""
    from torch._dynamo.utils import counters

    ptq = {"name": "ptq", "data": {"num_samples": 4, "max_seq_length": 48},
           "modifiers": [{"type": "flatquant", "epochs": 1}, {"type": "rtn"}]}
    name = "model.layers.0.rqat_transforms.qkv.rqat_kron_left"
    calibrated = dict(rqat_sdk.oneshot(tiny_qwen3, flatquant_recipe(ptq["modifiers"]) | {"stages": [ptq]},
                                       "reasoning-gym:chain_sum").model.named_parameters())[name].detach()
    runs = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        counters.clear()
        qat = {"name": "qat", "data": {"num_samples": 8, "max_seq_length": 96},
               "modifiers": [{"type": "qat_kd", "steps": 3, "batch_size": 4, "learning_rate": 1e-4,
                              "transform_learning_rate": 1e-3, "compile_student": compiled}]}
        result = rqat_sdk.oneshot(tiny_qwen3, flatquant_recipe(ptq["modifiers"]) | {"stages": [ptq, qat]},
                                  "reasoning-gym:chain_sum")
        runs[compiled] = (result.record["stages"][1]["metrics"]["qat_kd"]["final_loss"],
                          dict(result.model.named_parameters())[name].detach())
        assert (counters["stats"]["unique_graphs"] > 0) == compiled
    (eager_loss, _), (loss, transform) = runs[False], runs[True]
    assert loss == pytest.approx(eager_loss, rel=0.1)
    assert not torch.equal(transform, calibrated)


# --- the recipe ----------------------------------------------------------------------------------------


def flatquant_recipe(modifiers: list[dict], scheme: str = "W4A4KV4", **extra) -> dict:
    stages = [{"name": "ptq", "modifiers": modifiers}]
    return {"version": 1, "scheme": scheme, "stages": stages, **extra}


def test_a_flatquant_recipe_validates_with_its_defaults():
    recipe = Recipe.from_dict(flatquant_recipe([{"type": "rotation"}, {"type": "flatquant"}, {"type": "gptq"}]))
    modifier = recipe.stages[0].modifiers[1]
    assert (modifier.epochs, modifier.learning_rate, modifier.transforms) == (15, 5e-3, ["qkv", "o", "gate_up", "down"])
    assert any("vLLM cannot serve flatquant" in warning for warning in recipe.warnings())
    assert Recipe.from_yaml(recipe.to_yaml()) == recipe


@pytest.mark.parametrize(
    ("modifiers", "scheme", "extra", "message"),
    [
        ([{"type": "flatquant", "epochs": 0}, {"type": "rtn"}], "W4A4KV4", {}, r"stages\[0\]\.modifiers\[0\]\.epochs"),
        ([{"type": "flatquant", "transforms": ["qkv", "qkv"]}, {"type": "rtn"}], "W4A4KV4", {},
         r"stages\[0\]\.modifiers\[0\]\.transforms: .*twice"),
        ([{"type": "flatquant", "transforms": ["lm_head"]}, {"type": "rtn"}], "W4A4KV4", {},
         r"stages\[0\]\.modifiers\[0\]\.transforms"),
        ([{"type": "flatquant", "clip": 0.9}, {"type": "rtn"}], "W4A4KV4", {}, r"stages\[0\]\.modifiers\[0\]\.clip"),
        ([{"type": "rtn"}, {"type": "flatquant"}], "W4A4KV4", {}, r"must come before the quantizing modifier"),
        ([{"type": "flatquant"}, {"type": "rotation"}, {"type": "rtn"}], "W4A4KV4", {},
         r"stages\[0\]\.modifiers\[1\]: rotation must come before flatquant"),
        ([{"type": "flatquant"}, {"type": "rtn"}], "W4G128", {},
         r"needs dynamic activation scales; scheme W4G128 has none"),
        ([{"type": "flatquant"}, {"type": "rtn"}], "W4A4KV4", {"export": {"unservable": "refuse"}},
         r"no path for flatquant's online transforms"),
    ],
)
def test_bad_flatquant_recipes_name_the_field_at_fault(modifiers, scheme, extra, message):
    with pytest.raises(rqat_sdk.RqatError, match=message):
        Recipe.from_dict(flatquant_recipe(modifiers, scheme, **extra))


def test_flatquant_refuses_a_later_grpo_that_generates_with_vllm():
    recipe = flatquant_recipe([{"type": "flatquant"}, {"type": "rtn"}])
    recipe["stages"].append({"name": "rl", "modifiers": [{"type": "grpo", "generation": "vllm-colocate"}]})
    with pytest.raises(rqat_sdk.RqatError, match=r"stages\[1\]\.modifiers\[0\]\.generation: vLLM cannot run"):
        Recipe.from_dict(recipe)


def test_a_transform_the_fused_kernels_cannot_take_says_so_once(monkeypatch, caplog):
    """On CUDA a transform whose factors pad past 64 (6,144 = 64 x 96, a 1.7B model's MLP) takes the PyTorch
    path: training is slower, and the user is told once per shape, not at every forward."""
    pytest.importorskip("triton", reason="the kernels' size check lives beside them, in a module that imports triton")
    from rqat_sdk.ops import affine_transform
    from rqat_sdk.scheme import QuantScheme

    monkeypatch.setattr(affine_transform, "use_triton", lambda tensor: True)  # as on CUDA
    affine_transform._warn_unfused.cache_clear()
    activations = QuantScheme.model_validate("W4A4").input_activations.to_args()
    logit = torch.tensor(4.0)
    served = {}
    with caplog.at_level("WARNING", logger=affine_transform.__name__):
        for width in (1024, 6144, 6144):
            left, right = (torch.eye(n) for n in kronecker_sizes(width))
            served[width] = affine_transform.fused_kernel_serves(torch.ones(2, width), left, right, logit, activations)
    assert served == {1024: True, 6144: False}
    assert [r.getMessage().split(" runs")[0] for r in caplog.records] == ["FlatQuant transform 64 x 96 (torch.float32)"]
