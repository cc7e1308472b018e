"""CUDA-only checks: the Triton kernels (fake quantization, fused LM-head loss) and the FP8 teacher's
``_scaled_mm`` path against their PyTorch paths, a QAT-KD run in bf16 on the GPU, and the preallocated KV cache
and compiled teacher against their eager counterparts."""

import contextlib
import math

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (Triton kernels, bf16 QAT)"),
]
needs_fp8 = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
    reason="needs a CUDA GPU of compute capability 8.9+ (FP8 matmuls: Ada, Hopper)",
)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [64, 128, None])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_triton_kernels_match_the_pytorch_path(bits, group, dtype):
    from rqat_sdk.ops.fake_quant import (
        _WeightFakeQuant,
        fake_quantize_weight,
        int_range,
    )

    torch.manual_seed(bits)
    w = torch.randn(384, 1024, device="cuda") * 0.02
    g = group or 1024
    grouped = w.reshape(384, 1024 // g, g)
    qmin, qmax = int_range(bits)
    low, high = grouped.amin(-1), grouped.amax(-1)
    scale = ((high - low) / (qmax - qmin) * 0.9).to(dtype)
    zero = (qmin - torch.round(low / scale.float())).clamp(qmin, qmax).float()
    grad = torch.randn(384, 1024, device="cuda", dtype=dtype)
    outputs = []
    for path in ("triton", "torch"):
        wt, st, zt = (t.clone().requires_grad_(True) for t in (w, scale.float(), zero))
        if path == "triton":
            out = fake_quantize_weight(wt, st, zt, bits, group, dtype=dtype)
        else:
            out = _WeightFakeQuant.apply(wt, st, zt, qmin, qmax, g, dtype)
        out.backward(grad)
        outputs.append((out, wt.grad, st.grad, zt.grad))
    (a, aw, as_, az), (b, bw, bs, bz) = outputs
    assert torch.equal(a, b) and torch.equal(aw, bw)
    # Scale and zero-point gradients are sums over a group; summation order differs, so compare relative
    # to the largest magnitude (single sums can cancel to near zero).
    assert (as_ - bs).abs().max() <= 1e-5 * bs.abs().max()
    assert (az - bz).abs().max() <= 1e-5 * bz.abs().max()


@pytest.mark.parametrize("group", [128, None])
@pytest.mark.parametrize("symmetric", [True, False])
def test_many_weights_in_one_launch_match_the_pytorch_path(group, symmetric):
    from rqat_sdk.ops.fake_quant import (
        _WeightFakeQuant,
        fake_quantize_weights,
        int_range,
    )

    torch.manual_seed(1)
    qmin, qmax = int_range(3)
    # rows not a multiple of the kernel's rows per program, so programs end inside a layer
    shapes = [(1000, 1024), (24, 1024), (3072, 1024)] if group else [(1000, 1024), (7, 1024)]
    weights, scales, zeros, grads = [], [], [], []
    for rows, cols in shapes:
        w = torch.randn(rows, cols, device="cuda") * 0.02
        g = group or cols
        grouped = w.reshape(rows, cols // g, g)
        low, high = grouped.amin(-1), grouped.amax(-1)
        scale = (high - low) / (qmax - qmin) * 0.9
        weights.append(w.bfloat16())
        scales.append(scale.float())
        zeros.append((qmin - torch.round(low / scale)).clamp(qmin, qmax).float())
        grads.append(torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16))
    leaves = [[t.clone().requires_grad_(True) for t in ts] for ts in (weights, scales, zeros)]
    outs = fake_quantize_weights(*(leaves[:2]), None if symmetric else leaves[2], 3, group, torch.bfloat16)
    sum((o.float() * g.float()).sum() for o, g in zip(outs, grads, strict=True)).backward()
    for k, (_, cols) in enumerate(shapes):
        w, s, z = (t[k].clone().requires_grad_(True) for t in (weights, scales, zeros))
        ref = _WeightFakeQuant.apply(w, s, None if symmetric else z, qmin, qmax, group or cols, torch.bfloat16)
        (ref.float() * grads[k].float()).sum().backward()
        assert torch.equal(outs[k], ref) and torch.equal(leaves[0][k].grad, w.grad)
        assert (leaves[1][k].grad - s.grad).abs().max() <= 1e-5 * s.grad.abs().max()
        if not symmetric:
            assert (leaves[2][k].grad - z.grad).abs().max() <= 1e-5 * z.grad.abs().max()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("divergence,temperature", [("forward_kl", 1.0), ("forward_kl", 2.0), ("ce", 1.0)])
def test_fused_head_loss_matches_autograd(dtype, divergence, temperature):
    from rqat_sdk.ops.distill import LossSpec, token_losses
    from rqat_sdk.ops.triton_distill import head_loss_and_grad_

    torch.manual_seed(0)
    rows, vocab = 37, 151_936  # a Qwen3 vocabulary, not a multiple of the kernel's block
    student = (torch.randn(rows, vocab, device="cuda") * 3).to(dtype)
    teacher = (torch.randn(rows, vocab, device="cuda") * 3).to(dtype)
    targets = torch.randint(0, vocab, (rows,), device="cuda")
    weights = torch.rand(rows, device="cuda")
    spec = LossSpec(divergence, temperature=temperature)
    kl = divergence == "forward_kl"
    upcast = student.float().requires_grad_(True)
    expected = (token_losses(upcast, teacher if kl else None, targets, spec) * weights).sum()
    expected.backward()
    grad = student.clone()
    loss = head_loss_and_grad_(grad, teacher if kl else None, None if kl else targets, weights, temperature)
    assert torch.allclose(loss, expected.detach(), rtol=1e-5, atol=1e-5)
    # fp32 agrees to rounding; bf16 to one unit in the last place of the stored gradient
    tolerance = 1e-6 if dtype == torch.float32 else 2 ** -8
    assert (grad.float() - upcast.grad).abs().max() <= tolerance * upcast.grad.abs().max() + 1e-7


@needs_fp8
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fp8_scaled_mm_path_matches_the_reference(dtype):
    from rqat_sdk.ops.fp8 import FP8Linear, fp8_linear_reference, fp8_linear_scaled_mm

    torch.manual_seed(0)
    linear = torch.nn.Linear(1024, 3072, device="cuda", dtype=dtype)  # Qwen3-0.6B's gate and up projections
    x = torch.randn(4, 512, 1024, device="cuda", dtype=dtype)
    layer = FP8Linear.from_linear(linear)
    out = fp8_linear_scaled_mm(x, layer.w_fp8, layer.w_scale, layer.bias)
    reference = fp8_linear_reference(x, layer.w_fp8, layer.w_scale, layer.bias)
    assert torch.equal(layer(x), out)  # the layer takes this path on this GPU
    # the kernel rounds its output to bf16 and the bias is added there (2**-9 each), its sums run in another order
    assert out.dtype == dtype
    assert (out.float() - reference.float()).abs().max() <= 2**-7 * reference.float().abs().max()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("features", [576, 640, 1000, 1024, 3072])
def test_fp8_row_quantization_kernel_matches_the_pytorch_path_bit_for_bit(dtype, features):
    from rqat_sdk.ops import triton_fp8
    from rqat_sdk.ops.fp8 import quantize_rows, quantize_rows_reference

    torch.manual_seed(0)
    t = torch.randn(777, features, device="cuda") * torch.logspace(-6, 4, 777, device="cuda")[:, None]
    t[3] = 0  # an all-zero row takes the least scale
    t[5, 7] = 1e4  # an outlier in one row
    t = t.to(dtype)
    assert triton_fp8.supports(t)
    values, scale = quantize_rows(t)
    expected_values, expected_scale = quantize_rows_reference(t)
    assert torch.equal(scale, expected_scale)
    assert torch.equal(values.view(torch.uint8), expected_values.view(torch.uint8))
    wide = torch.randn(4, 20000, device="cuda", dtype=dtype)  # wider than one block: the PyTorch path
    assert not triton_fp8.supports(wide)
    assert torch.equal(quantize_rows(wide)[1], quantize_rows_reference(wide)[1])


@pytest.mark.parametrize(("teacher_precision", "compile_student"),
                         [("bf16", False), pytest.param("fp8", False, marks=needs_fp8), ("bf16", True)])
def test_qat_kd_in_bf16_on_the_gpu_exports_exactly(tmp_path, teacher_precision, compile_student):
    """GPTQ then KD with learned scales in bf16 (Triton fake quantization), with each teacher precision and with
    the student's blocks compiled: the trained model exports and reloads exactly."""
    from datasets import Dataset

    import rqat_sdk
    from rqat_sdk.testbed import build_model, build_tokenizer

    corpus = [f"What is {a} + {b}? \\boxed{{{a + b}}}" for a in range(30) for b in range(5)]
    tokenizer = build_tokenizer(vocab_size=400, corpus=corpus)
    model = build_model(tokenizer, "qwen3").to(torch.bfloat16)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    data = Dataset.from_list(
        [{"messages": [{"role": "user", "content": f"What is {a} + 3?"},
                       {"role": "assistant", "content": f"\\boxed{{{a + 3}}}"}]}
         for a in range(40)]
    )
    recipe = {
        "version": 1,
        "scheme": "W3G128",
        "stages": [
            {"name": "ptq", "data": {"num_samples": 16, "max_seq_length": 64}, "modifiers": [{"type": "gptq"}]},
            {"name": "qat", "data": {"num_samples": 40, "max_seq_length": 64}, "modifiers": [
                {"type": "qat_kd", "steps": 10, "batch_size": 8, "micro_batch_size": 4, "learning_rate": 1e-4,
                 "learn_scales": True, "logging_steps": 5, "teacher_precision": teacher_precision,
                 "compile_student": compile_student}]},
        ],
    }
    result = rqat_sdk.oneshot(tmp_path / "model", recipe, data, tmp_path / "out")
    assert result.model.dtype == torch.bfloat16 and result.model.device.type == "cuda"
    assert result.record["export"]["exact"] is True
    # the student (GPTQ) and the teacher (the bf16 model) differ: a loss of 0 or NaN means the KD did not run
    assert 0 < result.record["stages"][1]["metrics"]["qat_kd"]["final_loss"] < math.inf


def test_kv_cache_fake_quant_on_cuda_matches_the_cpu_in_bf16():
    from rqat_sdk.ops.kv_cache import fake_quantize_kv

    torch.manual_seed(0)
    x = (torch.randn(2, 8, 33, 128) * 2).bfloat16()
    on_gpu = fake_quantize_kv(x.cuda()).cpu()
    on_cpu = fake_quantize_kv(x)
    # the rotation's matmul sums in another order on the GPU: a value at a rounding tie may change level
    changed = (on_gpu != on_cpu).float().mean().item()
    assert changed < 0.01 and (on_gpu.float() - on_cpu.float()).abs().max() < 0.5


def _rows_changed(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a != b).flatten(0, -2).any(-1).float().mean().item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("dim", [32, 64, 128])
def test_kv_cache_kernel_matches_the_pytorch_path_on_the_cpu(dtype, dim):
    from rqat_sdk.ops.kv_cache import _KVFakeQuant, fake_quantize_kv
    from rqat_sdk.ops.triton_kv_cache import supports

    torch.manual_seed(dim)
    # (batch, heads, tokens, dim) as attention sees keys: a transposed view of (batch, tokens, heads, dim),
    # tokens not a multiple of the kernel's rows per program; scales from 1e-2 to 10 across tokens
    x = torch.randn(3, 77, 8, dim) * torch.logspace(-2, 1, 77)[:, None, None]
    x = x.to(dtype).transpose(1, 2)
    fused = fake_quantize_kv(x.cuda())
    assert supports(x.cuda()) and not x.is_contiguous()
    assert fused.shape == x.shape and fused.dtype == dtype and fused.stride() == x.stride()
    # The forward rotation's fp32 sums run in another order (the kernel's dot against the CPU's matmul);
    # in bf16 and fp16 they are rounded to the dtype right after, so a row could differ only at a rounding
    # tie; in fp32 a row's min or max may move by an ulp, and with it the stored scale.
    reference = _KVFakeQuant.apply(x)
    assert _rows_changed(fused.cpu(), reference) <= (0.15 if dtype == torch.float32 else 0.001)
    rows = lambda t: t.float().flatten(0, -2)  # noqa: E731
    assert ((rows(fused.cpu()) - rows(reference)).norm(dim=-1) <= 0.02 * rows(reference).norm(dim=-1)).all()
    assert torch.equal(fake_quantize_kv(x.cuda().contiguous()), fused.contiguous())  # the layout does not matter


def test_kv_cache_kernel_gradient_is_the_identity_and_other_dims_fall_back():
    from rqat_sdk.ops.kv_cache import _KVFakeQuant, fake_quantize_kv
    from rqat_sdk.ops.triton_kv_cache import supports

    x = torch.randn(2, 4, 16, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn_like(x)
    fake_quantize_kv(x).backward(grad)
    assert torch.equal(x.grad, grad)
    odd = torch.randn(2, 4, 16, 96, device="cuda", dtype=torch.bfloat16)  # vLLM rotates 96 as 3 blocks of 32
    assert not supports(odd) and torch.equal(fake_quantize_kv(odd), _KVFakeQuant.apply(odd))
    five = torch.randn(2, 2, 4, 16, 128, device="cuda", dtype=torch.bfloat16)
    assert not supports(five) and torch.equal(fake_quantize_kv(five), _KVFakeQuant.apply(five))


@pytest.mark.parametrize("compile_student", [False, True])
def test_w4a4kv4_qat_in_bf16_on_the_gpu(tmp_path, w4a4kv4_recipe, compile_student):
    """Rotation, GPTQ and KD at W4A4KV4 in bf16 (the Triton KV kernel), eager and with the student compiled (the
    kernel between graphs): the checkpoint exports and reloads exactly."""
    import rqat_sdk
    from rqat_sdk.testbed import write_tiny_model

    w4a4kv4_recipe["stages"][1]["modifiers"][0]["compile_student"] = compile_student
    model_dir = write_tiny_model(tmp_path / "model", "qwen3")
    result = rqat_sdk.oneshot(model_dir, w4a4kv4_recipe, "reasoning-gym:chain_sum", tmp_path / "out", dtype="bfloat16")
    assert result.model.device.type == "cuda" and result.model.config._attn_implementation.startswith("rqat_int4_kv_")
    assert result.record["export"]["format"] == "pack-quantized"  # the exporter checked the reload itself


def test_grpo_in_float32_on_the_gpu_exports_exactly(tmp_path):
    """trl trains with bf16 autocast on GPUs; the float32 model it hands back must compute in float32 again."""
    from pathlib import Path

    import rqat_sdk

    testbed = Path(rqat_sdk.__file__).parent / "testbed" / "short"
    recipe = {
        "version": 1,
        "scheme": "W3G128",
        "stages": [
            {"name": "ptq", "data": {"source": "testbed", "num_samples": 16}, "modifiers": [{"type": "rtn"}]},
            {"name": "rl", "data": {"source": "testbed", "num_samples": 32}, "modifiers": [
                {"type": "grpo", "steps": 2, "prompts_per_step": 4, "group_size": 4, "micro_batch_size": 16,
                 "max_completion_length": 48, "learning_rate": 1e-3, "allow_cold_start": True}]},
        ],
    }
    result = rqat_sdk.oneshot(testbed, recipe, output_dir=tmp_path / "out", dtype="float32")
    assert result.model.dtype == torch.float32 and result.model.device.type == "cuda"
    assert result.record["export"]["exact"] is True


def test_the_preallocated_kv_cache_decodes_the_dynamic_caches_tokens_on_the_gpu():
    """bf16 on CUDA, left-padded prompts, a group of completions per prompt: attention reads a strided view of
    the preallocated buffers where the dynamic cache hands it a fresh tensor, with the query heads grouped by
    key/value head where SDPA expands the cache; the greedy tokens are the same."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from rqat_sdk.generation import preallocated_kv_cache

    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, head_dim=64, attn_implementation="sdpa")
    model = Qwen3ForCausalLM(config).cuda().to(torch.bfloat16).eval()
    model.generation_config.eos_token_id = None
    ids = torch.randint(1, 512, (4, 24), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    mask = torch.ones_like(ids)
    mask[::2, :6] = 0
    ids, mask = ids.repeat_interleave(2, 0), mask.repeat_interleave(2, 0)  # a group of two per prompt
    outputs = []
    for decoding in (contextlib.nullcontext(), preallocated_kv_cache(model, 48)):
        with decoding, torch.no_grad():
            outputs.append(model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=48,
                                          min_new_tokens=48, pad_token_id=0))
    assert torch.equal(outputs[0], outputs[1])


def _tiny_cuda_qwen3(dtype: torch.dtype):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, head_dim=64, attn_implementation="sdpa")
    model = Qwen3ForCausalLM(config).cuda().to(dtype).eval()
    model.generation_config.eos_token_id = None
    ids = torch.randint(1, 512, (4, 24), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    mask = torch.ones_like(ids)
    mask[::2, :6] = 0  # left padding
    return model, ids, mask


def test_cuda_graph_decoding_replays_one_graph_and_gives_generates_greedy_tokens(monkeypatch):
    """float32, left-padded prompts, two completions per prompt, rows ending at different steps: every step after
    the first eager one is a replay of one captured graph, and the tokens, padding and length are generate's."""
    from transformers import GenerationConfig

    from rqat_sdk.generation import cuda_graph_decoding

    model, ids, mask = _tiny_cuda_qwen3(torch.float32)
    free = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=48, pad_token_id=0)
    stop = int(free[1, 24 + 10])  # ends row 1 at its 11th token; other rows end elsewhere or never
    # transformers refuses num_return_sequences > 1 without sampling: greedy is top_k=1
    config = GenerationConfig(max_new_tokens=48, do_sample=True, top_k=1, num_return_sequences=2, pad_token_id=0,
                              eos_token_id=stop)
    with torch.no_grad():
        reference = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    replays = []
    replay = torch.cuda.CUDAGraph.replay
    monkeypatch.setattr(torch.cuda.CUDAGraph, "replay", lambda self: replays.append(self) or replay(self))
    with cuda_graph_decoding(model), torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    assert torch.equal(out, reference)
    assert len(replays) >= 32 and len(set(map(id, replays))) == 1


def test_cuda_graph_replays_give_the_eager_loops_tokens_on_a_quantized_policy():
    """A W3G128 fake-quantized policy in bf16, its weights quantized once: the replayed steps compute what the
    same loop computes eagerly, token for token."""
    import rqat_sdk
    from rqat_sdk.cuda_graph_decoding import DecodingSettings, _Decoder
    from rqat_sdk.modifiers.layers import attach_fake_quant, weights_quantized_once

    model, ids, mask = _tiny_cuda_qwen3(torch.bfloat16)
    rtn = {"version": 1, "scheme": "W3G128", "stages": [{"name": "ptq", "modifiers": [{"type": "rtn"}]}]}
    model = rqat_sdk.oneshot(model, rtn, tokenizer=type("T", (), {"pad_token_id": 0, "chat_template": None})()).model
    attach_fake_quant(model, dtype=torch.bfloat16, learn_scales=False, learn_clipping=False)
    settings = DecodingSettings(max_new_tokens=64, greedy=True)
    with weights_quantized_once(model):
        eager = _Decoder(model, ids, mask, settings).run(graphed=False)
        graphed = _Decoder(model, ids, mask, settings).run(graphed=True)
    assert torch.equal(graphed, eager)


def test_cuda_graph_replays_draw_fresh_samples_at_every_step():
    """Sampling inside the graph: each replay draws new random numbers (a near-uniform distribution gives many
    distinct tokens per row, where a replayed draw would repeat one)."""
    from rqat_sdk.cuda_graph_decoding import DecodingSettings, decode

    model, ids, mask = _tiny_cuda_qwen3(torch.bfloat16)
    out = decode(model, ids, mask, DecodingSettings(max_new_tokens=64, temperature=1000.0))
    completions = out[:, ids.shape[1]:]
    assert all(len(row.unique()) > 40 for row in completions)


def test_a_compiled_teacher_gives_the_eager_hidden_states_on_the_gpu():
    """compile_teacher: the bf16 teacher's decoder under torch.compile, over sequences of several lengths."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from rqat_sdk.modifiers.qat.trainer import hidden_states

    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, head_dim=64, attn_implementation="sdpa")
    teacher = Qwen3ForCausalLM(config).cuda().to(torch.bfloat16).eval()
    compiled = torch.compile(teacher.get_decoder(), dynamic=True)
    for length in (64, 200, 333):
        batch = {"input_ids": torch.randint(0, 512, (2, length), device="cuda")}
        with torch.no_grad():
            eager, fused = hidden_states(teacher, batch), hidden_states(teacher, batch, compiled)
        assert (fused.float() - eager.float()).abs().max() <= 0.05 * eager.float().abs().max()
    torch._dynamo.reset()


@needs_fp8
def test_a_compiled_fp8_teacher_is_as_close_to_bf16_as_the_eager_one_on_the_gpu():
    """compile_teacher with teacher_precision fp8: the fused row quantization and ``_scaled_mm`` inside the
    compiled graph give a teacher as close to the bf16 one as the eager FP8 teacher is.

    Not the eager FP8 teacher's values: in bf16 the compiled graph keeps float32 between fused operations where
    eager rounds to bf16, and those small differences put many values on the other side of an e4m3 step (the
    two FP8 teachers differ by about half of FP8's own error; so do their CPU counterparts in bf16)."""
    import copy

    from transformers import Qwen3Config, Qwen3ForCausalLM

    from rqat_sdk.modifiers.qat.trainer import hidden_states
    from rqat_sdk.ops.fp8 import linears_to_fp8_

    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, head_dim=64, attn_implementation="sdpa")
    original = Qwen3ForCausalLM(config).cuda().to(torch.bfloat16).eval()
    teacher = copy.deepcopy(original)
    linears_to_fp8_(teacher, keep=[teacher.get_output_embeddings()])
    compiled = torch.compile(teacher.get_decoder(), dynamic=True)
    for length in (64, 200):
        batch = {"input_ids": torch.randint(0, 512, (2, length), device="cuda")}
        with torch.no_grad():
            eager, fused, full = (hidden_states(model, batch, decoder).float() for model, decoder in
                                  ((teacher, None), (teacher, compiled), (original, None)))
        fp8_error = (eager - full).norm()
        # as accurate as the eager FP8 teacher, and still FP8 (a graph that fell back to bf16 would be closer)
        assert 0.8 * fp8_error < (fused - full).norm() < 1.15 * fp8_error
    torch._dynamo.reset()


def _w4a4_activations():
    from rqat_sdk.scheme import QuantScheme

    return QuantScheme.model_validate("W4A4").input_activations.to_args()


def _flatquant_reference(x, left, right, smooth, logit):
    """The PyTorch path of the fused FlatQuant transform (the kernels switched off), W4A4's clipping."""
    from unittest import mock

    from rqat_sdk.ops import triton_affine_transform
    from rqat_sdk.ops.affine_transform import transform_and_clip

    with mock.patch.object(triton_affine_transform, "supports", lambda *args: False):
        return transform_and_clip(x, left, right, smooth, logit, _w4a4_activations())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("width", "smoothing", "clipping"), [
    (1024, True, True), (3072, True, True), (2048, False, True), (96, True, False), (64, False, False),
])
def test_the_fused_flatquant_transform_matches_the_pytorch_path(dtype, width, smoothing, clipping):
    """Forward and every gradient, Qwen3-0.6B's three widths (blocks 32 x 32, 48 x 64 padded to 64 x 64,
    32 x 64) and small padded ones, a token count that is no multiple of the kernel's tokens per program."""
    from rqat_sdk.ops.affine_transform import clip_factor, kronecker_sizes, random_orthogonal
    from rqat_sdk.ops.triton_affine_transform import TritonKroneckerTransform, supports

    generator = torch.Generator().manual_seed(width)
    n1, n2 = kronecker_sizes(width)
    # column-major orthogonal factors (as QR returns them) plus noise: far enough from orthogonal to matter
    left = (random_orthogonal(n1, generator) + 0.2 * torch.randn(n1, n1, generator=generator).T).cuda()
    right = (random_orthogonal(n2, generator) + 0.2 * torch.randn(n2, n2, generator=generator)).cuda()
    smooth = (torch.rand(width, generator=generator) + 0.5).cuda() if smoothing else None
    logit = torch.tensor(0.5, device="cuda") if clipping else None  # clips 38% of each token's range
    x = (torch.randn(3, 37, width, generator=generator) * torch.logspace(-1, 1, 37)[:, None]).to("cuda", dtype)
    named = {n: t.requires_grad_() for n, t in zip(["x", "left", "right", "smooth", "clip"],
                                                    (x, left, right, smooth, logit), strict=True) if t is not None}
    leaves = list(named.values())
    assert supports(x, left, right)

    expected = _flatquant_reference(x, left, right, smooth, logit)
    upstream = torch.randn_like(expected)
    expected_grads = torch.autograd.grad((expected.float() * upstream.float()).sum(), leaves)
    fused = TritonKroneckerTransform.apply(x, left, right, smooth, None if logit is None else clip_factor(logit))
    fused_grads = torch.autograd.grad((fused.float() * upstream.float()).sum(), leaves)

    # float32 sums of up to 64 products in another order: within a few ulps of the token's range; in bf16 the
    # output then rounds once, so a value may also move by one bf16 ulp
    token_range = expected.detach().float().abs().amax(-1, keepdim=True)
    difference = (fused.float() - expected.float()).abs()
    if dtype == torch.float32:
        assert (difference <= 1e-5 * token_range).all()
    else:
        assert (difference <= expected.float().abs() * 2**-7 + 1e-5 * token_range).all()
        assert (fused != expected).float().mean() < 0.02
    for name, actual, wanted in zip(named, fused_grads, expected_grads, strict=True):
        error = ((actual.float() - wanted.float()).norm() / wanted.float().norm()).item()
        assert error < (1e-2 if dtype == torch.bfloat16 and name == "x" else 1e-3), (name, error)


