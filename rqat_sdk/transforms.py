"""Learned online transforms (FlatQuant): the part of a transform that runs at inference, kept with the model.

The ``flatquant`` modifier folds each transform's inverse into the weights it feeds; what remains is
``x -> x T`` (and the learned activation clipping) in front of those Linears. It runs as a forward
pre-hook on each of them, so it survives every forward the Linear is given (compressed-tensors' fake
quantization, QAT's :func:`~rqat_sdk.modifiers.layers._qat_forward`) and comes before the
activation quantizer inside that forward.

The transforms are :class:`KroneckerTransform` modules registered under their decoder layer (in
``rqat_transforms``), so their parameters train, move and shard with the layer and appear in training
checkpoints. A saved model records them in ``config.json`` (:data:`TRANSFORMS_CONFIG_KEY`) and stores the
factors beside the weights in :data:`SIDECAR`, not in ``model.safetensors``: transformers would drop them
as unexpected keys on load and vLLM would refuse them. Every loader calls
:func:`restore_online_transforms`, as it re-attaches the KV-cache quantization.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save
from torch.utils.checkpoint import checkpoint

from rqat_sdk.errors import ModelLoadError
from rqat_sdk.files import write_bytes_atomic
from rqat_sdk.ops.affine_transform import (
    CLIP_LOGIT_INIT,
    clip_activation,
    clip_factor,
    fold_into_weight,
    fused_kernel_serves,
    kronecker_sizes,
    random_orthogonal,
    transform_and_clip,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel

TRANSFORMS_CONFIG_KEY = "rqat_transforms"
"""The config.json entry listing a model's online transforms: where each lives and which Linears it feeds."""
SIDECAR = "rqat_transforms.safetensors"
CONTAINER = "rqat_transforms"
"""The attribute of a decoder layer that holds its transforms (a ``ModuleDict``)."""
_TRANSFORM = "_rqat_input_transform"
_READERS = "_rqat_readers"
"""How many Linears read a transform's output (on the transform)."""
_PENDING = "_rqat_pending"
"""A transform's :class:`_Pending` result (on the transform)."""
TRANSFORM_PARAMETERS = ("rqat_kron_left", "rqat_kron_right", "rqat_smooth")
ACTIVATION_CLIP_PARAMETER = "rqat_act_clip_logit"


class KroneckerTransform(torch.nn.Module):
    """``x -> (x * smooth) (left ⊗ right)``, then clipping to ``sigmoid(logit)`` of the range where the
    Linear quantizes its input. Parameters are float32 whatever the model's dtype: they are tiny, and the
    folded weights were computed from their float32 values."""

    def __init__(
        self,
        width: int,
        *,
        smoothing: bool,
        activation_clipping: bool,
        orthogonal: bool = False,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        self.width = width
        sizes = kronecker_sizes(width)
        left, right = (random_orthogonal(n, generator) if orthogonal else torch.eye(n) for n in sizes)
        self.rqat_kron_left = torch.nn.Parameter(left)
        self.rqat_kron_right = torch.nn.Parameter(right)
        self.rqat_smooth = torch.nn.Parameter(torch.ones(width)) if smoothing else None
        self.rqat_act_clip_logit = torch.nn.Parameter(torch.tensor(CLIP_LOGIT_INIT)) if activation_clipping else None

    def spec(self) -> dict[str, Any]:
        """What :func:`restore_online_transforms` needs to rebuild this module before loading its tensors."""
        return {"width": self.width, "smoothing": self.rqat_smooth is not None,
                "activation_clipping": self.rqat_act_clip_logit is not None}

    def forward(self, x: torch.Tensor, activation_args: Any = None) -> torch.Tensor:
        """``x T`` in ``x``'s dtype, clipped where ``activation_args`` quantizes it (computed in float32)."""
        return transform_and_clip(
            x, self.rqat_kron_left, self.rqat_kron_right, self.rqat_smooth, self.rqat_act_clip_logit, activation_args
        )

    def fold(self, weight: torch.Tensor) -> torch.Tensor:
        """``W T^{-T}`` in float32: the weight that reads ``x T`` as ``weight`` reads ``x``."""
        return fold_into_weight(weight, self.rqat_kron_left, self.rqat_kron_right, self.rqat_smooth)

    def fused(self, x: torch.Tensor, activation_args: Any) -> bool:
        """Whether the fused kernels transform ``x`` (then autograd saves only ``x``: nothing to checkpoint)."""
        return fused_kernel_serves(
            x, self.rqat_kron_left, self.rqat_kron_right, self.rqat_act_clip_logit, activation_args
        )

    def clip(self, x: torch.Tensor, activation_args: Any) -> torch.Tensor:
        if self.rqat_act_clip_logit is None:
            return x
        return clip_activation(x, clip_factor(self.rqat_act_clip_logit), activation_args)


def input_transform(linear: torch.nn.Module) -> KroneckerTransform | None:
    """The online transform in front of ``linear``, if any."""
    return linear.__dict__.get(_TRANSFORM)


def _transform_inputs(module: torch.nn.Module, args: tuple) -> tuple:
    # A module-level function that finds the transform through the Linear, so that a deep copy of the model
    # (FSDP's training copy, a teacher copy) runs its own copy of the transform.
    x = args[0]
    transform = module.__dict__[_TRANSFORM]
    activations = getattr(getattr(module, "quantization_scheme", None), "input_activations", None)
    return (_shared_transform(transform, x, activations), *args[1:])


@dataclass(frozen=True)
class _Pending:
    """A transform's last result while ``readers_left`` of its Linears have yet to read it."""

    source: weakref.ref
    version: int
    activations: Any
    result: torch.Tensor
    readers_left: int

    def serves(self, x: torch.Tensor, activations: Any) -> bool:
        return self.source() is x and self.version == x._version and self.activations == activations


def _shared_transform(transform: KroneckerTransform, x: torch.Tensor, activations: Any) -> torch.Tensor:
    """``x T`` (clipped for ``activations``) in ``x``'s dtype, computed once for the Linears that share ``x``.

    q/k/v (and gate/up) read one input through one transform: the first Linear computes the result and
    keeps it until its siblings have read it, so the model holds one transformed copy, not three (inside
    ``torch.compile``, which holds no Python state, each computes it). Under
    autograd the float32 work is recomputed in the backward pass (by the fused kernels' backward on CUDA,
    checkpointed elsewhere): only ``x`` and the result stay saved, which keeps a FlatQuant model's training
    memory close to the plain W4A4 model's.
    """
    if torch.compiler.is_compiling():  # no Python state in a graph: each Linear transforms (the compiler may merge)
        return checkpoint(transform, x, activations, use_reentrant=False)
    pending = transform.__dict__.pop(_PENDING, None)
    if pending is not None and pending.serves(x, activations):
        y, readers_left = pending.result, pending.readers_left - 1
    else:
        trains = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in transform.parameters()))
        if trains and not transform.fused(x, activations):
            y = checkpoint(transform, x, activations, use_reentrant=False)
        else:
            y = transform(x, activations)
        readers_left = transform.__dict__.get(_READERS, 1) - 1
    if readers_left > 0:
        transform.__dict__[_PENDING] = _Pending(weakref.ref(x), x._version, activations, y, readers_left)
    return y


