import pytest
import torch
from transformers import AutoModelForCausalLM

import rqat_sdk
import rqat_sdk.exporters.compressed_tensors as ct_exporter
from rqat_sdk.errors import ExportError
from rqat_sdk.exporters import checkpoint_format, export_checkpoint
from rqat_sdk.recipe import QuantScheme

DATA = "reasoning-gym:chain_sum"
W3G64 = {"weights": {"num_bits": 3, "group_size": 64, "symmetric": False}}


def quantized(tiny_qwen3, ptq_recipe, scheme="W3G128"):
    return rqat_sdk.oneshot(tiny_qwen3, ptq_recipe([{"type": "rtn"}], scheme))


@pytest.mark.parametrize(
    ("scheme", "fmt"),
    [("W2G64", "pack-quantized"), ("W3G128", "pack-quantized"), ("W8A8", "int-quantized"), ("W4A4", "pack-quantized")],
)
def test_format_per_scheme(scheme, fmt):
    assert checkpoint_format(QuantScheme.model_validate(scheme)) == fmt


def test_unsupported_scheme_is_an_export_error():
    scheme = QuantScheme.model_validate({"weights": {"num_bits": 4}, "input_activations": {"num_bits": 8}})
    with pytest.raises(ExportError, match="W4A8 is not exportable"):
        checkpoint_format(scheme)


def test_export_writes_a_loadable_checkpoint_and_keeps_the_model_usable(tiny_qwen3, ptq_recipe, tmp_path):
    result = quantized(tiny_qwen3, ptq_recipe)
    probe = ct_exporter.probe_batch(result.tokenizer, torch.device("cpu"))
    with torch.no_grad():
        before = result.model(probe).logits
    report = export_checkpoint(result.model, result.tokenizer, result.recipe.scheme, tmp_path)
    assert report.exact and report.max_abs_logit_diff == 0.0 and report.format == "pack-quantized"
    assert report.bytes_on_disk > 0 and report.probe_tokens == probe.numel()
    with torch.no_grad():
        assert torch.equal(result.model(probe).logits, before)
    assert (tmp_path / "tokenizer.json").is_file() and (tmp_path / "chat_template.jinja").is_file()


def test_a_checkpoint_that_does_not_reproduce_the_model_is_an_error_naming_the_layer(
    tiny_qwen3, ptq_recipe, tmp_path, monkeypatch
):
    result = quantized(tiny_qwen3, ptq_recipe)

    def corrupted(directory, *, dtype, device):
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype)
        with torch.no_grad():
            model(ct_exporter.probe_batch(result.tokenizer, device))  # decompress, then damage one layer
            model.model.layers[1].mlp.up_proj.weight.mul_(1.5)
        return model

    monkeypatch.setattr(ct_exporter, "reload_checkpoint", corrupted)
    with pytest.raises(
        ExportError,
        match=r"does not reproduce the in-memory model.*the first module whose output differs: "
        r"model\.layers\.1\.mlp\.up_proj \(max \|diff\| .*weights differ: model\.layers\.1\.mlp\.up_proj$",
    ):
        export_checkpoint(result.model, result.tokenizer, result.recipe.scheme, tmp_path)


def test_a_difference_outside_the_weights_names_the_module_where_outputs_part(
    tiny_qwen3, ptq_recipe, tmp_path, monkeypatch
):
    result = quantized(tiny_qwen3, ptq_recipe)
    reload = ct_exporter.reload_checkpoint

    def buffer_cast(directory, *, dtype, device):
        model = reload(directory, dtype=dtype, device=device)
        inv_freq = model.model.rotary_emb.inv_freq
        inv_freq.copy_(inv_freq.to(torch.bfloat16).float())  # as a cast of buffers to bf16 would leave it
        return model

    monkeypatch.setattr(ct_exporter, "reload_checkpoint", buffer_cast)
    with pytest.raises(
        ExportError, match=r"the first module whose output differs: model\.rotary_emb .*weights differ: none$"
    ):
        export_checkpoint(result.model, result.tokenizer, result.recipe.scheme, tmp_path)


def test_probe_batch_is_chat_formatted_and_rectangular(tiny_qwen3):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen3)
    probe = ct_exporter.probe_batch(tokenizer, torch.device("cpu"))
    assert probe.shape[0] == len(ct_exporter.PROBE_PROMPTS) and probe.shape[1] > 10
    assert tokenizer.decode(probe[0]).startswith("<|im_start|>user\nWhat is 17 * 23?")


def quantize_in_float32(x, scale, zero_point, q_min, q_max, args, dtype=None, global_scale=None):
    """compressed-tensors' ``_quantize`` (what compression stores) as its Triton kernel computes it on CUDA:
    in float32 whatever the weight's dtype. Its fake-quantizing forward divides in the weight's dtype."""
    if global_scale is not None:
        scale = scale.float() / global_scale.float()
    levels = x.float() / scale.float()
    if zero_point is not None:
        levels = levels + zero_point.float()
    return levels.clamp(q_min, q_max).round().to(dtype or x.dtype)


@pytest.fixture
def compress_as_on_cuda(monkeypatch):
    """Call it to make compressed-tensors compress with its CUDA arithmetic on this CPU."""
    from compressed_tensors.utils.impl_backend import ImplBackend

    backend = [(quantize_in_float32, lambda *a, **k: True, 0)]
    return lambda: monkeypatch.setitem(ImplBackend._backends, "_quantize", backend)


def test_a_trained_bf16_model_exports_exactly_whatever_arithmetic_compression_uses(
    tiny_llama, tmp_path, compress_as_on_cuda
):
    """Issue 23: training leaves latent weights anywhere between grid points; where one sat near a rounding
    boundary, compression's float32 arithmetic (CUDA) gave it another code than the bf16 forward computed
    with, and the export check refused SmolLM2 trained at lr >= 1e-4."""
    qat = {"type": "qat_kd", "steps": 4, "batch_size": 4, "micro_batch_size": 4, "learning_rate": 1e-3}
    recipe = {
        "version": 1, "scheme": W3G64,
        "stages": [{"name": "ptq", "data": {"num_samples": 8, "max_seq_length": 64}, "modifiers": [{"type": "rtn"}]},
                   {"name": "qat", "data": {"num_samples": 16, "max_seq_length": 64}, "modifiers": [qat]}],
    }
    result = rqat_sdk.oneshot(tiny_llama, recipe, DATA, dtype="bfloat16", device="cpu")
    compress_as_on_cuda()
    report = export_checkpoint(result.model, result.tokenizer, result.recipe.scheme, tmp_path)
    assert report.exact and report.max_abs_logit_diff == 0.0


def test_8_bit_bf16_weights_export_exactly(tmp_path):
    """Snapping onto the grid must not change the model: in bf16, 8-bit codes times their scale can divide
    back to half steps and round to other codes, so such weights are kept as they are (the W8A8 export of the
    bf16 testbed that vLLM's serving tests use)."""
    from rqat_sdk.testbed.train import EMBEDDED

    recipe = {"version": 1, "scheme": "W8A8", "stages": [{"name": "p", "modifiers": [{"type": "rtn"}]}]}
    result = rqat_sdk.oneshot(EMBEDDED, recipe, output_dir=tmp_path / "w8a8")
    assert result.model.dtype == torch.bfloat16
    assert result.record["export"]["exact"] and result.record["export"]["max_abs_logit_diff"] == 0.0