def test_a_flatquant_model_trains_through_the_fused_kernels_as_through_the_pytorch_path(tmp_path, monkeypatch):
    """A model with FlatQuant's transforms on every Linear, in QAT's training mode: the fused kernels run (once
    per shared input) and give the PyTorch path's loss and gradients to float32 rounding.

    Weight-only int4: with int4 activations, clipped values sit at a rounding tie of the activation quantizer
    (``-bound / (bound / 7.5)``), so an ulp of difference in a token's range flips them a whole level, in
    either path; the clipping's own gradients are compared exactly in the test above."""
    from rqat_sdk.models import load_model, load_tokenizer
    from rqat_sdk.modifiers.layers import attach_fake_quant
    from rqat_sdk.modifiers.ptq.flatquant import TRANSFORM_INPUTS
    from rqat_sdk.modifiers.ptq.llmcompressor_adapter import quantize_rtn
    from rqat_sdk.ops import triton_affine_transform
    from rqat_sdk.scheme import QuantScheme
    from rqat_sdk.testbed import write_tiny_model
    from rqat_sdk.transforms import KroneckerTransform, attach_online_transform

    path = write_tiny_model(tmp_path / "model", "qwen3")
    model, tokenizer = load_model(path, dtype="float32", device="cuda"), load_tokenizer(path)
    generator = torch.Generator().manual_seed(0)
    for index, layer in enumerate(model.model.layers):
        for key, members in TRANSFORM_INPUTS.items():
            linears = [layer.get_submodule(m) for m in members]
            transform = KroneckerTransform(linears[0].in_features, smoothing=True, activation_clipping=True,
                                           orthogonal=True, generator=generator).cuda()
            attach_online_transform(model, f"model.layers.{index}", key, transform,
                                    [f"model.layers.{index}.{m}" for m in members])
            with torch.no_grad():
                for linear in linears:
                    linear.weight.data = transform.fold(linear.weight)
    quantize_rtn(model, tokenizer, QuantScheme.model_validate("W4A16"), None)
    attach_fake_quant(model, dtype=torch.float32, learn_scales=False, learn_clipping=True)
    model.train()
    ids = torch.randint(0, model.config.vocab_size, (2, 40), generator=generator).cuda()

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        loss = model(ids).logits.float().pow(2).mean()
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    launches = []
    apply = triton_affine_transform.TritonKroneckerTransform.apply
    monkeypatch.setattr(triton_affine_transform.TritonKroneckerTransform, "apply",
                        lambda *args: launches.append(1) or apply(*args))
    fused_loss, fused_grads = loss_and_grads()
    assert len(launches) == len(model.model.layers) * len(TRANSFORM_INPUTS)  # one per shared input
    monkeypatch.setattr(triton_affine_transform, "supports", lambda *args: False)  # the PyTorch path
    loss, grads = loss_and_grads()

    assert math.isclose(fused_loss, loss, rel_tol=1e-5)
    assert fused_grads.keys() == grads.keys() and any("rqat_kron_left" in n for n in grads)
    for name, grad in grads.items():
        assert (fused_grads[name] - grad).norm() <= 1e-4 * grad.norm() + 1e-12, name


