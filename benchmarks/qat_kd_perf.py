"""QAT-KD step time and memory against a plain bf16 cross-entropy step, on one GPU.

Qwen3-0.6B's shape with random weights (vocab 151,936), batch 4 x 2,048 tokens, W3G128 (asymmetric RTN
scales). Every variant runs in this one process, one after another, with the same data:

- ``bf16_ce``: the bf16 model, ``model(input_ids, labels=...).loss``, fused AdamW: what a plain
  fine-tuning step costs;
- ``no_fake_quant_ce``: rqat's training step (chunked LM-head loss, fp32 master weights) with cross-entropy
  and no fake quantization: the baseline that isolates the fake-quantization cost;
- ``fake_quant_ce``: the same with W3G128 fake quantization (Triton kernels): ``fake_quant_overhead`` is
  its extra time over ``no_fake_quant_ce``, as a share of the QAT-KD step;
- ``qat_kd``: rqat's QAT-KD step, the ``DistillationTrainer`` itself: fake-quantized student, frozen bf16
  teacher, forward KL on chunked LM-head logits;
- ``qat_kd_fp8_teacher``: the same with the teacher's Linear layers in FP8 (``teacher_precision: fp8``,
  ``torch._scaled_mm``; the LM head stays bf16), on GPUs of compute capability 8.9+;
- ``qat_kd_compiled_teacher``: ``qat_kd`` with the teacher's transformer blocks under ``torch.compile``
  (``compile_teacher: true``; its compile is left out of the timed steps);
- ``qat_kd_compiled``: ``qat_kd`` with both models' blocks compiled (``compile_teacher`` and ``compile_student``);
- ``qat_kd_fp8_teacher_compiled``: the same with the FP8 teacher (both models' blocks compiled);
- ``naive_kd``: compressed-tensors' fake quantization and forward KL on full fp32 logits of both models,
  for reference.

It first checks the Triton kernels against the PyTorch path (bit-identical forward) and compressed-tensors, and
the FP8 teacher's ``_scaled_mm`` path against its float32 reference. ``--variants`` times some of them only
(``bf16_ce`` always, first). The JSON record is rewritten after every variant, listing under ``unfinished`` what
is still to run: a run stopped by a time limit keeps what it measured.

    python benchmarks/qat_kd_perf.py --json docs/results/qat_kd_perf.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import gc
import math
import shlex
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from provenance import git_commit

from rqat_sdk.files import write_json_atomic

QWEN3_0_6B = dict(
    vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
    num_key_value_heads=8, head_dim=128, max_position_embeddings=40960, tie_word_embeddings=True,
    rms_norm_eps=1e-6, rope_theta=1_000_000,
)
SHAPES = {
    "qwen3-0.6b": QWEN3_0_6B,
    "qwen3-1.7b": {**QWEN3_0_6B, "hidden_size": 2048, "intermediate_size": 6144},
    "qwen3-4b": {**QWEN3_0_6B, "hidden_size": 2560, "intermediate_size": 9728, "num_hidden_layers": 36,
                 "num_attention_heads": 32},
}
"""Qwen3 shapes (their configs' widths, depths and heads; random weights), for the step benchmarks."""


TEACHER_VARIANTS = ("qat_kd_fp8_teacher", "qat_kd_compiled_teacher", "qat_kd_compiled", "qat_kd_fp8_teacher_compiled")
"""The QAT-KD variants besides ``qat_kd`` that the record also gives as ``{name}_over_bf16_ce``."""
VARIANTS = ("bf16_ce", "no_fake_quant_ce", "fake_quant_ce", "qat_kd", *TEACHER_VARIANTS, "naive_kd")
"""Every variant, in the order a run times them; each is recorded as ``{name}_ms`` and ``{name}_peak_gb``."""


def check_kernels() -> list[str]:
    """Triton vs PyTorch path vs compressed-tensors on CUDA; returns one line per case."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    from rqat_sdk.ops.fake_quant import _WeightFakeQuant, fake_quantize_weight, int_range

    lines = []
    torch.manual_seed(0)
    for rows, cols in ((1024, 3072), (3072, 1024)):
        for bits in (2, 3, 4, 8):
            for group in (64, 128, None):
                for symmetric in (True, False):
                    w = torch.randn(rows, cols, device="cuda") * 0.02
                    g = group or cols
                    grouped = w.reshape(rows, cols // g, g)
                    qmin, qmax = int_range(bits)
                    if symmetric:
                        scale = grouped.abs().amax(-1) / ((qmax - qmin) / 2)
                        zero = torch.zeros(scale.shape, dtype=torch.int8, device="cuda")
                    else:
                        low, high = grouped.amin(-1), grouped.amax(-1)
                        scale = (high - low) / (qmax - qmin)
                        zero = (qmin - torch.round(low / scale)).clamp(qmin, qmax).to(torch.int8)
                    scale = (scale * 0.85).bfloat16()
                    args = QuantizationArgs(num_bits=bits, symmetric=symmetric, group_size=group,
                                            strategy="group" if group else "channel")
                    expected = fake_quantize(w.bfloat16(), scale, zero, args)
                    master = w.clone().requires_grad_(True)
                    s32 = scale.float().requires_grad_(True)
                    z32 = zero.float().requires_grad_(True)
                    out = fake_quantize_weight(master, s32, z32, bits, group, dtype=torch.bfloat16)
                    grad = torch.randn_like(out)
                    out.backward(grad)
                    ref_w = master.detach().clone().requires_grad_(True)
                    ref_s = scale.float().requires_grad_(True)
                    ref_z = zero.float().requires_grad_(True)
                    ref = _WeightFakeQuant.apply(ref_w, ref_s, ref_z, qmin, qmax, g, torch.bfloat16)
                    ref.backward(grad)
                    ok = (
                        torch.equal(out, expected)
                        and torch.equal(out, ref)
                        and torch.equal(master.grad, ref_w.grad)
                        and torch.allclose(s32.grad, ref_s.grad, rtol=1e-4, atol=1e-4)
                        and torch.allclose(z32.grad, ref_z.grad, rtol=1e-4, atol=1e-4)
                    )
                    lines.append(f"{'ok ' if ok else 'BAD'} {rows}x{cols} W{bits} g{group} sym={symmetric}")
    return lines


def check_fp8() -> list[str]:
    """The FP8 ``_scaled_mm`` path against its float32 reference on the shape's projections; one line each."""
    from rqat_sdk.ops.fp8 import FP8Linear, fp8_linear_reference, fp8_linear_scaled_mm

    lines = []
    torch.manual_seed(0)
    for rows, cols in ((2048, 1024), (1024, 1024), (1024, 2048), (3072, 1024), (1024, 3072)):  # q, k/v, o, up, down
        layer = FP8Linear.from_linear(torch.nn.Linear(cols, rows, bias=False, device="cuda", dtype=torch.bfloat16))
        x = torch.randn(8192, cols, device="cuda", dtype=torch.bfloat16)
        out = fp8_linear_scaled_mm(x, layer.w_fp8, layer.w_scale).float()
        ref = fp8_linear_reference(x, layer.w_fp8, layer.w_scale).float()
        ok = (out - ref).abs().max() <= 2**-7 * ref.abs().max()  # the bound tests/test_gpu.py holds it to
        lines.append(f"{'ok ' if ok else 'BAD'} fp8 {rows}x{cols}")
    return lines


@contextlib.contextmanager
def pytorch_kv_quantizer():
    """KV-cache fake quantization through its PyTorch path instead of the fused kernel (the kernel's baseline)."""
    from rqat_sdk.ops import triton_kv_cache

    fused = triton_kv_cache.supports
    triton_kv_cache.supports = lambda x: False
    try:
        yield
    finally:
        triton_kv_cache.supports = fused


def synthetic_batch(batch: int, seq: int, vocab: int):
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq), generator=generator)
    return ids


