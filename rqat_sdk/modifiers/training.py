"""What the modifiers that train the fake-quantized model (``qat_kd``, ``grpo``) share: their common
optimizer fields, and the lifecycle around training.

``apply`` attaches the trainable fake-quantized forward (:func:`attach_training`), remembering the model's
dtype and ``requires_grad`` flags; ``finalize`` folds what was learned back into compressed-tensors'
parameters and restores the forward, dtype, eval mode and flags, also after an ``apply`` that raised
(a cold start, a collapse, a diverged loss), so the model never stays in its training state.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal

import torch
from pydantic import PrivateAttr, model_validator

from rqat_sdk.fields import FloatRange, IntRange
from rqat_sdk.modifiers.base import Modifier
from rqat_sdk.modifiers.layers import attach_fake_quant, finish_training

if TYPE_CHECKING:
    from rqat_sdk.session.state import SessionState


class TrainingModifier(Modifier):
    """Base class of the modifiers that train the quantized model through fake quantization."""

    trains_quantized = True

    learn_scales: bool = False
    """Train weight scales and zero points (LSQ-style) as their own parameter group, at scale_learning_rate."""
    scale_learning_rate: Annotated[float, FloatRange(0.0, 1.0)] = 5e-5
    """Peak learning rate of scales and zero points (with learn_scales)."""
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warmup: cosine or linear to zero, or constant."""
    warmup_steps: Annotated[int, IntRange(0, None)] = 0
    """Steps of linear warmup."""
    betas: tuple[Annotated[float, FloatRange(0.0, 0.9999)], Annotated[float, FloatRange(0.0, 0.9999)]] = (0.9, 0.95)
    """Adam's moment decay rates."""
    weight_decay: Annotated[float, FloatRange(0.0, None)] = 0.0
    """Decoupled weight decay, applied to the weights only."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    gradient_checkpointing_every_n_layers: Annotated[int, IntRange(1, None)] = 1
    """With gradient_checkpointing, only every n-th checkpointable layer (a text model's decoder layers)
    recomputes its activations (transformers' ``every_n_layers``); the others keep theirs. Above 1 it spends
    memory that full checkpointing would leave unused to skip part of the recompute."""

    @model_validator(mode="after")
    def _every_n_layers_needs_checkpointing(self) -> TrainingModifier:
        if self.gradient_checkpointing_every_n_layers != 1 and not self.gradient_checkpointing:
            raise ValueError(f"gradient_checkpointing_every_n_layers is {self.gradient_checkpointing_every_n_layers} "
                             "but gradient_checkpointing is false: set gradient_checkpointing: true, or remove it")
        return self

    _export_dtype: torch.dtype = PrivateAttr(torch.float32)
    _requires_grad: dict[str, bool] = PrivateAttr(default_factory=dict)
    _attached: bool = PrivateAttr(False)

    def attach_training(self, state: SessionState, *, learn_clipping: bool, float32: bool) -> None:
        """Put ``state.model`` in its training state: every quantized Linear trains through fake quantization
        in the model's own dtype, with fp32 weights when ``float32`` (masters that tiny updates do not vanish
        from), and gradient checkpointing when asked for. :meth:`finalize` undoes all of it."""
        model = state.model
        self._export_dtype = model.dtype
        self._requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
        self._attached = True  # from here on finalize restores the model, whatever part of this then fails
        if float32:
            model.float()
        attach_fake_quant(
            model, dtype=self._export_dtype, learn_scales=self.learn_scales, learn_clipping=learn_clipping
        )
        if self.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False},
                                                every_n_layers=self.gradient_checkpointing_every_n_layers)

    def finalize(self, state: SessionState) -> None:
        """Fold learned scales and clipping into the model and restore its forward, dtype, eval mode and
        ``requires_grad`` flags; nothing to do when :meth:`apply` stopped before attaching."""
        if not self._attached:
            return
        self._attached = False
        if self.gradient_checkpointing:
            state.model.gradient_checkpointing_disable()
        finish_training(state.model, dtype=self._export_dtype, requires_grad=self._requires_grad)
