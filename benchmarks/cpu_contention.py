"""`rqat demo` on a quiet CPU and beside a busy process: does the README's main job stay fast when the CPU is shared?

Issue 22: beside one process that kept one of two cores busy, the demo's QAT stage ran 10-50x slower, because
torch's intra-op threads spin-wait on a descheduled partner. This script times the whole demo twice, quiet and
with a synthetic busy process (a Python loop pinned to the last core with ``os.sched_setaffinity``), and writes
``docs/results/cpu_contention.json``, with the table the quiet demo printed (``demo_table``: the README quotes
it). The target: contended <= 2x quiet. The demo runs without
``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS``, as a newcomer's would, so it measures rqat's own thread choice.
Run it on an otherwise idle machine: other load makes "quiet" contended too.

    python benchmarks/cpu_contention.py                                   # the record
    python benchmarks/cpu_contention.py --problems 4 --output /tmp/x.json # a smoke run of the script
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from provenance import git_commit

from rqat_sdk.threads import THREAD_VARIABLES

ROOT = Path(__file__).resolve().parents[1]
BUSY_LOOP = "import os, sys\nos.sched_setaffinity(0, {int(sys.argv[1])})\nwhile True:\n    pass\n"


def demo_arguments(args: argparse.Namespace) -> list[str]:
    """The ``rqat demo`` options under test (the output directory is added per run)."""
    return ["--recipe", args.recipe, "--problems", str(args.problems)]


def time_demo(demo_args: list[str]) -> tuple[float, str]:
    """Seconds for one ``rqat demo`` into a fresh temporary directory, with no thread variables set, and what
    it printed."""
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARIABLES}
    with tempfile.TemporaryDirectory(prefix="rqat-contention-") as tmp:
        command = [sys.executable, "-m", "rqat_sdk", "demo", "--output-dir", str(Path(tmp) / "demo"), *demo_args]
        started = time.perf_counter()
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"rqat demo failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return seconds, done.stdout


def demo_table(stdout: str) -> list[str]:
    """The last Markdown table the demo printed (its result: one row per model), line by line."""
    tables: list[list[str]] = []
    previous_was_row = False
    for line in stdout.splitlines():
        row = line.strip().startswith("|")
        if row and not previous_was_row:
            tables.append([])
        if row:
            tables[-1].append(line.strip())
        previous_was_row = row
    if not tables:
        sys.exit(f"rqat demo printed no table:\n{stdout[-2000:]}")
    return tables[-1]


def time_demo_beside_busy_process(demo_args: list[str]) -> float:
    """Seconds for one ``rqat demo`` while a busy loop holds the last core this process may use."""
    core = max(os.sched_getaffinity(0))
    busy = subprocess.Popen([sys.executable, "-c", BUSY_LOOP, str(core)])
    try:
        return time_demo(demo_args)[0]
    finally:
        busy.kill()
        busy.wait()


def device_description() -> str:
    """The CPU model and how many cores this process may use."""
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
             if line.startswith("model name")] if cpuinfo.is_file() else []
    return f"{names[0] if names else platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} cores"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="testbed_w2g64", help="the demo's recipe (default: the demo's own)")
    parser.add_argument("--problems", type=int, default=150, help="held-out problems per evaluation (demo default)")
    parser.add_argument("--output", type=Path, default=ROOT / "docs/results/cpu_contention.json")
    args = parser.parse_args()
    demo_args = demo_arguments(args)
    quiet, printed = time_demo(demo_args)
    print(f"quiet: {quiet:.1f} s", flush=True)
    contended = time_demo_beside_busy_process(demo_args)
    print(f"beside a busy process: {contended:.1f} s ({contended / quiet:.2f}x)")
    record = {
        "command": " ".join(["rqat", "demo", *demo_args]),
        "device": device_description(),
        "date": datetime.date.today().isoformat(),
        "commit": git_commit(),
        "quiet_s": round(quiet, 1),
        "contended_s": round(contended, 1),
        "demo_table": demo_table(printed),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
