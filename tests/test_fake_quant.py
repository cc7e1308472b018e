"""Fake quantization: bit-exact against compressed-tensors, and straight-through gradients by the book."""

import pytest
import torch
from compressed_tensors.quantization import QuantizationArgs
from compressed_tensors.quantization.lifecycle.forward import fake_quantize

from rqat_sdk.ops.fake_quant import (
    clamp_ste,
    fake_quantize_activation,
    fake_quantize_weight,
    fake_quantize_weights,
    int_range,
    round_ste,
)


def minmax_qparams(w, bits, group, symmetric):
    """Scales and zero points as a min/max observer would choose them."""
    rows, cols = w.shape
    groups = w.float().reshape(rows, cols // (group or cols), -1)
    qmin, qmax = int_range(bits)
    if symmetric:
        scale = groups.abs().amax(-1) / ((qmax - qmin) / 2)
        return scale.to(w.dtype), torch.zeros(scale.shape, dtype=torch.int8)
    low, high = groups.amin(-1), groups.amax(-1)
    scale = ((high - low) / (qmax - qmin)).to(w.dtype)
    zero = (qmin - torch.round(low / scale.float())).clamp(qmin, qmax).to(torch.int8)
    return scale, zero


def reference_ste(w, s, z, bits):
    """STE with a clipping mask written with plain autograd (per-channel)."""
    qmin, qmax = int_range(bits)
    u = w / s + z
    clamped = torch.clamp(u, qmin, qmax)
    q = clamped + (torch.round(clamped) - clamped).detach()
    return (q - z) * s


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [64, 128, None])
@pytest.mark.parametrize("symmetric", [True, False])
def test_forward_is_bit_identical_to_compressed_tensors(dtype, bits, group, symmetric):
    torch.manual_seed(bits * 7 + (group or 0))
    w = torch.randn(64, 256, dtype=dtype) * 0.05
    scale, zero = minmax_qparams(w, bits, group, symmetric)
    scale = scale * 0.8  # clip some weights, so the clamp matters
    strategy = "group" if group else "channel"
    args = QuantizationArgs(num_bits=bits, symmetric=symmetric, strategy=strategy, group_size=group)
    expected = fake_quantize(w, scale, zero, args)
    assert torch.equal(fake_quantize_weight(w, scale, zero, bits, group), expected)
    # fp32 master weights quantized "in" the checkpoint dtype give the same numbers
    assert torch.equal(fake_quantize_weight(w.float(), scale.float(), zero, bits, group, dtype=dtype), expected)


def test_several_weights_at_once_give_each_weight_alone():
    torch.manual_seed(0)
    weights = [(torch.randn(rows, 256) * 0.05).requires_grad_(True) for rows in (8, 24, 16)]
    pairs = [minmax_qparams(w.detach(), 3, 64, symmetric=False) for w in weights]
    scales = [(s * 0.8).requires_grad_(True) for s, _ in pairs]
    zeros = [z.float() for _, z in pairs]
    together = fake_quantize_weights(weights, scales, zeros, 3, 64)
    sum(out.square().sum() for out in together).backward()
    for w, s, z, out in zip(weights, scales, zeros, together, strict=True):
        alone_w, alone_s = w.detach().clone().requires_grad_(True), s.detach().clone().requires_grad_(True)
        alone = fake_quantize_weight(alone_w, alone_s, z, 3, 64)
        alone.square().sum().backward()
        assert torch.equal(out, alone) and torch.equal(w.grad, alone_w.grad) and torch.equal(s.grad, alone_s.grad)
    with pytest.raises(ValueError, match="one group width"):
        fake_quantize_weights([torch.zeros(4, 64), torch.zeros(4, 128)], [torch.ones(4, 1)] * 2, None, 3, None)


def test_weight_gradient_passes_only_inside_the_range():
    w = torch.tensor([[-2.0, -0.3, 0.0, 0.26, 0.9, 5.0]], requires_grad=True)
    scale = torch.tensor([[0.25]])
    zero = torch.tensor([[0]], dtype=torch.int8)
    out = fake_quantize_weight(w, scale, zero, num_bits=3, group_size=None)  # range [-4, 3] * 0.25 = [-1, 0.75]
    assert out.tolist() == [[-1.0, -0.25, 0.0, 0.25, 0.75, 0.75]]
    out.sum().backward()
    assert w.grad.tolist() == [[0.0, 1.0, 1.0, 1.0, 0.0, 0.0]]