def test_the_fused_flatquant_transform_follows_pytorchs_float32_matmul_precision():
    """With TF32 allowed (``torch.set_float32_matmul_precision("high")``, as the benchmarks run) the kernels'
    products use it as cuBLAS does: within TF32's rounding of the IEEE result, forward and backward."""
    from rqat_sdk.ops.affine_transform import clip_factor, kronecker_sizes, random_orthogonal
    from rqat_sdk.ops.triton_affine_transform import TritonKroneckerTransform

    generator = torch.Generator().manual_seed(0)
    n1, n2 = kronecker_sizes(3072)
    left = random_orthogonal(n1, generator).cuda().requires_grad_()
    right = random_orthogonal(n2, generator).cuda().requires_grad_()
    factor = clip_factor(torch.tensor(2.0, device="cuda"))
    x = torch.randn(2, 50, 3072, generator=generator).cuda().requires_grad_()
    upstream = torch.randn(2, 50, 3072, generator=generator).cuda()

    def run():
        y = TritonKroneckerTransform.apply(x, left, right, None, factor)
        return y.detach(), torch.autograd.grad((y * upstream).sum(), [x, left, right])

    ieee, ieee_grads = run()
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        tf32, tf32_grads = run()
    finally:
        torch.set_float32_matmul_precision(before)
    assert not torch.equal(tf32, ieee)  # TF32 did run
    assert (tf32 - ieee).norm() <= 2e-3 * ieee.norm()
    for actual, wanted in zip(tf32_grads, ieee_grads, strict=True):
        assert (actual - wanted).norm() <= 1e-2 * wanted.norm()


