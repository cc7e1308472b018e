"""The one file that talks to trl: GRPO on the fake-quantized student.

trl's ``GRPOTrainer`` does the RL; this adapter gives it the recipe's settings, records its metrics, resumes
from its checkpoints, and fixes one thing for quantized policies: when rollouts come from vLLM, trl pushes
the model's raw ``named_parameters()`` (latent full-precision weights, plus scales and zero points vLLM does
not know), so vLLM would sample from the wrong policy. Here vLLM receives the fake-quantized weights and no
quantization parameters (:func:`~rqat_sdk.modifiers.layers.fake_quantized_weights`); trl's importance
sampling correction stays on. That replaces trl's private ``VLLMGeneration._iter_named_params``, and undoing
accelerate's mixed-precision wrapper reads its private ``_original_forward``, so each first checks that the
package is the version it was verified against (:data:`VERIFIED_VERSION`, :data:`VERIFIED_ACCELERATE`).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from rqat_sdk import distributed
from rqat_sdk.errors import RqatError
from rqat_sdk.generation import cuda_graph_decoding, preallocated_kv_cache
from rqat_sdk.modifiers.layers import fake_quantized_weights, parameter_group, quantized_once_per_generate
from rqat_sdk.upstream import require_verified

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from rqat_sdk.modifiers.rl.modifier import GRPOModifier
    from rqat_sdk.modifiers.rl.rewards import RewardFunction

log = logging.getLogger(__name__)

VERIFIED_VERSION = "1.16.0"
"""The trl whose private ``VLLMGeneration._iter_named_params`` this adapter replaces (pyproject.toml pins it)."""
VERIFIED_ACCELERATE = "1.15.0"
"""The accelerate whose private ``_original_forward`` this adapter reads (pyproject.toml pins it)."""

LOGGED = {
    "reward": "reward",
    "reward_std": "reward_std",
    "completions/mean_length": "response_length",
    "entropy": "entropy",
    "kl": "kl",
    "clip_ratio/region_mean": "clip_ratio",
    "loss": "loss",
    "learning_rate": "lr",
    "grad_norm": "grad_norm",
}
"""trl's metric names and the names they get in the stage's JSONL log."""
FINGERPRINT_FILE = "recipe_fingerprint.txt"


def run_grpo(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Dataset,
    config: GRPOModifier,
    rewards: list[RewardFunction],
    *,
    progress_dir: Path,
    log_file: Path | None,
    seed: int,
    reference_reward: float,
    fingerprint: str,
) -> dict[str, Any]:
    """Train ``model`` with GRPO on ``prompts`` (columns ``prompt``, ``answer``, ``meta``); return a summary.

    ``reference_reward`` is the starting policy's mean reward, which :class:`RewardCollapseGuard` compares
    the training rewards with; the summary's ``collapsed`` says when it stopped the stage (else None).
    """
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    completions_per_step = config.prompts_per_step * config.group_size
    per_step = config.micro_batch_size * distributed.world_size()
    if completions_per_step % per_step:
        raise ValueError(
            f"prompts_per_step x group_size ({completions_per_step}) must be a multiple of micro_batch_size x ranks "
            f"({per_step})"
        )
    cuda = model.device.type == "cuda"
    args = GRPOConfig(
        output_dir=str(progress_dir),
        max_steps=config.steps,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=config.warmup_steps,
        max_grad_norm=config.max_grad_norm,
        per_device_train_batch_size=config.micro_batch_size,
        gradient_accumulation_steps=completions_per_step // per_step,
        num_generations=config.group_size,
        max_completion_length=config.max_completion_length,
        temperature=config.temperature,
        top_p=config.top_p,
        beta=config.beta,
        loss_type=config.loss_type,
        epsilon=config.epsilon,
        reward_weights=config.reward_weights,
        use_vllm=config.generation != "transformers",
        cache_implementation="static" if config.cache_implementation == "static" else None,
        vllm_mode="server" if config.generation == "vllm-server" else "colocate",
        vllm_server_base_url=config.vllm_server_url,
        logging_steps=config.logging_steps,
        save_steps=config.save_steps,
        save_total_limit=1,
        report_to=[],
        seed=seed,
        bf16=cuda,
        use_cpu=not cuda,
        gradient_checkpointing=config.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},  # every_n_layers: _checkpointing_every_n_layers
        log_completions=False,
    )
    processing = copy.deepcopy(tokenizer)
    processing.padding_side = "left"  # trl generates with left padding; the run's tokenizer stays as it is

    guard = RewardCollapseGuard(reference_reward, config.collapse_fraction, config.collapse_window)

    class _Metrics(TrainerCallback):
        def on_log(self, _args, state, control, logs=None, **kwargs):
            if logs and "reward" in logs and guard.observe(state.global_step, logs["reward"]):
                control.should_training_stop = True  # every rank sees the same gathered reward
            if not logs or log_file is None or not distributed.is_main():
                return
            entry = {ours: logs[theirs] for theirs, ours in LOGGED.items() if theirs in logs}
            entry.update({k: v for k, v in logs.items() if k.startswith("rewards/")})
            if not entry:  # trl's end-of-training summary
                return
            entry = {"step": state.global_step, **entry}
            log_file.parent.mkdir(parents=True, exist_ok=True)
            with open(log_file, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(entry) + "\n")

    optimizer = adamw(model, config, fused=cuda)
    trainer = GRPOTrainer(
        model=model,
        # the ignore: trl types a reward's result list[float | None]; list is invariant, so our list[float] fails
        reward_funcs=rewards,  # type: ignore[arg-type]
        args=args,
        train_dataset=prompts,
        processing_class=processing,
        callbacks=[_Metrics()],
        optimizers=(optimizer, None),
    )
    if trainer.use_vllm:
        sync_quantized_weights(trainer.vllm_generation, model)
    checkpoints = sorted(progress_dir.glob("checkpoint-*"), key=lambda p: int(p.name.rsplit("-", 1)[-1]))
    _claim_progress_dir(progress_dir, fingerprint, resuming=bool(checkpoints))
    resume = str(checkpoints[-1]) if checkpoints else None
    if resume:
        log.info("resuming GRPO from %s", resume)
        _truncate_log(log_file, int(checkpoints[-1].name.rsplit("-", 1)[-1]))
    try:
        with contextlib.ExitStack() as rollouts:
            rollouts.enter_context(_checkpointing_every_n_layers(model, config.gradient_checkpointing_every_n_layers))
            if not trainer.use_vllm:  # transformers rollouts decode token by token: quantize the weights once
                if config.cache_implementation == "cuda_graph":  # first: the weights' quantization wraps it
                    rollouts.enter_context(cuda_graph_decoding(model))
                rollouts.enter_context(quantized_once_per_generate(model))
                if config.cache_implementation == "preallocated":
                    rollouts.enter_context(preallocated_kv_cache(model, config.max_completion_length))
            output = trainer.train(resume_from_checkpoint=resume)
    finally:
        remove_mixed_precision_wrapper(model)
    history = [h for h in trainer.state.log_history if "reward" in h]
    return {
        "steps": trainer.state.global_step,
        "resumed_from": resume,
        "train_loss": output.training_loss,
        "first_reward": history[0]["reward"] if history else None,
        "last_reward": history[-1]["reward"] if history else None,
        "skipped_steps": optimizer.skipped_steps,
        "collapsed": guard.collapsed,
    }


@contextlib.contextmanager
def _checkpointing_every_n_layers(model: PreTrainedModel, every_n_layers: int) -> Iterator[None]:
    """Inside the block, gradient checkpointing that anyone switches on for ``model`` covers every n-th layer:
    the Trainer switches it on as training starts, and trl off for each rollout and on again with its
    ``gradient_checkpointing_kwargs`` alone (``trl.models.utils.disable_gradient_checkpointing``), which would
    recompute every layer from the first rollout on."""
    enable = model.gradient_checkpointing_enable
    before = model.__dict__.get("gradient_checkpointing_enable")

    def every_n(gradient_checkpointing_kwargs: dict[str, Any] | None = None, **options: Any) -> None:
        options["every_n_layers"] = every_n_layers
        enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs, **options)

    model.gradient_checkpointing_enable = every_n  # type: ignore[method-assign, assignment]  # until the block ends
    try:
        yield
    finally:
        if before is None:
            del model.gradient_checkpointing_enable
        else:
            model.gradient_checkpointing_enable = before  # type: ignore[method-assign]


class RewardCollapseGuard:
    """Says when GRPO is destroying the policy: the mean reward of the last ``window`` logged steps has
    fallen below ``fraction`` of the starting policy's.

    GRPO at too high a learning rate can wreck a quantized policy within a hundred steps (RTN-initialised
    W2G64 testbed at lr 1e-3: pass@1 82 to 0) while the run goes on for hours; stopping there names the
    cause and keeps the earlier stages.
    """

    def __init__(self, reference: float, fraction: float | None, window: int) -> None:
        self.reference, self.fraction, self.window = reference, fraction, window
        self.rewards: list[float] = []
        self.collapsed: dict[str, float] | None = None

    def observe(self, step: int, reward: float) -> bool:
        """Record one logged mean reward; True once the policy has collapsed."""
        self.rewards.append(reward)
        if self.fraction is None or len(self.rewards) < self.window or self.collapsed is not None:
            return self.collapsed is not None
        recent = sum(self.rewards[-self.window:]) / self.window
        if recent < self.fraction * self.reference:
            self.collapsed = {"step": step, "recent_reward": recent, "reference_reward": self.reference}
        return self.collapsed is not None


class FiniteStepAdamW(torch.optim.AdamW):
    """AdamW that skips a step whose gradients are not all finite, and counts the skips.

    One non-finite policy gradient (GRPO runs hit them at high learning rates) would otherwise turn the
    weights into NaN, and the next rollout would die in sampling with a CUDA device-side assert that names
    neither the step nor the cause.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.skipped_steps = 0

    def step(self, closure=None):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        if grads and not torch.stack(torch._foreach_norm(grads)).isfinite().all():
            self.skipped_steps += 1
            log.warning("skipped an optimizer step with non-finite gradients (%d so far)", self.skipped_steps)
            return None
        return super().step(closure)


