"""Distillation and cross-entropy losses on the LM head, computed in token chunks.

Full-vocabulary fp32 logits for a 4 x 2048-token batch of a 152k-vocabulary model take 5 GB per model; the
student's, the teacher's and their gradients would take more memory than the rest of the training step.
:func:`lm_head_loss` never holds more than one chunk of logits: it computes each chunk's logits from the
final hidden states, the loss and its gradient with respect to those logits (by autograd on the chunk),
and from that the gradients for the hidden states and the head's weight, all during the forward pass.

The per-token divergences are small pure functions on logits; :func:`token_losses` is also the reference
that the chunked path is tested against.

Divergences, with teacher distribution ``p = softmax(z_t / T)`` and student ``q = softmax(z_s / T)``, each
multiplied by ``T**2`` so that gradients keep their scale across temperatures:

- ``forward_kl``: KL(p || q), the seed paper's default (mass-covering);
- ``reverse_kl``: KL(q || p) (mode-seeking);
- ``jsd``: beta * KL(p || m) + (1 - beta) * KL(q || m), m = beta * p + (1 - beta) * q (GKD's generalised JSD);
- ``topk_kl``: KL(p_k || q) over the teacher's ``top_k`` tokens, p_k renormalised over them;
- ``ce``: cross-entropy on the data's next tokens (SFT), no teacher, no temperature.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

from rqat_sdk.ops import use_triton

Divergence = Literal["forward_kl", "reverse_kl", "jsd", "topk_kl", "ce"]


@dataclass(frozen=True)
class LossSpec:
    divergence: Divergence = "forward_kl"
    temperature: float = 1.0
    beta: float = 0.5
    top_k: int = 64
    chunk_size: int = 1024


def token_losses(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    targets: torch.Tensor | None,
    spec: LossSpec,
) -> torch.Tensor:
    """Per-token loss (fp32) for logits of shape (N, V)."""
    z_s = student_logits.float()
    if spec.divergence == "ce":
        if targets is None:
            raise ValueError("cross-entropy needs targets")
        return F.cross_entropy(z_s, targets, reduction="none")
    if teacher_logits is None:
        raise ValueError(f"{spec.divergence} needs teacher logits")
    t = spec.temperature
    z_t = teacher_logits.float()
    log_q = F.log_softmax(z_s / t, dim=-1)
    if spec.divergence == "topk_kl":
        top, index = torch.topk(z_t, spec.top_k, dim=-1)
        log_p_k = F.log_softmax(top / t, dim=-1)
        loss = (log_p_k.exp() * (log_p_k - log_q.gather(-1, index))).sum(-1)
        return loss * t * t
    log_p = F.log_softmax(z_t / t, dim=-1)
    if spec.divergence == "forward_kl":
        loss = (log_p.exp() * (log_p - log_q)).sum(-1)
    elif spec.divergence == "reverse_kl":
        loss = (log_q.exp() * (log_q - log_p)).sum(-1)
    elif spec.divergence == "jsd":
        b = spec.beta
        log_m = torch.logsumexp(torch.stack([log_p + math.log(b), log_q + math.log(1 - b)]), dim=0)
        loss = b * (log_p.exp() * (log_p - log_m)).sum(-1) + (1 - b) * (log_q.exp() * (log_q - log_m)).sum(-1)
    else:
        raise ValueError(f"unknown divergence {spec.divergence!r}")
    return loss * t * t


def lm_head_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    token_weights: torch.Tensor,
    spec: LossSpec,
    *,
    teacher_hidden: torch.Tensor | None = None,
    teacher_weight: torch.Tensor | None = None,
    targets: torch.Tensor | None = None,
) -> torch.Tensor:
    """``sum_i token_weights[i] * loss_i`` over the rows of ``hidden`` (N, d), chunk by chunk.

    ``weight`` is the student's LM head (V, d). Rows with zero weight (prompt and padding positions) are
    skipped before any logits are computed. Gradients flow to ``hidden`` and ``weight``.
    """
    rows = token_weights.nonzero().squeeze(-1)
    pick = (lambda t: t.index_select(0, rows)) if rows.numel() < token_weights.numel() else (lambda t: t)
    return _ChunkedHeadLoss.apply(
        hidden,
        weight,
        rows,
        pick(token_weights).float(),
        pick(teacher_hidden) if teacher_hidden is not None else None,
        teacher_weight,
        pick(targets) if targets is not None else None,
        spec,
    )


def _chunk_loss_and_grad(logits, teacher_logits, targets, token_weights, spec: LossSpec):
    """The chunk's weighted loss sum and its gradient with respect to ``logits`` (in their dtype).

    Forward KL and cross-entropy use the fused Triton kernel on CUDA (same values to fp32 rounding); the
    other divergences, and every divergence on CPU, use autograd through :func:`token_losses`.
    """
    if spec.divergence in ("forward_kl", "ce") and use_triton(logits):
        # triton is optional (CUDA builds only) and imports at module level
        from rqat_sdk.ops.triton_distill import head_loss_and_grad_

        kl = spec.divergence == "forward_kl"
        loss = head_loss_and_grad_(logits, teacher_logits if kl else None, None if kl else targets, token_weights,
                                   spec.temperature)
        return loss, logits
    upcast = logits.float().requires_grad_(True)
    with torch.enable_grad():
        loss = (token_losses(upcast, teacher_logits, targets, spec) * token_weights).sum()
        (grad,) = torch.autograd.grad(loss, upcast)
    return loss.detach(), grad.to(logits.dtype)


class _ChunkedHeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, hidden, weight, rows, token_weights, teacher_hidden, teacher_weight, targets, spec):
        device = hidden.device
        compute = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else hidden.dtype
        with torch.autocast(device.type, enabled=False):
            w = weight.to(compute)
            w_t = teacher_weight.to(compute) if teacher_weight is not None else None
            h_all = (hidden.index_select(0, rows) if rows.numel() < hidden.shape[0] else hidden).to(compute)
            # Gradients accumulate in the compute dtype through addmm (fp32 inside the matmul), as the
            # unchunked lm_head backward would produce them.
            grad_h = torch.empty_like(h_all)
            grad_w = torch.zeros_like(w) if ctx.needs_input_grad[1] else None
            total = torch.zeros((), dtype=torch.float32, device=device)
            for start in range(0, h_all.shape[0], spec.chunk_size):
                part = slice(start, start + spec.chunk_size)
                h = h_all[part]
                logits = h @ w.T
                teacher_logits = None
                if teacher_hidden is not None:
                    assert w_t is not None, "teacher hidden states come with the teacher's lm_head weight"
                    teacher_logits = teacher_hidden[part].to(compute) @ w_t.T
                chunk_targets = targets[part] if targets is not None else None
                loss, grad_logits = _chunk_loss_and_grad(
                    logits, teacher_logits, chunk_targets, token_weights[part], spec
                )
                total += loss
                torch.mm(grad_logits, w, out=grad_h[part])
                if grad_w is not None:
                    grad_w.addmm_(grad_logits.T, h)
        if rows.numel() < hidden.shape[0]:
            grad_h = torch.zeros(hidden.shape, dtype=compute, device=device).index_copy_(0, rows, grad_h)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return total

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.dtypes
        grad_hidden = (grad_h * grad_output.to(grad_h.dtype)).to(hidden_dtype)
        grad_weight = (grad_w * grad_output.to(grad_w.dtype)).to(weight_dtype) if grad_w is not None else None
        return grad_hidden, grad_weight, None, None, None, None, None, None