def measure(step, warmup: int, steps: int) -> tuple[float, float]:
    """Median step time (ms) and peak memory (GB) over ``steps`` after ``warmup``."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), torch.cuda.max_memory_allocated() / 1e9


def fresh_model(seed: int = 0, shape: dict = QWEN3_0_6B, device: str | torch.device = "cuda",
                dtype: torch.dtype = torch.bfloat16):
    """A Qwen3 model of ``shape`` with random weights (seeded), on ``device`` in ``dtype``."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    config = Qwen3Config(**shape)
    config._attn_implementation = "sdpa"
    with torch.device(device):
        model = Qwen3ForCausalLM(config)
    return model.to(dtype)


def quantize_w3g128(model):
    import rqat_sdk

    recipe = {"version": 1, "scheme": "W3G128", "stages": [{"name": "ptq", "modifiers": [{"type": "rtn"}]}]}
    return rqat_sdk.oneshot(model, recipe, tokenizer=_Tokenizer()).model


class _Tokenizer:
    """oneshot needs a tokenizer object; RTN reads no data."""

    pad_token_id = 0
    chat_template = None


def cleanup():
    gc.collect()
    torch._dynamo.reset()  # a compiled teacher's graphs hold its weights
    torch.cuda.empty_cache()


def bench_bf16_ce(ids, warmup, steps):
    model = fresh_model()
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, betas=(0.9, 0.95), fused=True)

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    result = measure(step, warmup, steps)
    model = optimizer = None  # drop the references (the closures share them) before cleanup()
    cleanup()
    return result


