"""Why Hadamard rotation hurts RTN W3G64 on SmolLM2-135M (issue 23), measured on CPU.

For the float model, the model with only its RMSNorm weights fused into the next Linears, and the model after
the rotation modifier's R1+R2 (random-hadamard): held-out Wikipedia perplexity of the float model and after
W3 group-64 asymmetric RTN, the per-layer relative weight error ||Q(W) - W|| / ||W||, the relative output error
on real inputs ||(Q(W) - W) X|| / ||W X||, weight kurtosis and max/std; whether the rotated float model
computes the same logits, and what happened to the tied embedding / lm_head. Then ``rqat_sdk.oneshot`` runs
(rtn, rotation+rtn, gptq, rotation+gptq) for the product's own numbers.

    OMP_NUM_THREADS=2 python benchmarks/rotation_real_model.py --json docs/results/rotation_smollm2.json
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from provenance import git_commit

KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BITS, GROUP = 3, 64
SCHEME = {"weights": {"num_bits": BITS, "group_size": GROUP, "symmetric": False}}


def fake_quant(weight: torch.Tensor, bits: int = BITS, group: int = GROUP) -> torch.Tensor:
    """Asymmetric min-max RTN per group of ``group`` input columns (compressed-tensors' rule: range includes 0)."""
    rows, cols = weight.shape
    x = weight.reshape(rows, cols // group, group)
    low, high = x.amin(-1, keepdim=True).clamp(max=0), x.amax(-1, keepdim=True).clamp(min=0)
    levels = 2**bits - 1
    scale = (high - low) / levels
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    zero = torch.round(-low / scale).clamp(0, levels)
    codes = (torch.round(x / scale) + zero).clamp(0, levels)
    return ((codes - zero) * scale).reshape(rows, cols)


def linears(model) -> list[tuple[str, torch.nn.Linear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]


def layer_inputs(model, batch) -> dict[str, torch.Tensor]:
    inputs: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda mod, args, out, n=n: inputs.__setitem__(n, args[0].detach().flatten(0, -2)))
             for n, m in linears(model)]
    with torch.no_grad():
        model(**batch)
    for hook in hooks:
        hook.remove()
    return inputs


def layer_stats(model, batch) -> dict[str, dict[str, float]]:
    """Per Linear: relative weight and output error of RTN, kurtosis and max/std of the weight."""
    inputs = layer_inputs(model, batch)
    stats = {}
    with torch.no_grad():
        for name, module in linears(model):
            w = module.weight.detach().double()
            x = inputs[name].double()
            delta = fake_quant(w) - w
            flat = w.flatten()
            stats[name] = {
                "weight_err": float(delta.norm() / w.norm()),
                "output_err": float((delta @ x.T).norm() / (w @ x.T).norm()),
                "kurtosis": float(((flat - flat.mean()) ** 4).mean() / flat.var() ** 2),
                "max_over_std": float(flat.abs().max() / flat.std()),
            }
    return stats


def summarize(stats: dict[str, dict[str, float]]) -> dict[str, dict[str, dict[str, float]]]:
    out = {}
    for kind in KINDS:
        rows = [s for n, s in stats.items() if n.endswith(kind)]
        out[kind] = {key: {"median": round(statistics.median(r[key] for r in rows), 4),
                           "max": round(max(r[key] for r in rows), 4)} for key in rows[0]}
    return out


def rtn_in_place(model) -> None:
    with torch.no_grad():
        for _, module in linears(model):
            module.weight.data = fake_quant(module.weight.data)


def fuse_norms(model) -> None:
    from llmcompressor.modeling import fuse_norm_linears

    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        fuse_norm_linears(layer.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj])
        fuse_norm_linears(layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj])


