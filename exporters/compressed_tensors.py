"""Write a quantized model as a compressed-tensors checkpoint, and prove the file matches the model.

Before compressing, each quantized weight is replaced by the value the model's forward computes with (its
codes dequantized): compression recomputes the codes from the weight it is given, and compressed-tensors
does that with other arithmetic than its forward on CUDA (a float32 kernel, against the weight's own dtype),
so a latent weight that training left near a rounding boundary could get another code in the file than in
the model. A weight on its grid lies a whole number of steps from the zero point, far from any boundary,
and every arithmetic recovers its code. Where the snapped weight would quantize differently in the weight's
own dtype (8-bit codes in bf16), the weight is kept as it was.

After writing, the checkpoint is reloaded with ``transformers.AutoModelForCausalLM.from_pretrained`` and its
logits on a probe batch are compared with the in-memory quantized model's: they must be bit-identical for
weight-only schemes (and within float rounding where activations are quantized at run time). A mismatch is
an :class:`~rqat_sdk.errors.ExportError` that names the module whose output first differs (in execution
order) and the layers whose weights differ.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from rqat_sdk.errors import ExportError
from rqat_sdk.exporters.formats import DENSE, checkpoint_format
from rqat_sdk.logs import quiet_upstream_logs
from rqat_sdk.models import restore_kv_cache_quantization
from rqat_sdk.transforms import restore_online_transforms, save_online_transforms

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from rqat_sdk.scheme import QuantScheme

PROBE_PROMPTS = (
    "What is 17 * 23? Please reason step by step, and put your final answer within \\boxed{}.",
    "A train travels 120 km in 1.5 hours. What is its average speed in km/h?",
    "Solve for x: 3x + 7 = 22.",
)
ACTIVATION_RTOL = 1e-3
"""Where activations are quantized at run time, reloaded logits may differ by float rounding in the scales."""


@dataclass
class ExportReport:
    format: str
    exact: bool
    max_abs_logit_diff: float
    probe_tokens: int
    bytes_on_disk: int
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def export_checkpoint(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, scheme: QuantScheme, directory: Path
) -> ExportReport:
    """Write ``model`` (already quantized with ``scheme``) and ``tokenizer`` into the empty ``directory``.

    The in-memory model keeps working afterwards, holding the exported (dequantized) weights. Under a
    multi-process launcher only the main rank exports, so compressed-tensors must not coordinate ranks.
    """
    from compressed_tensors.offload.utils import as_single_threaded

    with as_single_threaded():
        return _export(model, tokenizer, scheme, directory)


def _export(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, scheme: QuantScheme, directory: Path
) -> ExportReport:
    from compressed_tensors import ModelCompressor
    from compressed_tensors.offload import remove_dispatch

    start = time.perf_counter()
    fmt = checkpoint_format(scheme)
    probe = probe_batch(tokenizer, model.device)
    expected, expected_outputs = _traced_forward(model, probe)
    snap_to_grid(model)

    with quiet_upstream_logs():  # it warns when a forced format differs from the one it would infer
        compressor = ModelCompressor.from_pretrained_model(model, quantization_format=fmt)
    compressor.compress_model(model)
    try:
        model.save_pretrained(directory)
        save_online_transforms(model, directory)
        compressor.update_config(str(directory))
    finally:
        compressor.decompress_model(model)
        # decompression leaves compressed-tensors offloading on every module; the model stays a plain one
        remove_dispatch(model, onload_tensors=True).to(probe.device)
        _refreeze(model)
    tokenizer.save_pretrained(directory)

    reloaded = reload_checkpoint(directory, dtype=model.dtype, device=model.device)
    actual, actual_outputs = _traced_forward(reloaded, probe)
    diff = (actual - expected).abs().max().item()
    exact = torch.equal(actual, expected)
    rtol = ACTIVATION_RTOL if scheme.input_activations is not None else 0.0
    if not (exact or _close(expected, actual, rtol)):
        first = _first_differing_output(expected_outputs, actual_outputs, rtol)
        layers = _differing_layers(model, reloaded)
        raise ExportError(
            f"the checkpoint written to {directory} does not reproduce the in-memory model: max |logit diff| "
            f"{diff:.3g} on {probe.numel()} probe tokens ({fmt}); the first module whose output differs: "
            f"{first}; layers whose reloaded weights differ: {', '.join(layers[:8]) or 'none'}"
        )
    size = sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())
    return ExportReport(fmt, exact, diff, probe.numel(), size, time.perf_counter() - start)


@torch.no_grad()
def snap_to_grid(model: PreTrainedModel) -> None:
    """Replace every quantized weight by the one its layer's forward computes with, so that compression, in
    whatever arithmetic, stores the codes the model ran with (see the module's docstring)."""
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize

    for module in model.modules():
        args = getattr(getattr(module, "quantization_scheme", None), "weights", None)
        if args is None or not getattr(module, "quantization_enabled", True):
            continue
        snapped = forward_quantize(module, module.weight.data, "weight", args)
        # In bf16, 8-bit codes times their scale do not always divide back to the same codes (bf16 keeps 8
        # significant bits, so w / s lands on half steps): keep the weight where snapping would change the model.
        if torch.equal(forward_quantize(module, snapped, "weight", args), snapped):
            module.weight.data = snapped


def _refreeze(model: PreTrainedModel) -> None:
    """Back to FROZEN: a DECOMPRESSED module's forward stops fake-quantizing its weight, so any later change
    to the weights (more training, a second export) would silently run unquantized."""
    from compressed_tensors.quantization import QuantizationStatus

    for module in model.modules():
        if getattr(module, "quantization_status", None) == QuantizationStatus.DECOMPRESSED:
            module.quantization_status = QuantizationStatus.FROZEN


def save_dense(model: PreTrainedModel, directory: Path) -> None:
    """Save latent (unquantized) weights plus scales and zero points: the resumable form of a stage."""
    from compressed_tensors import ModelCompressor
    from compressed_tensors.offload.utils import as_single_threaded

    # compressed-tensors warns that "dense" is not the format it would infer: that is the point
    with quiet_upstream_logs(), as_single_threaded():
        compressor = ModelCompressor.from_pretrained_model(model, quantization_format=DENSE)
        model.save_pretrained(directory)
        save_online_transforms(model, directory)
        if compressor.quantization_config is not None:
            compressor.update_config(str(directory))


def reload_checkpoint(directory: Path, *, dtype: torch.dtype, device: torch.device) -> PreTrainedModel:
    """Load a checkpoint written by this module the way users will: ``from_pretrained`` (on this rank only),
    with the KV-cache quantization and the online transforms its config records."""
    from compressed_tensors.offload.utils import as_single_threaded
    from transformers import AutoModelForCausalLM

    with as_single_threaded():
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype)
        restore_kv_cache_quantization(model)
        restore_online_transforms(model, directory)
        return model.to(device).eval()  # type: ignore[arg-type]  # @wraps typing gap (pyproject)


