import pytest
import torch
from transformers import AutoModelForCausalLM

import rqat_sdk
import rqat_sdk.exporters.compressed_tensors as ct_exporter
from rqat_sdk.errors import ExportError
from rqat_sdk.exporters import checkpoint_format, export_checkpoint
from rqat_sdk.recipe import QuantScheme


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
    with pytest.raises(ExportError, match=r"does not reproduce the in-memory model.*model\.layers\.1\.mlp\.up_proj$"):
        export_checkpoint(result.model, result.tokenizer, result.recipe.scheme, tmp_path)


def test_probe_batch_is_chat_formatted_and_rectangular(tiny_qwen3):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen3)
    probe = ct_exporter.probe_batch(tokenizer, torch.device("cpu"))
    assert probe.shape[0] == len(ct_exporter.PROBE_PROMPTS) and probe.shape[1] > 10
    assert tokenizer.decode(probe[0]).startswith("<|im_start|>user\nWhat is 17 * 23?")
