"""Where the FP8 teacher's error comes from: mean per-token KL(bf16 || variant) of next-token distributions.

The distillation teacher with ``teacher_precision: fp8`` runs every decoder Linear through
:func:`rqat_sdk.ops.fp8.linears_to_fp8_`: e4m3 weights with a scale per output row, e4m3 activations with a
scale per token, the LM head kept in bf16. This script loads ``--model`` in bf16 on the CPU (where
:class:`~rqat_sdk.ops.fp8.FP8Linear` computes the FP8 numbers in float32, the reference path), and measures
how far each variant's next-token distributions are from the bf16 model's: the mean over evaluated positions of
KL(bf16 || variant), and top-1 agreement (the share of positions whose most likely token is bf16's). Rows
(``--rows``, default all):

- ``float32``: the same source loaded in float32: the distance of bf16's own rounding, the noise floor;
- ``fp8``: the product's FP8 teacher, every decoder Linear FP8 (``linears_to_fp8_`` keeping the LM head);
- ``fp8_qkv``, ``fp8_o``, ``fp8_gate_up``, ``fp8_down``: only that class of the decoder layers' Linears FP8
  (``linears_to_fp8_`` keeping every other Linear): q/k/v projections, the attention output, the MLP's gate and
  up projections, its down projection;
- ``fp8_weights``: only the weights rounded to e4m3 (row scales), the activations left in bf16;
- ``fp8_activations``: only the activations rounded to e4m3 (token scales), the weights left in bf16;
- ``fp8_keep_qkv``: the product's FP8 teacher with the q/k/v projections kept in bf16 (``linears_to_fp8_``'s
  ``keep``);
- ``fp8_gptq``: the product's FP8 teacher (same kernel: e4m3 weights with a scale per output row, per-token e4m3
  activations) whose e4m3 weight values GPTQ chose (:func:`gptq_round_rows_e4m3`) instead of round-to-nearest;
- ``fp8_gptq_weights``: those GPTQ-rounded weights with bf16 activations (compare with ``fp8_weights``);
- ``fp8_gptq_keep_qkv``: ``fp8_gptq`` with the q/k/v projections kept in bf16 (GPTQ run without them).

The product has no layer that quantizes one operand only, so ``fp8_weights``, ``fp8_activations`` and
``fp8_gptq_weights`` use :class:`OperandFP8Linear`, a small emulation built from the product's own quantizers
(``quantize_rows``, ``quantize_tokens``, ``dequantize_rows``) that multiplies in float32 as the reference path
does. With both operands quantized it must give the product's logits exactly; the record's
``emulation_vs_product_max_abs_diff`` checks that on the first sequence. ``fp8_flop_share`` is the share of the
decoder Linears' multiply-adds that run in FP8.

GPTQ keeps the product's format: each row's scale stays ``amax / 448`` and its largest element stays +-448, so
``quantize_rows`` of the rounded weight gives back the same values and scales (the record's ``gptq`` entry checks
it on every layer), and the product's :class:`~rqat_sdk.ops.fp8.FP8Linear` runs them unchanged. Its Hessians come
from a calibration set disjoint from the evaluation text: ``CALIBRATION_CHATS`` ``testbed-long`` chats of another
seed (no user prompt in common with the evaluated chats, checked) and ``CALIBRATION_PARAGRAPHS`` paragraphs of the
product's ``wikipedia`` source (its training split, not the hand-written ``ENGLISH``), every position. It runs
layer by layer and, within a decoder layer, class by class (q/k/v, o, gate/up, down): each class's inputs come
from the model with every earlier class already rounded (activations unrounded), as GPTQ's sequential mode does.

Evaluation text (SmolLM2's GGUF: about 1,000 "math" positions and 340 "english"): 14 ``testbed-long`` chats
(seed 1, the GPU testbed's mix) in the model's chat template, evaluated at the positions whose next token is in
the assistant's reply ("math"), and four English paragraphs (``ENGLISH``) at every position ("english").

    python benchmarks/fp8_teacher_error.py --json docs/results/fp8_teacher_error.json
    python benchmarks/fp8_teacher_error.py --rows float32 fp8 fp8_weights  # a subset

About two minutes on two CPU cores for SmolLM2-135M, plus the GPTQ passes. KL is not pass@1: it says how far the
teacher's targets move, not what that costs the distilled student.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import functools
import platform
import shlex
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import cast

import torch
import torch.nn.functional as F
from provenance import git_commit

from rqat_sdk.files import write_json_atomic
from rqat_sdk.ops.fp8 import (
    E4M3,
    E4M3_MAX,
    FP8Linear,
    dequantize_rows,
    linears_to_fp8_,
    quantize_rows,
    quantize_rows_reference,
    quantize_tokens,
)

MODEL = "gguf:smollm2-135m-instruct"
CLASSES = {"qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",), "gate_up": ("gate_proj", "up_proj"),
           "down": ("down_proj",)}
"""The decoder layers' Linear classes, by the attribute names of Llama and Qwen3 layers."""
ROWS = ("float32", "fp8", *(f"fp8_{name}" for name in CLASSES), "fp8_weights", "fp8_activations", "fp8_keep_qkv",
        "fp8_gptq", "fp8_gptq_weights", "fp8_gptq_keep_qkv")
