"""FP8 teacher layers on CPU: e4m3 row quantization, the reference matmul, the ``_scaled_mm`` call, a tiny teacher.

The CUDA path is checked against the reference in tests/test_gpu.py.
"""

import pytest
import torch

from rqat_sdk.errors import UpstreamVersionError
from rqat_sdk.models import load_model, load_tokenizer
from rqat_sdk.ops import fp8
from rqat_sdk.ops.fp8 import (
    E4M3,
    E4M3_MAX,
    FP8Linear,
    dequantize_rows,
    fp8_linear,
    fp8_linear_reference,
    fp8_linear_scaled_mm,
    linears_to_fp8_,
    quantize_rows,
)

# e4m3 keeps 3 mantissa bits: rounding moves a normal value by at most 2**-4 of itself, a subnormal (below
# 2**-6) by at most half their spacing 2**-9, in units of the row's scale
RELATIVE_ROUNDING, SUBNORMAL_ROUNDING = 2.0**-4, 2.0**-10


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_quantization_round_trips_within_e4m3_rounding(dtype):
    torch.manual_seed(0)
    w = (torch.randn(64, 256) * torch.logspace(-4, 2, 64).unsqueeze(1)).to(dtype)  # rows six decades apart
    w[3, 7] = 50.0  # an outlier costs precision in its own row only
    values, scale = quantize_rows(w)
    assert values.dtype == E4M3 and scale.dtype == torch.float32 and scale.shape == (64, 1)
    assert (scale > 0).all()
    assert torch.equal(values.float().abs().amax(-1), torch.full((64,), E4M3_MAX))  # each row uses the full range
    error = (dequantize_rows(values, scale) - w.float()).abs()
    bound = torch.maximum(w.float().abs() * RELATIVE_ROUNDING, scale * SUBNORMAL_ROUNDING)
    assert (error <= bound * (1 + 1e-6)).all()


def test_zero_rows_quantize_to_zero_with_a_positive_scale():
    w = torch.randn(4, 32)
    w[1] = 0.0
    values, scale = quantize_rows(w)
    assert (scale > 0).all() and torch.isfinite(scale).all()
    assert torch.equal(dequantize_rows(values, scale)[1], torch.zeros(32))
    x = torch.randn(2, 3, 32)
    x[0, 1] = 0.0  # a zero token gives the bias alone
    bias = torch.randn(4)
    out = fp8_linear_reference(x, values, scale, bias)
    assert torch.isfinite(out).all() and torch.equal(out[0, 1], bias)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_linear_is_close_to_the_float_linear(dtype):
    torch.manual_seed(1)
    linear = torch.nn.Linear(256, 96).to(dtype)
    x = torch.randn(3, 10, 256, dtype=dtype)
    fp8 = FP8Linear.from_linear(linear)
    with torch.no_grad():
        exact, out = linear(x).float(), fp8(x)
    assert out.dtype == dtype and out.shape == (3, 10, 96)
    assert fp8_linear(x, fp8.w_fp8, fp8.w_scale, fp8.bias).equal(out)  # on the CPU fp8_linear is the reference
    # both operands carry e4m3 rounding, at most 2**-4 of each element (3.7% relative error measured here)
    assert ((out.float() - exact).norm() / exact.norm()).item() < 0.06


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_scaled_mm_call_computes_the_reference(dtype):
    """torch's CPU build implements ``_scaled_mm`` too, so the CUDA path's call (operand layout, scale shapes)
    is checked here; its output is rounded to bf16, and the bias added in bf16."""
    torch.manual_seed(2)
    values, scale = quantize_rows(torch.randn(48, 64))
    x, bias = torch.randn(3, 5, 64, dtype=dtype), torch.randn(48)
    out = fp8_linear_scaled_mm(x, values, scale, bias)
    reference = fp8_linear_reference(x, values, scale, bias)
    assert out.dtype == dtype and out.shape == reference.shape
    assert (out.float() - reference.float()).abs().max() <= 2.0**-7 * reference.float().abs().max()



