"""StepBatches: which examples a step reads, and how its micro-batches are cut."""

from __future__ import annotations

import torch

from rqat_sdk.data import IGNORE_INDEX
from rqat_sdk.modifiers.qat.batches import StepBatches


def _examples(lengths: list[int]) -> list[dict[str, list[int]]]:
    return [{"input_ids": [n] * n, "labels": [n] * n} for n in lengths]  # each token names its example's length


def _batches(lengths: list[int], **overrides) -> StepBatches:
    settings = {"batch_size": 8, "micro_batch_size": 2, "seed": 3, "pad_token_id": 0, "packing": False}
    return StepBatches(_examples(lengths), **{**settings, **overrides})


def test_padded_micro_batches_hold_the_steps_examples_grouped_by_length():
    lengths = [3, 40, 5, 37, 4, 39, 6, 38, 7, 36, 2, 35]
    batches = _batches(lengths)
    for step in range(3):
        micro = batches.micro_batches(step, torch.device("cpu"))
        read = sorted(int(row[0]) for batch in micro for row in batch["input_ids"])
        assert read == sorted(lengths[i] for i in batches.indices(step))  # the same examples, each once
        padded = sum(batch["input_ids"].numel() for batch in micro)
        shuffled = [batches.indices(step)[i:i + 2] for i in range(0, 8, 2)]
        assert padded <= sum(2 * max(lengths[i] for i in pair) for pair in shuffled)
        for batch in micro:  # a micro-batch pads only to its own longest example, and masks what it pads
            real = batch["attention_mask"].sum(1)
            assert batch["input_ids"].shape[1] == real.max()
            assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()


def test_short_and_long_examples_do_not_share_a_micro_batch_when_the_step_has_both():
    batches = _batches([2, 50, 3, 51, 4, 52, 5, 53])
    micro = batches.micro_batches(0, torch.device("cpu"))
    assert [batch["input_ids"].shape[1] for batch in micro] == [3, 5, 51, 53]


def test_a_share_that_is_one_micro_batch_keeps_the_steps_order():
    batches = _batches([2, 50, 3, 51, 4, 52, 5, 53], micro_batch_size=8)
    (micro,) = batches.micro_batches(0, torch.device("cpu"))
    assert [int(row[0]) for row in micro["input_ids"]] == [[2, 50, 3, 51, 4, 52, 5, 53][i] for i in batches.indices(0)]


def test_packed_micro_batches_keep_the_steps_order():
    batches = _batches([3, 4, 5, 6, 7, 8, 9, 10], packing=True)
    micro = batches.micro_batches(0, torch.device("cpu"))
    read = [int(micro_batch["input_ids"][0, 0]) for micro_batch in micro]
    assert read == [len(_examples([3, 4, 5, 6, 7, 8, 9, 10])[i]["input_ids"]) for i in batches.indices(0)[::2]]
