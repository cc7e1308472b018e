"""Generation throughput of the fake-quantized W4A4KV4 model: what GRPO rollouts and evaluation pay for A4 and KV4.

On the long-chain testbed (round-to-nearest, float32), greedy generation of ``--problems`` held-out problems
in one batch, for:

- ``W4A16``: int4 weights per channel only;
- ``W4A4``: plus int4 per-token activations;
- ``W4A4KV4``: plus vLLM's int4 KV cache, each key and value quantized once as it enters the cache (on
  CUDA by the fused Triton kernel);
- ``W4A4KV4 PyTorch quantizer`` (CUDA only): the same through the KV quantizer's PyTorch path;
- ``W4A4KV4 requantized``: the same values, but the whole cache quantized again at every step (rqat's
  behaviour before keys and values were quantized on entry; the hooks that do that are removed here).

    python benchmarks/kv_cache_generation_perf.py --json docs/results/kv_cache_generation_perf.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
import time
from pathlib import Path

import torch
from provenance import git_commit
from qat_kd_perf import pytorch_kv_quantizer

import rqat_sdk
from rqat_sdk.models import resolve_device
from rqat_sdk.testbed.tasks import RESPONSE_TOKENS
from rqat_sdk.testbed.train import LONG

SCHEMES = {
    "W4A16": {"weights": {"num_bits": 4, "group_size": None, "symmetric": True}},
    "W4A4": "W4A4",
    "W4A4KV4": "W4A4KV4",
}


def quantized(scheme: str | dict, device: str):
    recipe = {"version": 1, "scheme": scheme, "stages": [{"name": "ptq", "modifiers": [{"type": "rtn"}]}]}
    return rqat_sdk.oneshot(LONG, recipe, dtype="float32", device=device)


def requantize_every_step(model: torch.nn.Module) -> None:
    """Remove the quantize-on-entry hooks: the attention function then quantizes the whole cache each step."""
    for module in model.modules():
        if getattr(module, "_rqat_quantizes_cache_entries", False):
            module._forward_pre_hooks.clear()
            module._rqat_kv_quantized_in_cache = False


def timed_generation(result, label: str, problems: int) -> dict:
    def generate():
        return rqat_sdk.evaluate(result.model, "testbed-long", tokenizer=result.tokenizer, samples=1, greedy=True,
                                 num_examples=problems, batch_size=problems,
                                 max_new_tokens=RESPONSE_TOKENS["testbed-long"], dtype="float32", label=label)

    generate()  # warm-up: kernels, caches
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    started = time.perf_counter()
    evaluation = generate()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    tokens = evaluation.mean_response_tokens * problems
    return {"variant": label, "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds),
            "pass_at_1": round(evaluation.pass_at_1, 4),
            "mean_response_tokens": round(evaluation.mean_response_tokens, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", type=int, default=256, help="held-out problems, generated as one batch")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    device = resolve_device(args.device)
    rows = []
    for name, scheme in SCHEMES.items():
        result = quantized(scheme, str(device))
        rows.append(timed_generation(result, name, args.problems))
        print(rows[-1], flush=True)
        if name == "W4A4KV4" and device.type == "cuda":
            with pytorch_kv_quantizer():
                rows.append(timed_generation(result, "W4A4KV4 PyTorch quantizer", args.problems))
            print(rows[-1], flush=True)
        if name == "W4A4KV4":
            requantize_every_step(result.model)
            rows.append(timed_generation(result, "W4A4KV4 requantized", args.problems))
            print(rows[-1], flush=True)
    base = rows[0]["seconds"]
    print(f"\n| variant | seconds | tokens/s | vs {rows[0]['variant']} | pass@1 (greedy) |\n|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['variant']} | {row['seconds']} | {row['tokens_per_s']} | {row['seconds'] / base:.2f}x | "
              f"{100 * row['pass_at_1']:.1f} |")
    if args.json:
        name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "command": "python " + shlex.join(sys.argv), "device": name, "date": datetime.date.today().isoformat(),
            "commit": git_commit(),
            "torch": torch.__version__, "problems": args.problems, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