GPTQ_ROWS = ("fp8_gptq", "fp8_gptq_weights", "fp8_gptq_keep_qkv")
DESCRIPTIONS = {
    "float32": "float32 model (bf16's own rounding, the reference noise)",
    "fp8": "FP8 teacher (product: every decoder Linear, LM head bf16)",
    **{f"fp8_{name}": f"only {name} FP8" for name in CLASSES},
    "fp8_weights": "FP8 weights only, bf16 activations",
    "fp8_activations": "FP8 activations only, bf16 weights",
    "fp8_keep_qkv": "FP8 teacher, q/k/v kept bf16",
    "fp8_gptq": "FP8 teacher, GPTQ-rounded e4m3 weights",
    "fp8_gptq_weights": "GPTQ-rounded FP8 weights only, bf16 activations",
    "fp8_gptq_keep_qkv": "FP8 teacher, GPTQ-rounded e4m3 weights, q/k/v kept bf16",
}
CHATS, CHAT_SEED, MIX = 14, 1, "testbed-long"
CALIBRATION_CHATS, CALIBRATION_SEED, CALIBRATION_PARAGRAPHS, CALIBRATION_MAX_TOKENS = 64, 101, 64, 512
"""GPTQ's calibration text: chats of another seed than the evaluated ones (seed 2 would share some: a mix's task
``t`` draws with ``seed + t``), Wikipedia paragraphs cut to ``CALIBRATION_MAX_TOKENS``."""
GPTQ_DAMP, GPTQ_BLOCK = 0.01, 128

ENGLISH = [
    "The history of the bicycle is a story of many small improvements. Early machines had no pedals at all: riders "
    "pushed themselves along with their feet. Later designs added cranks to the front wheel, which grew larger and "
    "larger until riding one became dangerous. The safety bicycle, with two wheels of equal size and a chain driving "
    "the rear wheel, solved that problem and quickly became the standard shape that we still ride today.",
    "Bread is made from flour, water, salt and yeast. When the dough is kneaded, proteins in the flour form long "
    "elastic strands of gluten. The yeast eats sugars and releases carbon dioxide, and the gluten traps the gas in "
    "small bubbles, so the dough rises. In the oven the bubbles expand further, the proteins set, and the outside "
    "browns into a crust. A good loaf depends as much on patience as on the recipe.",
    "Dear Ms. Patel, thank you for your letter of March 3rd. I am sorry to hear that the package arrived damaged. "
    "We have arranged for a replacement to be sent by express delivery, and it should reach you within three "
    "working days. Please keep the damaged item until our courier collects it. If you have any further questions, "
    "do not hesitate to contact our customer service team. Kind regards, James Miller.",
    "Rivers shape the land in two ways. Fast water in the mountains cuts deep, narrow valleys and carries stones "
    "and sand downstream. Where the river reaches flatter ground it slows down, drops what it carries, and begins "
    "to wander from side to side in wide loops called meanders. Over thousands of years a single river can build "
    "a broad plain of fertile soil, which is why so many cities grew up along their banks.",
]
"""General English text, beside the math chats."""

Batch = tuple[str, torch.Tensor, torch.Tensor]
"""``(split, ids (1, T), mask (T,))``: the mask marks the positions whose next-token distribution is evaluated."""


