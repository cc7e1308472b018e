"""benchmarks/paper_tables.py's bookkeeping: which jobs a command plans, and how runs measured in separate
processes (``--workers``) merge into the rows one process would have written."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import pytest

import rqat_sdk

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
            "table3_matched": False, "grpo_cache": "dynamic", "teacher_precision": "bf16"}
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


def test_tasks_go_seed_by_seed_costliest_first(tables):
    rtn = tables.Job("5", "W3G128", "RTN", "rtn", ())
    gptq = tables.Job("5", "W3G128", "GPTQ", "gptq", ())
    grpo = tables.Job("5", "W3G128", "GPTQ+KD+GRPO", "gptq", ("kd", "grpo"))
    same_recipe = tables.Job("3", "W3G128", "GPTQ", "gptq", (), calibration="testbed", qat_data=None)
    tasks = tables.planned_tasks([rtn, gptq, grpo, same_recipe], 3, 2)
    assert tasks == [(grpo.key, 3), (gptq.key, 3), (rtn.key, 3), (grpo.key, 4), (gptq.key, 4)]


def test_table3_domains_name_the_recipe_sources(tables):
    assert tables.domain_source("mixed", "worked-math") == "worked-math + wikipedia"
    assert tables.domain_source("mixed-3to1", "worked-math") == {"worked-math": 3.0, "wikipedia": 1.0}
    args = _args(benchmark="worked-math", max_seq_length=512, qat_steps=10, qat_lr=1e-3, grpo_steps=1, grpo_lr=1e-5,
                 grpo_prompts=2, grpo_data=None, group_size_fallback="error")
    plan = tables.recipe("W3G128", "gptq", ["kd"], args, qat_data="mixed-3to1", calibration="mixed-3to1")
    assert [stage["data"]["source"] for stage in plan["stages"]] == [{"worked-math": 3.0, "wikipedia": 1.0}] * 2
    rqat_sdk.Recipe.from_dict(plan)


def test_an_fp8_teacher_goes_to_the_kd_stages_only_and_is_recorded(tables):
    args = _args(benchmark="worked-math", max_seq_length=512, qat_steps=10, qat_lr=1e-3, grpo_steps=1, grpo_lr=1e-5,
                 grpo_prompts=2, grpo_data=None, group_size_fallback="error", teacher_precision="fp8")
    plan = tables.recipe("W3G128", "gptq", ["sft", "kd"], args)
    precisions = {stage["name"]: stage["modifiers"][0].get("teacher_precision") for stage in plan["stages"][1:]}
    assert precisions == {"sft": None, "kd": "fp8"}
    rqat_sdk.Recipe.from_dict(plan)  # SFT with an FP8 teacher would be refused
    assert tables.training_settings(["kd"], args)["teacher_precision"] == "fp8"
    assert "teacher_precision" not in tables.training_settings(["sft"], args)
    bf16 = argparse.Namespace(**{**vars(args), "teacher_precision": "bf16"})
    assert "teacher_precision" not in tables.training_settings(["kd"], bf16)


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
    (parts / f"{job.key}_s2.log").write_text("kd (kd): 0/10\ntorch.OutOfMemoryError: CUDA out of memory.\n")
    for name, command, teacher in (("launch.json", "python a.py --first", None),  # a build before digests
                                   ("launch-1.json", "python a.py --second", "d" * 64)):
        (parts / name).write_text(json.dumps({"command": command, "date": "2026-11-30", "commit": "c" * 40,
                                              "teacher_weights_sha256": teacher}))
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
    assert record["failed"] == [{"job": job.key, "seed": 2, "log": f"{job.key}_s2.log",
                                 "error": "torch.OutOfMemoryError: CUDA out of memory."}]
    assert record["model"] == "m" and record["device"] == "GPU"
    # two runs shared the parts (--merge-only adds its own command last)
    assert record["commands"][:2] == ["python a.py --first", "python a.py --second"]
    assert record["teacher_weights_sha256"] == "d" * 64
    # a third run on another teacher build: its rows would not compare, so the merge refuses
    (parts / "launch-2.json").write_text(json.dumps({"command": "python a.py --third", "date": "2026-12-01",
                                                     "commit": "c" * 40, "teacher_weights_sha256": "e" * 64}))
    with pytest.raises(SystemExit, match="2 different teachers"):
        tables.merge_parts(parts, tasks, [job, same_recipe], _args(), None, 0.0)


class _FakeJob:
    """Stands in for a job's process: the first launch of ``oom`` runs out of GPU memory, every other launch
    writes its part file at once."""

    launches: list[tuple[str, str]] = []
    oom = "W3G128_GPTQ+KD"

    def __init__(self, command, stdout, stderr, env):
        key, part = command[command.index("--job") + 1], Path(command[command.index("--json") + 1])
        first = all(launched != key for launched, _ in self.launches)
        self.launches.append((key, env.get("CUDA_VISIBLE_DEVICES")))
        if key == self.oom and first:
            stdout.write("torch.OutOfMemoryError: CUDA out of memory.\n")
            self.returncode = 1
            return
        row = {"table": "5", "scheme": "W3G128", "method": key.split("_")[1], "seconds": 1.0,
               **_over([_run(int(command[command.index("--seed") + 1]), [0.5], 10.0)])}
        part.write_text(json.dumps({"bf16": None, "rows": [row], "device": "GPU", "model": "m", "testbed": "t"}))
        if key.endswith("+GRPO"):  # as train_and_measure does: the job it extends, measured on the way
            shorter = {**row, "method": row["method"].removesuffix("+GRPO")}
            part.with_name(part.name.replace("+GRPO", "")).write_text(json.dumps(
                {"bf16": None, "rows": [shorter], "device": "GPU", "model": "m", "testbed": "t"}))
        self.returncode = 0

    def poll(self):
        return self.returncode


def _over(runs):
    return {"pass_at_1": runs[0]["pass_at_1"], "std": 0.0, "seeds": 1, "runs": runs}


def _fake_workers(tables, tmp_path, monkeypatch, **overrides) -> argparse.Namespace:
    """The arguments of a --workers run of Table 5 whose jobs are :class:`_FakeJob`s."""
    import subprocess

    monkeypatch.setattr(subprocess, "Popen", _FakeJob)
    monkeypatch.setattr(tables.time, "sleep", lambda seconds: None)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    monkeypatch.setenv("RQAT_COMMIT", "0" * 40)  # no git process under the fake Popen
    _FakeJob.launches = []
    return _args(tables=["5"], merge_only=False, bf16_json=tmp_path / "none.json", json=tmp_path / "t.json",
                 samples=1, bf16_samples=None, problems=1, qat_steps=1, qat_lr=1e-4, grpo_steps=1, grpo_lr=1e-5,
                 grpo_prompts=1, dtype="float32", group_size_fallback="error", ppl_paragraphs=0,
                 eval_batch_size=None, eval_cache="dynamic", grpo_data=None, plot=None, **overrides)


def test_a_job_out_of_gpu_memory_is_retried_with_fewer_beside_it(tables, tmp_path, monkeypatch, capsys):
    args = _fake_workers(tables, tmp_path, monkeypatch, methods=["GPTQ", "GPTQ+KD"], training_seeds=1, workers=3,
                         oom_retries=1)
    jobs = tables.planned_jobs(args)
    assert tables.run_parallel(args, jobs, "m", 0.0) == 0
    assert [key for key, _ in _FakeJob.launches] == ["W3G128_GPTQ+KD", "W3G128_GPTQ", "W3G128_GPTQ+KD"]
    assert "W3G128_GPTQ+KD seed 0 on GPU 0: FAILED (exit 1): out of GPU memory, retried with at most 1 jobs" in (
        capsys.readouterr().out)
    record = json.loads(args.json.read_text())
    assert [row["method"] for row in record["rows"]] == ["GPTQ", "GPTQ+KD"] and record["failed"] == []


def test_a_grpo_job_measures_the_job_it_extends(tables, tmp_path, monkeypatch):
    grpo = tables.Job("5", "W3G128", "GPTQ+KD+GRPO", "gptq", ("kd", "grpo"))
    kd = tables.Job("5", "W3G128", "GPTQ+KD", "gptq", ("kd",))
    mixed = tables.Job("3", "W3G128", "GPTQ+KD", "gptq", ("kd",), calibration="mixed", qat_data="mixed")
    jobs = [kd, grpo, mixed]
    assert tables.prefix(grpo, jobs) == kd and tables.extension(kd, jobs) == grpo
    assert tables.prefix(kd, jobs) is None and tables.extension(mixed, jobs) is None
    args = _fake_workers(tables, tmp_path, monkeypatch, methods=["GPTQ+KD", "GPTQ+KD+GRPO"], training_seeds=2,
                         workers=2, oom_retries=0)
    assert tables.run_parallel(args, tables.planned_jobs(args), "m", 0.0) == 0
    assert [key for key, _ in _FakeJob.launches] == ["W3G128_GPTQ+KD+GRPO"] * 2
    record = json.loads(args.json.read_text())
    assert [(row["method"], row["training_seeds"]) for row in record["rows"]] == [("GPTQ+KD", 2), ("GPTQ+KD+GRPO", 2)]


def test_parts_trained_otherwise_are_not_resumed(tables, tmp_path, monkeypatch):
    """A rerun that shares part files must train as they were trained: its rows would otherwise mix settings."""
    args = _fake_workers(tables, tmp_path, monkeypatch, methods=["GPTQ"], training_seeds=1, workers=1,
                         oom_retries=0)
    assert tables.run_parallel(args, tables.planned_jobs(args), "m", 0.0) == 0
    launch = json.loads((args.json.with_suffix(".parts") / "launch.json").read_text())
    assert launch["training"] == {"qat_lr": 1e-4, "qat_steps": 1, "grpo_lr": 1e-5, "grpo_steps": 1}
    assert tables.run_parallel(args, tables.planned_jobs(args), "m", 0.0) == 0  # the same settings resume
    fp8 = argparse.Namespace(**{**vars(args), "teacher_precision": "fp8"})
    with pytest.raises(SystemExit, match=r"holds rows trained with \{'qat_lr': 0.0001.*not this run's .*'fp8'"):
        tables.run_parallel(fp8, tables.planned_jobs(fp8), "m", 0.0)


def test_train_and_measure_gives_the_shorter_recipe_its_checkpoint(tables, tmp_path):
    from rqat_sdk.testbed.train import EMBEDDED

    args = _args(testbed=EMBEDDED, benchmark="testbed", max_seq_length=256, qat_steps=2, qat_lr=1e-4,
                 grpo_steps=1, grpo_lr=1e-5, grpo_prompts=2, grpo_data=None, group_size_fallback="error",
                 problems=4, samples=1, dtype="float32", eval_batch_size=None, eval_cache="dynamic",
                 ppl_paragraphs=0)
    grpo = tables.Job("5", "W2G64", "RTN+KD+GRPO", "rtn", ("kd", "grpo"))
    kd = tables.Job("5", "W2G64", "RTN+KD", "rtn", ("kd",))
    runs = tables.train_and_measure(grpo, kd, 0, args)
    assert set(runs) == {grpo.key, kd.key}
    assert set(runs[kd.key]["codes_changed"]) == {"kd"}
    assert set(runs[grpo.key]["codes_changed"]) == {"kd", "grpo"}
    assert runs[kd.key]["codes_changed"]["kd"] == runs[grpo.key]["codes_changed"]["kd"]


def test_both_ways_cuda_reports_running_out_of_memory_count(tables, tmp_path):
    log = tmp_path / "job.log"
    for text, expected in (("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 512.00 MiB", True),
                           ("torch.AcceleratorError: CUDA error: out of memory", True),
                           ("RuntimeError: shape mismatch", False)):
        log.write_text(f"kd (kd): 3/300\n{text}\n")
        assert tables.out_of_memory(log) is expected


def test_a_run_on_another_teacher_build_stops_before_any_job(tables, tmp_path, monkeypatch):
    testbed = tmp_path / "teacher"
    testbed.mkdir()
    (testbed / "testbed.json").write_text(json.dumps({"weights_sha256": "a" * 64}))
    args = _fake_workers(tables, tmp_path, monkeypatch, methods=["GPTQ"], training_seeds=1, workers=1,
                         oom_retries=0, testbed=testbed)
    jobs = tables.planned_jobs(args)
    assert tables.run_parallel(args, jobs, "m", 0.0) == 0
    assert json.loads(args.json.read_text())["teacher_weights_sha256"] == "a" * 64
    # the same build again resumes (nothing left to run); a rebuilt teacher with another digest is refused
    assert tables.run_parallel(args, jobs, "m", 0.0) == 0
    launched = len(_FakeJob.launches)
    (testbed / "testbed.json").write_text(json.dumps({"weights_sha256": "b" * 64}))
    with pytest.raises(SystemExit, match="another teacher build"):
        tables.run_parallel(args, jobs, "m", 0.0)
    assert len(_FakeJob.launches) == launched and len(list(args.json.with_suffix(".parts").glob("launch*"))) == 2
