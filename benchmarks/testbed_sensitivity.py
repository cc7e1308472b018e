"""Which testbed does low-bit PTQ hurt? Train candidate testbeds and measure BF16 against W3G128 PTQ.

The reasoning testbed must lose at least 20 points pass@1 under W3G128 round-to-nearest, as real reasoning
models do, so that QAT has something to recover. This script trains each candidate (model size x task mix)
with :func:`rqat_sdk.testbed.train.train_testbed`, each in its own process and all at once (small models
leave a GPU mostly idle), then measures pass@1 of the full-precision model and of W3G128 RTN (symmetric, as
the seed initialises RTN; and asymmetric) and GPTQ (asymmetric) on held-out problems of the candidate's mix.
Finished candidates are kept and skipped when the script runs again.

    python benchmarks/testbed_sensitivity.py --out runs/sensitivity --json docs/results/testbed_sensitivity.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
from provenance import git_commit

from rqat_sdk.testbed.train import SIZES, TestbedSize

CANDIDATES: dict[str, TestbedSize] = {
    "short-h128-l2": SIZES["short"],
    "long-h128-l2": SIZES["long"],
    "long-h256-l2": replace(SIZES["long"], hidden_size=256, intermediate_size=768, learning_rate=2e-3),
    # Depth and training length, the two ways the seed's models differ most from the committed testbed
    # (Qwen3-0.6B: 28 layers, ~60,000 training tokens per parameter; the testbed: 2 layers, ~60).
    "long-h128-l6": replace(SIZES["long"], num_layers=6),
    "long-h128-l4-x2": replace(SIZES["long"], num_layers=4, steps=6000),
    "long-h128-l2-x3": replace(SIZES["long"], steps=9000),
}
W3G128 = {
    "RTN (symmetric)": ("rtn", True),
    "RTN": ("rtn", False),
    "GPTQ": ("gptq", False),
}


def measure_candidate(name: str, out: Path, problems: int, samples: int) -> dict:
    import rqat_sdk
    from rqat_sdk.testbed.train import train_testbed

    spec, directory = CANDIDATES[name], out / name
    result_file = directory / "sensitivity.json"
    if result_file.is_file():
        return json.loads(result_file.read_text())
    if directory.is_dir():
        record = json.loads((directory / "testbed.json").read_text())
    else:
        record = train_testbed(directory, spec)
    evaluation = dict(samples=samples, num_examples=problems, max_new_tokens=spec.max_seq_length - 64,
                      batch_size=problems, dtype="float32")
    rows = {"BF16": rqat_sdk.evaluate(directory, spec.mix, label="BF16", **evaluation)}
    for method, (init, symmetric) in W3G128.items():
        recipe = {"version": 1, "seed": 0,
                  "scheme": {"weights": {"num_bits": 3, "group_size": 128, "symmetric": symmetric}},
                  "stages": [{"name": "ptq", "data": {"source": spec.mix, "num_samples": 128,
                                                      "max_seq_length": spec.max_seq_length},
                              "modifiers": [{"type": init}]}]}
        quantized = rqat_sdk.oneshot(directory, recipe, dtype="float32")
        rows[method] = rqat_sdk.evaluate(quantized.model, spec.mix, tokenizer=quantized.tokenizer, label=method,
                                         **evaluation)
    result = {
        "candidate": name, "spec": asdict(spec), "parameters": record["parameters"],
        "train_seconds": record["seconds"], "final_loss": record["train"]["final_loss"],
        "rows": {method: {"pass_at_1": round(r.pass_at_1, 4), "std": round(r.std, 4),
                          "mean_response_tokens": round(r.mean_response_tokens, 1),
                          "truncation_rate": round(r.truncation_rate, 4)} for method, r in rows.items()},
    }
    result_file.write_text(json.dumps(result, indent=2) + "\n")
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="where candidates are trained and kept")
    parser.add_argument("--candidates", nargs="+", choices=sorted(CANDIDATES), default=list(CANDIDATES))
    parser.add_argument("--problems", type=int, default=200)
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--json", type=Path, help="write the table here")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a worker: one candidate
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    started = time.perf_counter()
    if args.one:
        (name,) = args.candidates
        measure_candidate(name, args.out, args.problems, args.samples)
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    workers = {
        name: subprocess.Popen(
            [sys.executable, __file__, "--one", "--out", str(args.out), "--candidates", name,
             "--problems", str(args.problems), "--samples", str(args.samples)],
            stdout=open(args.out / f"{name}.log", "a"), stderr=subprocess.STDOUT,
        )
        for name in args.candidates
    }
    failed = [name for name, worker in workers.items() if worker.wait() != 0]
    results = [json.loads((args.out / n / "sensitivity.json").read_text()) for n in args.candidates if n not in failed]
    print("\n| candidate | params | train s | " + " | ".join(["BF16", *W3G128]) + " | RTN (sym.) loss |")
    print("|---" * (len(W3G128) + 5) + "|")
    for r in results:
        cells = [f"{100 * v['pass_at_1']:.1f}" for v in r["rows"].values()]
        loss = 100 * (r["rows"]["BF16"]["pass_at_1"] - r["rows"]["RTN (symmetric)"]["pass_at_1"])
        print(f"| {r['candidate']} | {r['parameters'] / 1e6:.1f}M | {r['train_seconds']:.0f} | "
              + " | ".join(cells) + f" | {loss:.1f} |")
    if args.json:
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "command": "python " + " ".join(sys.argv), "device": device, "date": datetime.date.today().isoformat(),
            "commit": git_commit(),
            "seconds": round(time.perf_counter() - started, 1), "results": results}, indent=2) + "\n")
    if failed:
        print(f"failed: {', '.join(failed)} (see {args.out}/<name>.log)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