def test_the_fused_flatquant_transform_gives_only_the_gradients_asked_for():
    """Frozen factors (GRPO after QAT), or an input that needs no gradient (calibration's first layer): the
    kernels skip what is not asked, and what is asked matches the PyTorch path; a second derivative is refused."""
    from rqat_sdk.ops.affine_transform import clip_factor, kronecker_sizes, random_orthogonal
    from rqat_sdk.ops.triton_affine_transform import TritonKroneckerTransform

    generator = torch.Generator().manual_seed(1)
    n1, n2 = kronecker_sizes(1024)
    left, right = (random_orthogonal(n, generator).cuda() for n in (n1, n2))
    logit = torch.tensor(0.5, device="cuda")
    x = torch.randn(2, 40, 1024, generator=generator).cuda()
    upstream = torch.randn(2, 40, 1024, generator=generator).cuda()
    for asked in ([x], [left, right, logit]):
        for tensor in (x, left, right, logit):
            tensor.requires_grad_(any(tensor is a for a in asked))
        fused = TritonKroneckerTransform.apply(x, left, right, None, clip_factor(logit))
        expected = _flatquant_reference(x, left, right, None, logit)
        for actual, wanted in zip(torch.autograd.grad((fused * upstream).sum(), asked),
                                  torch.autograd.grad((expected * upstream).sum(), asked), strict=True):
            assert (actual - wanted).norm() <= 1e-4 * wanted.norm()
    x.requires_grad_()
    (grad,) = torch.autograd.grad((TritonKroneckerTransform.apply(x, left, right, None, None) * upstream).sum(), [x],
                                  create_graph=True)
    with pytest.raises(RuntimeError):
        grad.sum().backward()


