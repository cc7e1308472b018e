"""The QAT training loop: distillation (or SFT) of the fake-quantized student, resumable to the step.

One optimizer step reads ``batch_size`` examples (split over ranks and micro-batches), normalises the loss
by the number of response tokens in the whole step, clips the gradient norm, and steps AdamW with
separate learning rates for weights, quantization scales, clipping factors and online transforms. Every
``save_steps`` the model, optimizer, scheduler and RNG states are written atomically to the stage's progress
directory; a resumed run loads the newest one and continues bit-identically (data order depends only on the
step).
A non-finite loss or gradient, or a loss above ``max_loss_ratio`` times the first step's, stops the stage
before the optimizer touches the weights.

On a CPU that runs the model on one intra-op thread (tiny models, :mod:`rqat_sdk.threads`) and has another
core, :meth:`DistillationTrainer.train` prepares each step's batches and the frozen teacher's hidden states
one step ahead on a second Python thread while this one trains the student: the two threads share no
intra-op barrier, so a busy core slows them by time-sharing instead of spin-waiting, and each computes
exactly the numbers it would alone.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from tqdm.auto import tqdm

from rqat_sdk import distributed
from rqat_sdk.data import IGNORE_INDEX
from rqat_sdk.errors import RqatError
from rqat_sdk.files import atomic_directory
from rqat_sdk.modifiers.layers import (
    fake_quantized_together,
    parameter_group,
    quantized_linears,
)
from rqat_sdk.modifiers.qat.optim import MasterWeightOptimizer
from rqat_sdk.ops.distill import LossSpec, lm_head_loss
from rqat_sdk.threads import available_cores

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from rqat_sdk.modifiers.qat.batches import StepBatches

log = logging.getLogger(__name__)

STATE_FILE = "trainer.pt"


class TrainingDiverged(RqatError):
    """The loss or the gradient became NaN or infinite, or the loss grew past ``max_loss_ratio``."""


def format_loss(loss: float) -> str:
    """A loss as the progress bar and the run summary show it: KD losses near 1e-4 must not read 0.0000."""
    return f"{loss:.4f}" if loss == 0 or 1e-2 <= abs(loss) < 1e4 or not math.isfinite(loss) else f"{loss:.2e}"


LOSS_RATIO_FLOOR = 1e-2
"""The smallest first loss ``max_loss_ratio`` multiplies: a KD stage after a good PTQ starts near zero (1e-4
nats per token), where ordinary noise at a high learning rate is already a hundredfold."""


def loss_exploded(loss: float, first: float, max_ratio: float | None) -> bool:
    """Whether ``loss`` has grown past ``max_ratio`` times the stage's ``first`` loss, or times
    :data:`LOSS_RATIO_FLOOR` when the first is smaller (never, with no ratio)."""
    return max_ratio is not None and loss > max_ratio * max(first, LOSS_RATIO_FLOOR)


@dataclass(frozen=True)
class TrainerConfig:
    """The settings of :class:`DistillationTrainer`, trl-style: plain values whose defaults suit a short
    fine-tuning run. The ``qat_kd`` modifier builds one from its recipe node (:meth:`QATKDModifier.trainer_config`),
    the testbed builder one for plain SFT."""

    loss: LossSpec = field(default_factory=LossSpec)
    """What the loss compares: a divergence from the teacher, or ``ce`` (cross-entropy on the data, no teacher)."""
    steps: int = 1000
    """Optimizer steps."""
    learning_rate: float = 2e-5
    """Peak learning rate of the weights."""
    scale_learning_rate: float = 5e-5
    """Peak learning rate of trainable scales and zero points."""
    clipping_learning_rate: float = 5e-4
    """Peak learning rate of clipping factors."""
    transform_learning_rate: float = 5e-5
    """Peak learning rate of online transforms."""
    optimizer: Literal["adamw", "adam"] = "adamw"
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    """Applied to the weights only."""
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warmup: cosine or linear to zero, or constant."""
    warmup_steps: int = 0
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm; None to only measure it."""
    train: Literal["all", "quantized"] = "all"
    """Train every parameter that requires a gradient, or of the weights only the quantized layers'."""
    save_steps: int = 500
    """Write a resumable checkpoint every this many steps (with a progress directory)."""
    logging_steps: int = 10
    max_loss_ratio: float | None = 100.0
    """Stop when a step's loss exceeds this multiple of the first step's (see :func:`loss_exploded`)."""
    distributed: Literal["ddp", "fsdp"] = "ddp"
    """Under a multi-process launcher: DDP, or FSDP2 sharding of the transformer blocks."""
    compile_teacher: bool = False
    """Run the teacher's transformer blocks through ``torch.compile`` with dynamic shapes, each on its own (see
    :func:`_compile_blocks`)."""
    compile_student: bool = False
    """Run the student's transformer blocks, forward and backward, through ``torch.compile`` with dynamic shapes,
    each on its own (see :func:`_compile_blocks`)."""

    @property
    def objective(self) -> str:
        return "sft" if self.loss.divergence == "ce" else "kd"


