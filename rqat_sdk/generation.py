"""Batched sampling with transformers: the ``hf`` evaluation backend, and GRPO's cold-start probe."""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol, cast, get_args

import torch
from tqdm.auto import tqdm

from rqat_sdk.cuda_graph_decoding import decode, decoding_settings, graph_decoding_problem
from rqat_sdk.data.tokenize import chat_text

if TYPE_CHECKING:
    from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

FALLBACK_WARNING = "cuda_graph decoding: this generate call runs transformers' generate instead: %s"
"""What :func:`cuda_graph_decoding` logs (once per reason) for a call it hands to ``generate``."""


class _Generates(Protocol):
    """What :func:`generate` calls: a causal LM mixes in ``GenerationMixin``, which ``PreTrainedModel``, the type
    models are passed as, does not declare; without ``return_dict_in_generate`` it returns the token ids."""

    def generate(self, **kwargs: Any) -> torch.Tensor: ...


@dataclass(frozen=True)
class Completion:
    text: str
    tokens: int
    """Generated tokens, the end-of-sequence token included."""
    truncated: bool
    """True when generation hit ``max_new_tokens`` before the end-of-sequence token."""


CacheImplementation = Literal["dynamic", "static", "preallocated", "cuda_graph"]
"""How ``generate`` holds the KV cache (see :attr:`Sampling.cache_implementation`)."""
CACHE_IMPLEMENTATIONS: tuple[str, ...] = get_args(CacheImplementation)


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 1024
    temperature: float = 0.6
    top_p: float = 0.95
    greedy: bool = False
    cache_implementation: CacheImplementation = "dynamic"
    """``dynamic`` grows the KV cache token by token (a copy of the whole cache at every token);
    ``preallocated`` allocates it once per batch, writes in place and reads it without per-head copies
    (:mod:`rqat_sdk.preallocated_cache`; full-attention models only), with the same tokens; ``static``
    allocates it once at its full length, whose fixed shapes let transformers compile the decoding step on GPUs
    (the first batch pays the compile); ``cuda_graph`` decodes with rqat's own loop
    (:mod:`rqat_sdk.cuda_graph_decoding`): the preallocated cache read at its full length, each step replayed from
    a CUDA graph on GPUs, so that decoding does not wait on Python (full-attention models on SDPA attention; other
    models and options fall back to ``dynamic`` with a warning)."""


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[dict[str, str]]],
    sampling: Sampling,
    *,
    batch_size: int,
    seed: int,
) -> list[Completion]:
    """One completion per prompt, in order. Sampling is seeded per batch, so a run can be repeated."""
    texts = [render_prompt(tokenizer, prompt) for prompt in prompts]
    stops = stop_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    completions: list[Completion] = []
    was_training = model.training
    model.eval()
    # answers to long reasoning prompts take minutes: show answers and tokens per second beyond one batch
    bar = tqdm(total=len(texts), desc="generating", unit="answer", leave=False, disable=len(texts) <= batch_size)
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(
            texts[start : start + batch_size],
            return_tensors="pt",
            padding=True,
            padding_side="left",
            add_special_tokens=False,
        ).to(model.device)
        torch.manual_seed(seed * 1_000_003 + start)
        options: dict[str, Any] = {"do_sample": False} if sampling.greedy else {
            "do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": 0,
        }
        if sampling.cache_implementation == "static":
            options["cache_implementation"] = "static"
        decoding = (preallocated_kv_cache(model, sampling.max_new_tokens)
                    if sampling.cache_implementation == "preallocated"
                    else cuda_graph_decoding(model) if sampling.cache_implementation == "cuda_graph"
                    else contextlib.nullcontext())
        with decoding:
            output = cast(_Generates, model).generate(
                **batch, max_new_tokens=sampling.max_new_tokens, pad_token_id=pad, eos_token_id=stops, **options
            )
        for row in output[:, batch["input_ids"].shape[1] :].tolist():
            end = next((i for i, token in enumerate(row) if token in stops), None)
            kept = row[: end + 1] if end is not None else row
            text = cast(str, tokenizer.decode(kept, skip_special_tokens=True))  # one sequence: one str
            completions.append(Completion(text, len(kept), end is None))
        bar.update(len(output))
        bar.set_postfix(tok_s=f"{sum(c.tokens for c in completions) / max(bar.format_dict['elapsed'], 1e-9):.0f}")
    bar.close()
    model.train(was_training)
    return completions