def rqat_trainer(student, teacher, ids, objective: str, strategy: str = "ddp", *, compile_teacher: bool = False,
                 compile_student: bool = False, micro_batches: int = 1):
    """rqat's training step on ``ids``; under a launcher each rank trains on its own share of the rows, in
    ``micro_batches`` forward and backward passes whose gradients accumulate into one optimizer step."""
    from datasets import Dataset

    from rqat_sdk import distributed
    from rqat_sdk.modifiers.qat.batches import StepBatches
    from rqat_sdk.modifiers.qat.trainer import DistillationTrainer, TrainerConfig, TrainerPaths
    from rqat_sdk.ops.distill import LossSpec

    rows = [{"input_ids": r, "labels": r} for r in ids.tolist()]
    per_rank = len(rows) // distributed.world_size()
    config = TrainerConfig(loss=LossSpec(divergence="forward_kl" if objective == "kd" else "ce"), steps=10_000,
                           learning_rate=1e-6, logging_steps=10_000, save_steps=10_000, distributed=strategy,
                           compile_teacher=compile_teacher, compile_student=compile_student)
    batches = StepBatches(Dataset.from_list(rows), batch_size=len(rows), micro_batch_size=per_rank // micro_batches,
                          seed=0, pad_token_id=0, packing=False, rank=distributed.rank(),
                          world_size=distributed.world_size())
    trainer = DistillationTrainer(
        config, student, teacher, batches,
        device=distributed.local_device(), paths=TrainerPaths(None, None), fingerprint="bench", stage="bench",
    )
    student.train()
    counter = iter(range(10**9))
    return trainer, lambda: trainer.step(next(counter))


def bench_rqat(ids, warmup, steps, *, fake_quant: bool, objective: str, kernels: dict | None = None,
               fp8_teacher: bool = False, compile_teacher: bool = False, compile_student: bool = False):
    from rqat_sdk.modifiers.layers import attach_fake_quant, detach_fake_quant
    from rqat_sdk.ops.fp8 import linears_to_fp8_

    model = fresh_model()
    teacher = copy.deepcopy(model).eval().requires_grad_(False) if objective == "kd" else None
    if fp8_teacher:
        linears_to_fp8_(teacher, keep=[teacher.get_output_embeddings()])  # as SessionState.teacher does
    if fake_quant:
        model = quantize_w3g128(model)
        attach_fake_quant(model, dtype=torch.bfloat16, learn_scales=False, learn_clipping=False)
    trainer, step = rqat_trainer(model, teacher, ids, objective, compile_teacher=compile_teacher,
                                 compile_student=compile_student)
    # a compile happens in the first steps
    result = measure(step, warmup + 2 * (compile_teacher or compile_student), steps)
    if kernels is not None:
        kernels.update(kernel_time(step))
    if fake_quant:
        detach_fake_quant(model)
    del model, teacher, trainer, step
    cleanup()
    return result


def bench_naive_kd(ids, warmup, steps):
    model = fresh_model()
    teacher = copy.deepcopy(model).eval().requires_grad_(False)
    model = quantize_w3g128(model)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, betas=(0.9, 0.95), fused=True)

    def step():
        with torch.no_grad():
            teacher_logits = teacher(input_ids=ids).logits.float()
        logits = model(input_ids=ids).logits.float()
        loss = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(teacher_logits, -1), log_target=True,
                        reduction="batchmean")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    result = measure(step, warmup, steps)
    model = teacher = optimizer = None  # drop the references (the closures share them) before cleanup()
    cleanup()
    return result