@dataclass
class TrainerPaths:
    progress_dir: Path | None
    log_file: Path | None


@dataclass
class _StepInputs:
    micro: list[dict[str, torch.Tensor]]
    """The step's micro-batches, on the device."""
    counted: torch.Tensor
    """This rank's response tokens and input tokens (float64, on the CPU)."""
    teacher_hidden: list[torch.Tensor | None] | None
    """The teacher's hidden states per micro-batch when prepared ahead; None: computed when needed."""


class _StudentObjective(torch.nn.Module):
    """The student and its loss in one module, so that DDP/FSDP wrap exactly what backpropagates."""

    def __init__(self, student: PreTrainedModel, spec: LossSpec, *, compile_decoder: bool = False):
        super().__init__()
        self.student = student
        self.spec = spec
        decoder = student.get_decoder()
        # a compiled function, not a compiled module: the objective's parameters and state dict stay the student's
        self._decoder = (torch.compile(lambda **inputs: decoder(**inputs), dynamic=True)
                         if compile_decoder else None)

    def forward(self, batch: dict[str, torch.Tensor], normalizer: float, teacher_hidden=None, teacher_weight=None):
        hidden = hidden_states(self.student, batch, self._decoder)
        width = hidden.shape[-1]
        weights = (batch["labels"][:, 1:] != IGNORE_INDEX).reshape(-1).float() / normalizer
        return lm_head_loss(
            hidden[:, :-1].reshape(-1, width),
            self.student.get_output_embeddings().weight,
            weights,
            self.spec,
            teacher_hidden=teacher_hidden[:, :-1].reshape(-1, width) if teacher_hidden is not None else None,
            teacher_weight=teacher_weight,
            targets=batch["input_ids"][:, 1:].reshape(-1),
        )


