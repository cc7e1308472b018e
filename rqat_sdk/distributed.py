"""Multi-process training without a launcher of our own: ``accelerate launch`` or ``torchrun`` start the
processes and set ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``; this module joins them (NCCL on GPUs, gloo on
CPUs) and wraps the student in DDP or FSDP2.

Every rank runs the whole recipe (PTQ is deterministic given the same seeded data, so every rank reaches
the same quantized model); training shards the data across ranks; only the main rank writes files.
"""

from __future__ import annotations

import os
from typing import Literal

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

Strategy = Literal["ddp", "fsdp"]


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def sharded(strategy: Strategy) -> bool:
    return strategy == "fsdp" and dist.is_initialized()


def launched() -> bool:
    """True when a launcher started several processes for this run."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def initialize() -> None:
    """Join the process group the launcher set up (idempotent; a no-op for a single process)."""
    if launched() and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(local_device())
            # Naming the device binds NCCL to it (without, NCCL guesses it from the global rank).
            dist.init_process_group("nccl", device_id=local_device())
        else:
            dist.init_process_group("gloo")


def local_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def wrap(
    module: torch.nn.Module, strategy: Strategy, layers: list[torch.nn.Module], compute_dtype: torch.dtype
) -> torch.nn.Module:
    """DDP or FSDP2 around ``module`` (``layers``: the transformer blocks FSDP shards one by one).

    FSDP2 keeps sharded fp32 parameters as the masters and gathers them in ``compute_dtype``. Integer
    parameters (compressed-tensors' zero points) stay whole on every rank: they are frozen, and torch 2.11's
    FSDP2 fails to shard them ("only Tensors of floating point dtype can require gradients").
    """
    if not dist.is_initialized():
        return module
    if strategy == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        module.float()
        policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
        integer = {parameter for parameter in module.parameters() if not parameter.is_floating_point()}
        for layer in layers:
            fully_shard(layer, mp_policy=policy, ignored_params=integer)
        fully_shard(module, mp_policy=policy, ignored_params=integer)
        return module

    device_ids = [torch.cuda.current_device()] if torch.cuda.is_available() else None
    return DistributedDataParallel(module, device_ids=device_ids)
