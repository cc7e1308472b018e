"""GRPO rollout throughput with ``generation: transformers``: completion tokens/s of a fake-quantized policy.

Qwen3-0.6B's shape with random weights (the real vocabulary), W3G128 round-to-nearest with QAT's fake-quantized
layers attached, as GRPO trains it; ``--prompts`` prompts of ``--prompt-tokens`` tokens, ``--completions`` sampled
completions each (one ``generate`` call over the whole group, as trl batches them), ``--new-tokens`` each. A
random model never emits its end-of-sequence token, so every completion has the full length. Variants:

- ``per_token`` (the baseline): every quantized layer fake-quantizes its weight at every decoded token (rqat's
  rollouts before ``quantized_once_per_generate``);
- ``once``: the weights fake-quantized once per ``generate`` call (``quantized_once_per_generate``, what GRPO's
  rollouts run now);
- ``once_preallocated``: the same with ``cache_implementation: preallocated``: the KV cache written in place
  where the dynamic cache copies itself at every token, and decoding attention reading it without expanding
  it per query head;
- ``once_grouped``: ``once`` with the dynamic cache and the preallocated path's decode attention over grouped heads
  (:func:`~rqat_sdk.preallocated_cache.grouped_decode_attention`): what the grouped attention alone does where
  prompts are padded (transformers' SDPA path then expands keys and values per query head at every step);
- ``once_cuda_graph``: ``once`` with ``cache_implementation: cuda_graph``: rqat's decoding loop
  (:mod:`rqat_sdk.cuda_graph_decoding`), the preallocated cache read at its full length and every decoding step
  after the first replayed from one CUDA graph, so that a step does not wait on Python to issue its kernels
  (its steps call no logits processor, so they are not clocked);
- ``once_static``: the same with transformers' static KV cache (``cache_implementation: static``), which
  transformers compiles for on GPUs (last: its compile can take minutes).

``--padded`` left-pads half the prompts by a quarter of their length, as rollouts of prompts of different
lengths are: attention then takes a mask at every step.

Before timing, each variant's greedy tokens on a few prompts are checked against the baseline's: the policy's
outputs must not change. Where they do, the record says where (``first_difference``): the first decoding step
whose token differs, and there, from the same tokens before it, how far the variant's logits are from the
baseline's against the baseline's margin between its token and the variant's. A margin within that distance is a near
tie that another kernel's rounding can flip (``near_tie``); a margin far beyond it is an error. The record's
``tokens_per_s`` is the fastest variant's whose tokens match the baseline's or first differ at a near tie (the
same policy to rounding); the script exits non-zero where a variant differs otherwise.

    python benchmarks/grpo_rollout_perf.py --json docs/results/grpo_rollout_perf.json
    python benchmarks/grpo_rollout_perf.py --shape tiny --prompts 4 --completions 2 --new-tokens 16  # CPU smoke

Each timed rollout also clocks its decoding steps (``step_ms``: mean milliseconds per step over each quarter of
them), which shows how a step's cost grows with the cache's length; ``generate`` waits for every step's tokens
(its stopping check reads them), so the clock measures whole steps.

``--profile-window START COUNT`` (CUDA), after every variant is timed: in one more rollout of each variant,
the profiler records decoding steps START to START + COUNT - 1 only: the GPU time of all their kernels per step
(``gpu_kernel_ms``, against the timed rollout's ``step_ms`` of the same steps: a step whose kernels
fill a small share of it waits on the host) and the costliest kernels, to show where a late step's time goes.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import itertools
import logging
import math
import shlex
import sys
import time
from pathlib import Path

import torch
from provenance import git_commit
from qat_kd_perf import SHAPES as STEP_SHAPES
from qat_kd_perf import fresh_model, kernel_summary, profiled_ms_per_kernel, quantize_w3g128
from transformers import LogitsProcessor, LogitsProcessorList

from rqat_sdk.files import write_json_atomic
from rqat_sdk.generation import FALLBACK_WARNING, cuda_graph_decoding, preallocated_kv_cache
from rqat_sdk.modifiers.layers import attach_fake_quant, quantized_once_per_generate
from rqat_sdk.preallocated_cache import grouped_decode_attention

SHAPES = {
    **STEP_SHAPES,
    "tiny": dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=32, max_position_embeddings=4096, tie_word_embeddings=True),
}
VARIANTS = ("per_token", "once", "once_preallocated", "once_grouped", "once_cuda_graph", "once_static")
UNCLOCKED = ("once_cuda_graph",)
"""Variants whose decoding runs no logits processor, so the step clock cannot time their steps."""
CHECK_TOKENS = 32


def policy(shape: str, device: torch.device, dtype: torch.dtype):
    """A W3G128 policy as GRPO trains it: RTN, then QAT's fake-quantized layers."""
    model = quantize_w3g128(fresh_model(0, SHAPES[shape], device, dtype))
    attach_fake_quant(model, dtype=dtype, learn_scales=False, learn_clipping=False)
    model.generation_config.eos_token_id = None  # every completion runs to --new-tokens
    model.generation_config.pad_token_id = 0
    return model.eval()