def adamw(model: PreTrainedModel, config: GRPOModifier, *, fused: bool) -> FiniteStepAdamW:
    """AdamW over the trained parameters in two groups: scales and zero points at ``scale_learning_rate``
    without weight decay, everything else at ``learning_rate`` (trl's scheduler then scales both)."""

    groups: dict[str, list[torch.nn.Parameter]] = {"weights": [], "scales": []}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            groups["scales" if parameter_group(name) == "scales" else "weights"].append(parameter)
    scales = [{"params": groups["scales"], "lr": config.scale_learning_rate, "weight_decay": 0.0}]
    return FiniteStepAdamW(
        [{"params": groups["weights"], "lr": config.learning_rate, "weight_decay": config.weight_decay},
         *(scales if groups["scales"] else [])],
        betas=tuple(config.betas), fused=fused or None,
    )


def sync_quantized_weights(vllm_generation: Any, model: PreTrainedModel) -> None:
    """Make trl's weight sync push the fake-quantized weights (no scales or zero points) to vLLM.

    trl offers no public hook for what it sends: its ``sync_weights`` iterates ``_iter_named_params``.
    """
    require_verified("trl", VERIFIED_VERSION, "rqat_sdk/modifiers/rl/trl_adapter.py (sync_quantized_weights)")
    vllm_generation._iter_named_params = lambda: fake_quantized_weights(model)


