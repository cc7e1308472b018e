"""Runs inside the vLLM environment (its own interpreter): load a checkpoint, generate, report as JSON.

vLLM pins a compressed-tensors version that llmcompressor's pin excludes, so the two never share an
environment; this script imports nothing from rqat_sdk. Usage::

    python vllm_worker.py REQUEST.json RESPONSE.json

REQUEST: ``{"model", "prompt_token_ids": [[...]], "n", "temperature", "top_p", "max_tokens", "seed",
"max_model_len", "kv_cache_dtype"}``. RESPONSE: ``{"outputs": [[{"token_ids", "text", "finish_reason"}, ...]],
"load_seconds", "generate_seconds", "generated_tokens"}``, or ``{"error"}``.
"""

import json
import sys
import time
import traceback


def run(request: dict) -> dict:
    from vllm import LLM, SamplingParams

    started = time.perf_counter()
    llm = LLM(
        model=request["model"],
        max_model_len=request.get("max_model_len", 2048),
        seed=request.get("seed", 0),
        enforce_eager=True,
        kv_cache_dtype=request.get("kv_cache_dtype", "auto"),
    )
    loaded = time.perf_counter()
    params = SamplingParams(
        n=request.get("n", 1),
        temperature=request.get("temperature", 0.0),
        top_p=request.get("top_p", 1.0),
        max_tokens=request["max_tokens"],
        seed=request.get("seed", 0),
    )
    prompts = [{"prompt_token_ids": ids} for ids in request["prompt_token_ids"]]
    results = llm.generate(prompts, params, use_tqdm=False)
    done = time.perf_counter()
    outputs = [
        [{"token_ids": list(o.token_ids), "text": o.text, "finish_reason": o.finish_reason} for o in result.outputs]
        for result in results
    ]
    return {
        "outputs": outputs,
        "load_seconds": loaded - started,
        "generate_seconds": done - loaded,
        "generated_tokens": sum(len(o["token_ids"]) for row in outputs for o in row),
    }


if __name__ == "__main__":
    request_path, response_path = sys.argv[1], sys.argv[2]
    with open(request_path) as handle:
        request = json.load(handle)
    try:
        response = run(request)
    except Exception as exc:  # reported to the caller, which decides whether it is a skip or a failure
        response = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    with open(response_path, "w") as handle:
        json.dump(response, handle)