class StepClock(LogitsProcessor):
    """Called by ``generate`` once per forward (the prefill, then each decoding step), scores unchanged: keeps the
    time of each call and hands it to ``on_step`` (a profiler's ``step``)."""

    def __init__(self, on_step=None) -> None:
        self.times: list[float] = []
        self.on_step = on_step

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.times.append(time.perf_counter())
        if self.on_step is not None:
            self.on_step()
        return scores

    def step_ms(self, first: int, last: int) -> float:
        """Mean milliseconds per decoding step over steps ``first`` to ``last`` (1 is the first after the
        prefill)."""
        return (self.times[last] - self.times[first - 1]) * 1000 / (last - first + 1)

    def quarters(self) -> dict[str, float]:
        """Mean ms per step over each quarter of the decoding steps, keyed by their range."""
        steps = len(self.times) - 1
        bounds = [1 + steps * i // 4 for i in range(5)]
        return {f"{a}-{b - 1}": round(self.step_ms(a, b - 1), 2) for a, b in itertools.pairwise(bounds) if b > a}


def generate(model, ids: torch.Tensor, mask: torch.Tensor, variant: str, *, new_tokens: int, completions: int,
             greedy: bool, clock: StepClock | None = None, **outputs: bool):
    """One ``generate`` call as ``variant`` runs it, ``clock`` timing its steps; ``outputs``
    (``return_dict_in_generate``, ``output_logits``) pass through."""
    settings = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "num_return_sequences": completions,
                "do_sample": not greedy, **({"temperature": 1.0, "top_k": 0, "top_p": 1.0} if not greedy else {}),
                **({"cache_implementation": "static"} if variant == "once_static" else {}),
                **({"logits_processor": LogitsProcessorList([clock])} if clock is not None else {}), **outputs}
    once = quantized_once_per_generate(model) if variant != "per_token" else contextlib.nullcontext()
    # as GRPO's rollouts run it (generate expands the prompts for num_return_sequences before the prefill)
    decoding = (preallocated_kv_cache(model, new_tokens) if variant == "once_preallocated"
                else grouped_decode_attention(model) if variant == "once_grouped"
                else cuda_graph_decoding(model) if variant == "once_cuda_graph" else contextlib.nullcontext())
    with decoding, once, FallbackCheck(variant), torch.no_grad():  # once wraps the decoding, as in GRPO
        return model.generate(input_ids=ids, attention_mask=mask, **settings)


class FallbackCheck(logging.Handler):
    """Inside the block, a ``generate`` call that ``once_cuda_graph`` hands back to transformers is an error: the
    variant would time transformers' decoding under its own name."""

    def __init__(self, variant: str) -> None:
        super().__init__(logging.WARNING)
        self.variant = variant
        self.logger = logging.getLogger("rqat_sdk.generation")

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg == FALLBACK_WARNING:
            raise RuntimeError(f"{self.variant}: {record.getMessage()}")

    def __enter__(self) -> FallbackCheck:
        self.logger.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        self.logger.removeHandler(self)