def remove_mixed_precision_wrapper(model: PreTrainedModel) -> None:
    """Give ``model`` back its own forward.

    With ``bf16`` (on GPUs) accelerate replaces ``model.forward`` with one that runs under bf16 autocast,
    and the trainer leaves it there: the trained model would keep computing in bf16 while its export and
    every later stage expect the checkpoint's dtype (the export check then fails on the logits).

    accelerate keeps the forward it replaced in its private ``_original_forward``. Its public
    ``extract_model_from_parallel(keep_fp32_wrapper=False)`` is no substitute: it unwraps every ``__wrapped__``
    layer, transformers' own decorators on the class's forward included.
    """
    require_verified("accelerate", VERIFIED_ACCELERATE, "rqat_sdk/modifiers/rl/trl_adapter.py "
                     "(remove_mixed_precision_wrapper)")
    original = model.__dict__.pop("_original_forward", None)
    if original is None:
        return
    if getattr(original, "__func__", None) is type(model).forward:
        model.__dict__.pop("forward", None)
    else:
        model.forward = original


def _claim_progress_dir(progress_dir: Path, fingerprint: str, *, resuming: bool) -> None:
    """Resume only from checkpoints that this recipe's stage wrote (the recipe fingerprint beside them)."""
    stamp = progress_dir / FINGERPRINT_FILE
    if resuming and stamp.is_file() and stamp.read_text().strip() != fingerprint:
        raise RqatError(
            f"{progress_dir} holds GRPO checkpoints of a different recipe; remove that directory to start this "
            f"stage afresh from the previous stage's checkpoint, or start over with --overwrite"
        )
    if distributed.is_main():
        progress_dir.mkdir(parents=True, exist_ok=True)
        stamp.write_text(fingerprint + "\n")


def _truncate_log(log_file: Path | None, step: int) -> None:
    if log_file is None or not log_file.is_file() or not distributed.is_main():
        return
    kept = [line for line in log_file.read_text().splitlines() if json.loads(line)["step"] <= step]
    log_file.write_text("".join(line + "\n" for line in kept))
