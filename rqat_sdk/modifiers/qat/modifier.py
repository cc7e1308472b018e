"""``qat_kd``: quantization-aware training with knowledge distillation, Reasoning-QAT's second step."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import model_validator

from rqat_sdk import distributed
from rqat_sdk.data import check_trainable_tokens
from rqat_sdk.fields import FloatRange, IntRange
from rqat_sdk.modifiers.layers import tracking_codes
from rqat_sdk.modifiers.qat.batches import StepBatches
from rqat_sdk.modifiers.qat.trainer import DistillationTrainer, TrainerConfig, TrainerPaths
from rqat_sdk.modifiers.training import TrainingModifier
from rqat_sdk.ops.distill import LossSpec
from rqat_sdk.ops.fp8 import uses_scaled_mm

if TYPE_CHECKING:
    from rqat_sdk.recipe.recipe import Position, Recipe
    from rqat_sdk.session.state import SessionState

log = logging.getLogger(__name__)


class QATKDModifier(TrainingModifier):
    """Train the fake-quantized student to match the full-precision teacher (or the data, with ``sft``).

    The defaults are the seed paper's (Adam, betas 0.9/0.95, cosine decay, batch 32, 6,000 steps,
    lr 1e-6 for a GPTQ-initialised model; use 2e-5 after RTN).
    """

    type: Literal["qat_kd"] = "qat_kd"
    needs_data = True
    trains_on_responses = True

    objective: Literal["kd", "sft"] = "kd"
    """``kd``: match the teacher's next-token distribution; ``sft``: cross-entropy on the data's responses."""
    divergence: Literal["forward_kl", "reverse_kl", "jsd", "topk_kl"] = "forward_kl"
    """How ``kd`` compares the distributions (forward KL is the seed paper's)."""
    temperature: Annotated[float, FloatRange(0.05, 100.0)] = 1.0
    """Softmax temperature of both distributions; the loss is multiplied by its square."""
    jsd_beta: Annotated[float, FloatRange(0.01, 0.99)] = 0.5
    """The teacher's weight in the ``jsd`` mixture."""
    top_k: Annotated[int, IntRange(1, None)] = 64
    """Teacher tokens kept by ``topk_kl``."""
    teacher: str | None = None
    """A model directory or hub id; null: the full-precision model the run started from."""
    teacher_precision: Literal["bf16", "fp8"] = "bf16"
    """``bf16``: the teacher runs in the checkpoint's dtype; ``fp8``: its Linear layers except the LM head hold e4m3
    weights with a scale per output row, quantize their inputs per token and multiply on FP8 tensor cores (CUDA,
    compute capability 8.9+; elsewhere they dequantize and multiply in float32, slower), so the teacher's
    distribution differs slightly from the bf16 one. Only with ``objective: kd``."""
    compile_teacher: bool = False
    """Run each of the frozen teacher's transformer blocks through ``torch.compile`` (the identical blocks share one
    graph, with shapes marked dynamic, so sequences of any length reuse it): fewer, fused kernel launches where the
    teacher's forward waits on the host; the first steps pay the compile. The teacher runs eagerly again after the
    stage. Only with ``objective: kd``; with ``teacher_precision: fp8`` too."""
    compile_student: bool = False
    """Run each of the student's transformer blocks through ``torch.compile`` (the identical blocks share one graph;
    dynamic shapes), forward and backward: their norms, rotary embeddings and activations fuse into fewer kernels;
    the fake-quantized weights are computed outside the compiled graph as without it. The first steps pay the
    compile; the model runs eagerly again after the stage. Under ``distributed: fsdp`` the blocks run compiled
    between FSDP2's gathers."""

    steps: Annotated[int, IntRange(1, None)] = 6000
    """Optimizer steps."""
    batch_size: Annotated[int, IntRange(1, None)] = 32
    """Examples per optimizer step, over all ranks."""
    micro_batch_size: Annotated[int, IntRange(1, None)] = 4
    """Examples per forward pass and rank; gradients accumulate over batch_size / (micro_batch_size x ranks)."""
    learning_rate: Annotated[float, FloatRange(0.0, 1.0)] = 1e-6
    """Peak learning rate of the weights."""
    clipping_learning_rate: Annotated[float, FloatRange(0.0, 1.0)] = 5e-4
    """Peak learning rate of clipping factors (with learn_clipping, and flatquant's activation clipping)."""
    transform_learning_rate: Annotated[float, FloatRange(0.0, 1.0)] = 5e-5
    """Peak learning rate of flatquant's online transforms (their Kronecker factors and smoothing scales)."""
    optimizer: Literal["adamw", "adam"] = "adamw"
    """AdamW (decoupled weight decay) or Adam."""
    max_grad_norm: Annotated[float, FloatRange(0.0, None)] | None = 1.0
    """Clip the global gradient norm; null to only measure it."""
    learn_clipping: bool = False
    """Train a clipping factor per scale in [0.5, 1] as its own parameter group."""
    train: Literal["all", "quantized"] = "all"
    """Train every parameter, or only the quantized layers' weights."""
    packing: bool = False
    """Pack each micro-batch into one row (no padding) instead of padding it."""
    loss_chunk_size: Annotated[int, IntRange(16, None)] = 1024
    """Tokens per chunk of LM-head logits in the loss (memory vs. speed)."""
    save_steps: Annotated[int, IntRange(1, None)] = 500
    """Write a resumable checkpoint every this many steps."""
    logging_steps: Annotated[int, IntRange(1, None)] = 10
    """Log loss, learning rate, gradient norm and throughput every this many steps."""
    max_loss_ratio: Annotated[float, FloatRange(1.0, None)] | None = 100.0
    """Stop the stage when a step's loss exceeds this multiple of its first step's loss, or of 0.01 when that
    is smaller (training has diverged and would ruin the model); null to never stop."""
    distributed: Literal["ddp", "fsdp"] = "ddp"
    """Under a multi-process launcher: DDP, or FSDP2 sharding of the transformer blocks."""

    @model_validator(mode="after")
    def _batch_fits(self) -> QATKDModifier:
        if self.batch_size % self.micro_batch_size:
            raise ValueError(
                f"batch_size {self.batch_size} is not a multiple of micro_batch_size {self.micro_batch_size}"
            )
        if self.compile_teacher and self.objective == "sft":
            raise ValueError("compile_teacher compiles the teacher of objective kd, and objective sft has no "
                             "teacher; use objective kd, or compile_teacher false")
        if self.teacher_precision == "fp8" and self.objective == "sft":
            raise ValueError("teacher_precision fp8 sets the teacher's precision, and objective sft has no teacher; "
                             "use objective kd or teacher_precision bf16")
        return self

    def warnings(self, recipe: Recipe, at: Position) -> list[str]:
        if self.learning_rate > 0:
            return []
        others = [name for name, on in (("scales", self.learn_scales), ("clipping", self.learn_clipping)) if on]
        trained = f"only the {' and '.join(others)} train" if others else "nothing trains and the stage changes nothing"
        return [f"{at.path}.learning_rate: 0 leaves the weights unchanged; {trained}"]

    def wants_original_model(self) -> bool:
        return self.objective == "kd" and self.teacher is None

    def trainer_config(self) -> TrainerConfig:
        """The training loop's settings: this node's, less what only the recipe needs."""
        loss = LossSpec(
            divergence=self.divergence if self.objective == "kd" else "ce", temperature=self.temperature,
            beta=self.jsd_beta, top_k=self.top_k, chunk_size=self.loss_chunk_size,
        )
        return TrainerConfig(
            loss=loss, steps=self.steps, learning_rate=self.learning_rate,
            scale_learning_rate=self.scale_learning_rate, clipping_learning_rate=self.clipping_learning_rate,
            transform_learning_rate=self.transform_learning_rate, optimizer=self.optimizer, betas=self.betas,
            weight_decay=self.weight_decay, lr_scheduler=self.lr_scheduler, warmup_steps=self.warmup_steps,
            max_grad_norm=self.max_grad_norm, train=self.train, save_steps=self.save_steps,
            logging_steps=self.logging_steps, max_loss_ratio=self.max_loss_ratio, distributed=self.distributed,
            compile_teacher=self.compile_teacher, compile_student=self.compile_student,
        )

    # --- lifecycle -------------------------------------------------------------------------------

    def apply(self, state: SessionState) -> None:
        data = state.stage_data()
        check_trainable_tokens(data, state.data_field(), state.stage.data.max_seq_length)
        self.attach_training(state, learn_clipping=self.learn_clipping, float32=False)
        teacher = None
        if self.objective == "kd":
            fp8 = self.teacher_precision == "fp8"
            teacher = state.teacher(self.teacher, dtype=self._export_dtype, fp8=fp8)
            if fp8 and not uses_scaled_mm(state.model.device):
                log.warning("teacher_precision fp8: %s has no FP8 matmuls (CUDA, compute capability 8.9+); the "
                            "teacher's FP8 layers dequantize and multiply in float32, slower than bf16",
                            state.model.device)
        batches = StepBatches(
            data,
            batch_size=self.batch_size,
            micro_batch_size=self.micro_batch_size,
            seed=state.recipe.seed + state.stage_index,
            pad_token_id=state.tokenizer.pad_token_id if state.tokenizer.pad_token_id is not None else 0,
            packing=self.packing,
            rank=distributed.rank(),
            world_size=distributed.world_size(),
        )
        trainer = DistillationTrainer(
            self.trainer_config(),
            state.model,
            teacher,
            batches,
            device=state.model.device,
            paths=TrainerPaths(state.progress_dir(), state.log_file()),
            fingerprint=state.recipe.fingerprint(state.stage_index),
            stage=state.stage.name,
        )
        with tracking_codes(state.model) as codes:
            summary = trainer.train()
        if codes["codes_changed"] == 0 and not self.learn_scales:
            log.warning(
                "%s: %d steps at learning_rate %g moved no weight code off its initial grid point: the quantized "
                "weights are still the initialisation's, and any gain came from the parameters kept in full "
                "precision (norms, embeddings); a higher learning_rate lets the weights cross grid boundaries",
                self.type, self.steps, self.learning_rate,
            )
        teacher_precision = {"teacher_precision": self.teacher_precision} if teacher is not None else {}
        state.stage_metrics[self.type] = {**summary, **codes, **teacher_precision}
