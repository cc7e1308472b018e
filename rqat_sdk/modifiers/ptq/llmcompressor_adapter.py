"""The one file that talks to llmcompressor.

rqat_sdk delegates the PTQ algorithms (RTN, GPTQ, AWQ, SpinQuant rotations) to llmcompressor and keeps its
side effects contained. Each call here:

- runs inside llmcompressor's ``create_session()``, so its process-global session is a fresh thread-local one
  and two rqat sessions never share state;
- points ``config._name_or_path`` at a saved copy of the config for the duration of the call, because
  ``oneshot`` reloads the config from that path in ``validate_model`` (an in-memory model with an empty
  name fails there);
- removes the ``save_pretrained`` wrapper that ``oneshot`` installs on the model instance, so that saving
  stays with our exporter;
- removes the compressed-tensors offloading that ``oneshot``'s pipelines leave on every module (an
  ``OffloadCache`` in place of ``_parameters``, onloading weights at each forward): training would pay for
  it at every step, and FSDP2 cannot shard parameters held that way;
- on hosts without an accelerator, skips ``IntermediatesCache.pin_memory``, which AWQ calls
  unconditionally and which raises "Cannot access accelerator device when none is available" on CPU
  (replaced for the call and restored after it);
- under a multi-process launcher, runs single-threaded: every rank quantizes its own copy of the model
  (deterministically, from the same seeded data) instead of coordinating through compressed-tensors'
  distributed offloading, whose per-tensor broadcasts deadlocked here when ranks reached them out of step;
- holds offset norms' weights (Gemma's ``x * (1 + w)``) in float32, so that ``oneshot``'s conversion of them
  to ``x * w`` and back does not round every gain in bf16;
- mutes llmcompressor's logging (see :mod:`rqat_sdk.logs`), modifier construction included;
- feeds calibration samples in the order our data layer drew them with the recipe's seed, as a ``DataLoader``
  (which ``oneshot`` takes as it is; from a dataset it would shuffle the samples with an unseeded
  ``RandomSampler``, or sort them by length with an unstable sort that may reorder ties), and seeds torch, so
  that the same recipe, seed and data give the same checkpoint.

Three things here touch llmcompressor's private internals: ``IntermediatesCache.pin_memory``,
``SpinQuantModifier._center_embeddings``, which :func:`rotate_spinquant` overrides, and AWQ's
``_check_layers_are_compatible``, which :func:`awq_unbalanced_layers` asks. Every call therefore first
checks that llmcompressor is the version they were verified against (:data:`VERIFIED_VERSION`).
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import tempfile
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch.utils.data import DataLoader, SequentialSampler

from rqat_sdk.logs import quiet_upstream_logs
from rqat_sdk.upstream import require_verified

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from rqat_sdk.scheme import QuantScheme

VERIFIED_VERSION = "0.14.0.1"
"""The llmcompressor whose private internals this adapter touches (pyproject.toml pins it)."""


def quantize_rtn(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    scheme: QuantScheme,
    calibration: Dataset | None,
    *,
    seed: int = 0,
) -> dict[str, Any]:
    """Round-to-nearest: scales from each weight's range; data only for static activation or KV scales."""

    def modifiers() -> list:
        from llmcompressor.modifiers.quantization import QuantizationModifier

        return [QuantizationModifier(**_scheme_kwargs(scheme, model))]

    return _oneshot(model, tokenizer, modifiers, calibration, seed)


def quantize_gptq(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    scheme: QuantScheme,
    calibration: Dataset,
    *,
    seed: int,
    block_size: int,
    dampening_frac: float,
    actorder: str | None,
) -> dict[str, Any]:
    """GPTQ: quantize column by column, folding each column's error into the rest through the Hessian."""

    def modifiers() -> list:
        from llmcompressor.modifiers.gptq import GPTQModifier

        kwargs = _scheme_kwargs(scheme, model)
        return [GPTQModifier(**kwargs, block_size=block_size, dampening_frac=dampening_frac, actorder=actorder)]

    return _oneshot(model, tokenizer, modifiers, calibration, seed)