def test_the_first_scaled_mm_checks_the_kernel_and_refuses_one_that_differs(monkeypatch):
    """The self-check runs the real kernel (torch's CPU build has one) and passes; a ``_scaled_mm`` that takes
    other arguments, or computes something else, is refused with what to do."""
    fp8._check_scaled_mm.cache_clear()
    fp8._check_scaled_mm(torch.device("cpu"))

    def other_signature(*args, **kwargs):
        raise TypeError("_scaled_mm() got an unexpected keyword argument 'scale_a'")

    monkeypatch.setattr(torch, "_scaled_mm", other_signature)
    fp8._check_scaled_mm.cache_clear()
    with pytest.raises(UpstreamVersionError, match=r"refused the call .*unexpected keyword.*teacher_precision: bf16"):
        fp8._check_scaled_mm(torch.device("cpu"))

    monkeypatch.setattr(torch, "_scaled_mm", lambda a, b, **kwargs: torch.zeros(a.shape[0], b.shape[1],
                                                                                 dtype=torch.bfloat16))
    fp8._check_scaled_mm.cache_clear()
    with pytest.raises(UpstreamVersionError, match=r"differs from the FP8 reference by 1\.000 \(relative\)"):
        fp8._check_scaled_mm(torch.device("cpu"))
    fp8._check_scaled_mm.cache_clear()

def test_fp8_teacher_logits_stay_close_to_the_float_teachers(tiny_qwen3):
    from rqat_sdk.exporters import probe_batch

    model = load_model(tiny_qwen3, dtype="float32", device="cpu")
    probe = probe_batch(load_tokenizer(tiny_qwen3), torch.device("cpu"))
    head = model.get_output_embeddings()
    with torch.no_grad():
        reference = model(probe).logits
        replaced = linears_to_fp8_(model, keep=[head])
        logits = model(probe).logits
    assert replaced == 7 * model.config.num_hidden_layers  # q, k, v, o, gate, up, down
    assert model.get_output_embeddings() is head and head.weight is model.get_input_embeddings().weight
    assert not any(isinstance(m, torch.nn.Linear) for m in model.model.modules())
    # the stated tolerance on this random tiny model: 10% relative error of the logits (7.6% measured), and
    # next-token distributions 1e-3 nats apart on average (3e-4 measured)
    assert ((logits - reference).norm() / reference.norm()).item() < 0.10
    log_p, log_q = reference.log_softmax(-1), logits.log_softmax(-1)
    assert (log_p.exp() * (log_p - log_q)).sum(-1).mean().item() < 1e-3


def test_a_tensor_quantized_once_serves_every_layer_that_reads_it():
    inputs = fp8.SharedInputQuantizer()
    x = torch.randn(2, 5, 32)
    first = inputs(x)
    assert inputs(x) is first  # the key and value projections after the query's
    x.mul_(2.0)  # changed in place: quantized again
    again = inputs(x)
    assert again is not first and torch.equal(again[1], first[1] * 2)
    assert inputs(x.clone()) is not again  # another tensor with the same values
    with torch.inference_mode():
        frozen = torch.randn(3, 32)
        assert inputs(frozen) is not inputs(frozen)  # no version counter: every call quantizes


def test_an_fp8_model_quantizes_four_inputs_a_layer_and_computes_the_same(tiny_qwen3, monkeypatch):
    model = load_model(tiny_qwen3, dtype="float32", device="cpu")
    separate = load_model(tiny_qwen3, dtype="float32", device="cpu")
    linears_to_fp8_(model, keep=[model.get_output_embeddings()])
    for name, module in list(separate.model.named_modules()):  # each layer its own quantizer: nothing shared
        if isinstance(module, torch.nn.Linear):
            parent, _, attribute = name.rpartition(".")
            setattr(separate.model.get_submodule(parent), attribute, FP8Linear.from_linear(module))
    calls = []
    quantize = fp8.quantize_tokens
    monkeypatch.setattr(fp8, "quantize_tokens", lambda x: calls.append(x.shape) or quantize(x))
    ids = torch.randint(3, 200, (2, 12))
    with torch.no_grad():
        shared_logits = model(ids).logits
        assert len(calls) == 4 * model.config.num_hidden_layers  # q/k/v, o, gate/up, down
        assert torch.equal(shared_logits, separate(ids).logits)
