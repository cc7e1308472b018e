"""KV-cache fake quantization on CUDA: the fused Triton kernel against the PyTorch path, per call.

For keys shaped as attention hands them over (a transposed view of (batch, tokens, heads, head_dim)), in
the shapes QAT training and generation produce, this script measures:

- the time per call with the host included (a loop of calls, then a synchronize): what a training step or
  a decoding step pays;
- the time between CUDA events around a loop of calls: the GPU's time, plus any time it waits for the host;
- the share of (token, head) rows whose output differs from the PyTorch path on the CPU (the reference,
  whose division and rounding vLLM's kernel shares), for the kernel and for the PyTorch path on the GPU.

    python benchmarks/kv_cache_kernel_perf.py --json docs/results/kv_cache_kernel_perf.json
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

CASES = {
    "QAT step, Qwen3-0.6B shape, bf16": ((4, 2048, 8, 128), torch.bfloat16),
    "QAT step, fp16, head_dim 64": ((2, 512, 8, 64), torch.float16),
    "decoding step, 64 sequences, bf16": ((64, 1, 8, 128), torch.bfloat16),
    "decoding step, testbed, 256 sequences, fp32": ((256, 1, 2, 32), torch.float32),
    "prefill, testbed, 256 x 100 tokens, fp32": ((256, 100, 2, 32), torch.float32),
}
"""name: ((batch, tokens, kv heads, head_dim), dtype)."""


def host_us(fn, x: torch.Tensor, calls: int = 200) -> float:
    for _ in range(5):
        fn(x)
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(calls):
        fn(x)
    torch.cuda.synchronize()
    return (time.perf_counter() - started) / calls * 1e6


def gpu_us(fn, x: torch.Tensor, calls: int = 50) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fn(x)
    torch.cuda.synchronize()
    start.record()
    for _ in range(calls):
        fn(x)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / calls * 1e3


def rows_changed(a: torch.Tensor, reference: torch.Tensor) -> float:
    return (a.cpu() != reference).flatten(0, -2).any(-1).float().mean().item()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 2
    from rqat_sdk.ops.kv_cache import _KVFakeQuant
    from rqat_sdk.ops.triton_kv_cache import TritonKVFakeQuant

    rows = []
    for name, (shape, dtype) in CASES.items():
        torch.manual_seed(0)
        scales = torch.logspace(-2, 1, shape[1])[:, None, None]  # magnitudes from 0.01 to 10 across tokens
        keys = (torch.randn(*shape) * scales).to(dtype).transpose(1, 2)
        reference = _KVFakeQuant.apply(keys)
        on_gpu = keys.cuda()
        rows.append({
            "case": name, "shape": list(keys.shape), "dtype": str(dtype).removeprefix("torch."),
            "pytorch_us": round(host_us(_KVFakeQuant.apply, on_gpu)),
            "kernel_us": round(host_us(TritonKVFakeQuant.apply, on_gpu)),
            "pytorch_gpu_us": round(gpu_us(_KVFakeQuant.apply, on_gpu)),
            "kernel_gpu_us": round(gpu_us(TritonKVFakeQuant.apply, on_gpu)),
            "kernel_rows_changed": round(rows_changed(TritonKVFakeQuant.apply(on_gpu), reference), 5),
            "pytorch_gpu_rows_changed": round(rows_changed(_KVFakeQuant.apply(on_gpu), reference), 5),
        })
        print(rows[-1], flush=True)
    print("\n| case | PyTorch µs/call | kernel µs/call | speed-up | CUDA-event µs: PyTorch / kernel "
          "| rows ≠ CPU: kernel / PyTorch on GPU |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['pytorch_us']:,} | {r['kernel_us']:,} | {r['pytorch_us'] / r['kernel_us']:.1f}x | "
              f"{r['pytorch_gpu_us']:,} / {r['kernel_gpu_us']:,} | "
              f"{100 * r['kernel_rows_changed']:.2f}% / {100 * r['pytorch_gpu_rows_changed']:.2f}% |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "command": "python " + shlex.join(sys.argv), "device": torch.cuda.get_device_name(),
            "date": datetime.date.today().isoformat(),
            "commit": git_commit(), "torch": torch.__version__, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