def eval_batches(tokenizer) -> list[Batch]:
    """The evaluation text: the chats' assistant-reply positions ("math"), the paragraphs' every position but
    the last ("english")."""
    from rqat_sdk.testbed.tasks import testbed_rows

    batches = []
    for row in testbed_rows(num_samples=CHATS, seed=CHAT_SEED, mix=MIX):
        messages = row["messages"]
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
        ids = tokenizer(full, return_tensors="pt", add_special_tokens=False).input_ids
        prompt_tokens = len(tokenizer(prompt, add_special_tokens=False).input_ids)
        mask = torch.zeros(ids.shape[1], dtype=torch.bool)
        mask[prompt_tokens - 1:-1] = True  # the logits at these positions predict the reply's tokens
        batches.append(("math", ids, mask))
    for text in ENGLISH:
        ids = tokenizer(text, return_tensors="pt").input_ids
        mask = torch.ones(ids.shape[1], dtype=torch.bool)
        mask[-1] = False
        batches.append(("english", ids, mask))
    return batches


def calibration_ids(tokenizer) -> list[torch.Tensor]:
    """GPTQ's calibration sequences (1, T), disjoint from :func:`eval_batches`' text: ``CALIBRATION_CHATS`` chats
    of seed ``CALIBRATION_SEED`` in the chat template and ``CALIBRATION_PARAGRAPHS`` paragraphs of the
    ``wikipedia`` source (not its held-out split)."""
    from rqat_sdk.data import load_examples
    from rqat_sdk.testbed.tasks import testbed_rows

    evaluated = {row["messages"][0]["content"] for row in testbed_rows(num_samples=CHATS, seed=CHAT_SEED, mix=MIX)}
    rows = testbed_rows(num_samples=CALIBRATION_CHATS, seed=CALIBRATION_SEED, mix=MIX)
    shared = sum(row["messages"][0]["content"] in evaluated for row in rows)
    if shared:
        raise ValueError(f"{shared} calibration chats (seed {CALIBRATION_SEED}) are evaluated chats; pick another seed")
    texts = [tokenizer.apply_chat_template(row["messages"], tokenize=False) for row in rows]
    ids = [tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids for text in texts]
    paragraphs = load_examples("wikipedia", num_samples=CALIBRATION_PARAGRAPHS, seed=0)["text"]
    ids += [tokenizer(text, return_tensors="pt").input_ids[:, :CALIBRATION_MAX_TOKENS] for text in paragraphs]
    return ids


def gptq_round_rows_e4m3(weight: torch.Tensor, hessian: torch.Tensor, *, damp: float = GPTQ_DAMP,
                         block: int = GPTQ_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight`` (out, in) as :func:`~rqat_sdk.ops.fp8.quantize_rows` returns it, e4m3 values and float32 scales
    (out, 1), with the values chosen by GPTQ (Frantar et al., 2022) instead of rounded to nearest: they minimise
    the layer's output error ``||X W^T - X W_q^T||`` over inputs ``X`` whose ``hessian`` (in, in) is ``2 X^T X``,
    not the weights' own.

    Each row keeps ``quantize_rows``' scale, ``amax / 448``, and its largest element stays at +-448 (the rest of
    the error is spread around it), so ``quantize_rows`` of ``values * scale`` gives back these values and scales:
    the product's FP8 kernel and format, other values. The standard algorithm: ``H`` damped by ``damp`` times its
    mean diagonal, the upper Cholesky factor of ``H^-1``, columns rounded in order, each column's error spread
    over the columns not yet rounded, lazily in blocks of ``block`` columns. Inputs that are always zero (a zero
    diagonal) get round-to-nearest."""
    _, scale = quantize_rows_reference(weight)
    w = weight.float() / scale  # in units of each row's scale: the grid is e4m3's
    h = hessian.double().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1
    h.diagonal().add_(damp * h.diagonal().mean())
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()
    peak = weight.abs().argmax(1)
    pinned = torch.sign(weight.float().gather(1, peak[:, None]))[:, 0] * E4M3_MAX  # 0 for an all-zero row
    values = torch.empty_like(w)
    columns = w.shape[1]
    for start in range(0, columns, block):
        end = min(start + block, columns)
        chunk, u_chunk = w[:, start:end].clone(), u[start:end, start:end]
        errors = torch.empty(w.shape[0], end - start, dtype=w.dtype)
        for i in range(end - start):
            column = chunk[:, i]
            rounded = column.clamp(-E4M3_MAX, E4M3_MAX).to(E4M3).float()
            rounded = torch.where(peak == start + i, pinned, rounded)
            values[:, start + i] = rounded
            errors[:, i] = (column - rounded) / u_chunk[i, i]
            chunk[:, i:] -= errors[:, i:i + 1] * u_chunk[i:i + 1, i:]
        w[:, end:] -= errors @ u[start:end, end:]
    return values.to(E4M3), scale


def named_decoder_linears(model: torch.nn.Module, classes: Iterable[str] = CLASSES) -> dict[str, torch.nn.Linear]:
    """:func:`decoder_linears` by their names in ``model``."""
    chosen = {id(module) for module in decoder_linears(model, classes)}
    return {name: module for name, module in model.named_modules() if id(module) in chosen}


class _Caught(Exception):
    """Stops a calibration forward once it has given what was wanted: the first decoder layer's inputs, or every
    hooked Linear's."""


