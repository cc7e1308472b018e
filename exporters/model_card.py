"""The README.md written beside every exported checkpoint: what it is, how it was made, how to serve it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rqat_sdk.exporters.vllm import SERVE_CONTEXT, layer_group_sizes, serve_command, vllm_support

if TYPE_CHECKING:
    from rqat_sdk.recipe import Recipe


def base_model_name(model: str | dict[str, Any]) -> str:
    """The source the run started from: run.json's ``model`` is a description (a dict) for a named source and a
    plain string for a model given in memory."""
    return model["source"] if isinstance(model, dict) else model


def recorded_fallbacks(record: dict[str, Any]) -> dict[str, int | None]:
    """The per-layer group sizes the quantizing stage recorded (stage metric ``group_size_fallbacks``)."""
    found: dict[str, int | None] = {}
    for stage in record.get("stages", []):
        found.update(stage.get("metrics", {}).get("group_size_fallbacks", {}))
    return found


def model_card(recipe: Recipe, record: dict[str, Any], max_model_len: int = SERVE_CONTEXT) -> str:
    scheme = recipe.scheme
    export = record.get("export", {})
    base = base_model_name(record.get("model", ""))
    lines = [
        "---",
        "library_name: transformers",
        "tags: [rqat-sdk, compressed-tensors, quantized, reasoning]",
        *([f"base_model: {base}"] if base and not base.startswith(("/", ".", "<", "gguf:")) else []),
        "---",
        "",
        f"# {recipe.name or 'Quantized model'}: {scheme.label}",
        "",
        f"Made with rqat_sdk {record.get('rqat_sdk')} from `{base}`: {scheme.describe()}.",
        f"compressed-tensors `{export.get('format')}` checkpoint, {export.get('bytes_on_disk', 0) / 2**20:.1f} MiB; "
        f"reloading it reproduces the quantized model's logits "
        f"{'exactly' if export.get('exact') else 'within float rounding'}.",
        "",
        "## How it was made",
        "",
        "| stage | modifiers | data | time |",
        "|---|---|---|---|",
    ]
    for stage in record.get("stages", []):
        modifiers = ", ".join(m["type"] for m in stage["modifiers"])
        lines.append(f"| {stage['name']} | {modifiers} | {stage.get('data') or '-'} | {stage['seconds']:.1f} s |")
    evaluation = record.get("evaluation")
    if evaluation:
        lines += [
            "",
            "## Accuracy",
            "",
            f"pass@1 on `{evaluation['benchmark']}`: **{100 * evaluation['pass_at_1']:.1f}%** "
            f"(± {100 * evaluation['std']:.1f} over {evaluation['samples']} sample(s), "
            f"{evaluation['num_problems']} problems, mean response {evaluation['mean_response_tokens']:.0f} tokens, "
            f"{100 * evaluation['truncation_rate']:.0f}% truncated).",
        ]
    lines += ["", "## Serving with vLLM", "", "| target | servable | kernel or reason |", "|---|---|---|"]
    online_transforms = any(modifier.type == "flatquant" for _, modifier in recipe.positions())
    group_sizes = layer_group_sizes(scheme, recorded_fallbacks(record))
    for target in ("gpu", "cpu"):
        verdict = vllm_support(scheme, target, group_sizes=group_sizes, online_transforms=online_transforms)
        lines.append(f"| {target} | {'yes' if verdict.servable else 'no'} | {verdict.detail} |")
    if online_transforms:
        # The folded weights are only right behind the learned transforms, which plain transformers does not apply.
        lines += [
            "",
            "vLLM has no path for the learned (flatquant) transforms; rqat runs this checkpoint with fake "
            "quantization: `rqat eval <this directory>`, or in Python:",
            "",
            "```python",
            "from rqat_sdk.models import load_model",
            'model = load_model("<this directory>", allow_quantized=True)  # re-attaches the transforms',
            "```",
            "",
        ]
    else:
        lines += [
            "",
            "```bash",
            serve_command("<this directory>", scheme, max_model_len),
            "```",
            "",
            "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            'model = AutoModelForCausalLM.from_pretrained("<this directory>")',
            "```",
            "",
        ]
    lines += [
        "## Recipe",
        "",
        "The exact recipe is `recipe.yaml`; versions, seeds and timings are in `run.json`.",
        "",
        "```yaml",
        recipe.to_yaml().rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)
