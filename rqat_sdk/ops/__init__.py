"""Numerical building blocks: fake quantization and distillation losses, each with a plain reference."""

import functools

import torch


@functools.cache
def _triton_installed() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def use_triton(tensor: torch.Tensor) -> bool:
    """Whether the fused Triton kernels serve ``tensor``: on CUDA, with Triton installed."""
    return tensor.is_cuda and _triton_installed()