def hidden_states(model: PreTrainedModel, batch: dict[str, torch.Tensor],
                  decoder: Callable[..., Any] | None = None) -> torch.Tensor:
    """The final (normalised) hidden states, without computing the full-vocabulary logits; ``decoder`` replaces
    the model's own (a compiled one)."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    return (decoder if decoder is not None else model.get_decoder())(**inputs, use_cache=False).last_hidden_state


class DistillationTrainer:
    """Trains ``student`` for ``config.steps`` optimizer steps (:meth:`train`), one step at a time
    (:meth:`step`), distilling from ``teacher`` or, with a ``ce`` loss and no teacher, on the labels."""

    def __init__(
        self,
        config: TrainerConfig,
        student: PreTrainedModel,
        teacher: PreTrainedModel | None,
        batches: StepBatches,
        *,
        device: torch.device,
        paths: TrainerPaths,
        fingerprint: str,
        stage: str,
    ):
        self.config = config
        self.student = student
        self.teacher = teacher
        # compiling the frozen teacher fuses its many small kernels into fewer launches; a model without
        # ``layers`` compiles its whole decoder (the blocks compile at the end of __init__)
        self._teacher_decoder = (torch.compile(teacher.get_decoder(), dynamic=True)
                                 if teacher is not None and config.compile_teacher and not _blocks(teacher) else None)
        self.batches = batches
        self.device = device
        self.paths = paths
        self.fingerprint = fingerprint
        self.stage = stage
        if (teacher is None) != (config.loss.divergence == "ce"):
            needs = "takes no teacher" if config.loss.divergence == "ce" else "needs a teacher"
            raise ValueError(f"config.loss.divergence {config.loss.divergence!r} {needs}")
        self.sharded = distributed.sharded(config.distributed)
        # FSDP2 shards a copy; the trained weights are gathered back into ``student`` after training.
        trained = copy.deepcopy(student) if self.sharded else student
        self.objective = _StudentObjective(
            trained, config.loss, compile_decoder=config.compile_student and not self.sharded and not _blocks(trained)
        )
        self.model = distributed.wrap(self.objective, config.distributed, _blocks(trained), student.dtype)
        self.optimizer = _optimizer(config, trained, device)
        self.scheduler = _scheduler(config, self.optimizer.optimizer)
        self.writer = _tensorboard(paths.log_file)
        self._first_loss: float | None = None
        self._teacher_pool: ThreadPoolExecutor | None = None
        self._ahead: tuple[int, Future[_StepInputs]] | None = None
        # last, so that nothing after it can fail and leave the models compiled; :meth:`train` undoes it (a caller
        # of :meth:`step` alone keeps it). Under FSDP2 these are the sharded blocks of the copy, whose weights FSDP2
        # gathers around each block's forward.
        self._compiled = contextlib.ExitStack()
        compiled = ((_blocks(teacher) if teacher is not None and config.compile_teacher else [])
                    + (_blocks(trained) if config.compile_student else []))
        if compiled:
            _compile_blocks(compiled, self._compiled)

    # --- the loop --------------------------------------------------------------------------------

    def train(self) -> dict[str, Any]:
        """Run the stage's steps from the latest checkpoint on, and summarise them. The student and the teacher
        outlive the stage (export, generation, later stages): their blocks run eagerly again afterwards."""
        with self._compiled:
            return self._train()

    def _train(self) -> dict[str, Any]:
        config = self.config
        start = self._resume()
        self.student.train()
        show = distributed.is_main()
        bar = tqdm(total=config.steps, initial=start, desc=f"{self.stage} ({config.objective})", disable=not show)
        began, tokens_seen, last_loss = time.perf_counter(), 0, float("nan")
        window_start, window_tokens = time.perf_counter(), 0
        if self._teacher_beside_student():
            self._teacher_pool = ThreadPoolExecutor(1, thread_name_prefix="rqat-teacher")
        try:
            for step in range(start, config.steps):
                loss, tokens = self.step(step)
                last_loss = loss
                tokens_seen += tokens
                window_tokens += tokens
                if (step + 1) % config.logging_steps == 0 or step + 1 == config.steps:
                    elapsed = time.perf_counter() - window_start
                    metrics = self._metrics(step + 1, loss, window_tokens / max(elapsed, 1e-9))
                    bar.set_postfix(
                        loss=format_loss(loss), lr=f"{metrics['lr']:.2e}", tok_s=f"{metrics['tokens_per_s']:.0f}"
                    )
                    self._log(metrics)
                    window_start, window_tokens = time.perf_counter(), 0
                bar.update(1)
                if (step + 1) % config.save_steps == 0 and step + 1 < config.steps:
                    self._save(step + 1)
        finally:
            if self._teacher_pool is not None:
                self._teacher_pool.shutdown(cancel_futures=True)
                self._teacher_pool, self._ahead = None, None
        bar.close()
        if self.writer is not None:
            self.writer.close()
        if self.sharded:
            self._gather_into(self.student)
        seconds = time.perf_counter() - began
        return {
            "steps": config.steps,
            "resumed_at_step": start or None,
            "final_loss": last_loss,
            "tokens": tokens_seen,
            "seconds": round(seconds, 3),
            "tokens_per_s": round(tokens_seen / max(seconds, 1e-9), 1),
        }

    def step(self, step: int) -> tuple[float, int]:
        """Optimizer step ``step`` (0-based; its data depends only on the index): forward and backward over
        its micro-batches, clip, update. Returns the step's loss and the tokens it read; raises
        :class:`TrainingDiverged`, before updating, on a non-finite or exploded loss."""
        inputs = self._inputs(step)
        counted = inputs.counted
        if distributed.world_size() > 1:
            counted = distributed.all_reduce_sum(counted.to(self.device)).cpu()
        targets, tokens = counted.tolist()
        normalizer = max(targets, 1.0) / distributed.world_size()
        total = torch.zeros((), device=self.device)
        for index, batch in enumerate(inputs.micro):
            last = index == len(inputs.micro) - 1
            with fake_quantized_together(self.objective.student):
                with self._no_sync(not last):
                    teacher_hidden = (inputs.teacher_hidden[index] if inputs.teacher_hidden is not None
                                      else self._teacher_hidden(batch))
                    teacher_weight = self.teacher.get_output_embeddings().weight if self.teacher is not None else None
                    loss = self.model(batch, normalizer, teacher_hidden, teacher_weight)
                loss.backward()
            total += loss.detach()
        total = distributed.all_reduce_sum(total) / distributed.world_size()
        grad_norm = torch.nn.utils.clip_grad_norm_(
            self.optimizer.parameters(),
            self.config.max_grad_norm if self.config.max_grad_norm is not None else math.inf,
        )
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP2
            grad_norm = grad_norm.full_tensor()
        value, norm = torch.stack([total.float(), grad_norm.float()]).tolist()  # the step's one host sync
        if not (math.isfinite(value) and math.isfinite(norm)):
            self._stop(step, f"the loss is {value} and the gradient norm {norm}", "or enable max_grad_norm")
        self._first_loss = value if self._first_loss is None else self._first_loss
        if loss_exploded(value, self._first_loss, self.config.max_loss_ratio):
            self._stop(
                step,
                f"the loss {format_loss(value)} is more than max_loss_ratio {self.config.max_loss_ratio:g} times the "
                f"first step's {format_loss(self._first_loss)}: training diverged",
                "or raise max_loss_ratio",
            )
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._grad_norm = norm
        return value, int(tokens)

    def _stop(self, step: int, why: str, remedy: str) -> None:
        """Stop the stage before this step's update: the weights keep the last step that trained sanely."""
        self.optimizer.zero_grad(set_to_none=True)
        raise TrainingDiverged(
            f"stage {self.stage!r} step {step + 1}: {why}; the weights were not updated. The last good checkpoint "
            f"is {self._latest_checkpoint() or 'the previous stage checkpoint'}; lower the learning rate ({remedy}) "
            f"and rerun with --resume."
        )

    def _teacher_hidden(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        if self.teacher is None:
            return None
        with torch.no_grad():  # grad mode is per thread: set here, where the forward runs
            return hidden_states(self.teacher, batch, self._teacher_decoder)

    def _prepare(self, step: int, *, with_teacher: bool) -> _StepInputs:
        micro = self.batches.micro_batches(step, torch.device("cpu"))
        counted = torch.tensor(
            [sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro),
             sum(int(b["input_ids"].numel() if "attention_mask" not in b else b["attention_mask"].sum())
                 for b in micro)],
            dtype=torch.float64,
        )
        micro = [{k: v.to(self.device, non_blocking=True) for k, v in b.items()} for b in micro]
        return _StepInputs(micro, counted, [self._teacher_hidden(b) for b in micro] if with_teacher else None)

    def _inputs(self, step: int) -> _StepInputs:
        """Step ``step``'s inputs. With a teacher thread (during :meth:`train`) they were prepared there, and
        the next step's are started; otherwise they are prepared here, the teacher's when needed."""
        if self._teacher_pool is None:
            return self._prepare(step, with_teacher=False)
        if self._ahead is None or self._ahead[0] != step:
            self._ahead = (step, self._teacher_pool.submit(self._prepare, step, with_teacher=True))
        inputs = self._ahead[1].result()
        self._ahead = None
        if step + 1 < self.config.steps:
            self._ahead = (step + 1, self._teacher_pool.submit(self._prepare, step + 1, with_teacher=True))
        return inputs

    def _teacher_beside_student(self) -> bool:
        """Whether the teacher gets its own thread: on a CPU running one intra-op thread, with a second core."""
        return (self.teacher is not None and self.device.type == "cpu" and torch.get_num_threads() == 1
                and available_cores() > 1)

    def _no_sync(self, skip: bool):
        no_sync = getattr(self.model, "no_sync", None)  # DDP
        if skip and no_sync is not None:
            return no_sync()
        set_sync = getattr(self.model, "set_requires_gradient_sync", None)  # FSDP2
        if set_sync is not None:
            set_sync(not skip)
        return contextlib.nullcontext()

    # --- metrics ---------------------------------------------------------------------------------

    def _metrics(self, step: int, loss: float, tokens_per_s: float) -> dict[str, Any]:
        lrs = {group["name"]: group["lr"] for group in self.optimizer.param_groups}
        return {
            "step": step,
            "loss": loss,
            "grad_norm": self._grad_norm,
            "lr": lrs.get("weights", next(iter(lrs.values()))),
            "learning_rates": lrs,
            "tokens_per_s": round(tokens_per_s, 1),
        }

    def _log(self, metrics: dict[str, Any]) -> None:
        if not distributed.is_main():
            return
        if self.paths.log_file is not None:
            self.paths.log_file.parent.mkdir(parents=True, exist_ok=True)
            with open(self.paths.log_file, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(metrics) + "\n")
        if self.writer is not None:
            for key in ("loss", "grad_norm", "lr", "tokens_per_s"):
                self.writer.add_scalar(f"{self.stage}/{key}", metrics[key], metrics["step"])

    # --- checkpoints -----------------------------------------------------------------------------

    def _save(self, step: int) -> None:
        model_state, optimizer_state = self._gather_state()
        if distributed.is_main() and self.paths.progress_dir is not None:
            state = {
                "step": step,
                "fingerprint": self.fingerprint,
                "model": model_state,
                "optimizer": optimizer_state,
                "scheduler": self.scheduler.state_dict(),
                "rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            }
            with atomic_directory(self.paths.progress_dir / f"step-{step:07d}") as tmp:
                torch.save(state, tmp / STATE_FILE)
            for older in self._checkpoints()[:-1]:
                shutil.rmtree(older, ignore_errors=True)
        distributed.barrier()

    def _checkpoints(self) -> list[Path]:
        if self.paths.progress_dir is None or not self.paths.progress_dir.is_dir():
            return []
        return sorted(p for p in self.paths.progress_dir.glob("step-*") if (p / STATE_FILE).is_file())

    def _latest_checkpoint(self) -> Path | None:
        found = self._checkpoints()
        return found[-1] if found else None

    def _gather_state(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """Full (unsharded) model and optimizer state, on the CPU."""
        student = self.objective.student
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_state_dict,
            )

            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            model_state, optimizer_state = get_state_dict(student, self.optimizer.optimizer, options=options)
            return model_state, {"optimizer": optimizer_state, "masters": []}
        return {k: v.detach().cpu() for k, v in student.state_dict().items()}, self.optimizer.state_dict()

    def _gather_into(self, student: PreTrainedModel) -> None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        full = get_model_state_dict(self.objective.student, options=StateDictOptions(full_state_dict=True))
        with torch.no_grad():
            for name, tensor in student.state_dict().items():
                tensor.copy_(full[name])

    def _restore_state(self, model_state: dict[str, Any], optimizer_state: dict[str, Any]) -> None:
        student = self.objective.student
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_state_dict,
            )

            set_state_dict(
                student, self.optimizer.optimizer,
                model_state_dict=model_state, optim_state_dict=optimizer_state["optimizer"],
                options=StateDictOptions(full_state_dict=True, strict=True),
            )
            return
        student.load_state_dict(model_state, strict=True)
        self.optimizer.load_state_dict(optimizer_state)

    def _resume(self) -> int:
        latest = self._latest_checkpoint()
        if latest is None:
            return 0
        state = torch.load(latest / STATE_FILE, map_location="cpu", weights_only=True)
        if state["fingerprint"] != self.fingerprint:
            raise RqatError(
                f"{latest} was written by a different recipe; remove {self.paths.progress_dir} or start over "
                f"with --overwrite"
            )
        self._restore_state(state["model"], state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        if state["cuda_rng"]:
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        step = int(state["step"])
        self._truncate_log(step)
        log.info("stage %r: resuming at step %d from %s", self.stage, step, latest)
        return step

    def _truncate_log(self, step: int) -> None:
        if not distributed.is_main() or self.paths.log_file is None or not self.paths.log_file.is_file():
            return
        kept = [line for line in self.paths.log_file.read_text().splitlines() if json.loads(line)["step"] <= step]
        self.paths.log_file.write_text("".join(line + "\n" for line in kept))


def _blocks(model: PreTrainedModel) -> list[torch.nn.Module]:
    layers = getattr(model.get_decoder(), "layers", None)
    return list(layers) if layers is not None else []


RECOMPILE_LIMIT = 32
"""The lowest ``torch.compile`` recompile limit while compiled blocks train. All blocks of one class, the student's
and the teacher's, share one code object's graphs, and each variant counts against the limit (default 8; past
it torch logs a warning and runs the blocks eagerly): the student (grad mode; FSDP2's gathered weights) and the
teacher (no grad; FP8 Linear layers) times a size threshold past which the graph recompiles once, an attention
mask present or not, and full or sliding-window attention: up to 16. Twice that leaves room, and still bounds a
runaway of one graph per block."""


def _compile_blocks(blocks: list[torch.nn.Module], scope: contextlib.ExitStack) -> None:
    """Regional compilation: each block's ``forward`` replaced, on the instance, by a ``torch.compile``'d one
    (dynamic shapes) until ``scope`` closes, and the recompile limit raised to :data:`RECOMPILE_LIMIT` meanwhile.
    Dynamo keeps graphs per code object and traces parameters as inputs, so identical blocks share one graph:
    the compile costs about one block's, not the whole decoder's. An instance attribute adds no module or
    parameter (names and state dict unchanged); the block's hooks and ``__call__`` (FSDP2's gathers, gradient
    checkpointing) stay eager."""
    limit = torch.compiler.config.recompile_limit
    torch.compiler.config.recompile_limit = max(limit, RECOMPILE_LIMIT)
    scope.callback(setattr, torch.compiler.config, "recompile_limit", limit)
    for block in blocks:
        before = block.__dict__.get("forward")  # an instance forward set by someone else, kept for afterwards
        block.forward = torch.compile(block.forward, dynamic=True)
        if before is None:
            scope.callback(delattr, block, "forward")  # the class's forward again
        else:
            scope.callback(setattr, block, "forward", before)


def _optimizer(config: TrainerConfig, student: PreTrainedModel, device: torch.device):
    if config.train == "quantized":
        trained = {f"{name}.weight" for name, _ in quantized_linears(student)}
        for name, parameter in student.named_parameters():
            if parameter_group(name) == "weights":
                parameter.requires_grad_(name in trained)
    by_group: dict[str, list[torch.nn.Parameter]] = {"weights": [], "scales": [], "clipping": [], "transforms": []}
    for name, parameter in student.named_parameters():
        if parameter.requires_grad:
            by_group[parameter_group(name)].append(parameter)
    rates = {
        "weights": config.learning_rate,
        "scales": config.scale_learning_rate,
        "clipping": config.clipping_learning_rate,
        "transforms": config.transform_learning_rate,
    }
    groups = [
        {"name": name, "params": params, "lr": rates[name], **({"weight_decay": 0.0} if name != "weights" else {})}
        for name, params in by_group.items()
        if params
    ]

    cls = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    fused = device.type == "cuda" or None
    return MasterWeightOptimizer(groups, cls, betas=tuple(config.betas), weight_decay=config.weight_decay, fused=fused)


def _scheduler(config: TrainerConfig, optimizer: torch.optim.Optimizer):
    from transformers import get_scheduler

    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[config.lr_scheduler]
    return get_scheduler(name, optimizer, num_warmup_steps=config.warmup_steps, num_training_steps=config.steps)


def _tensorboard(log_file: Path | None):
    if log_file is None or not distributed.is_main():
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(log_dir=str(log_file.parent / "tensorboard"))
