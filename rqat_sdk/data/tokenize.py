"""Tokenize normalised examples with the model's chat template.

Each row becomes ``input_ids``, ``attention_mask`` and ``labels``; labels are -100 except on the last
assistant message, so that training losses (KD, SFT) count response tokens only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

from rqat_sdk.errors import DatasetError

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100


def tokenize_examples(examples: Dataset, tokenizer: PreTrainedTokenizerBase, max_seq_length: int) -> Dataset:
    from datasets import Dataset

    rows = [_tokenize_row(dict(row), tokenizer, max_seq_length) for row in examples]
    return Dataset.from_list(rows)


def has_response(row: dict[str, Any]) -> bool:
    """Whether training counts any token of ``row``: plain text, or a chat ending with the assistant's turn."""
    return bool(row.get("text")) or (bool(row.get("messages")) and row["messages"][-1]["role"] == "assistant")


def check_trainable(examples: Dataset, field: str) -> None:
    """Refuse examples with no response to train on: the loss and its gradient would be zero, and the stage
    would run to the end and export an unchanged model. ``field`` names the source in the message."""
    if not any(has_response(row) for row in examples):
        raise DatasetError(
            f"{field}: none of its {len(examples)} examples has a response to train on (a final assistant message, "
            f"a response/completion/solution/answer column, or plain text); training counts response tokens only"
        )


def check_trainable_tokens(data: Dataset, field: str, max_seq_length: int) -> None:
    """Refuse tokenized examples whose responses were all cut off by truncation to ``max_seq_length``."""
    if not any(label != IGNORE_INDEX for labels in data["labels"] for label in labels):
        raise DatasetError(
            f"{field}: truncated to max_seq_length {max_seq_length} tokens, no example keeps a response token to "
            f"train on; raise the stage's data.max_seq_length or shorten the prompts"
        )


def _tokenize_row(row: dict[str, Any], tokenizer: PreTrainedTokenizerBase, max_len: int) -> dict[str, list[int]]:
    if row.get("messages"):
        text, response_start = _render_chat(row["messages"], tokenizer)
        special = False  # the chat template already writes any BOS token
    else:
        text, response_start, special = row["text"], 0, True
    encoded = tokenizer(
        text,
        add_special_tokens=special,
        truncation=True,
        max_length=max_len,
        return_offsets_mapping=tokenizer.is_fast,
    )
    ids = list(encoded["input_ids"])
    if tokenizer.is_fast:
        in_response = [start >= response_start for start, _ in encoded["offset_mapping"]]
    else:
        prompt_len = len(tokenizer(text[:response_start], add_special_tokens=special)["input_ids"])
        in_response = [i >= prompt_len for i in range(len(ids))]
    labels = [tok if keep else IGNORE_INDEX for tok, keep in zip(ids, in_response, strict=True)]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def chat_text(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], *, add_generation_prompt: bool = False
) -> str:
    """``tokenizer.apply_chat_template(messages, tokenize=False)``: the templated text. (transformers annotates
    the result as any of the forms its other arguments select, so type checkers need the cast.)"""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return cast(str, text)


def _render_chat(messages: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase) -> tuple[str, int]:
    """The templated chat and the character offset where the final assistant message starts."""
    if not getattr(tokenizer, "chat_template", None):
        raise DatasetError(
            f"the tokenizer ({type(tokenizer).__name__}, {tokenizer.name_or_path or 'in memory'}) has no chat "
            f"template, but the data holds chat messages; use a tokenizer with a chat template, or give the data "
            f"as plain 'text' rows"
        )
    text = chat_text(tokenizer, messages)
    if messages[-1]["role"] != "assistant":
        return text, len(text)  # no response: nothing to train on, all of it to calibrate on
    prompt = chat_text(tokenizer, messages[:-1], add_generation_prompt=True)
    if text.startswith(prompt):
        return text, len(prompt)
    # Templates that rewrite earlier turns (e.g. dropping reasoning) break the prefix property;
    # fall back to the last occurrence of the response itself.
    found = text.rfind(messages[-1]["content"])
    return text, found if found >= 0 else len(text)