def input_hessians(linears: dict[str, torch.nn.Linear],
                   forwards: Iterable[Callable[[], object]]) -> dict[str, torch.Tensor]:
    """``2 X^T X / n`` of each of ``linears``' inputs ``X`` (n tokens, in) over what the ``forwards`` run, by
    name. Each forward is stopped once every one of ``linears`` has seen its input: the rest of a decoder layer
    (the MLP after the attention's Linears) would be computed for nothing."""
    sums = {name: torch.zeros(linear.in_features, linear.in_features) for name, linear in linears.items()}
    counts = dict.fromkeys(linears, 0)
    seen: set[str] = set()

    def accumulate(name: str, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        sums[name].addmm_(x.T, x)
        counts[name] += x.shape[0]
        seen.add(name)
        if len(seen) == len(linears):
            seen.clear()
            raise _Caught

    handles = [linear.register_forward_pre_hook(lambda _module, args, name=name: accumulate(name, args[0]))
               for name, linear in linears.items()]
    try:
        for forward in forwards:
            try:
                forward()
            except _Caught:
                pass
    finally:
        for handle in handles:
            handle.remove()
    return {name: sums[name] * (2 / max(counts[name], 1)) for name in linears}


@torch.no_grad()
def gptq_fp8_weights(model: torch.nn.Module, calibration: Sequence[torch.Tensor],
                     classes: Iterable[str] = CLASSES) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """GPTQ-rounded e4m3 weights (:func:`gptq_round_rows_e4m3`) of the decoder Linears of ``classes``, by name:
    sequentially, on a float32 copy of ``model``. The first decoder layer's inputs on the ``calibration``
    sequences are caught once; then for each layer and each of its classes in the order they run, the class's
    Hessians are summed over the layer's forward on its inputs (:func:`input_hessians`, which stops it as soon as
    it has them), the class's weights rounded and put in place (dequantized), and the layer's outputs, from its
    rounded weights, become the next layer's inputs."""
    classes = [c for c in CLASSES if c in set(classes)]
    work = copy.deepcopy(model).float()
    layers = cast(torch.nn.ModuleList, work.get_submodule("model.layers"))
    inputs: list[tuple[torch.Tensor, dict]] = []

    def catch(_module, args, kwargs):
        inputs.append((args[0], kwargs))
        raise _Caught

    handle = layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for ids in calibration:
            try:
                work(ids, use_cache=False)
            except _Caught:
                pass
    finally:
        handle.remove()

    def run(layer: torch.nn.Module) -> list[torch.Tensor]:
        outputs = [layer(hidden, **kwargs) for hidden, kwargs in inputs]
        return [out[0] if isinstance(out, tuple) else out for out in outputs]

    def forwards(layer: torch.nn.Module) -> list[Callable[[], object]]:
        return [functools.partial(layer, hidden, **kwargs) for hidden, kwargs in inputs]

    rounded: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for index, layer in enumerate(layers):
        for c in classes:
            linears = {f"model.layers.{index}.{name}": module for name, module in layer.named_modules()
                       if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in CLASSES[c]}
            hessians = input_hessians(linears, forwards(layer))
            for name, linear in linears.items():
                values, scale = gptq_round_rows_e4m3(linear.weight, hessians[name])
                rounded[name] = values, scale
                linear.weight.copy_(dequantize_rows(values, scale))
        inputs = [(out, kwargs) for out, (_, kwargs) in zip(run(layer), inputs, strict=True)]
    return rounded


def gptq_reproduced(rounded: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, int]:
    """How many rows of the GPTQ-rounded weights ``quantize_rows`` gives back exactly (values and scale) from their
    dequantized float32 weight, out of how many."""
    same = total = 0
    for values, scale in rounded.values():
        again_values, again_scale = quantize_rows(dequantize_rows(values, scale))
        rows = (again_values.view(torch.uint8) == values.view(torch.uint8)).all(1) & (again_scale == scale)[:, 0]
        same, total = same + int(rows.sum()), total + rows.numel()
    return {"rows_reproduced": same, "rows": total}


class OperandFP8Linear(torch.nn.Module):
    """``x W^T + b`` with either operand, or both, rounded as :class:`~rqat_sdk.ops.fp8.FP8Linear` rounds it
    (weights per output row, activations per token, by the product's quantizers), multiplied in float32 and
    returned in ``x``'s dtype, as the product's reference path computes. Only to split FP8's error between its
    operands: with both rounded it computes exactly what ``FP8Linear`` does on the CPU."""

    weight: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, linear: torch.nn.Linear, *, weights: bool, activations: bool,
                 rounded: tuple[torch.Tensor, torch.Tensor] | None = None):
        super().__init__()
        weight = linear.weight.detach()
        if weights:  # ``rounded``: the weight's e4m3 values and row scales, chosen otherwise than quantize_rows
            weight = dequantize_rows(*(rounded if rounded is not None else quantize_rows(weight)))
        self.register_buffer("weight", weight.float())
        self.register_buffer("bias", linear.bias.detach().float() if linear.bias is not None else None)
        self.activations = activations

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = dequantize_rows(*quantize_tokens(x)) if self.activations else x.reshape(-1, x.shape[-1]).float()
        out = tokens @ self.weight.T
        if self.bias is not None:
            out = out + self.bias
        return out.to(x.dtype).reshape(*x.shape[:-1], out.shape[-1])


