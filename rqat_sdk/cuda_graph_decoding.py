"""Decoding whose steps replay one CUDA graph: rollouts without the host's cost per kernel.

At rollout batch sizes a decoding step of a small model is a few hundred short kernels, and ``generate`` issues
them one by one from Python: the GPU waits on the host for most of each step. Here a ``generate`` call prefills
as transformers does, then runs its first decoding step eagerly, captures the next one as a CUDA graph (the
model's forward, the logits' warping and sampling, the stopping bookkeeping), and replays that graph for every
step after, reading the whole KV cache (:class:`~rqat_sdk.preallocated_cache.PreallocatedCache` written at a
position held on the device) under a full-length mask. The graph is captured again for each call, since a call
brings new weights (a GRPO step's) and new shapes; on a CPU the same steps run eagerly.

Sampling follows transformers' processors for what rollouts and evaluation use (``min_new_tokens``, temperature,
top-k, top-p, greedy decoding): the same warped logits, the same end-of-sequence handling, and sequences padded
and trimmed as ``generate`` returns them. It draws its samples differently (``probs / Exp(1)``'s argmax, which
has the same distribution as ``torch.multinomial`` and runs inside a graph), so sampled tokens match in
distribution, greedy ones token for token up to the rounding of the attention kernel. A call asking for anything
else (beam search, repetition penalties, stopping strings, processed scores) goes to ``generate`` unchanged, with
one warning naming what it asked for.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import torch

if TYPE_CHECKING:
    from transformers import GenerationConfig, PreTrainedModel

STOP_CHECK_EVERY = 32
"""Replays between two reads of the finished flags (each read waits for the GPU)."""


@dataclass(frozen=True)
class DecodingSettings:
    """What a ``generate`` call asks of the decoding loop, resolved from its generation config."""

    max_new_tokens: int
    min_new_tokens: int = 0
    greedy: bool = False
    temperature: float = 1.0
    top_k: int = 0
    """0: off."""
    top_p: float = 1.0
    """1.0: off."""
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0
    num_return_sequences: int = 1
    return_dict_in_generate: bool = False
    output_logits: bool = False
    """Keep each step's raw logits (float32, before any warping), as ``generate``'s ``output_logits`` does."""


_NEUTRAL: dict[str, Callable[[Any], bool]] = {
    "num_beams": lambda v: v in (None, 1),
    "constraints": lambda v: not v,
    "force_words_ids": lambda v: not v,
    "token_healing": lambda v: not v,
    "cache_implementation": lambda v: v in (None, "dynamic", "static"),  # the loop's cache decodes the same
    "repetition_penalty": lambda v: v in (None, 1.0),
    "encoder_repetition_penalty": lambda v: v in (None, 1.0),
    "no_repeat_ngram_size": lambda v: not v,
    "encoder_no_repeat_ngram_size": lambda v: not v,
    "bad_words_ids": lambda v: not v,
    "sequence_bias": lambda v: not v,
    "suppress_tokens": lambda v: not v,
    "begin_suppress_tokens": lambda v: not v,
    "forced_bos_token_id": lambda v: v is None,
    "forced_eos_token_id": lambda v: v is None,
    "min_length": lambda v: not v,
    "exponential_decay_length_penalty": lambda v: v is None,
    "guidance_scale": lambda v: v in (None, 1.0),
    "watermarking_config": lambda v: v is None,
    "penalty_alpha": lambda v: v is None,
    "dola_layers": lambda v: v is None,
    "prompt_lookup_num_tokens": lambda v: v is None,
    "stop_strings": lambda v: not v,
    "max_time": lambda v: v is None,
    "renormalize_logits": lambda v: not v,
    "remove_invalid_values": lambda v: not v,
    "output_scores": lambda v: not v,
    "output_attentions": lambda v: not v,
    "output_hidden_states": lambda v: not v,
}
"""Generation options the loop does not implement, with the values that ask nothing of it."""

_SAMPLING_ONLY: dict[str, Callable[[Any], bool]] = {
    "min_p": lambda v: v is None,
    "typical_p": lambda v: v in (None, 1.0),
    "epsilon_cutoff": lambda v: not v,
    "eta_cutoff": lambda v: not v,
    "top_h": lambda v: v is None,
}
"""Sampling warpers the loop does not implement: greedy decoding ignores them, as ``generate`` does."""


def decoding_settings(config: GenerationConfig) -> tuple[DecodingSettings | None, list[str]]:
    """``config`` (resolved as ``generate`` resolves it) as settings, or None and the options that need
    ``generate``."""
    checks = {**_NEUTRAL, **(_SAMPLING_ONLY if config.do_sample else {})}
    unsupported = [f"{name}={getattr(config, name)!r}" for name, neutral in checks.items()
                   if not neutral(getattr(config, name, None))]
    if config.max_new_tokens is None:  # generate then counts max_length (default 20) from the prompt's start
        unsupported.append("max_length without max_new_tokens")
    if unsupported:
        return None, unsupported
    eos = config.eos_token_id
    eos_ids = tuple([eos] if isinstance(eos, int) else list(eos or ()))
    pad = config.pad_token_id if config.pad_token_id is not None else (eos_ids[0] if eos_ids else 0)
    return DecodingSettings(
        max_new_tokens=config.max_new_tokens, min_new_tokens=config.min_new_tokens or 0, greedy=not config.do_sample,
        temperature=config.temperature if config.temperature is not None else 1.0,
        top_k=config.top_k or 0, top_p=config.top_p if config.top_p is not None else 1.0, eos_token_ids=eos_ids,
        pad_token_id=pad, num_return_sequences=config.num_return_sequences or 1,
        return_dict_in_generate=bool(config.return_dict_in_generate), output_logits=bool(config.output_logits),
    ), []


def warp_logits(scores: torch.Tensor, settings: DecodingSettings, generated: torch.Tensor,
                eos: torch.Tensor) -> torch.Tensor:
    """transformers' processors and warpers, in their order, on float32 ``scores [batch, vocab]`` (in place):
    the end-of-sequence tokens ``eos`` (on the device) barred while ``generated`` (a device scalar: tokens so far)
    < ``min_new_tokens``; then, when sampling, temperature, top-k and top-p, a removed token's score set to -inf."""
    if settings.min_new_tokens and eos.numel():
        scores[:, eos] = torch.where(generated < settings.min_new_tokens, float("-inf"), scores[:, eos])
    if settings.greedy:
        return scores
    if settings.temperature != 1.0:
        scores.div_(settings.temperature)
    if settings.top_k:
        kth = torch.topk(scores, min(settings.top_k, scores.shape[-1])).values[..., -1:]
        scores.masked_fill_(scores < kth, float("-inf"))
    if settings.top_p < 1.0:
        ordered, order = torch.sort(scores, descending=False)
        removed = ordered.softmax(dim=-1).cumsum(dim=-1) <= 1 - settings.top_p
        removed[..., -1:] = False  # the likeliest token always stays
        scores.masked_fill_(removed.scatter(1, order, removed), float("-inf"))
    return scores