def stop_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The tokens that end an answer: the generation config's (Gemma 3 ends a chat turn with
    ``<end_of_turn>``, not its ``<eos>``) and the tokenizer's EOS."""
    configured = getattr(model.generation_config, "eos_token_id", None)
    configured = [configured] if isinstance(configured, int) else list(configured or [])
    ids = [*configured, *([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])]
    if not ids:
        raise ValueError("neither the model's generation config nor the tokenizer names an end-of-sequence token")
    return list(dict.fromkeys(ids))


def render_prompt(tokenizer: PreTrainedTokenizerBase, prompt: list[dict[str, str]]) -> str:
    """The prompt as the model reads it: its chat template with the generation prompt, or the plain text."""
    if getattr(tokenizer, "chat_template", None):
        return chat_text(tokenizer, prompt, add_generation_prompt=True)
    return "\n".join(message["content"] for message in prompt)


@contextlib.contextmanager
def wrapped_generate(model: PreTrainedModel, wrap: Callable[[Callable[..., Any]], Callable[..., Any]]
                     ) -> Iterator[None]:
    """Inside the block, ``model.generate`` is ``wrap(model.generate)``: for the calls a trainer makes (trl's
    rollouts), which rqat does not write. An instance attribute shadows the class's method and is undone after;
    blocks nest."""
    own = model.__dict__.get("generate")
    original = cast(_Generates, model).generate
    model.__dict__["generate"] = functools.wraps(original)(wrap(original))
    try:
        yield
    finally:
        if own is not None:
            model.__dict__["generate"] = own
        else:
            del model.__dict__["generate"]


def preallocated_kv_cache(model: PreTrainedModel, max_new_tokens: int) -> contextlib.AbstractContextManager[None]:
    """Inside the block, each ``model.generate`` call decodes without copies of its KV cache
    (:mod:`rqat_sdk.preallocated_cache`): with a fresh :class:`~rqat_sdk.preallocated_cache.PreallocatedCache`
    for ``max_new_tokens`` (unless it brings a cache of its own), under
    :func:`~rqat_sdk.preallocated_cache.grouped_decode_attention`."""
    # transformers' cache and attention classes load lazily (import rqat_sdk loads torch alone)
    from rqat_sdk.preallocated_cache import PreallocatedCache, grouped_decode_attention

    def wrap(original: Callable[..., Any]) -> Callable[..., Any]:
        def generate(*args: Any, **kwargs: Any) -> Any:
            if kwargs.get("past_key_values") is None:
                kwargs["past_key_values"] = PreallocatedCache(model.config, max_new_tokens=max_new_tokens)
            with grouped_decode_attention(model):
                return original(*args, **kwargs)
        return generate

    return wrapped_generate(model, wrap)


def cuda_graph_decoding(model: PreTrainedModel) -> contextlib.AbstractContextManager[None]:
    """Inside the block, each ``model.generate`` call that asks only for what
    :func:`~rqat_sdk.cuda_graph_decoding.decode` implements decodes through it (its steps replayed from a CUDA
    graph on GPUs), under :func:`~rqat_sdk.preallocated_cache.grouped_decode_attention`; other calls, and every
    call of a model :func:`~rqat_sdk.cuda_graph_decoding.graph_decoding_problem` refuses, go to ``generate``, each
    reason warned once. Enter it before what else wraps ``generate``
    (:func:`~rqat_sdk.modifiers.layers.quantized_once_per_generate`), so that those wrap the decoding too."""
    # transformers' cache and attention classes load lazily (import rqat_sdk loads torch alone)
    from rqat_sdk.preallocated_cache import grouped_decode_attention, resolved_generation_config

    warned: set[str] = set()

    def fall_back(reason: str) -> None:
        if reason not in warned:
            warned.add(reason)
            log.warning(FALLBACK_WARNING, reason)

    def wrap(original: Callable[..., Any]) -> Callable[..., Any]:
        def generate(input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                     generation_config: GenerationConfig | None = None, **kwargs: Any) -> Any:
            missing = [name for name, value in (("input_ids", input_ids), ("attention_mask", attention_mask))
                       if value is None]  # generate infers a mask from the pad token; the loop takes it given
            problem = graph_decoding_problem(model)
            config, unknown = resolved_generation_config(model, generation_config, kwargs)
            settings, unsupported = decoding_settings(config)
            reasons = [*(f"no {name}" for name in missing), *([problem] if problem else []), *unsupported,
                       *([f"arguments {', '.join(sorted(unknown))}"] if unknown else [])]
            if reasons or settings is None or input_ids is None or attention_mask is None:
                fall_back("; ".join(reasons))
                return original(input_ids=input_ids, attention_mask=attention_mask,
                                generation_config=generation_config, **kwargs)
            with grouped_decode_attention(model):
                return decode(model, input_ids, attention_mask, settings)
        return generate

    return wrapped_generate(model, wrap)