def kernel_time(step, steps: int = 3) -> dict[str, float]:
    """GPU time per step (ms) of rqat's Triton kernels inside ``step``, from the profiler.

    Timing a kernel in isolation (``do_bench`` around ``.backward()``) would count autograd-engine start-up
    and launch latency that a real step overlaps with other work; the profiler counts device time only.
    """
    names = {"_forward_kernel": "fake_quant_fwd", "_backward_kernel": "fake_quant_bwd",
             "_head_loss_kernel": "head_loss"}
    totals = dict.fromkeys(names.values(), 0.0)
    for key, ms in gpu_ms_per_kernel(step, steps).items():
        for kernel, label in names.items():
            if kernel in key:
                totals[label] += ms
    return totals


def gpu_ms_per_kernel(step, steps: int) -> dict[str, float]:
    """GPU time (ms per step) of each kernel ``step`` runs, from the profiler over ``steps`` steps."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    return profiled_ms_per_kernel(prof, steps)


def profiled_ms_per_kernel(prof, steps: int) -> dict[str, float]:
    """GPU time (ms per step) of each kernel a finished profiler recorded over ``steps`` steps."""
    return {event.key: event.self_device_time_total / 1000 / steps for event in prof.key_averages()}


def kernel_profile(step, steps: int = 3, count: int = 12) -> dict:
    """The GPU time of all of ``step``'s kernels (``gpu_kernel_ms``, ms per step: against the step's wall time, how
    busy the GPU is) and the ``count`` costliest (``top_kernels_ms``), from the profiler."""
    return kernel_summary(gpu_ms_per_kernel(step, steps), count)


def host_profile(step: Callable[[], object], steps: int = 1, count: int = 16) -> dict:
    """Where the host spends a step's time, from a profiler of the CPU alone: for a step whose GPU idles.

    ``host_ranges_ms``: inclusive CPU ms per step of the ranges torch and rqat label (FSDP2's hooks, the
    optimizer's step, rqat's weight quantization), each summed over the layers its label names; ranges nest
    (``FSDP::pre_backward`` holds ``FSDP::backward_prefetch``, ``FSDP::root_post_backward_callback`` the root's
    ``FSDP::post_backward_*``), so they do not add up. ``host_profiled_step_ms``: the profiled steps' wall time
    per step, which the profiler itself lengthens, the figure to read the ranges against.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        started = time.perf_counter()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - started) * 1000 / steps
    ranges: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        if event.is_user_annotation and event.key.startswith(("FSDP::", "Optimizer.", "rqat::")):
            ranges[event.key.split(" (")[0].split(" for ")[0]] += event.cpu_time_total / 1000 / steps
    costliest = sorted(ranges.items(), key=lambda item: item[1], reverse=True)[:count]
    return {"host_profiled_step_ms": round(wall_ms, 1),
            "host_ranges_ms": {key: round(ms, 2) for key, ms in costliest}}


def kernel_summary(ms_per_kernel: dict[str, float], count: int = 12) -> dict:
    """:func:`kernel_profile`'s summary of kernels' GPU times: their sum and the ``count`` costliest."""
    kernels = sorted(ms_per_kernel.items(), key=lambda item: item[1], reverse=True)
    return {"gpu_kernel_ms": round(sum(ms for _, ms in kernels), 2),
            "top_kernels_ms": {key[:120]: round(ms, 3) for key, ms in kernels[:count]}}


def host_ms(step, steps: int = 5) -> float:
    """Median host time (ms) to issue ``step``, from an idle GPU, without waiting for its kernels: a step whose
    host time is close to its device time (:func:`measure`) is bound by the CPU launching kernels."""
    times = []
    for _ in range(steps):
        torch.cuda.synchronize()
        started = time.perf_counter()
        step()
        times.append((time.perf_counter() - started) * 1000)
    torch.cuda.synchronize()
    return statistics.median(times)