def choose_tokens(scores: torch.Tensor, settings: DecodingSettings) -> torch.Tensor:
    """The next token of each row of warped ``scores``: the argmax when greedy, else a sample drawn as the
    argmax of ``probs / E`` with ``E ~ Exp(1)`` per entry (the exponential race: each token wins with its
    probability), which needs no host synchronisation."""
    if settings.greedy:
        return scores.argmax(dim=-1)
    probs = scores.softmax(dim=-1)
    race = torch.empty_like(probs).exponential_().clamp_min_(torch.finfo(probs.dtype).tiny)
    return probs.div_(race).argmax(dim=-1)


class _Decoder:
    """One call's decoding state, all on the device, so that a step reads and advances it without the host."""

    def __init__(self, model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 settings: DecodingSettings) -> None:
        # transformers' cache classes load lazily (import rqat_sdk loads torch alone)
        from rqat_sdk.preallocated_cache import PreallocatedCache

        self.model, self.settings = model, settings
        ids = input_ids.repeat_interleave(settings.num_return_sequences, dim=0)
        mask = attention_mask.repeat_interleave(settings.num_return_sequences, dim=0).bool()
        self.prompt = ids
        batch, prompt_length = ids.shape
        device = ids.device
        self.cache = PreallocatedCache(model.config, max_new_tokens=settings.max_new_tokens)
        positions = (mask.long().cumsum(-1) - 1).masked_fill(~mask, 0)  # as generate derives them
        logits = model(input_ids=ids, attention_mask=mask.long(), position_ids=positions,
                       past_key_values=self.cache, use_cache=True, logits_to_keep=1).logits
        self.eos = torch.tensor(settings.eos_token_ids, dtype=torch.long, device=device)
        self.generated = torch.ones((), dtype=torch.long, device=device)
        self.raw_logits = (logits.new_empty((settings.max_new_tokens, batch, logits.shape[-1]), dtype=torch.float32)
                           if settings.output_logits and settings.return_dict_in_generate else None)
        first = choose_tokens(warp_logits(self._scores(logits, self.generated - 1), settings, self.generated - 1,
                                          self.eos), settings)
        self.completion = torch.full((batch, settings.max_new_tokens), settings.pad_token_id, dtype=torch.long,
                                     device=device)
        self.completion[:, 0] = first
        self.tokens = first[:, None].clone()
        self.finished = torch.isin(first, self.eos)
        self.columns = torch.ones((), dtype=torch.long, device=device)
        self.length = 1
        """Completion columns, known once :meth:`run` ends."""
        self.position = positions[:, -1:] + 1
        self.write_index = torch.full((1,), prompt_length, dtype=torch.long, device=device)
        self.mask = torch.zeros((batch, prompt_length + settings.max_new_tokens), dtype=torch.bool, device=device)
        self.mask[:, :prompt_length] = mask
        self.cache.write_at(self.write_index)

    def step(self) -> None:
        """Feed the last tokens, choose the next ones and advance: no host synchronisation, fixed shapes."""
        self.mask.index_fill_(1, self.write_index, True)
        full_mask = self.mask[:, None, None, :]  # a 4-D mask goes to attention as it is
        logits = self.model(input_ids=self.tokens, attention_mask=full_mask, position_ids=self.position,
                            past_key_values=self.cache, use_cache=True).logits
        chosen = choose_tokens(warp_logits(self._scores(logits, self.generated), self.settings, self.generated,
                                           self.eos), self.settings)
        alive = ~self.finished
        chosen = torch.where(alive, chosen, self.settings.pad_token_id)
        self.columns.add_(alive.any().long())
        self.finished.logical_or_(torch.isin(chosen, self.eos))
        self.completion.index_copy_(1, self.generated.view(1), chosen[:, None])
        self.tokens.copy_(chosen[:, None])
        self.position.add_(1)
        self.write_index.add_(1)
        self.generated.add_(1)

    def _scores(self, logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """The last position's logits in float32 (a copy, which warping changes in place), kept at row ``index``
        of :attr:`raw_logits` when asked for."""
        scores = logits[:, -1].to(torch.float32, copy=True)
        if self.raw_logits is not None:
            self.raw_logits.index_copy_(0, index.view(1), scores[None])
        return scores

    def run(self, graphed: bool) -> torch.Tensor:
        """All decoding steps (graphed: the first eagerly, then a captured one replayed), stopping early once every
        sequence has ended; the prompts and completions as ``generate`` returns them."""
        steps = self.settings.max_new_tokens - 1
        replay: Callable[[], None] = self.step
        if graphed and steps > 1:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # the first step also warms up what the capture must not initialise
                self.step()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph):
                    self.step()
            except RuntimeError as exc:  # an op that waits on the host, which graph_decoding_problem did not foresee
                raise RuntimeError(f"cache_implementation cuda_graph: capturing {type(self.model).__name__}'s "
                                   f"decoding step failed ({exc}); use cache_implementation dynamic") from exc
            replay, steps = graph.replay, steps - 1
        for done in range(1, steps + 1):
            replay()
            if done % STOP_CHECK_EVERY == 0 and bool(self.finished.all()):
                break
        self.length = int(self.columns)
        return torch.cat([self.prompt, self.completion[:, : self.length]], dim=1)


