"""A fused Triton kernel for the LM-head loss of one chunk of rows: forward KL or cross-entropy, and the
gradient with respect to the student's logits, in two passes over each row.

The PyTorch path (:func:`rqat_sdk.ops.distill.token_losses` and autograd) makes a dozen full passes over a
chunk's fp32 logits (log-softmax of both models, the product, the sum, then as many backward); at a
152k vocabulary that is most of the KD step's loss time. Here each row is read twice: the first pass keeps
online log-sum-exps of both models and, for KL, the running ``sum exp(a_t - m_t) * (a_t - a_s)``; the
second writes the gradient, in place over the student's logits (same dtype), which are no longer needed.

With ``a = z / T``, ``p = softmax(a_t)``, ``q = softmax(a_s)`` and the token's weight ``w``:

- forward KL: ``loss = w T^2 (sum p (a_t - a_s) - lse_t + lse_s)``, ``grad = w T (q - p)``;
- cross-entropy (T = 1): ``loss = w (lse_s - a_s[y])``, ``grad = w (q - onehot(y))``.

The results equal the PyTorch path's to fp32 rounding (tested).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK = 4096  # vocabulary entries per loop step


@triton.jit
def _head_loss_kernel(
    s_ptr, t_ptr, target_ptr, weight_ptr, loss_ptr, vocab, stride_s, stride_t, inv_temp, temp,
    BLOCK: tl.constexpr, KL: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * stride_s
    t_row = t_ptr + row * stride_t
    w = tl.load(weight_ptr + row)
    m_s = -float("inf")
    d_s = 0.0
    m_t = -float("inf")
    d_t = 0.0
    acc = 0.0
    for start in range(0, vocab, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < vocab
        a_s = tl.load(s_row + cols, mask=mask, other=-float("inf")).to(tl.float32) * inv_temp
        new_m_s = tl.maximum(m_s, tl.max(a_s, axis=0))
        d_s = d_s * tl.exp(m_s - new_m_s) + tl.sum(tl.exp(a_s - new_m_s), axis=0)
        m_s = new_m_s
        if KL:
            a_t = tl.load(t_row + cols, mask=mask, other=-float("inf")).to(tl.float32) * inv_temp
            new_m_t = tl.maximum(m_t, tl.max(a_t, axis=0))
            rescale = tl.exp(m_t - new_m_t)
            e = tl.exp(a_t - new_m_t)
            acc = acc * rescale + tl.sum(tl.where(mask, e * (a_t - a_s), 0.0), axis=0)
            d_t = d_t * rescale + tl.sum(e, axis=0)
            m_t = new_m_t
    lse_s = m_s + tl.log(d_s)
    if KL:
        lse_t = m_t + tl.log(d_t)
        loss = w * temp * temp * (acc / d_t - lse_t + lse_s)
        scale = w * temp
    else:
        target = tl.load(target_ptr + row)
        loss = w * (lse_s - tl.load(s_row + target).to(tl.float32))
        scale = w
    tl.store(loss_ptr + row, loss)
    for start in range(0, vocab, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < vocab
        a_s = tl.load(s_row + cols, mask=mask, other=0.0).to(tl.float32) * inv_temp
        grad = tl.exp(a_s - lse_s)
        if KL:
            a_t = tl.load(t_row + cols, mask=mask, other=0.0).to(tl.float32) * inv_temp
            grad = grad - tl.exp(a_t - lse_t)
        else:
            grad = tl.where(cols == target, grad - 1.0, grad)
        tl.store(s_row + cols, (grad * scale).to(s_ptr.dtype.element_ty), mask=mask)


def head_loss_and_grad_(
    logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    targets: torch.Tensor | None,
    token_weights: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """Weighted loss sum (fp32 scalar) of forward KL (with ``teacher_logits``) or cross-entropy (with
    ``targets``) over the rows of ``logits`` (N, V); overwrites ``logits`` with the loss's gradient."""
    rows, vocab = logits.shape
    kl = teacher_logits is not None
    losses = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows == 0:
        return losses.sum()
    if logits.stride(-1) != 1 or (teacher_logits is not None and teacher_logits.stride(-1) != 1):
        raise ValueError("the logits' last dimension must be contiguous")
    _head_loss_kernel[(rows,)](
        logits,
        teacher_logits if kl else logits,
        targets if not kl else token_weights,
        token_weights.float().contiguous(),
        losses,
        vocab,
        logits.stride(0),
        teacher_logits.stride(0) if teacher_logits is not None else 0,
        1.0 / temperature if kl else 1.0,
        temperature if kl else 1.0,
        BLOCK=_BLOCK,
        KL=kl,
        num_warps=8,
    )
    return losses.sum()
