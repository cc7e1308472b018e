"""Watching the policy: the cold-start reward probe and the training curves of a GRPO stage."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from rqat_sdk.generation import Sampling, generate

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from rqat_sdk.modifiers.rl.rewards import RewardFunction


def plot_training(log_file: Path, path: Path) -> None:
    """Reward, response length and entropy over GRPO steps (the seed paper's Figure 4), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = [json.loads(line) for line in log_file.read_text().splitlines()]
    panels = [("reward", "mean reward"), ("response_length", "response length (tokens)"), ("entropy", "entropy")]
    figure, axes = plt.subplots(1, len(panels), figsize=(10, 2.8), dpi=150)
    for axis, (key, title) in zip(axes, panels, strict=True):
        points = [(e["step"], e[key]) for e in entries if key in e]
        if points:
            axis.plot(*zip(*points, strict=True), marker="o", markersize=2, linewidth=1.2, color="#4C72B0")
        axis.set_title(title, fontsize=9)
        axis.set_xlabel("step", fontsize=8)
        axis.tick_params(labelsize=7)
        axis.spines[["top", "right"]].set_visible(False)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def mean_reward(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Dataset,
    rewards: list[RewardFunction],
    weights: list[float] | None,
    *,
    max_new_tokens: int,
    temperature: float,
) -> float:
    """The mean weighted reward of one sampled completion per prompt: the cold-start probe."""

    sampling = Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=1.0)
    completions = [c.text for c in generate(model, tokenizer, list(prompts["prompt"]), sampling, batch_size=16, seed=0)]
    weights = weights or [1.0] * len(rewards)
    columns = {k: list(prompts[k]) for k in prompts.column_names if k != "prompt"}
    total = torch.zeros(len(completions))
    for weight, reward in zip(weights, rewards, strict=True):
        total += weight * torch.tensor(reward(list(prompts["prompt"]), completions, **columns), dtype=torch.float32)
    return float(total.mean())
