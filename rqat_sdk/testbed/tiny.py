"""Tiny models and tokenizers built offline, deterministically: the SDK's embedded default and test fixtures.

No Hugging Face hub access is needed: the tokenizer is a byte-level BPE trained on reasoning-gym questions
and the model is built from a config. Layer widths are multiples of 128 so that every weight-only preset
(group 64 or 128) applies.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from rqat_sdk.data.sources import REASONING_INSTRUCTION

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS_TASKS = ("chain_sum", "basic_arithmetic", "leg_counting", "simple_equations")

Architecture = Literal["qwen3", "llama"]


def build_tokenizer(
    vocab_size: int = 1024,
    corpus_size: int = 400,
    seed: int = 0,
    corpus: list[str] | None = None,
    split_digits: bool = False,
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with a ChatML template, trained on ``corpus`` or reasoning-gym text.

    ``split_digits`` keeps every digit a token of its own (as Qwen's tokenizer does), which small models
    need to learn arithmetic.
    """
    from transformers import PreTrainedTokenizerFast

    texts = [REASONING_INSTRUCTION, "Let me think step by step. So the answer is \\boxed{42}."]
    if corpus is not None:
        texts += corpus
    else:
        import reasoning_gym

        for t, task in enumerate(CORPUS_TASKS):
            for entry in reasoning_gym.create_dataset(task, size=corpus_size // len(CORPUS_TASKS), seed=seed + t):
                texts.append(f"{entry['question']}\n\\boxed{{{entry['answer']}}}")
    bpe = Tokenizer(models.BPE(unk_token=None))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.pre_tokenizer = (
        pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        if split_digits
        else byte_level
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_model(
    tokenizer: PreTrainedTokenizerFast,
    architecture: Architecture = "qwen3",
    *,
    hidden_size: int = 256,
    intermediate_size: int = 512,
    num_layers: int = 2,
    seed: int = 0,
) -> PreTrainedModel:
    """A randomly initialised causal LM of the given architecture, sized for CPU tests."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden_size // 4,
        max_position_embeddings=2048,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    if architecture == "qwen3":
        return Qwen3ForCausalLM(Qwen3Config(**common, tie_word_embeddings=True))
    if architecture == "llama":
        return LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=False))
    raise ValueError(f"architecture {architecture!r} is not one of qwen3, llama")


def write_tiny_model(directory: str | os.PathLike, architecture: Architecture = "qwen3", seed: int = 0) -> Path:
    """Build a tokenizer and model and save both to ``directory`` (a from_pretrained-loadable folder)."""
    directory = Path(directory)
    tokenizer = build_tokenizer(seed=seed)
    model = build_model(tokenizer, architecture, seed=seed)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