def quantize_awq(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    scheme: QuantScheme,
    calibration: Dataset,
    *,
    seed: int,
    duo_scaling: bool | Literal["both"],
    n_grid: int,
) -> dict[str, Any]:
    """AWQ: search per-channel scales that protect salient weights, then round to nearest."""

    def modifiers() -> list:
        from llmcompressor.modifiers.quantization import QuantizationModifier
        from llmcompressor.modifiers.transform.awq import AWQModifier

        quantize = QuantizationModifier(**_scheme_kwargs(scheme, model))
        return [AWQModifier(duo_scaling=duo_scaling, n_grid=n_grid), quantize]

    return _oneshot(model, tokenizer, modifiers, calibration, seed)


def awq_unbalanced_layers(model: PreTrainedModel) -> list[str]:
    """The Linear layers (LM head aside) that llmcompressor's AWQ balances no scales for on ``model``: AWQ
    quantizes them with round-to-nearest. Its Gemma 3 mappings, for one, leave out q/k/v, whose outputs Gemma 3
    normalises (q_norm, k_norm; llm-compressor issue 2522); and AWQ skips a ``v_proj`` -> ``o_proj`` mapping whose
    widths differ, as under grouped-query attention (SmolLM2, Gemma 3), leaving ``o_proj`` out too."""
    from llmcompressor.modifiers.transform.awq.base import _check_layers_are_compatible
    from llmcompressor.modifiers.transform.awq.dynamic_mappings import get_layer_mappings_from_model

    patterns = [pattern for mapping in get_layer_mappings_from_model(model) for pattern in mapping.balance_layers]
    head = model.get_output_embeddings()
    skipped = set()
    for name, module in model.named_modules():  # the shape check AWQ applies when it resolves its mappings
        values, output = getattr(module, "v_proj", None), getattr(module, "o_proj", None)
        if isinstance(values, torch.nn.Linear) and isinstance(output, torch.nn.Linear) and not \
                _check_layers_are_compatible(values, f"{name}.v_proj", [output], [f"{name}.o_proj"]):
            skipped.add(f"{name}.o_proj")

    def balanced(name: str) -> bool:
        return name not in skipped and any(re.match(p[3:], name) if p.startswith("re:") else p == name
                                           for p in patterns)

    return [name for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and module is not head and not balanced(name)]


def rotate_spinquant(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    *,
    rotations: list[Literal["R1", "R2"]],
    transform_type: Literal["hadamard", "random-hadamard"],
    randomize: bool,
) -> None:
    """Fuse Hadamard rotations (SpinQuant R1/R2) into the weights; the float model's output is unchanged.

    llmcompressor's SpinQuant (0.14) also subtracts each embedding's mean, a step from QuaRot's LayerNorm
    conversion that RMSNorm models do not take: RMSNorm is not mean-invariant, so it changes an RMSNorm model's
    float logits. Rotations alone commute with RMSNorm (once
    its weight is fused into the next layers), so the step is skipped here.
    """

    def modifiers() -> list:
        from llmcompressor.modifiers.transform import SpinQuantModifier
        from llmcompressor.modifiers.transform.spinquant.base import SpinquantRotation

        class RotationOnly(SpinQuantModifier):
            def _center_embeddings(self, model: PreTrainedModel) -> None:
                pass

        rotated = [SpinquantRotation(rotation) for rotation in rotations]
        return [RotationOnly(rotations=rotated, transform_type=transform_type, randomize=randomize)]

    _oneshot(model, tokenizer, modifiers, None, 0)


def _scheme_kwargs(scheme: QuantScheme, model: PreTrainedModel) -> dict[str, Any]:
    return {"config_groups": scheme.config_groups(model), "ignore": list(scheme.ignore)}