def decoder_linears(model: torch.nn.Module, classes: Iterable[str] = CLASSES) -> list[torch.nn.Linear]:
    """The Linears of ``classes`` in the model's decoder layers (``model.model.layers``)."""
    names = {name for c in classes for name in CLASSES[c]}
    layers = cast(torch.nn.ModuleList, model.get_submodule("model.layers"))
    return [module for layer in layers for name, module in layer.named_modules()
            if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in names]


def product_fp8(model: torch.nn.Module, classes: Iterable[str] = CLASSES,
                rounded: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> torch.nn.Module:
    """A copy of ``model`` with the product's FP8 layers in place of the decoder Linears of ``classes``; every
    other Linear (the LM head among them) is kept. ``rounded``: e4m3 values and row scales by layer name (from
    :func:`gptq_fp8_weights`) that replace those ``linears_to_fp8_`` rounded to nearest."""
    fp8 = copy.deepcopy(model)
    chosen = {id(module) for module in decoder_linears(fp8, classes)}
    linears_to_fp8_(fp8, keep=[m for m in fp8.modules() if isinstance(m, torch.nn.Linear) and id(m) not in chosen])
    for name, (values, scale) in (rounded or {}).items():
        layer = cast(FP8Linear, fp8.get_submodule(name))
        layer.w_fp8, layer.w_scale = values, scale
    return fp8


def operand_fp8(model: torch.nn.Module, *, weights: bool, activations: bool,
                rounded: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> torch.nn.Module:
    """A copy of ``model`` whose decoder Linears are :class:`OperandFP8Linear` layers (with the weights of
    ``rounded``, by layer name, where it has them)."""
    variant = copy.deepcopy(model)
    for name, module in named_decoder_linears(variant).items():
        parent, _, attribute = name.rpartition(".")
        setattr(variant.get_submodule(parent), attribute,
                OperandFP8Linear(module, weights=weights, activations=activations,
                                 rounded=(rounded or {}).get(name)))
    return variant


@torch.no_grad()
def log_probs(model: torch.nn.Module, batches: Sequence[Batch]) -> list[torch.Tensor]:
    """Float32 next-token log-probabilities at each batch's evaluated positions."""
    return [F.log_softmax(model(ids).logits[0, mask].float(), -1) for _, ids, mask in batches]


def compare(reference: list[torch.Tensor], other: list[torch.Tensor], batches: Sequence[Batch]) -> dict[str, float]:
    """Mean KL(reference || other) and top-1 agreement per split and over all positions (``kl_all``)."""
    splits = sorted({split for split, _, _ in batches}, key=[split for split, _, _ in batches].index)
    found: dict[str, float] = {}
    for split in (*splits, "all"):
        kl, agree, count = 0.0, 0, 0
        for (name, _, _), p, q in zip(batches, reference, other, strict=True):
            if split in (name, "all"):
                kl += (p.exp() * (p - q)).sum(-1).clamp_min(0).sum().item()
                agree += int((p.argmax(-1) == q.argmax(-1)).sum())
                count += p.shape[0]
        found[f"kl_{split}"] = round(kl / count, 6)
        found[f"top1_{split}"] = round(agree / count, 4)
    return found


def measure(model: torch.nn.Module, batches: Sequence[Batch], rows: Sequence[str] = ROWS,
            float32_model: Callable[[], torch.nn.Module] | None = None,
            on_row: Callable[[dict], None] | None = None,
            calibration: Sequence[torch.Tensor] | None = None) -> dict:
    """KL(``model`` || variant) and top-1 agreement of each row of ``rows`` (see the module's docstring) on
    ``batches``; ``model`` is the bf16 reference. ``float32_model`` loads the same source in float32 (the
    ``float32`` row; by default ``model`` cast to float32, which keeps bf16's rounding of the weights).
    ``on_row`` gets the result so far after every row. ``calibration``: GPTQ's calibration sequences (1, T), which
    the GPTQ rows need."""
    unknown = set(rows) - set(ROWS)
    if unknown:
        raise ValueError(f"unknown rows {sorted(unknown)}; choose from {ROWS}")
    if set(GPTQ_ROWS) & set(rows) and not calibration:
        raise ValueError(f"rows {sorted(set(GPTQ_ROWS) & set(rows))} need calibration sequences")
    macs = {c: sum(m.in_features * m.out_features for m in decoder_linears(model, [c])) for c in CLASSES}
    total = sum(macs.values())
    unkept = [c for c in CLASSES if c != "qkv"]
    shares = {"float32": 0.0, "fp8": 1.0, "fp8_weights": 1.0, "fp8_activations": 1.0, "fp8_gptq": 1.0,
              "fp8_gptq_weights": 1.0, **{f"fp8_{c}": macs[c] / total for c in CLASSES},
              "fp8_keep_qkv": 1 - macs["qkv"] / total, "fp8_gptq_keep_qkv": 1 - macs["qkv"] / total}
    reference = log_probs(model, batches)
    result: dict = {
        "tokens": {split: sum(int(mask.sum()) for name, _, mask in batches if name == split)
                   for split in dict.fromkeys(name for name, _, _ in batches)},
        "flop_share": {c: round(macs[c] / total, 4) for c in CLASSES},
        "rows": [],
    }
    if {"fp8_weights", "fp8_activations"} & set(rows):  # the emulation against the product, on one sequence
        ids = batches[0][1]
        with torch.no_grad():
            product = product_fp8(model)(ids).logits.float()
            emulated = operand_fp8(model, weights=True, activations=True)(ids).logits.float()
        result["emulation_vs_product_max_abs_diff"] = (product - emulated).abs().max().item()

    gptq: dict[tuple[str, ...], dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}

    def gptq_weights(classes: Sequence[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """GPTQ's rounding of ``classes``' weights, run once per set of classes (its inputs depend on which
        Linears are rounded before them)."""
        if tuple(classes) not in gptq:
            started = time.perf_counter()
            gptq[tuple(classes)] = found = gptq_fp8_weights(model, cast(Sequence[torch.Tensor], calibration), classes)
            seconds = round(time.perf_counter() - started, 1)
            result.setdefault("gptq", {})["+".join(classes)] = {"seconds": seconds, **gptq_reproduced(found)}
            print(f"GPTQ of {'+'.join(classes)}: {seconds} s, {result['gptq']['+'.join(classes)]}", flush=True)
        return gptq[tuple(classes)]

    if set(GPTQ_ROWS) & set(rows):
        result["calibration_tokens"] = sum(ids.shape[1] for ids in cast(Sequence[torch.Tensor], calibration))

    def variant(row: str) -> torch.nn.Module:
        if row == "float32":
            return float32_model() if float32_model is not None else copy.deepcopy(model).float()
        if row == "fp8":
            return product_fp8(model)
        if row in ("fp8_weights", "fp8_activations"):
            return operand_fp8(model, weights=row == "fp8_weights", activations=row == "fp8_activations")
        if row == "fp8_keep_qkv":
            return product_fp8(model, unkept)
        if row == "fp8_gptq":
            return product_fp8(model, rounded=gptq_weights(list(CLASSES)))
        if row == "fp8_gptq_weights":
            return operand_fp8(model, weights=True, activations=False, rounded=gptq_weights(list(CLASSES)))
        if row == "fp8_gptq_keep_qkv":
            return product_fp8(model, unkept, rounded=gptq_weights(unkept))
        return product_fp8(model, [row.removeprefix("fp8_")])

    for row in rows:
        started = time.perf_counter()  # a GPTQ row's seconds include its GPTQ pass, if it ran it
        measured = compare(reference, log_probs(variant(row), batches), batches)
        result["rows"].append({"row": row, "description": DESCRIPTIONS[row], "fp8_flop_share": round(shares[row], 4),
                               **measured, "seconds": round(time.perf_counter() - started, 1)})
        print(f"{row}: KL {measured['kl_all']:.5f}, top-1 {measured['top1_all']:.2%} "
              f"({result['rows'][-1]['seconds']} s)", flush=True)
        if on_row is not None:
            on_row(result)
    return result


def record(args: argparse.Namespace, measured: dict) -> dict:
    return {
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "device": f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)",
        "date": datetime.date.today().isoformat(),
        "commit": git_commit(),
        "model": args.model, "dtype": "bfloat16", "torch": torch.__version__,
        "eval": f"{CHATS} {MIX} chats (seed {CHAT_SEED}) at their assistant-reply positions ('math'), "
                f"{len(ENGLISH)} English paragraphs at every position ('english')",
        "metric": "mean per-token KL(bf16 || variant) of next-token distributions; top-1: share of positions whose "
                  "argmax is bf16's",
        "calibration": f"GPTQ rows: {CALIBRATION_CHATS} {MIX} chats (seed {CALIBRATION_SEED}, no prompt in common with "
                       f"the evaluated chats) and {CALIBRATION_PARAGRAPHS} 'wikipedia' paragraphs (seed 0, at most "
                       f"{CALIBRATION_MAX_TOKENS} tokens), every position; sequential GPTQ, damping {GPTQ_DAMP} of "
                       f"the mean diagonal, blocks of {GPTQ_BLOCK} columns",
        **measured,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=MODEL, help="a source load_model reads (default %(default)s)")
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    from rqat_sdk.models import load_model, load_tokenizer

    torch.manual_seed(0)
    model = load_model(args.model, dtype="bfloat16", device="cpu")
    tokenizer = load_tokenizer(args.model)
    batches = eval_batches(tokenizer)
    calibration = calibration_ids(tokenizer) if set(GPTQ_ROWS) & set(args.rows) else None

    def save(measured: dict) -> None:
        if args.json:  # after every row: a stopped run keeps the rows it finished
            write_json_atomic(args.json, record(args, measured))

    measured = measure(model, batches, args.rows,
                       float32_model=lambda: load_model(args.model, dtype="float32", device="cpu"), on_row=save,
                       calibration=calibration)
    splits = list(measured["tokens"])
    print()
    print(f"tokens: {measured['tokens']}; emulation vs product: {measured.get('emulation_vs_product_max_abs_diff')}; "
          f"GPTQ: {measured.get('gptq')}")
    print(f"| row | FP8 share | {' | '.join(f'KL {s}' for s in splits)} | KL all | top-1 | seconds |")
    print("|---|---|" + "---|" * len(splits) + "---|---|---|")
    for row in measured["rows"]:
        kls = " | ".join(f"{row[f'kl_{s}']:.4f}" for s in splits)
        print(f"| {row['row']} | {row['fp8_flop_share']:.2f} | {kls} | {row['kl_all']:.4f} | "
              f"{row['top1_all']:.1%} | {row['seconds']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
