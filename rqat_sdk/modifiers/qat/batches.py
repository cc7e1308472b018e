"""Deterministic batches: which examples a training step reads depends only on the seed and the step.

Epoch ``e`` visits the examples in the order of a permutation seeded with ``seed + e``; step ``k`` takes the
``batch_size`` examples at positions ``k * batch_size ...`` of that endless stream, each rank takes every
``world``-th of them, and splits its share into micro-batches. Resuming at step ``k`` therefore needs no
data-loader state, and a resumed run reads exactly what an uninterrupted one would.

Micro-batches are right-padded, or packed into one row with position ids that restart at every example
(transformers then masks attention across examples).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from rqat_sdk.data import IGNORE_INDEX

if TYPE_CHECKING:
    from datasets import Dataset


class StepBatches:
    def __init__(
        self,
        examples: Dataset,
        *,
        batch_size: int,
        micro_batch_size: int,
        seed: int,
        pad_token_id: int,
        packing: bool,
        rank: int = 0,
        world_size: int = 1,
    ):
        per_rank, remainder = divmod(batch_size, world_size)
        if remainder or per_rank % micro_batch_size:
            raise ValueError(
                f"batch_size {batch_size} must split evenly into {world_size} rank(s) x micro-batches of "
                f"{micro_batch_size}"
            )
        self.rows = [(list(r["input_ids"]), list(r["labels"])) for r in examples]
        self.batch_size = batch_size
        self.micro_batch_size = micro_batch_size
        self.seed = seed
        self.pad_token_id = pad_token_id
        self.packing = packing
        self.rank = rank
        self.world_size = world_size
        self._orders: dict[int, list[int]] = {}

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._orders = {epoch: torch.randperm(len(self.rows), generator=generator).tolist()}
        return self._orders[epoch]

    def indices(self, step: int) -> list[int]:
        """The example indices this rank reads at ``step``."""
        n = len(self.rows)
        chosen = []
        for position in range(step * self.batch_size, (step + 1) * self.batch_size):
            chosen.append(self._order(position // n)[position % n])
        return chosen[self.rank :: self.world_size]

    def micro_batches(self, step: int, device: torch.device) -> list[dict[str, torch.Tensor]]:
        """This rank's share of ``step``, in micro-batches. Split into several padded micro-batches, the share is
        taken by length, so that each pads to a length close to its own examples'; the loss is normalised over
        the whole step's target tokens, so the grouping changes no gradient, only how much padding is computed.
        A share that is one micro-batch keeps its order (sorting would save nothing)."""
        mine = self.indices(step)
        if not self.packing and len(mine) > self.micro_batch_size:
            mine = sorted(mine, key=lambda i: len(self.rows[i][0]))
        groups = [mine[i : i + self.micro_batch_size] for i in range(0, len(mine), self.micro_batch_size)]
        collate = self._packed if self.packing else self._padded
        return [{k: v.to(device) for k, v in collate([self.rows[i] for i in group]).items()} for group in groups]

    def _padded(self, rows: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
        length = max(len(ids) for ids, _ in rows)
        ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, (row_ids, row_labels) in enumerate(rows):
            ids[i, : len(row_ids)] = torch.tensor(row_ids)
            labels[i, : len(row_labels)] = torch.tensor(row_labels)
            mask[i, : len(row_ids)] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    def _packed(self, rows: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
        ids, labels, positions = [], [], []
        for row_ids, row_labels in rows:
            ids += row_ids
            # The first token of an example is never a target: nothing before it belongs to it.
            labels += [IGNORE_INDEX] + row_labels[1:]
            positions += list(range(len(row_ids)))
        return {
            "input_ids": torch.tensor([ids]),
            "labels": torch.tensor([labels]),
            "position_ids": torch.tensor([positions]),
        }
