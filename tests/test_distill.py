"""Distillation losses: textbook references, and the chunked LM-head path against full logits."""

import math

import pytest
import torch
import torch.nn.functional as F

from rqat_sdk.ops.distill import LossSpec, lm_head_loss, token_losses

V, D, N = 97, 16, 23


def textbook(z_s, z_t, spec):
    """Each divergence from its definition, in float64."""
    t = spec.temperature
    p = F.softmax(z_t.double() / t, -1)
    q = F.softmax(z_s.double() / t, -1)
    kl = lambda a, b: (a * (a.log() - b.log())).sum(-1)  # noqa: E731
    if spec.divergence == "forward_kl":
        return kl(p, q) * t * t
    if spec.divergence == "reverse_kl":
        return kl(q, p) * t * t
    if spec.divergence == "jsd":
        m = spec.beta * p + (1 - spec.beta) * q
        return (spec.beta * kl(p, m) + (1 - spec.beta) * kl(q, m)) * t * t
    if spec.divergence == "topk_kl":
        top, index = torch.topk(z_t.double(), spec.top_k, -1)
        p_k = F.softmax(top / t, -1)
        return (p_k * (p_k.log() - q.gather(-1, index).log())).sum(-1) * t * t
    raise AssertionError


SPECS = [
    LossSpec("forward_kl"),
    LossSpec("forward_kl", temperature=2.0),
    LossSpec("reverse_kl", temperature=0.7),
    LossSpec("jsd", beta=0.3),
    LossSpec("topk_kl", top_k=5),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.divergence}-T{s.temperature}")
def test_divergences_match_their_definitions(spec):
    torch.manual_seed(0)
    z_s, z_t = torch.randn(N, V) * 3, torch.randn(N, V) * 3
    assert torch.allclose(token_losses(z_s, z_t, None, spec).double(), textbook(z_s, z_t, spec), atol=1e-5)


def test_divergences_vanish_when_student_equals_teacher():
    z = torch.randn(N, V)
    for spec in SPECS[:4]:
        assert token_losses(z, z, None, spec).abs().max() < 1e-5
    assert token_losses(z, z, None, LossSpec("topk_kl", top_k=V)).abs().max() < 1e-5


def test_cross_entropy():
    z, targets = torch.randn(N, V), torch.randint(0, V, (N,))
    expected = -F.log_softmax(z.double(), -1).gather(-1, targets[:, None]).squeeze(-1)
    assert torch.allclose(token_losses(z, None, targets, LossSpec("ce")).double(), expected, atol=1e-5)


@pytest.mark.parametrize("spec", [*SPECS, LossSpec("ce")], ids=lambda s: s.divergence)
@pytest.mark.parametrize("chunk", [4, 1024])
def test_chunked_head_loss_equals_full_logits(spec, chunk):
    torch.manual_seed(1)
    spec = LossSpec(spec.divergence, spec.temperature, spec.beta, spec.top_k, chunk_size=chunk)
    hidden = torch.randn(N, D, requires_grad=True)
    weight = torch.randn(V, D, requires_grad=True)
    teacher_hidden, teacher_weight = torch.randn(N, D), torch.randn(V, D)
    targets = torch.randint(0, V, (N,))
    token_weights = (torch.rand(N) > 0.3).float() / 17.0  # a mask, normalised

    loss = lm_head_loss(hidden, weight, token_weights, spec, teacher_hidden=teacher_hidden,
                        teacher_weight=teacher_weight, targets=targets)
    (loss * 2.5).backward()
    ours = (loss.detach(), hidden.grad.clone(), weight.grad.clone())
    hidden.grad = weight.grad = None

    losses = token_losses(hidden @ weight.T, teacher_hidden @ teacher_weight.T, targets, spec)
    reference = (losses * token_weights).sum()
    (reference * 2.5).backward()
    assert torch.allclose(ours[0], reference.detach(), atol=1e-5)
    assert torch.allclose(ours[1], hidden.grad, atol=1e-5)
    assert torch.allclose(ours[2], weight.grad, atol=1e-5)
    masked = token_weights == 0
    assert torch.all(ours[1][masked] == 0)


def test_head_loss_under_bf16_autocast_is_close_to_fp32():
    torch.manual_seed(2)
    hidden, weight = torch.randn(N, D), torch.randn(V, D) * 0.3
    teacher_hidden = hidden + 0.1 * torch.randn(N, D)
    weights = torch.full((N,), 1.0 / N)
    spec = LossSpec("forward_kl")
    exact = lm_head_loss(hidden, weight, weights, spec, teacher_hidden=teacher_hidden, teacher_weight=weight)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        approx = lm_head_loss(hidden, weight, weights, spec, teacher_hidden=teacher_hidden, teacher_weight=weight)
    assert approx.dtype == torch.float32 and math.isclose(approx.item(), exact.item(), rel_tol=0.05)