def probe_batch(tokenizer: PreTrainedTokenizerBase, device: torch.device) -> torch.Tensor:
    """A fixed batch of reasoning prompts, chat-formatted when the tokenizer has a template."""
    texts = []
    for prompt in PROBE_PROMPTS:
        if getattr(tokenizer, "chat_template", None):
            messages = [{"role": "user", "content": prompt}]
            texts.append(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
        else:
            texts.append(prompt)
    rows = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    length = min(len(r) for r in rows)  # equal lengths: no padding, so every position is compared
    return torch.tensor([r[:length] for r in rows], device=device)


@torch.no_grad()
def _traced_forward(model: PreTrainedModel, probe: torch.Tensor) -> tuple[torch.Tensor, list[tuple[str, torch.Tensor]]]:
    """The logits on ``probe`` and each submodule's output (its first tensor), in the order the modules
    finished: what a failed check compares to find where two models part."""
    outputs: list[tuple[str, torch.Tensor]] = []

    def record(name: str):
        def hook(module: torch.nn.Module, args: tuple, output: object) -> None:
            tensor = _first_tensor(output)
            if tensor is not None:
                outputs.append((name, tensor.detach().clone()))  # clone: a later in-place op must not change it

        return hook

    handles = [module.register_forward_hook(record(name)) for name, module in model.named_modules() if name]
    try:
        logits = model(input_ids=probe).logits.float()
    finally:
        for handle in handles:
            handle.remove()
    return logits, outputs


def _first_tensor(output: object) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        return next((t for t in output if isinstance(t, torch.Tensor)), None)
    return None


def _close(expected: torch.Tensor, actual: torch.Tensor, rtol: float) -> bool:
    """Equal shapes and values within ``rtol`` of the expected tensor's largest magnitude (0: identical)."""
    if expected.shape != actual.shape:
        return False
    if rtol == 0.0:
        return torch.equal(expected, actual)
    bound = rtol * expected.float().abs().max().item()
    return (expected.float() - actual.float()).abs().max().item() <= bound


def _first_differing_output(
    expected: list[tuple[str, torch.Tensor]], actual: list[tuple[str, torch.Tensor]], rtol: float
) -> str:
    """The first module, in execution order, whose output on the probe differs between the two models
    (a module that runs several times is compared call by call), with its largest difference."""
    theirs: dict[str, list[torch.Tensor]] = defaultdict(list)
    for name, tensor in actual:
        theirs[name].append(tensor)
    calls: dict[str, int] = defaultdict(int)
    for name, tensor in expected:
        index = calls[name]
        calls[name] += 1
        other = theirs[name][index] if index < len(theirs[name]) else None
        if other is None:
            return f"{name} (it did not run in the reloaded model)"
        if not _close(tensor, other, rtol):
            if tensor.shape != other.shape:
                return f"{name} (output shape {tuple(tensor.shape)}, reloaded {tuple(other.shape)})"
            return f"{name} (max |diff| {(tensor.float() - other.float()).abs().max().item():.3g})"
    return "none (every module's output matches; only the final logits differ)"


def _differing_layers(model: PreTrainedModel, reloaded: PreTrainedModel) -> list[str]:
    theirs = dict(reloaded.named_modules())
    differing = []
    for name, module in model.named_modules():
        other = theirs.get(name)
        weight = getattr(module, "weight", None)
        other_weight = getattr(other, "weight", None)
        if isinstance(weight, torch.Tensor) and isinstance(other_weight, torch.Tensor):
            if weight.shape != other_weight.shape or not torch.equal(weight, other_weight):
                differing.append(name)
    return differing