def _oneshot(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    make_modifiers: Callable[[], list],
    calibration: Dataset | None,
    seed: int,
) -> dict[str, Any]:
    """Run llmcompressor; what made the run repeatable: the torch seed, the sample order and the threads."""
    require_verified("llmcompressor", VERIFIED_VERSION, "rqat_sdk/modifiers/ptq/llmcompressor_adapter.py")
    kwargs: dict[str, Any] = {}
    if calibration is not None:
        from transformers import default_data_collator

        samples = calibration.select_columns(["input_ids", "attention_mask"])
        kwargs = {"dataset": DataLoader(samples, sampler=SequentialSampler(samples), collate_fn=default_data_collator)}
    torch.manual_seed(seed)
    with _isolated(model):
        from llmcompressor import oneshot

        # the ignore: llmcompressor annotates processor as str | ProcessorMixin, and takes a tokenizer as well
        oneshot(model=model, processor=tokenizer, recipe=make_modifiers(), output_dir=None, **kwargs)  # type: ignore[arg-type]
    return calibration_record(calibration, seed)


def calibration_record(calibration: Dataset | None, seed: int) -> dict[str, Any]:
    """The torch seed, the calibration order and a digest of its tokens, and the CPU threads: what fixes
    the result of a calibrated run (on CPU, matrix products may round differently with other thread counts)."""
    record: dict[str, Any] = {"torch_seed": seed, "torch_threads": torch.get_num_threads()}
    if calibration is not None:
        digest = hashlib.sha256()
        for ids in calibration["input_ids"]:
            digest.update(torch.tensor(ids, dtype=torch.int64).numpy().tobytes())
        record |= {"order": "as drawn (recipe seed), unshuffled", "samples": len(calibration),
                   "tokens_sha256": digest.hexdigest()}
    return record


@contextlib.contextmanager
def _isolated(model: PreTrainedModel) -> Iterator[None]:
    original_name = model.config._name_or_path
    device = next(model.parameters()).device
    with contextlib.ExitStack() as stack:
        stack.enter_context(quiet_upstream_logs())
        from compressed_tensors.offload import remove_dispatch
        from compressed_tensors.offload.utils import as_single_threaded
        from llmcompressor.core import create_session
        from llmcompressor.pipelines.cache import IntermediatesCache

        stack.enter_context(as_single_threaded())
        stack.enter_context(_offset_norms_in_float32(model))  # entered before, so left after, remove_dispatch
        stack.callback(lambda: remove_dispatch(model, onload_tensors=True).to(device))
        config_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="rqat-config-"))
        model.config.save_pretrained(config_dir)
        model.config._name_or_path = config_dir
        stack.callback(setattr, model.config, "_name_or_path", original_name)
        stack.callback(model.__dict__.pop, "save_pretrained", None)
        if not torch.accelerator.is_available():
            stack.enter_context(_replaced(IntermediatesCache, "pin_memory", lambda *args, **kwargs: None))
        stack.enter_context(create_session())
        yield


@contextlib.contextmanager
def _offset_norms_in_float32(model: PreTrainedModel) -> Iterator[None]:
    """Hold the weights of offset norms (Gemma's ``x * (1 + w)``) in float32 for the block.

    ``oneshot`` converts each such norm to ``x * (1 + w)`` stored in the weight's dtype and converts it back after
    (``norm_calibration_context``); in bf16 ``1 + w`` rounds to bf16's spacing near 1 (2^-8 to 2^-7, coarser than
    ``w``'s own), so every run moved every gain, smoothing or not. In float32 the round trip is exact: RTN and
    GPTQ leave the norms as they were, and AWQ's smoothed gains round once, when they return to the model's
    dtype. The offset norms are the classes llmcompressor registers for that conversion."""
    from compressed_tensors.registry import standardize_lookup_name
    from llmcompressor.modeling.offset_norm import NormCalibrationModule

    offset = {*NormCalibrationModule.registered_names(), *NormCalibrationModule.registered_aliases()}
    gains: list[tuple[torch.nn.Parameter, torch.dtype]] = []
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if standardize_lookup_name(type(module).__name__) in offset and isinstance(weight, torch.nn.Parameter) \
                and weight.dtype != torch.float32:
            gains.append((weight, weight.dtype))
            weight.data = weight.data.float()
    try:
        yield
    finally:
        for weight, dtype in gains:
            weight.data = weight.data.to(dtype)


@contextlib.contextmanager
def _replaced(owner: Any, name: str, value: Any) -> Iterator[None]:
    """``owner.name`` is ``value`` inside the block and what it was after it."""
    original = owner.__dict__[name]
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, original)
