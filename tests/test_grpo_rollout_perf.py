"""benchmarks/grpo_rollout_perf.py on a tiny shape on the CPU: every rollout variant runs, keeps the policy's
greedy tokens, and the record names what the issue's JSON needs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "grpo_rollout_perf.py"


def test_every_rollout_variant_keeps_the_policy_tokens(tmp_path):
    out = tmp_path / "rollout.json"
    subprocess.run([sys.executable, SCRIPT.name, "--shape", "tiny", "--prompts", "3", "--completions", "2",
                    "--new-tokens", "12", "--prompt-tokens", "6", "--json", str(out)],
                   cwd=SCRIPT.parent, check=True, capture_output=True, text=True)
    record = json.loads(out.read_text())
    assert {"command", "device", "date", "commit", "baseline_tokens_per_s", "tokens_per_s"} <= set(record)
    assert [row["variant"] for row in record["variants"]] == ["per_token", "once", "once_static"]
    assert all(row["greedy_tokens_match_baseline"] for row in record["variants"])
    assert all(row["completion_tokens"] == 3 * 2 * 12 for row in record["variants"])
