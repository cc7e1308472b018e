"""KV-cache fake quantization (vLLM's int4 per-token-head cache): the math against a plain reference, the
model plumbing, QAT through it, export and reload, and (with a vLLM environment) vLLM's own rotation."""

import json
import math
import struct
import subprocess

import pytest
import torch

import rqat_sdk
from rqat_sdk.exporters.vllm import closest_servable, engine_options, vllm_support
from rqat_sdk.models import attach_kv_cache_quantization, load_model
from rqat_sdk.ops.kv_cache import _signs, fake_quantize_kv, quantize_kv, random_hadamard
from rqat_sdk.recipe import QuantScheme
from rqat_sdk.scheme import KVCacheQuant
from rqat_sdk.serving import vllm_env


def explicit_rotation(dim: int) -> torch.Tensor:
    """The rotation as a matrix R with rotate(x) = x @ R: block-diagonal H_b diag(signs)... built by hand."""
    block = dim & -dim
    hadamard = torch.tensor([[(-1) ** bin(i & j).count("1") for j in range(block)] for i in range(block)],
                            dtype=torch.float64)
    # rotate(x) = H (d * x): x @ diag(d) @ H (H is symmetric)
    one = torch.diag(_signs(block).double()) @ hadamard
    return torch.block_diag(*[one] * (dim // block))


def reference_kv(row: list[float]) -> list[float]:
    """vLLM's int4 write and read of one (token, head) vector, scalar by scalar, in float64 except where vLLM
    rounds: the rotated vector to the model dtype (fp32 here) and the scale's 4 low mantissa bits."""
    dim = len(row)
    rotation = explicit_rotation(dim)
    rotated = (torch.tensor(row, dtype=torch.float64) @ rotation).float().tolist()
    low, high = min(rotated), max(rotated)
    f32 = lambda v: struct.unpack("f", struct.pack("f", v))[0]  # noqa: E731
    scale = f32(max(f32((high - low) / 15), 1e-6))
    half_away = lambda v: math.copysign(math.floor(abs(v) + 0.5), v)  # noqa: E731
    zero = min(max(half_away(f32(-low / scale)), 0), 15)
    inverse = f32(1.0 / scale)
    levels = [min(max(half_away(f32(f32(v * inverse) + zero)), 0), 15) for v in rotated]
    bits = struct.unpack("i", struct.pack("f", scale))[0] & -16
    stored = struct.unpack("f", struct.pack("i", bits))[0]
    dequantized = torch.tensor([(q - zero) * stored for q in levels], dtype=torch.float64)
    block = dim & -dim
    return (dequantized @ rotation.T / block).tolist()


@pytest.mark.parametrize("dim", [128, 96, 64])
def test_rotation_is_vllms_block_hadamard_and_inverts(dim):
    x = torch.randn(4, 3, dim)
    expected = (x.double() @ explicit_rotation(dim)).float()
    assert torch.allclose(random_hadamard(x), expected, atol=1e-5)
    block = dim & -dim
    assert torch.allclose(random_hadamard(random_hadamard(x), inverse=True) / block, x, atol=1e-5)


@pytest.mark.parametrize("dim", [128, 96])
def test_fake_quantization_matches_a_scalar_reference(dim):
    torch.manual_seed(dim)
    x = torch.randn(6, dim) * torch.linspace(0.1, 3, 6)[:, None]
    out = fake_quantize_kv(x)
    for row, got in zip(x.tolist(), out, strict=True):
        assert torch.allclose(got.double(), torch.tensor(reference_kv(row), dtype=torch.float64), atol=1e-5)
    for row in random_hadamard(out):  # at most 16 levels per (token, head) in the rotated space
        gaps = row.sort().values.diff()
        assert 1 + int((gaps > 1e-3 * (row.max() - row.min())).sum()) <= 16
    assert 0.02 < ((out - x).norm() / x.norm()).item() < 0.2  # 4 bits: visibly lossy, not broken


def test_levels_round_half_away_and_the_scale_loses_its_low_mantissa_bits():
    levels, scale, zero = quantize_kv(torch.tensor([[-1.5, 0.0, 0.75, 6.0]]))  # scale 0.5, zero point 3
    assert scale.item() == 0.5 and zero.item() == 3
    assert levels.tolist() == [[0.0, 3.0, 5.0, 15.0]]  # 4.5 rounds away from zero (half-to-even gives 4)
    _, scale, _ = quantize_kv(torch.tensor([[0.0, 1.5]]))  # scale 0.1 = 0x3DCCCCCD; vLLM keeps 0x3DCCCCC0
    assert scale.view(torch.int32).item() == 0x3DCCCCC0


def test_gradient_passes_straight_through():
    x = torch.randn(2, 4, 5, 64, requires_grad=True)
    grad = torch.randn(2, 4, 5, 64)
    fake_quantize_kv(x).backward(grad)
    assert torch.equal(x.grad, grad)


def test_attention_reads_quantized_keys_and_values_and_trains_through_them(tiny_qwen3, tmp_path):
    model = load_model(tiny_qwen3, device="cpu")
    ids = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        plain = model(ids).logits
    attach_kv_cache_quantization(model, KVCacheQuant())
    with torch.no_grad():
        quantized = model(ids).logits
    assert not torch.allclose(plain, quantized, atol=1e-3)
    model.train()
    model(ids).logits.pow(2).mean().backward()
    attention = model.model.layers[0].self_attn
    assert attention.k_proj.weight.grad.abs().sum() > 0 and attention.v_proj.weight.grad.abs().sum() > 0
    model.eval()
    model.save_pretrained(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["rqat_kv_cache"] == {
        "num_bits": 4, "strategy": "token_head"}
    reloaded = load_model(tmp_path / "saved", allow_quantized=True, device="cpu")
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, quantized)
    assert reloaded.generate(ids[:, :6], max_new_tokens=4, do_sample=False).shape == (2, 10)


def test_generation_quantizes_each_token_once_and_reads_what_requantizing_reads(tiny_qwen3, monkeypatch):
    from transformers import DynamicCache

    from rqat_sdk import models

    model = load_model(tiny_qwen3, device="cpu", dtype="float32")
    attach_kv_cache_quantization(model, KVCacheQuant())
    layers = len(model.model.layers)
    quantized_tokens = []
    quantize = models.fake_quantize_kv
    monkeypatch.setattr(models, "fake_quantize_kv", lambda x: quantized_tokens.append(x.shape[-2]) or quantize(x))
    tokens = torch.randint(0, 300, (3, 12))

    def decode() -> torch.Tensor:  # the prompt (7 tokens), then one token at a time through the cache
        cache = DynamicCache(config=model.config)
        logits = [model(tokens[:, :7], past_key_values=cache, use_cache=True).logits]
        logits += [model(tokens[:, t : t + 1], past_key_values=cache, use_cache=True).logits for t in range(7, 12)]
        return torch.cat(logits, 1)

    with torch.no_grad():
        cached = decode()
        assert quantized_tokens == [7] * 2 * layers + [1] * 2 * layers * 5  # each token once, as it enters
        without_cache = model(tokens, use_cache=False).logits  # the attention function quantizes everything
        for module in model.modules():  # the reference: the whole cache quantized again at every step
            module._forward_pre_hooks.clear()
            module._rqat_kv_quantized_in_cache = False
        quantized_tokens.clear()
        requantized = decode()
    assert quantized_tokens[-2:] == [12, 12]
    assert torch.allclose(cached, requantized, atol=1e-4)
    assert torch.allclose(cached, without_cache, atol=1e-4)


def test_w4a4kv4_reasoning_qat_exports_with_the_kv_cache_and_vllm_flag(tiny_qwen3, tmp_path, w4a4kv4_recipe):
    result = rqat_sdk.oneshot(tiny_qwen3, w4a4kv4_recipe, "reasoning-gym:chain_sum", tmp_path / "out")
    assert result.recipe.scheme.label == "W4A4KV4"
    assert result.record["export"]["format"] == "pack-quantized"  # the exporter checked the reload itself
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    quantization = config["quantization_config"]
    assert "kv_cache_scheme" not in quantization or not quantization["kv_cache_scheme"]
    assert config["rqat_kv_cache"]["num_bits"] == 4
    assert engine_options(tmp_path / "out") == {"kv_cache_dtype": "int4_per_token_head"}
    card = (tmp_path / "out" / "README.md").read_text()
    assert "--kv-cache-dtype int4_per_token_head" in card
    assert result.model.config._attn_implementation.startswith("rqat_int4_kv_")


def test_vllm_serves_the_int4_cache_on_gpus_only():
    scheme = QuantScheme.model_validate("W4A4KV4")
    assert vllm_support(scheme, "gpu").servable and "int4_per_token_head" in vllm_support(scheme, "gpu").detail
    assert not vllm_support(scheme, "cpu").servable
    assert closest_servable(scheme, "cpu").label == "W8A8"
    with pytest.raises(ValueError, match="kv_cache.num_bits"):
        QuantScheme.model_validate({"weights": {"num_bits": 4}, "kv_cache": {"num_bits": 8}})


@pytest.mark.skipif(vllm_env.python() is None, reason="no vLLM environment: run `rqat serve-check --setup` (CI does)")
@pytest.mark.parametrize("dim", [128, 96])
def test_rotation_is_the_one_vllm_applies(dim):
    script = (
        "import json, torch\n"
        "from vllm.v1.attention.ops.int4_per_token_head import single_rht\n"
        f"x = torch.linspace(-3, 3, 5 * {dim}).reshape(5, {dim}) ** 3\n"
        "print(json.dumps(single_rht(x).tolist()))\n"
    )
    done = subprocess.run([vllm_env.python(), "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    theirs = torch.tensor(json.loads(done.stdout.strip().splitlines()[-1]))
    x = torch.linspace(-3, 3, 5 * dim).reshape(5, dim) ** 3
    assert torch.allclose(random_hadamard(x), theirs, rtol=1e-5, atol=1e-4)
