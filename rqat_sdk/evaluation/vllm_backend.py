"""The ``vllm`` evaluation backend: sampling from a checkpoint with vLLM, in vLLM's own environment."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rqat_sdk.errors import RqatError
from rqat_sdk.exporters.vllm import engine_options
from rqat_sdk.generation import Completion, Sampling, render_prompt
from rqat_sdk.serving import vllm_env

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def generate_vllm(
    checkpoint: str,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[dict[str, str]]],
    sampling: Sampling,
    *,
    samples: int,
    seed: int,
) -> list[list[Completion]]:
    """``samples`` completions per prompt from vLLM (in its own environment), as ``runs[k][prompt]``."""
    interpreter = vllm_env.python()
    if interpreter is None:
        raise RqatError(
            "the vllm backend needs a vLLM environment: run `rqat serve-check --setup` or set RQAT_VLLM_PYTHON"
        )
    ids = [tokenizer(render_prompt(tokenizer, p), add_special_tokens=False)["input_ids"] for p in prompts]
    request = {
        "model": checkpoint, "prompt_token_ids": ids, "n": samples, "max_tokens": sampling.max_new_tokens,
        "temperature": 0.0 if sampling.greedy else sampling.temperature,
        "top_p": 1.0 if sampling.greedy else sampling.top_p, "seed": seed,
        "max_model_len": max(map(len, ids)) + sampling.max_new_tokens, **engine_options(checkpoint),
    }
    response = vllm_env.run_worker(interpreter, request, timeout=24 * 3600)
    return [
        [Completion(row[k]["text"], len(row[k]["token_ids"]), row[k]["finish_reason"] == "length")
         for row in response["outputs"]]
        for k in range(samples)
    ]
