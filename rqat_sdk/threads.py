"""How many CPU threads rqat's math runs on.

PyTorch starts one intra-op thread per physical core. For a tiny model (the testbed's 0.46M parameters) each
operation is smaller than the cost of synchronising those threads, and when another process holds one core
the threads spin-wait on a descheduled partner, and a step takes many times longer than on one thread
(docs/performance.md, "CPU threads"). So on CPU rqat runs models below ``TINY_PARAMETERS`` on one thread, and
leaves larger ones on torch's default.

A count the user chose wins: ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` in the environment, or an earlier
``torch.set_num_threads`` (seen as a count that is neither torch's default nor the one rqat last set).
The choice is process-wide and stays after the call; it is logged at DEBUG level.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

import torch

log = logging.getLogger(__name__)

TINY_PARAMETERS = 20_000_000
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")

_rqat_count: int | None = None  # the count rqat last set, so that a later call does not take it for the user's


def choose_threads(
    parameters: int, *, current: int, default: int, env: Mapping[str, str], rqat_count: int | None
) -> tuple[int, str]:
    """The intra-op thread count for a model of ``parameters`` on CPU, and why (for the log)."""
    for name in THREAD_VARIABLES:
        if env.get(name):
            return current, f"{name}={env[name]} is set"
    if current not in (default, rqat_count):
        return current, "torch.set_num_threads was called"
    if parameters < TINY_PARAMETERS:
        return 1, f"{parameters / 1e6:.2f}M parameters < {TINY_PARAMETERS / 1e6:.0f}M: more threads only synchronise"
    return default, f"{parameters / 1e6:.0f}M parameters: torch's default"


def torch_default_threads() -> int:
    """Torch's own intra-op default (one per physical core), which the inter-op pool also uses and which
    ``torch.set_num_threads`` does not change."""
    return torch.get_num_interop_threads()


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def configure_threads(model: torch.nn.Module) -> int:
    """Set the process's intra-op thread count for running ``model``, if it is on CPU; return the count."""
    global _rqat_count
    first = next(model.parameters(), None)
    if first is None or first.device.type != "cpu":
        return torch.get_num_threads()
    parameters = sum(p.numel() for p in model.parameters())
    count, why = choose_threads(
        parameters, current=torch.get_num_threads(), default=torch_default_threads(), env=os.environ,
        rqat_count=_rqat_count,
    )
    if count != torch.get_num_threads():
        torch.set_num_threads(count)
        _rqat_count = count
    log.debug("CPU threads: %d (%s)", count, why)
    return count