@torch.no_grad()
def decode(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
           settings: DecodingSettings) -> Any:
    """The sequences ``generate`` would return for ``settings`` (prompts first, left-padded; ``attention_mask``
    marks the padding), decoded with each step replayed from a CUDA graph on a GPU and run eagerly elsewhere."""
    decoder = _Decoder(model, input_ids, attention_mask, settings)
    sequences = decoder.run(graphed=input_ids.device.type == "cuda")
    if not settings.return_dict_in_generate:
        return sequences
    # transformers' generation classes load lazily (import rqat_sdk loads torch alone)
    from transformers.generation import GenerateDecoderOnlyOutput

    raw = decoder.raw_logits
    return GenerateDecoderOnlyOutput(sequences=cast(torch.LongTensor, sequences),
                                     logits=tuple(raw[: decoder.length]) if raw is not None else None)


_HOST_ROPE = ("dynamic", "longrope")
"""Rotary embeddings that read the largest position on the host at every forward (not capturable)."""


def graph_decoding_problem(model: PreTrainedModel) -> str | None:
    """Why ``model`` cannot decode this way (None: it can): its cache must be full attention, its attention read
    SDPA's boolean masks (which the steps build), its forward run on one device without reading tensors on the
    host, and its weights be whole on each process (a sharded model gathers them in collectives that every rank
    must run in step, which the loop's early stop would break)."""
    from torch.distributed.tensor import DTensor

    # transformers' cache classes load lazily (import rqat_sdk loads torch alone)
    from rqat_sdk.preallocated_cache import attention_implementation, check_full_attention, reads_sdpa_masks

    try:
        check_full_attention(model.config, "cuda_graph")
    except ValueError as exc:
        return str(exc)
    if not reads_sdpa_masks(model):
        return (f"cache_implementation cuda_graph needs an SDPA attention implementation; the model uses "
                f"{attention_implementation(model)!r}")
    rope = getattr(model.config, "rope_parameters", None) or {}
    rope_types = {rope.get("rope_type")} | {v.get("rope_type") for v in rope.values() if isinstance(v, dict)}
    host_rope = [name for name in _HOST_ROPE if name in rope_types]
    if host_rope:
        return f"cache_implementation cuda_graph cannot capture {host_rope[0]} rotary embeddings (rope_type)"
    if len(set(getattr(model, "hf_device_map", {}).values())) > 1:
        return "cache_implementation cuda_graph needs the model on one device; it is split across several"
    if any(isinstance(p, DTensor) or hasattr(p, "ds_id") for p in model.parameters()):
        return "cache_implementation cuda_graph needs whole weights on each process; they are sharded (FSDP, ZeRO-3)"
    return None