def breakdown(ids, warmup: int, steps: int, top_kernels: dict[str, dict[str, float]]) -> dict[str, float]:
    """Time the parts of a step one by one (median ms), to see where QAT-KD spends its time. The teacher's
    forward is timed in bf16 and, where FP8 matmuls run, in FP8 with the fused and with the PyTorch input
    quantization, each with its host time; ``top_kernels`` receives each teacher forward's costliest kernels."""
    from unittest import mock

    from rqat_sdk.modifiers.qat.optim import MasterWeightOptimizer
    from rqat_sdk.modifiers.qat.trainer import hidden_states
    from rqat_sdk.ops import fp8
    from rqat_sdk.ops.distill import LossSpec, lm_head_loss

    model = fresh_model()
    batch = {"input_ids": ids}
    parts: dict[str, float] = {}

    def forward_of(teacher, decoder=None):
        def forward():
            with torch.no_grad():
                hidden_states(teacher, batch, decoder)
        return forward

    teachers = {"teacher_forward": forward_of(model)}
    if fp8.uses_scaled_mm(torch.device("cuda")):
        fp8_teacher = copy.deepcopy(model).eval().requires_grad_(False)
        fp8.linears_to_fp8_(fp8_teacher, keep=[fp8_teacher.get_output_embeddings()])
        teachers["teacher_forward_fp8"] = forward_of(fp8_teacher)
        fp8_teacher = None
    for name, forward in teachers.items():
        parts[name] = measure(forward, warmup, steps)[0]
        parts[f"{name}_host"] = host_ms(forward)
    if "teacher_forward_fp8" in teachers:  # the same forward with the PyTorch path's six launches per input
        with mock.patch.object(fp8, "use_triton", lambda tensor: False):
            parts["teacher_forward_fp8_pytorch_quant"] = measure(teachers["teacher_forward_fp8"], warmup, steps)[0]
            parts["teacher_forward_fp8_pytorch_quant_host"] = host_ms(teachers["teacher_forward_fp8"])
    # the bf16 teacher's whole decoder compiled (compile_teacher compiles each block instead); a failure to compile
    # is recorded, not fatal
    compiled_forward = forward_of(model, torch.compile(model.get_decoder(), dynamic=True))
    try:
        parts["teacher_forward_compiled"] = measure(compiled_forward, warmup + 2, steps)[0]
        parts["teacher_forward_compiled_host"] = host_ms(compiled_forward)
    except Exception as error:  # noqa: BLE001  # any compiler failure: the other parts still count
        print(f"teacher_forward_compiled: torch.compile failed: {type(error).__name__}: {error}", flush=True)
    compiled_forward = None
    torch._dynamo.reset()

    def hf_ce_fwd_bwd():
        model(input_ids=ids, labels=ids).loss.backward()
        model.zero_grad(set_to_none=True)

    parts["student_fwd_bwd_hf_ce"] = measure(hf_ce_fwd_bwd, warmup, steps)[0]
    weight = model.get_output_embeddings().weight
    with torch.no_grad():
        hidden = hidden_states(model, batch)[:, :-1].reshape(-1, hidden_states(model, batch).shape[-1])
        teacher_hidden = hidden + 0.01 * torch.randn_like(hidden)
    hidden.requires_grad_(True)
    targets = ids[:, 1:].reshape(-1)
    weights = torch.full((hidden.shape[0],), 1.0 / hidden.shape[0], device="cuda")
    for divergence in ("ce", "forward_kl"):
        for chunk in (1024, 4096):
            spec = LossSpec(divergence, chunk_size=chunk)

            def head_loss(spec: LossSpec = spec) -> None:
                lm_head_loss(hidden, weight, weights, spec, teacher_hidden=teacher_hidden, teacher_weight=weight,
                             targets=targets).backward()
                hidden.grad = None
                weight.grad = None

            parts[f"head_loss_{divergence}_chunk{chunk}"] = measure(head_loss, warmup, steps)[0]

    def full_logits_ce():
        logits = (hidden @ weight.T).float()
        F.cross_entropy(logits, targets).backward()
        hidden.grad = None
        weight.grad = None

    parts["head_loss_full_logits_ce"] = measure(full_logits_ce, warmup, steps)[0]
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    plain = torch.optim.AdamW(model.parameters(), lr=1e-6, betas=(0.9, 0.95), fused=True)
    parts["optimizer_bf16_adamw"] = measure(plain.step, warmup, steps)[0]
    del plain
    master = MasterWeightOptimizer([{"params": list(model.parameters()), "lr": 1e-6}], torch.optim.AdamW,
                                   betas=(0.9, 0.95), fused=True)

    def master_step():
        grads = [p.grad for p in model.parameters()]
        master.step()
        for p, g in zip(model.parameters(), grads, strict=True):
            p.grad = g

    parts["optimizer_master_adamw"] = measure(master_step, warmup, steps)[0]
    for name, forward in teachers.items():  # the profiler last (see main)
        top_kernels[name] = kernel_profile(forward)["top_kernels_ms"]
    teachers.clear()
    model = master = hidden = teacher_hidden = None  # drop the references (the closures share them) before cleanup()
    cleanup()
    return parts


