"""Perplexity on plain text: how much of a model's general-domain language modelling a compression kept.

The seed paper's domain finding (calibrate and train on reasoning traces, and general text suffers) needs a
general-domain measure beside pass@1; ``wikipedia:heldout`` paragraphs are never drawn for calibration or
training (:data:`rqat_sdk.data.sources.WIKIPEDIA_HELD_OUT`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@torch.no_grad()
def perplexity(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    *,
    max_length: int = 512,
    batch_size: int = 16,
) -> float:
    """``exp`` of the mean next-token negative log-likelihood over every token of ``texts`` (each truncated
    to ``max_length`` tokens, with the tokenizer's special tokens, e.g. Gemma's BOS)."""
    if not texts:
        raise ValueError("perplexity needs at least one text")
    rows = [tokenizer(text, truncation=True, max_length=max_length)["input_ids"] for text in texts]
    rows.sort(key=len)  # batches of similar length waste little on padding
    total_nll, total_tokens = 0.0, 0
    device = next(model.parameters()).device
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        width = max(len(r) for r in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long, device=device)
        mask = torch.zeros_like(ids)
        for i, row in enumerate(batch):
            ids[i, :len(row)] = torch.tensor(row, device=device)
            mask[i, :len(row)] = 1
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        targets = ids[:, 1:]
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
        kept = mask[:, 1:].bool()
        total_nll += nll[kept].sum().item()
        total_tokens += int(kept.sum().item())
    if total_tokens == 0:
        raise ValueError("the texts have no token to predict (each needs at least two tokens)")
    return math.exp(total_nll / total_tokens)
