"""benchmarks/grpo_rollout_perf.py on a tiny shape on the CPU: every rollout variant runs, keeps the policy's
greedy tokens, and the record names what the issue's JSON needs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "grpo_rollout_perf.py"


@pytest.mark.parametrize("padded", [False, True])
def test_every_rollout_variant_keeps_the_policy_tokens(tmp_path, padded):
    out = tmp_path / "rollout.json"
    subprocess.run([sys.executable, SCRIPT.name, "--shape", "tiny", "--prompts", "3", "--completions", "2",
                    "--new-tokens", "12", "--prompt-tokens", "8", "--json", str(out),
                    *(["--padded"] if padded else [])],
                   cwd=SCRIPT.parent, check=True, capture_output=True, text=True)
    record = json.loads(out.read_text())
    assert {"command", "device", "date", "commit", "baseline_tokens_per_s", "tokens_per_s"} <= set(record)
    assert record["padded"] is padded
    assert [row["variant"] for row in record["variants"]] == ["per_token", "once", "once_preallocated", "once_grouped",
                                                               "once_cuda_graph", "once_static"]
    assert all(row["greedy_tokens_match_baseline"] for row in record["variants"])
    assert all(row["completion_tokens"] == 3 * 2 * 12 for row in record["variants"])
    # 12 new tokens: the prefill's, then 11 decoding steps, clocked by quarter
    clocked = [row for row in record["variants"] if row["variant"] != "once_cuda_graph"]
    assert all(list(row["step_ms"]) == ["1-2", "3-5", "6-8", "9-11"] and min(row["step_ms"].values()) > 0
               for row in clocked)


def test_first_difference_names_the_step_the_margin_and_the_logit_distance(monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    from grpo_rollout_perf import first_difference

    logits = torch.zeros(3, 2, 5)  # [steps, batch, vocab]
    logits[:, :, 0] = 1.0
    logits[2, 1, 3] = 0.99  # row 1's step 2: a near tie between tokens 0 and 3
    tokens = logits.argmax(-1).T  # [batch, steps]
    assert first_difference((tokens, logits), (tokens.clone(), logits.clone()), torch.bfloat16) is None

    flipped_logits = logits.clone()
    flipped_logits[0, 0, 0] += 0.001  # computation noise at step 0, no token changes
    flipped_logits[2, 1, 3] += 0.02
    flipped = flipped_logits.argmax(-1).T
    # a near tie: the margin (0.01) within the paths' distance (0.02), itself within 8 bf16 ulps at 1.0 (0.0625)
    assert first_difference((tokens, logits), (flipped, flipped_logits), torch.bfloat16) == {
        "step": 2, "row": 1, "baseline_margin": 0.01, "max_logit_diff": 0.02, "max_logit_diff_before": 0.001,
        "rounding": 0.0625, "near_tie": True}
    wrong = flipped_logits.clone()
    wrong[2, 1, 3] += 0.5  # the same flip from an error far beyond rounding
    assert first_difference((tokens, logits), (wrong.argmax(-1).T, wrong), torch.bfloat16)["near_tie"] is False