def step_benchmark_parser(doc: str) -> argparse.ArgumentParser:
    """The options every training-step benchmark here takes."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--json", type=Path, help="write the results here")
    return parser


def cuda_device() -> str | None:
    """The GPU's name, with TF32 matmuls on as in the measured runs; None (and a message) without CUDA."""
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return None
    torch.backends.cuda.matmul.allow_tf32 = True
    device = torch.cuda.get_device_name()
    print(f"device: {device}; torch {torch.__version__}", flush=True)
    return device


def main() -> int:
    parser = step_benchmark_parser(__doc__)
    parser.add_argument("--breakdown", action="store_true", help="also time the parts of a step")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS[1:], default=list(VARIANTS[1:]),
                        help="the variants to time after bf16_ce (the baseline of every ratio, always timed first)")
    args = parser.parse_args()
    device = cuda_device()
    if device is None:
        return 2

    from rqat_sdk.ops.fp8 import uses_scaled_mm

    fp8 = uses_scaled_mm(torch.device("cuda"))
    checks = check_kernels() + (check_fp8() if fp8 else [])
    bad = [line for line in checks if line.startswith("BAD")]
    print(f"kernel checks: {len(checks) - len(bad)}/{len(checks)} ok", flush=True)
    for line in bad:
        print("  " + line)

    ids = synthetic_batch(args.batch, args.seq, QWEN3_0_6B["vocab_size"]).cuda()
    runs = {
        "bf16_ce": lambda: bench_bf16_ce(ids, args.warmup, args.steps),
        "no_fake_quant_ce": lambda: bench_rqat(ids, args.warmup, args.steps, fake_quant=False, objective="sft"),
        "fake_quant_ce": lambda: bench_rqat(ids, args.warmup, args.steps, fake_quant=True, objective="sft"),
        "qat_kd": lambda: bench_rqat(ids, args.warmup, args.steps, fake_quant=True, objective="kd"),
        "qat_kd_fp8_teacher": lambda: bench_rqat(ids, args.warmup, args.steps, fake_quant=True, objective="kd",
                                                 fp8_teacher=True),
        "qat_kd_compiled_teacher": lambda: bench_rqat(ids, args.warmup, args.steps, fake_quant=True, objective="kd",
                                                      compile_teacher=True),
        "qat_kd_compiled": lambda: bench_rqat(ids, args.warmup, args.steps, fake_quant=True, objective="kd",
                                              compile_teacher=True, compile_student=True),
        "qat_kd_fp8_teacher_compiled": lambda: bench_rqat(ids, args.warmup, args.steps, fake_quant=True,
                                                          objective="kd", fp8_teacher=True, compile_teacher=True,
                                                          compile_student=True),
        "naive_kd": lambda: bench_naive_kd(ids, args.warmup, args.steps),
    }
    selected = [name for name in VARIANTS if name == "bf16_ce" or name in args.variants]
    if not fp8:
        for name in [name for name in selected if name.startswith("qat_kd_fp8_teacher")]:
            print(f"{name}: skipped, {device} has no FP8 matmuls (compute capability 8.9+)", flush=True)
            selected.remove(name)
    pending = [*selected, *(["breakdown"] if args.breakdown else []), *(["profile"] if "qat_kd" in selected else [])]
    measured = Measured(ids.numel())

    def save() -> None:
        """The record of everything measured so far: a run stopped by a time limit keeps its finished variants."""
        if args.json:
            write_json_atomic(args.json, {
                "command": "python " + " ".join(shlex.quote(a) for a in sys.argv), "device": device,
                "date": datetime.date.today().isoformat(), "commit": git_commit(), "kernel_checks_ok": not bad,
                **measured.record(), **({"unfinished": pending} if pending else {})})

    for name in selected:
        started = time.perf_counter()
        try:
            measured.steps[name] = runs[name]()
        except torch.OutOfMemoryError:
            measured.steps[name] = (float("nan"), float("nan"))
            cleanup()
        pending.remove(name)
        save()
        print(f"{name}: {measured.steps[name][0]:.1f} ms, peak {measured.steps[name][1]:.1f} GB "
              f"({time.perf_counter() - started:.0f} s)", flush=True)
    if args.breakdown:
        measured.parts = breakdown(ids, args.warmup, args.steps, measured.top_kernels)
        pending.remove("breakdown")
        save()
    if "qat_kd" in selected:
        # the profiler only after everything is timed: a process that has run it can launch slower afterwards
        # (CUPTI stays attached), which once made the variants timed after it look slower than those before
        bench_rqat(ids, args.warmup, args.steps, fake_quant=True, objective="kd", kernels=measured.kernels)
        pending.remove("profile")
        save()
    measured.print_summary()
    return 0 if not bad else 1