def massive_channels(model, batch) -> list[dict]:
    """The residual channels carrying most of each layer's normalised input energy, and the norm gains on them."""
    captured: dict[int, torch.Tensor] = {}
    hooks = [layer.input_layernorm.register_forward_hook(
        lambda mod, args, out, i=i: captured.__setitem__(i, args[0].detach().flatten(0, -2)))
        for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        model(**batch)
    for hook in hooks:
        hook.remove()
    rows = []
    for i, x in captured.items():
        x_hat = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
        energy = x_hat.pow(2).mean(0)
        top = energy.topk(2)
        gains = model.model.layers[i].input_layernorm.weight.detach()
        rows.append({"layer": i, "channels": top.indices.tolist(),
                     "energy_share": [round(float(v / energy.sum()), 3) for v in top.values],
                     "norm_gain": [round(float(gains[c]), 4) for c in top.indices],
                     "median_abs_norm_gain": round(float(gains.abs().median()), 4)})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gguf:smollm2-135m-instruct")
    parser.add_argument("--paragraphs", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--calibration-samples", type=int, default=32)
    parser.add_argument("--skip-gptq", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    import rqat_sdk
    from rqat_sdk.data import load_examples
    from rqat_sdk.evaluation import perplexity
    from rqat_sdk.models import load_model, load_tokenizer
    from rqat_sdk.modifiers.ptq.llmcompressor_adapter import rotate_spinquant

    started = time.time()
    tokenizer = load_tokenizer(args.model)
    base = load_model(args.model, dtype="float32", device="cpu").eval()
    texts = load_examples("wikipedia:heldout", num_samples=args.paragraphs, seed=0)["text"]
    probe = tokenizer(texts[:8], return_tensors="pt", padding=True, truncation=True, max_length=128)

    def ppl(model) -> float:
        with torch.no_grad():
            return round(perplexity(model, tokenizer, texts, max_length=args.max_length), 2)

    def logits(model) -> torch.Tensor:
        with torch.no_grad():
            return model(**probe).logits

    report: dict = {
        "command": "OMP_NUM_THREADS=2 python " + " ".join([sys.argv[0], *sys.argv[1:]]),
        "device": f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads, float32",
        "date": datetime.date.today().isoformat(),
        "commit": git_commit(),
        "model": args.model,
        "scheme": f"W{BITS} group {GROUP} asymmetric, RTN; lm_head and embeddings unquantized",
        "perplexity_data": f"{args.paragraphs} wikipedia:heldout paragraphs (seed 0), {args.max_length} tokens",
        "rows": [],
    }

    def add(row: dict) -> None:
        row["elapsed_s"] = round(time.time() - started, 1)
        report["rows"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k not in ("layers", "by_kind", "massive_channels")}),
              flush=True)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=1) + "\n")

    reference = logits(base)
    tied = base.lm_head.weight is base.model.embed_tokens.weight
    plain_stats = layer_stats(base, probe)
    add({"name": "float", "perplexity": ppl(base), "tied_embeddings": tied,
         "massive_channels": massive_channels(base, probe)})
    quantized = copy.deepcopy(base)
    rtn_in_place(quantized)
    add({"name": "RTN (no rotation)", "perplexity": ppl(quantized), "by_kind": summarize(plain_stats)})
    del quantized

    fused = copy.deepcopy(base)
    fuse_norms(fused)
    fused_stats = layer_stats(fused, probe)
    float_ppl = ppl(fused)
    rtn_in_place(fused)
    add({"name": "norm weights fused, no rotation, RTN", "float_perplexity": float_ppl, "perplexity": ppl(fused),
         "by_kind": summarize(fused_stats)})
    del fused

    rotated = copy.deepcopy(base)
    rotate_spinquant(rotated, tokenizer, rotations=["R1", "R2"], transform_type="random-hadamard", randomize=False)
    change = (logits(rotated) - reference).abs().max()
    rotated_stats = layer_stats(rotated, probe)
    float_ppl = ppl(rotated)
    embed, head = rotated.model.embed_tokens.weight, rotated.lm_head.weight
    tie_row = {
        "tied_after_rotation": head is embed,
        "config_tie_word_embeddings_after": rotated.config.tie_word_embeddings,
        "lm_head_equals_embedding_after": bool(torch.equal(head, embed)),
        # R1 rotates the embedding's output and the lm_head's input by the same matrix, and the final norm is
        # fused into the lm_head: head = (E * g_final) @ Q when embed = E @ Q, so head ~ embed @ diag(g) in
        # the rotated basis. Check: the untied lm_head computes the float model's logits (max change above).
    }
    rtn_in_place(rotated)
    add({"name": "rotation R1+R2 random-hadamard, RTN", "float_perplexity": float_ppl,
         "float_max_abs_logit_change": float(change), "float_max_abs_logit": float(reference.abs().max()),
         **tie_row, "perplexity": ppl(rotated), "by_kind": summarize(rotated_stats),
         "layers": {n: {"plain": {k: round(v, 4) for k, v in plain_stats[n].items()},
                        "norm_fused": {k: round(v, 4) for k, v in fused_stats[n].items()},
                        "rotated": {k: round(v, 4) for k, v in rotated_stats[n].items()}} for n in plain_stats}})
    del rotated

    with tempfile.TemporaryDirectory(prefix="rqat-rotation-") as tmp:
        base.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        del base
        methods = {"rqat rtn": [{"type": "rtn"}],
                   "rqat rotation(random-hadamard)+rtn": [{"type": "rotation", "transform_type": "random-hadamard"},
                                                          {"type": "rtn"}]}
        if not args.skip_gptq:
            methods |= {"rqat gptq": [{"type": "gptq"}],
                        "rqat rotation(random-hadamard)+gptq": [
                            {"type": "rotation", "transform_type": "random-hadamard"}, {"type": "gptq"}]}
        for name, modifiers in methods.items():
            t0 = time.time()
            data = {"source": "wikipedia", "num_samples": args.calibration_samples, "max_seq_length": args.max_length}
            recipe = {"version": 1, "seed": 0, "scheme": SCHEME,
                      "stages": [{"name": "ptq", "data": data, "modifiers": modifiers}]}
            try:
                result = rqat_sdk.oneshot(tmp, recipe, dtype="float32", device="cpu")
            except rqat_sdk.RqatError as error:
                add({"name": name, "refused": str(error)})
                continue
            add({"name": name, "ptq_seconds": round(time.time() - t0, 1), "perplexity": ppl(result.model)})
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