def test_the_fused_flatquant_kernels_serve_only_what_they_compute():
    """Blocks past 64 x 64 after padding, asymmetric or grouped clipping, tensors off CUDA and compiled graphs
    take the PyTorch path; W4A4's clipping on Qwen3-0.6B's widths takes the kernels."""
    from rqat_sdk.ops.affine_transform import fused_kernel_serves, kronecker_sizes

    args = _w4a4_activations()
    logit = torch.tensor(4.0, device="cuda")

    def serves(width, activations=args, device="cuda"):
        left, right = (torch.eye(n, device=device) for n in kronecker_sizes(width))
        return fused_kernel_serves(torch.ones(1, width, device=device), left, right, logit, activations)

    assert all(serves(width) for width in (1024, 2048, 3072, 4096))
    assert not serves(6144)  # 64 x 96: the 96 pads to 128
    assert not serves(2144)  # 32 x 67: the 67 pads to 128
    assert not serves(1024, args.model_copy(update={"symmetric": False}))
    assert not serves(1024, args.model_copy(update={"strategy": "group", "group_size": 128}))
    assert serves(1024, None)  # no quantizer: no clipping to fuse
    assert not serves(1024, device="cpu")
    assert not torch.compile(lambda: serves(1024), backend="eager")()


def test_sharded_compiled_blocks_train_as_the_unsharded_eager_model_on_the_gpu(tiny_qwen3, monkeypatch):
    """FSDP2 (one rank, NCCL) with each block compiled: the blocks quantize their gathered weights with the
    Triton kernel before their compiled forward (fake_quantized_together), never inside the graph, which the
    kernel's launch tables cannot enter; loss and gradients are the unsharded eager model's, to the rounding of
    fused kernels in bf16."""
    import copy
    import socket

    import torch.distributed as dist

    import rqat_sdk
    from rqat_sdk import distributed
    from rqat_sdk.modifiers.layers import attach_fake_quant, fake_quantized_together
    from rqat_sdk.modifiers.qat.trainer import _compile_blocks

    recipe = {"version": 1, "scheme": "W3G128", "stages": [{"name": "ptq", "modifiers": [{"type": "rtn"}]}]}
    model = rqat_sdk.oneshot(tiny_qwen3, recipe, dtype="bfloat16").model.cuda()
    attach_fake_quant(model, dtype=torch.bfloat16, learn_scales=False, learn_clipping=False)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    sharded = copy.deepcopy(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0)).cuda()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        monkeypatch.setenv("MASTER_PORT", str(probe.getsockname()[1]))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
    try:
        distributed.wrap(sharded, "fsdp", list(sharded.model.layers), torch.bfloat16)
        with contextlib.ExitStack() as compiled:
            torch._dynamo.reset()
            _compile_blocks(list(sharded.model.layers), compiled)
            with fake_quantized_together(sharded):
                loss = sharded(ids, labels=ids).loss
                loss.backward()
        gradient = dict(sharded.named_parameters())["model.layers.1.mlp.down_proj.weight"].grad.full_tensor()
    finally:
        dist.destroy_process_group()
    with fake_quantized_together(model):
        reference = model(ids, labels=ids).loss
        reference.backward()
    assert loss.item() == pytest.approx(reference.item(), rel=1e-2)
    expected = model.model.layers[1].mlp.down_proj.weight.grad
    assert (gradient - expected).norm() <= 0.05 * expected.norm()
