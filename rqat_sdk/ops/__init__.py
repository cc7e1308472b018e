"""Numerical building blocks: fake quantization and distillation losses, each with a plain reference."""

import importlib.util

import torch

TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
"""Whether Triton is installed, found without importing it (importing rqat_sdk loads torch alone); a plain
constant, which a compiled graph reads without tracing a check."""


def use_triton(tensor: torch.Tensor) -> bool:
    """Whether the fused Triton kernels serve ``tensor``: on CUDA, with Triton installed."""
    return tensor.is_cuda and TRITON_INSTALLED