class Measured:
    """What a run has measured: each variant's (step ms, peak GB), the breakdown's parts, the profiled QAT-KD
    step's kernel times; and the record and summary made from whatever of them exists."""

    def __init__(self, tokens: int) -> None:
        self.tokens = tokens
        self.steps: dict[str, tuple[float, float]] = {}
        self.parts: dict[str, float] = {}
        self.top_kernels: dict[str, dict[str, float]] = {}
        self.kernels: dict[str, float] = {}

    def over_base(self, name: str) -> float:
        return self.steps[name][0] / self.steps["bf16_ce"][0]

    def fake_quant_overhead(self) -> float | None:
        """``fake_quant_ce``'s extra time over ``no_fake_quant_ce``, as a share of the QAT-KD step."""
        if not {"fake_quant_ce", "no_fake_quant_ce", "qat_kd"} <= self.steps.keys():
            return None
        return (self.steps["fake_quant_ce"][0] - self.steps["no_fake_quant_ce"][0]) / self.steps["qat_kd"][0]

    def record(self) -> dict:
        steps, kernels = self.steps, self.kernels
        record: dict = {
            **{key: value for name, (ms, gb) in steps.items()
               for key, value in ((f"{name}_ms", round(ms, 1)), (f"{name}_peak_gb", round(gb, 2)))},
            **{f"{name}_over_bf16_ce": round(self.over_base(name), 3)
               for name in ("qat_kd", *TEACHER_VARIANTS) if name in steps},
            "tokens_per_s": {name: None if math.isnan(ms) else round(self.tokens / ms * 1000)  # NaN: out of memory
                             for name, (ms, _) in steps.items()},
            "tokens_per_step": self.tokens,
        }
        overhead = self.fake_quant_overhead()
        if overhead is not None:
            record["fake_quant_overhead"] = round(overhead, 4)
        if kernels:
            record["qat_kd_kernel_gpu_ms"] = {k: round(v, 2) for k, v in kernels.items()}
            record["fake_quant_kernel_share"] = round(
                (kernels["fake_quant_fwd"] + kernels["fake_quant_bwd"]) / steps["qat_kd"][0], 4)
        record["breakdown_ms"] = {k: round(v, 2) for k, v in self.parts.items()}
        if self.top_kernels:
            record["top_kernels_ms"] = self.top_kernels
        return record

    def print_summary(self) -> None:
        base_ms, base_gb = self.steps["bf16_ce"]
        print()
        print("| variant | step ms | tokens/s | peak GB |")
        print("|---|---|---|---|")
        for name, (ms, gb) in self.steps.items():
            print(f"| {name} | {ms:.1f} | {self.tokens / ms * 1000:,.0f} | {gb:.1f} |")
        for name, ms in self.parts.items():
            print(f"  {name}: {ms:.2f} ms")
        for part, costliest in self.top_kernels.items():
            for name, ms in costliest.items():
                print(f"  {part} kernel {ms:.3f} ms: {name}")
        print()
        for name in ("qat_kd", *TEACHER_VARIANTS):
            if name in self.steps:
                ms, gb = self.steps[name]
                target = (" (target <= 1.35, peak <= 1.0)" if name == "qat_kd" else
                          " (target <= 1.20, peak <= 1.0)" if name.startswith("qat_kd_fp8_teacher") else "")
                print(f"{name} / bf16 CE step: {ms / base_ms:.3f}, peak {gb / base_gb:.3f} of bf16 CE's{target}")
        overhead = self.fake_quant_overhead()
        if overhead is not None:
            print(f"fake-quant overhead: {overhead:.1%} of the QAT-KD step (target <= 5%)")
        if self.kernels:
            kernels = self.kernels
            print(f"fake-quant kernels' GPU time: {kernels['fake_quant_fwd']:.2f} ms forward, "
                  f"{kernels['fake_quant_bwd']:.2f} ms backward; fused head loss {kernels['head_loss']:.2f} ms")


if __name__ == "__main__":
    sys.exit(main())
