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
- ``fp8_activations``: only the activations rounded to e4m3 (token scales), the weights left in bf16.

The product has no layer that quantizes one operand only, so the last two rows use :class:`OperandFP8Linear`, a
small emulation built from the product's own quantizers (``quantize_rows``, ``quantize_tokens``,
``dequantize_rows``) that multiplies in float32 as the reference path does. With both operands quantized it
must give the product's logits exactly; the record's ``emulation_vs_product_max_abs_diff`` checks that on the
first sequence. ``fp8_flop_share`` is the share of the decoder Linears' multiply-adds that run in FP8.

Evaluation text (SmolLM2's GGUF: about 1,000 "math" positions and 340 "english"): 14 ``testbed-long`` chats
(seed 1, the GPU testbed's mix) in the model's chat template, evaluated at the positions whose next token is in
the assistant's reply ("math"), and four English paragraphs (``ENGLISH``) at every position ("english").

    python benchmarks/fp8_teacher_error.py --json docs/results/fp8_teacher_error.json
    python benchmarks/fp8_teacher_error.py --rows float32 fp8 fp8_weights  # a subset

About two minutes on two CPU cores for SmolLM2-135M. KL is not pass@1: it says how far the teacher's targets
move, not what that costs the distilled student.
"""

from __future__ import annotations

import argparse
import copy
import datetime
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
from rqat_sdk.ops.fp8 import dequantize_rows, linears_to_fp8_, quantize_rows, quantize_tokens

MODEL = "gguf:smollm2-135m-instruct"
CLASSES = {"qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",), "gate_up": ("gate_proj", "up_proj"),
           "down": ("down_proj",)}
"""The decoder layers' Linear classes, by the attribute names of Llama and Qwen3 layers."""
ROWS = ("float32", "fp8", *(f"fp8_{name}" for name in CLASSES), "fp8_weights", "fp8_activations")
DESCRIPTIONS = {
    "float32": "float32 model (bf16's own rounding, the reference noise)",
    "fp8": "FP8 teacher (product: every decoder Linear, LM head bf16)",
    **{f"fp8_{name}": f"only {name} FP8" for name in CLASSES},
    "fp8_weights": "FP8 weights only, bf16 activations",
    "fp8_activations": "FP8 activations only, bf16 weights",
}
CHATS, CHAT_SEED, MIX = 14, 1, "testbed-long"

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


class OperandFP8Linear(torch.nn.Module):
    """``x W^T + b`` with either operand, or both, rounded as :class:`~rqat_sdk.ops.fp8.FP8Linear` rounds it
    (weights per output row, activations per token, by the product's quantizers), multiplied in float32 and
    returned in ``x``'s dtype, as the product's reference path computes. Only to split FP8's error between its
    operands: with both rounded it computes exactly what ``FP8Linear`` does on the CPU."""

    weight: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, linear: torch.nn.Linear, *, weights: bool, activations: bool):
        super().__init__()
        weight = linear.weight.detach()
        self.register_buffer("weight", dequantize_rows(*quantize_rows(weight)) if weights else weight.float())
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


def product_fp8(model: torch.nn.Module, classes: Iterable[str] = CLASSES) -> torch.nn.Module:
    """A copy of ``model`` with the product's FP8 layers in place of the decoder Linears of ``classes``; every
    other Linear (the LM head among them) is kept."""
    fp8 = copy.deepcopy(model)
    chosen = {id(module) for module in decoder_linears(fp8, classes)}
    linears_to_fp8_(fp8, keep=[m for m in fp8.modules() if isinstance(m, torch.nn.Linear) and id(m) not in chosen])
    return fp8


def operand_fp8(model: torch.nn.Module, *, weights: bool, activations: bool) -> torch.nn.Module:
    """A copy of ``model`` whose decoder Linears are :class:`OperandFP8Linear` layers."""
    variant = copy.deepcopy(model)
    chosen = {id(module) for module in decoder_linears(variant)}
    for name, module in list(variant.named_modules()):
        if id(module) in chosen:
            parent, _, attribute = name.rpartition(".")
            setattr(variant.get_submodule(parent), attribute,
                    OperandFP8Linear(module, weights=weights, activations=activations))
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
            on_row: Callable[[dict], None] | None = None) -> dict:
    """KL(``model`` || variant) and top-1 agreement of each row of ``rows`` (see the module's docstring) on
    ``batches``; ``model`` is the bf16 reference. ``float32_model`` loads the same source in float32 (the
    ``float32`` row; by default ``model`` cast to float32, which keeps bf16's rounding of the weights).
    ``on_row`` gets the result so far after every row."""
    unknown = set(rows) - set(ROWS)
    if unknown:
        raise ValueError(f"unknown rows {sorted(unknown)}; choose from {ROWS}")
    macs = {c: sum(m.in_features * m.out_features for m in decoder_linears(model, [c])) for c in CLASSES}
    total = sum(macs.values())
    shares = {"float32": 0.0, "fp8": 1.0, "fp8_weights": 1.0, "fp8_activations": 1.0,
              **{f"fp8_{c}": macs[c] / total for c in CLASSES}}
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

    def variant(row: str) -> torch.nn.Module:
        if row == "float32":
            return float32_model() if float32_model is not None else copy.deepcopy(model).float()
        if row == "fp8":
            return product_fp8(model)
        if row in ("fp8_weights", "fp8_activations"):
            return operand_fp8(model, weights=row == "fp8_weights", activations=row == "fp8_activations")
        return product_fp8(model, [row.removeprefix("fp8_")])

    for row in rows:
        started = time.perf_counter()
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
    batches = eval_batches(load_tokenizer(args.model))

    def save(measured: dict) -> None:
        if args.json:  # after every row: a stopped run keeps the rows it finished
            write_json_atomic(args.json, record(args, measured))

    measured = measure(model, batches, args.rows,
                       float32_model=lambda: load_model(args.model, dtype="float32", device="cpu"), on_row=save)
    splits = list(measured["tokens"])
    print()
    print(f"tokens: {measured['tokens']}; emulation vs product: {measured.get('emulation_vs_product_max_abs_diff')}")
    print(f"| row | FP8 share | {' | '.join(f'KL {s}' for s in splits)} | KL all | top-1 | seconds |")
    print("|---|---|" + "---|" * len(splits) + "---|---|---|")
    for row in measured["rows"]:
        kls = " | ".join(f"{row[f'kl_{s}']:.4f}" for s in splits)
        print(f"| {row['row']} | {row['fp8_flop_share']:.2f} | {kls} | {row['kl_all']:.4f} | "
              f"{row['top1_all']:.1%} | {row['seconds']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