@pytest.mark.parametrize("group", [32, None])
def test_scale_and_zero_point_gradients_match_the_autograd_reference(group):
    torch.manual_seed(0)
    w = (torch.randn(8, 64, dtype=torch.float64) * 0.1).requires_grad_(True)
    scale, zero = minmax_qparams(w.detach(), 3, group, symmetric=False)
    scale = (scale * 0.7).requires_grad_(True)
    zero = zero.double().requires_grad_(True)
    grad = torch.randn(8, 64, dtype=torch.float64)

    (fake_quantize_weight(w, scale, zero, 3, group) * grad).sum().backward()
    ours = (w.grad.clone(), scale.grad.clone(), zero.grad.clone())
    for t in (w, scale, zero):
        t.grad = None
    g = group or 64
    expand = lambda t: t.repeat_interleave(g, dim=1)  # noqa: E731
    (reference_ste(w, expand(scale), expand(zero), 3) * grad).sum().backward()
    assert torch.allclose(ours[0], w.grad, atol=1e-12)
    assert torch.allclose(ours[1], scale.grad, atol=1e-10)
    assert torch.allclose(ours[2], zero.grad, atol=1e-10)
    assert ours[1].abs().sum() > 0 and ours[2].abs().sum() > 0


def test_gradient_reaches_fp32_masters_through_the_dtype_cast():
    w = (torch.randn(4, 128) * 0.02).requires_grad_(True)
    scale, zero = minmax_qparams(w.detach().bfloat16(), 4, 128, symmetric=True)
    out = fake_quantize_weight(w, scale.float(), zero, 4, 128, dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert w.grad.dtype == torch.float32 and w.grad.abs().sum() > 0


def test_activation_fake_quant_matches_compressed_tensors_and_passes_gradients():
    from compressed_tensors.quantization.utils import compute_dynamic_scales_and_zp

    args = QuantizationArgs(num_bits=4, strategy="token", symmetric=False, dynamic=True)
    x = torch.randn(2, 5, 32, requires_grad=True)
    out = fake_quantize_activation(x, args)
    scale, zero = compute_dynamic_scales_and_zp(value=x.detach(), args=args, module=torch.nn.Module())
    assert torch.equal(out, fake_quantize(x.detach(), scale, zero, args))
    assert not torch.equal(out, x)
    out.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_bits", [4, 8])
def test_symmetric_per_token_fast_path_is_bit_identical_to_compressed_tensors(dtype, num_bits):
    from compressed_tensors.quantization.utils import compute_dynamic_scales_and_zp

    from rqat_sdk.ops.fake_quant import symmetric_per_token_fake_quant

    args = QuantizationArgs(num_bits=num_bits, strategy="token", symmetric=True, dynamic=True)
    torch.manual_seed(num_bits)
    x = (torch.randn(3, 9, 64) * torch.logspace(-3, 3, 9)[None, :, None]).to(dtype)
    x[0, 0] = 0  # a zero token: compressed-tensors' epsilon scale
    x[1, 1, :8] = torch.tensor([7.5, -7.5, 3.5, 2.5, -0.5, 0.5, 1.5, -8.0]).to(dtype)  # ties at 4 bits
    x[1, 1, 8:] = 0
    reference = fake_quantize(x, *compute_dynamic_scales_and_zp(value=x, args=args, module=torch.nn.Module()), args)
    assert torch.equal(symmetric_per_token_fake_quant(x, num_bits), reference)
    assert torch.equal(fake_quantize_activation(x, args), reference)
    flat = x.reshape(27, 64)  # 2-D: compressed-tensors' 'token' strategy is one scale for the tensor
    scale, zero_point = compute_dynamic_scales_and_zp(value=flat, args=args, module=torch.nn.Module())
    flat_reference = fake_quantize(flat, scale, zero_point, args)
    assert torch.equal(fake_quantize_activation(flat, args), flat_reference)


def test_ste_helpers_are_exact_forward_and_identity_backward():
    x = torch.tensor([-3.7, -0.5, 0.49, 2.5, 7.2], requires_grad=True)
    assert torch.equal(round_ste(x), torch.round(x.detach()))
    assert torch.equal(clamp_ste(x, -1.0, 1.0), torch.clamp(x.detach(), -1.0, 1.0))
    (round_ste(x) + clamp_ste(x, -1.0, 1.0)).sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, 2.0))
