"""benchmarks/paper_tables.py's bookkeeping: which jobs a command plans, and how runs measured in separate
processes (``--workers``) merge into the rows one process would have written."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "paper_tables.py"


@pytest.fixture(scope="module")
def tables():
    sys.path.insert(0, str(SCRIPT.parent))  # the script imports its sibling provenance.py, as when it runs
    spec = importlib.util.spec_from_file_location("paper_tables", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]
    sys.path.remove(str(SCRIPT.parent))


def _args(**overrides) -> argparse.Namespace:
    args = {"schemes": ["W3G128"], "tables": ["5", "4"], "methods": None, "domains": ["testbed", "mixed"],
            "table3_scheme": "W3G128", "seed": 0, "training_seeds": 3, "workers": 2, "bf16_json": None,
            "merge_only": True, "testbed": Path("unused"), "json": None, "qat_learn_scales": False,
            "table3_matched": False}
    return argparse.Namespace(**{**args, **overrides})


def _run(seed: int, per_sample: list[float], ppl: float) -> dict:
    return {"seed": seed, "pass_at_1": sum(per_sample) / len(per_sample), "std": 0.0, "seeds": len(per_sample),
            "mean_response_tokens": 100.0, "per_sample": per_sample, "wiki_ppl": ppl}


def test_planned_jobs_follow_the_tables_and_the_method_filter(tables):
    jobs = tables.planned_jobs(_args())
    assert [job.method for job in jobs] == ["RTN", "RTN+SFT", "RTN+KD", "RTN+KD+GRPO", "GPTQ", "GPTQ+SFT",
                                            "GPTQ+KD", "GPTQ+KD+GRPO", "AWQ"]
    picked = tables.planned_jobs(_args(methods=["RTN", "GPTQ+KD"], tables=["5", "3"]))
    assert [(job.table, job.method, job.calibration, job.qat_data) for job in picked] == [
        ("5", "RTN", None, None), ("5", "GPTQ+KD", None, None),
        ("3", "GPTQ+KD", "testbed", "testbed"), ("3", "GPTQ+KD", "testbed", "mixed"),
        ("3", "GPTQ+KD", "mixed", "testbed"), ("3", "GPTQ+KD", "mixed", "mixed")]
    # round-to-nearest alone reads no data: one run stands for every training seed
    assert [job.deterministic for job in picked] == [True, False, False, False, False, False]
    # Table 3's all-reasoning-data cell runs Table 5's recipe: one key, so its runs are measured once
    assert len({job.key for job in picked}) == len(picked) - 1
    assert picked[1].key == picked[2].key == "W3G128_GPTQ+KD" and picked[3].key == "W3G128_GPTQ+KD_testbed_mixed"
    matched = tables.planned_jobs(_args(methods=["GPTQ+KD"], tables=["3"], table3_matched=True))
    assert [(job.calibration, job.qat_data) for job in matched] == [("testbed", "testbed"), ("mixed", "mixed")]


def test_rows_over_training_seeds_keep_every_run(tables):
    runs = [_run(0, [0.5, 0.7], 10.0), _run(1, [0.6, 0.6], 20.0)]
    row = tables.over_training_seeds(runs)
    assert row["pass_at_1"] == pytest.approx(0.6)
    assert row["training_seeds"] == 2
    assert row["per_training_seed"] == [pytest.approx(0.6), pytest.approx(0.6)]
    assert row["wiki_ppl"] == pytest.approx(15.0)
    assert row["runs"] == runs
    single = tables.over_training_seeds(runs[:1])
    assert "per_sample" not in single and single["runs"] == runs[:1]


def test_part_files_merge_into_the_rows_of_one_process(tables, tmp_path):
    parts = tmp_path / "x.parts"
    parts.mkdir()
    bf16 = tables.over_training_seeds([_run(0, [0.8, 0.8], 5.0)])
    (parts / "BF16_s0.json").write_text(json.dumps({"bf16": bf16, "rows": [], "device": "GPU", "model": "m",
                                                    "testbed": "t"}))
    job = tables.Job("5", "W3G128", "GPTQ+KD", "gptq", ("kd",))
    for seed, samples in ((0, [0.5, 0.7]), (1, [0.6, 0.6])):
        row = {"table": "5", "scheme": "W3G128", "method": "GPTQ+KD", "seconds": 10.0,
               **tables.over_training_seeds([_run(seed, samples, 20.0)])}
        (parts / f"{job.key}_s{seed}.json").write_text(json.dumps({"bf16": None, "rows": [row], "device": "GPU",
                                                                    "model": "m", "testbed": "t"}))
    tasks = [("BF16", 0), (job.key, 0), (job.key, 1), (job.key, 2)]
    same_recipe = tables.Job("3", "W3G128", "GPTQ+KD", "gptq", ("kd",), calibration="testbed", qat_data="testbed")
    record = tables.merge_parts(parts, tasks, [job, same_recipe], _args(), None, 0.0)
    merged, cell = record["rows"]
    assert (cell["table"], cell["calibration"], cell["qat_data"]) == ("3", "testbed", "testbed")
    assert cell["runs"] == merged["runs"] and "calibration" not in merged
    assert merged["training_seeds"] == 2 and merged["pass_at_1"] == pytest.approx(0.6)
    assert merged["bf16_pass_at_1"] == pytest.approx(0.8) and merged["seconds"] == 20.0
    assert [run["seed"] for run in merged["runs"]] == [0, 1]
    assert record["missing"] == [f"{job.key} seed 2"]
    assert record["model"] == "m" and record["device"] == "GPU"
