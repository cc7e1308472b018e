"""W4A4KV4 PTQ on a testbed model: FlatQuant against round-to-nearest and Hadamard rotation + GPTQ.

For each initialisation, greedy pass@1 on held-out testbed problems of the PTQ model (no QAT), and for
``flatquant`` the per-layer quantized output MSE without and with the learned transforms. The JSON names the
command, device, date and git commit beside the rows.

    python benchmarks/flatquant_testbed.py --json docs/results/flatquant_testbed.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
import time
from pathlib import Path

from provenance import git_commit

import rqat_sdk
from rqat_sdk.models import load_model, load_tokenizer


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--testbed", type=Path, default=Path(__file__).resolve().parents[1] / "rqat_sdk/testbed/short")
    parser.add_argument("--problems", type=int, default=200)
    parser.add_argument("--calibration-samples", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    flatquant = {"type": "flatquant", "epochs": args.epochs}
    methods = {
        "RTN": [{"type": "rtn"}],
        "FlatQuant+RTN": [flatquant, {"type": "rtn"}],
        "Rotation+GPTQ": [{"type": "rotation"}, {"type": "gptq"}],
        "FlatQuant+GPTQ": [flatquant, {"type": "gptq"}],
    }

    def pass_at_1(model, tokenizer) -> float:
        report = rqat_sdk.evaluate(model, "testbed", tokenizer=tokenizer, greedy=True, num_examples=args.problems,
                                   max_new_tokens=96, dtype="float32")
        return round(report.pass_at_1, 4)

    tokenizer = load_tokenizer(args.testbed)
    provenance = {"command": "python " + " ".join(shlex.quote(a) for a in sys.argv), "device": "CPU",
                  "date": datetime.date.today().isoformat(), "commit": git_commit()}
    rows = {"BF16": {"pass_at_1": pass_at_1(load_model(args.testbed, dtype="float32", device="cpu"), tokenizer)}}
    for name, modifiers in methods.items():
        started = time.perf_counter()
        recipe = {"version": 1, "seed": 0, "scheme": "W4A4KV4", "stages": [
            {"name": "ptq",
             "data": {"source": "testbed", "num_samples": args.calibration_samples, "max_seq_length": 256},
             "modifiers": modifiers}]}
        result = rqat_sdk.oneshot(args.testbed, recipe, dtype="float32", device="cpu")
        seconds = round(time.perf_counter() - started, 1)
        rows[name] = {"pass_at_1": pass_at_1(result.model, result.tokenizer), "ptq_seconds": seconds,
                      **result.record["stages"][0]["metrics"]}
        print(name, json.dumps(rows[name]), flush=True)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({**provenance, **rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