def greedy_check(model, ids: torch.Tensor, mask: torch.Tensor, variant: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``variant``'s greedy completion of the check prompts: its tokens, and its logits ``[steps, batch, vocab]``."""
    out = generate(model, ids, mask, variant, new_tokens=CHECK_TOKENS, completions=1, greedy=True,
                   return_dict_in_generate=True, output_logits=True)
    return out.sequences[:, ids.shape[1]:], torch.stack(out.logits).float()


ROUNDING_ULPS = 8
"""How far apart two computations of the same logits may be and still count as rounding: this many units in the
last place of the model's dtype at the row's largest logit."""


def first_difference(reference: tuple[torch.Tensor, torch.Tensor], candidate: tuple[torch.Tensor, torch.Tensor],
                     dtype: torch.dtype) -> dict | None:
    """Where ``candidate``'s greedy tokens first leave ``reference``'s (None: nowhere). At that step both ran on the
    same tokens, so their logits differ only by computation; where that difference is rounding (within
    ``ROUNDING_ULPS`` of ``dtype``) and the reference's margin between its token and the candidate's is within
    it, the flip is a near tie (``near_tie``); otherwise it is an error."""
    (ref_tokens, ref_logits), (tokens, logits) = reference, candidate
    differs = (tokens != ref_tokens).any(dim=0)
    if not differs.any():
        return None
    step = int(differs.nonzero()[0])
    row = int((tokens[:, step] != ref_tokens[:, step]).nonzero()[0])
    chosen, other = int(ref_tokens[row, step]), int(tokens[row, step])
    margin = float(ref_logits[step, row, chosen] - ref_logits[step, row, other])
    distance = float((logits[step, row] - ref_logits[step, row]).abs().max())
    largest = float(ref_logits[step, row].abs().max())
    rounding = ROUNDING_ULPS * torch.finfo(dtype).eps * 2.0 ** math.floor(math.log2(largest)) if largest else 0.0
    return {"step": step, "row": row, "baseline_margin": round(margin, 5), "max_logit_diff": round(distance, 5),
            "max_logit_diff_before": round(float((logits[:step] - ref_logits[:step]).abs().max()), 5)
            if step else 0.0, "rounding": round(rounding, 5), "near_tie": margin <= distance <= rounding}


def profile_window(model, ids: torch.Tensor, mask: torch.Tensor, variant: str, args: argparse.Namespace,
                   start: int, count: int, top: int = 12) -> dict:
    """One rollout of ``variant`` with the profiler recording decoding steps ``start`` to ``start + count - 1``
    only: their kernels' GPU time per step, in all (``gpu_kernel_ms``) and for the ``top`` costliest."""
    from torch.profiler import ProfilerActivity, profile, schedule

    # profiler steps end at each clock call: step k (the forward of decoding step k) ends at call k
    plan = schedule(wait=start - 1, warmup=1, active=count, repeat=1)

    def next_step() -> None:  # the GPU done first: kernels still queued belong to the step before
        torch.cuda.synchronize()
        prof.step()

    with profile(activities=[ProfilerActivity.CUDA], schedule=plan) as prof:
        generate(model, ids, mask, variant, new_tokens=args.new_tokens, completions=args.completions, greedy=False,
                 clock=StepClock(next_step))
    return kernel_summary(profiled_ms_per_kernel(prof, count), top)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def keeps_the_policy(row: dict) -> bool:
    """Whether a variant's greedy tokens are the baseline's, or first leave them at a near tie."""
    return row["greedy_tokens_match_baseline"] or row["first_difference"]["near_tie"]


def record(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, rows: list[dict],
           profiles: dict[str, dict] | None = None) -> dict:
    """The run's record from the variants measured so far (the fastest one that keeps the policy, to rounding)."""
    by_variant = {row["variant"]: row for row in rows}
    best = max(filter(keeps_the_policy, rows), key=lambda row: row["tokens_per_s"], default=None)
    return {
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
        "date": datetime.date.today().isoformat(),
        "commit": git_commit(),
        "shape": args.shape, "dtype": str(dtype).removeprefix("torch."), "prompts": args.prompts,
        "completions": args.completions, "new_tokens": args.new_tokens, "prompt_tokens": args.prompt_tokens,
        "padded": args.padded,
        "baseline_tokens_per_s": by_variant["per_token"]["tokens_per_s"] if "per_token" in by_variant else None,
        "tokens_per_s": best["tokens_per_s"] if best else None,
        "fastest_variant": best["variant"] if best else None,
        "variants": rows,
        **({"profile_window": args.profile_window, "profile": profiles} if profiles else {}),
    }



def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-0.6b")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--completions", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=1024)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--padded", action="store_true", help="left-pad half the prompts by a quarter")
    parser.add_argument("--profile-window", type=int, nargs=2, metavar=("START", "COUNT"),
                        help="CUDA: after the timings, profile decoding steps START to START + COUNT - 1 of each "
                             "variant's rollout")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.profile_window:
        start, count = args.profile_window
        if not 1 <= start <= start + count - 1 <= args.new_tokens - 1:
            parser.error(f"--profile-window {start} {count}: decoding steps run from 1 to {args.new_tokens - 1}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = policy(args.shape, device, dtype)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1, SHAPES[args.shape]["vocab_size"], (args.prompts, args.prompt_tokens), generator=generator)
    mask = torch.ones_like(ids)
    if args.padded:
        mask[::2, : args.prompt_tokens // 4] = 0
        ids[mask == 0] = 0
    ids, mask = ids.to(device), mask.to(device)

    check, check_mask = ids[:4], mask[:4]
    reference = greedy_check(model, check, check_mask, "per_token")
    rows = []
    clocks: dict[str, StepClock] = {}
    for variant in args.variants:
        difference = first_difference(reference, greedy_check(model, check, check_mask, variant), dtype)
        same = difference is None
        clock = None if variant in UNCLOCKED else StepClock()
        synchronize(device)
        started = time.perf_counter()
        out = generate(model, ids, mask, variant, new_tokens=args.new_tokens, completions=args.completions,
                       greedy=False, clock=clock)
        synchronize(device)
        seconds = time.perf_counter() - started
        if clock is not None:
            clocks[variant] = clock
            if len(clock.times) != args.new_tokens:  # the step clock assumes one logits-processor call per forward
                raise RuntimeError(f"generate called the step clock {len(clock.times)} times for "
                                   f"{args.new_tokens} tokens")
        tokens = (out.shape[1] - ids.shape[1]) * out.shape[0]
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        rows.append({"variant": variant, "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds),
                     "completion_tokens": tokens, **({"step_ms": clock.quarters()} if clock else {}),
                     "greedy_tokens_match_baseline": same,
                     **({"first_difference": difference} if difference else {}),
                     "peak_gib": round(peak, 1) if peak is not None else None})
        print(f"{variant}: {tokens / seconds:,.0f} completion tokens/s ({seconds:.1f} s), greedy tokens "
              f"{'match' if same else 'DIFFER from'} the baseline's{f' ({difference})' if difference else ''}",
              flush=True)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        if args.json:  # after every variant: a run stopped by a time limit keeps the variants it finished
            write_json_atomic(args.json, record(args, device, dtype, rows))

    if args.profile_window and device.type == "cuda":  # last: a process that has profiled can launch slower
        start, count = args.profile_window
        profiles = {}
        for variant in (v for v in args.variants if v in clocks):  # the window is counted in clocked steps
            profiles[variant] = profile_window(model, ids, mask, variant, args, start, count)
            profiles[variant]["step_ms"] = round(clocks[variant].step_ms(start, start + count - 1), 2)
            print(f"{variant}: decoding steps {start}-{start + count - 1} take {profiles[variant]['step_ms']:.1f} ms "
                  f"each, their kernels {profiles[variant]['gpu_kernel_ms']:.1f} ms of GPU time", flush=True)
            if args.json:
                write_json_atomic(args.json, record(args, device, dtype, rows, profiles))

    print()
    print("| variant | completion tokens/s | seconds | greedy tokens as the baseline's |")
    print("|---|---|---|---|")
    for row in rows:
        match = row["greedy_tokens_match_baseline"]
        print(f"| {row['variant']} | {row['tokens_per_s']:,} | {row['seconds']} | {match} |")
    return 0 if all(map(keeps_the_policy, rows)) else 1


if __name__ == "__main__":
    sys.exit(main())