def attach_online_transform(
    model: PreTrainedModel, parent: str, key: str, transform: KroneckerTransform, linears: list[str]
) -> None:
    """Register ``transform`` as ``{parent}.rqat_transforms.{key}`` and run it in front of each of ``linears``
    (module names in ``model``), recording it in ``model.config`` for the checkpoint."""
    owner = model.get_submodule(parent)
    if not hasattr(owner, CONTAINER):
        owner.register_module(CONTAINER, torch.nn.ModuleDict())
    getattr(owner, CONTAINER)[key] = transform
    for linear_name in linears:
        linear = model.get_submodule(linear_name)
        if linear.in_features != transform.width:
            raise ValueError(
                f"{linear_name} reads {linear.in_features} features; the transform {parent}.{key} has width "
                f"{transform.width}"
            )
        if input_transform(linear) is not None:
            raise ValueError(f"{linear_name} already has an online transform")
        linear.__dict__[_TRANSFORM] = transform
        linear.register_forward_pre_hook(_transform_inputs)
        transform.__dict__[_READERS] = transform.__dict__.get(_READERS, 0) + 1
    name = f"{parent}.{CONTAINER}.{key}"
    empty: dict[str, Any] = {"method": "flatquant", "file": SIDECAR, "transforms": {}}
    record = getattr(model.config, TRANSFORMS_CONFIG_KEY, None) or empty
    record["transforms"][name] = {**transform.spec(), "inputs_of": list(linears)}
    setattr(model.config, TRANSFORMS_CONFIG_KEY, record)
    # The factors go to the sidecar, not into model.safetensors (see the module docstring).
    ignored = set(getattr(model, "_keys_to_ignore_on_save", None) or ())
    model._keys_to_ignore_on_save = ignored | {f"{name}.{p}" for p, _ in transform.named_parameters()}


def is_transform_parameter(name: str) -> bool:
    """Whether the parameter named ``name`` (in the whole model) belongs to an online transform."""
    return f".{CONTAINER}." in name


def transform_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every online-transform parameter of ``model`` by its state-dict name, on the CPU."""
    return {
        name: parameter.detach().cpu().contiguous()
        for name, parameter in model.named_parameters()
        if is_transform_parameter(name)
    }


def save_online_transforms(model: PreTrainedModel, directory: Path) -> None:
    """Write the sidecar beside a saved model whose config records online transforms (atomically)."""
    record = getattr(model.config, TRANSFORMS_CONFIG_KEY, None)
    if not record:
        return

    write_bytes_atomic(Path(directory) / record["file"], save(transform_tensors(model)))


def restore_online_transforms(model: PreTrainedModel, directory: Path | None) -> None:
    """Re-attach the online transforms a loaded checkpoint's config records, from its sidecar in ``directory``."""
    record = getattr(model.config, TRANSFORMS_CONFIG_KEY, None)
    if not record:
        return
    sidecar = Path(directory) / record["file"] if directory is not None else None
    if sidecar is None or not sidecar.is_file():
        raise ModelLoadError(
            f"the checkpoint's config.json lists learned online transforms ({TRANSFORMS_CONFIG_KEY}) but "
            f"{sidecar or record['file']} is missing; the model cannot run without them. Load the checkpoint "
            f"from a local directory that holds {record['file']}."
        )

    tensors = load_file(sidecar)
    setattr(model.config, TRANSFORMS_CONFIG_KEY, None)  # attach_online_transform records them again
    for name, spec in record["transforms"].items():
        parent, _, key = name.rpartition(f".{CONTAINER}.")
        transform = KroneckerTransform(
            spec["width"], smoothing=spec["smoothing"], activation_clipping=spec["activation_clipping"]
        )
        state = {k.removeprefix(f"{name}."): v for k, v in tensors.items() if k.startswith(f"{name}.")}
        try:
            transform.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ModelLoadError(
                f"{sidecar} does not hold the transform {name} that config.json lists: {exc}"
            ) from None
        attach_online_transform(model, parent, key, transform, spec["inputs_of"])
