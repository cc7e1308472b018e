"""The fused FlatQuant kernels' math on the CPU, through Triton's interpreter, against the PyTorch path.

The interpreter runs the kernels' Python with NumPy, so their indexing, padding, masks and gradients (ties
included) are checked on every machine with Triton installed. It runs in a separate process: Triton reads
``TRITON_INTERPRET`` when a kernel is defined, and a process that goes on to run the CUDA tests must keep the
compiled kernels. Only float32 is compared: the interpreter truncates float32 to bf16 where the GPU rounds to
nearest even, so bf16 stays with ``tests/test_gpu.py``.
"""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton", reason="Triton is not installed (the interpreter needs it, not a GPU)")

CHECK = r"""
import json
import torch
from rqat_sdk.ops.affine_transform import kronecker_sizes, random_orthogonal, transform_and_clip
from rqat_sdk.ops.triton_affine_transform import TritonKroneckerTransform
from rqat_sdk.scheme import QuantScheme

activations = QuantScheme.model_validate("W4A4").input_activations.to_args()
errors = {}
for width, smoothing, clipping, asked in [
    (1024, True, True, "all"), (3072, True, True, "all"), (96, False, True, "all"), (561, True, False, "all"),
    (35, False, True, "x"), (35, False, True, "factors"), (64, False, False, "all"),
]:
    generator = torch.Generator().manual_seed(width)
    n1, n2 = kronecker_sizes(width)
    # column-major factors (QR's layout) and a non-contiguous input: the kernels must read them row-major
    left = (random_orthogonal(n1, generator) + 0.2 * torch.randn(n1, n1, generator=generator)).T
    right = random_orthogonal(n2, generator) + 0.2 * torch.randn(n2, n2, generator=generator)
    smooth = torch.rand(width, generator=generator) + 0.5 if smoothing else None
    logit = torch.tensor(0.5) if clipping else None
    x = (torch.randn(37, 2, width, generator=generator) * torch.logspace(-1, 1, 37)[:, None, None]).transpose(0, 1)
    if width == 35:  # integers through identity factors: ties at each token's range and at the clipping bounds
        x = torch.randint(-3, 4, x.shape, generator=generator).float()
        left, right = torch.eye(n1), torch.eye(n2)
    tensors = {"x": x, "left": left, "right": right, "smooth": smooth, "clip": logit}
    wanted = [n for n, t in tensors.items() if t is not None and (asked == "all" or (n == "x") == (asked == "x"))]
    for name, tensor in tensors.items():
        if tensor is not None:
            tensor.requires_grad_(name in wanted)
    upstream = torch.randn(x.shape, generator=generator)
    expected = transform_and_clip(x, left, right, smooth, logit, activations if clipping else None)
    factor = torch.sigmoid(logit) if clipping else None
    fused = TritonKroneckerTransform.apply(x, left, right, smooth, factor)
    leaves = [tensors[n] for n in wanted]
    grads = torch.autograd.grad((fused * upstream).sum(), leaves)
    expected_grads = torch.autograd.grad((expected * upstream).sum(), leaves)
    case = f"{width}-{smoothing}-{clipping}-{asked}"
    scale = expected.detach().abs().amax(-1, keepdim=True)
    errors[f"{case} forward"] = ((fused - expected).abs() / scale).max().item()
    for name, actual, reference in zip(wanted, grads, expected_grads, strict=True):
        errors[f"{case} {name}"] = ((actual - reference).norm() / reference.norm()).item()
print(json.dumps(errors))
"""


def test_the_fused_flatquant_kernels_match_the_pytorch_path_in_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    errors = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(errors) == 7 + 25  # every case's forward and each gradient asked for
    # float32 sums of at most 64 products in another order
    assert all(error < 1e-5 for error in errors.values()), {k: v for k, v in errors.items() if v >= 1e-5}
