"""``grpo``: cold-start GRPO with a correctness reward on the quantized model, Reasoning-QAT's third step."""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import field_validator, model_validator

from rqat_sdk import distributed
from rqat_sdk.code import check_code_ref_syntax, is_code_ref
from rqat_sdk.errors import RqatError
from rqat_sdk.fields import FloatRange, IntRange
from rqat_sdk.generation import CacheImplementation
from rqat_sdk.modifiers.layers import tracking_codes
from rqat_sdk.modifiers.rl.monitor import mean_reward, plot_training
from rqat_sdk.modifiers.rl.rewards import BUILTIN_REWARDS, resolve_rewards
from rqat_sdk.modifiers.rl.trl_adapter import run_grpo
from rqat_sdk.modifiers.training import TrainingModifier

if TYPE_CHECKING:
    from rqat_sdk.recipe.recipe import Position, Recipe
    from rqat_sdk.session.state import SessionState

log = logging.getLogger(__name__)


class ColdStartError(RqatError):
    """GRPO would start from a policy that almost never earns a reward."""


class PolicyCollapseError(RqatError):
    """GRPO's training reward fell far below the starting policy's: it was destroying the model."""


class GRPOModifier(TrainingModifier):
    """Reinforcement learning (GRPO, through trl) with a verifiable reward, on the fake-quantized model.

    Defaults are the seed paper's: learning rate 5e-7, 64 prompts x 8 completions per step, 250 steps,
    32k-token completions. The seed paper runs it after a ``qat_kd`` stage, not straight after PTQ (where the
    reward may have no variance to learn from); a recipe with ``grpo`` at 3 bits or fewer and no ``qat_kd``
    before it gets a warning. Before training, a probe measures the mean reward and stops the run when it is
    below ``cold_start_threshold`` (unless ``allow_cold_start``).

    A quantized weight changes only when its latent value crosses half a quantization step, which small rates
    rarely reach in a GRPO stage; with ``learn_scales`` a scale moves its whole group's values at once.
    """

    type: Literal["grpo"] = "grpo"
    needs_data = True

    steps: Annotated[int, IntRange(1, None)] = 250
    """Optimizer steps."""
    prompts_per_step: Annotated[int, IntRange(1, None)] = 64
    """Prompts per step (over all ranks)."""
    group_size: Annotated[int, IntRange(2, None)] = 8
    """Completions sampled per prompt; rewards are normalised within each group."""
    micro_batch_size: Annotated[int, IntRange(1, None)] = 8
    """Completions per forward pass and rank."""
    max_completion_length: Annotated[int, IntRange(1, None)] = 32768
    """Tokens a completion may generate."""
    temperature: Annotated[float, FloatRange(0.01, 10.0)] = 1.0
    """Sampling temperature of the rollouts."""
    top_p: Annotated[float, FloatRange(0.0, 1.0)] = 1.0
    """Nucleus sampling of the rollouts."""
    learning_rate: Annotated[float, FloatRange(0.0, 1.0)] = 5e-7
    """Peak learning rate of the weights (latent weights of quantized layers, and the unquantized ones)."""
    max_grad_norm: Annotated[float, FloatRange(0.0, None)] = 1.0
    """Gradient norm clipping."""
    beta: Annotated[float, FloatRange(0.0, None)] = 0.0
    """KL penalty towards the starting policy (0: none, no reference model kept)."""
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = "dapo"
    """trl's loss normalisation."""
    epsilon: Annotated[float, FloatRange(0.0, 1.0)] = 0.2
    """PPO-style clipping of the probability ratio."""
    rewards: list[str] = ["correctness"]
    """``correctness``, ``format``, or ``python:module:function`` (needs allow_code)."""
    reward_weights: list[Annotated[float, FloatRange(0.0, None)]] | None = None
    """One weight per reward (default: all 1)."""
    generation: Literal["transformers", "vllm-colocate", "vllm-server"] = "transformers"
    """Rollout engine; vLLM receives the fake-quantized weights at every step."""
    vllm_server_url: str | None = None
    """The vLLM server, with ``generation: vllm-server``."""
    cache_implementation: CacheImplementation = "dynamic"
    """With ``generation: transformers``: ``preallocated`` allocates each rollout's KV cache once, writes in place
    and reads it without per-head copies, where ``dynamic`` copies the whole cache at every token (the same
    tokens; full-attention models only);
    ``static`` allocates it once at its full length, whose fixed shapes let transformers compile the decoding
    step on GPUs (the first rollout pays the compile); ``cuda_graph`` decodes rollouts with rqat's own loop, the
    preallocated cache read at its full length and each step replayed from a CUDA graph, so that decoding does
    not wait on Python (full-attention models on SDPA attention; sampling options beyond temperature, top-k and
    top-p fall back to ``dynamic`` with a warning)."""
    allow_cold_start: bool = False
    """Train even when the probe's mean reward is below ``cold_start_threshold``."""
    cold_start_threshold: Annotated[float, FloatRange(0.0, None)] = 0.05
    """Minimum mean reward of the probe."""
    probe_size: Annotated[int, IntRange(1, None)] = 32
    """Prompts the cold-start probe samples once each."""
    collapse_fraction: Annotated[float, FloatRange(0.0, 1.0)] | None = 0.5
    """Stop the stage with an error when the mean training reward of the last ``collapse_window`` logged
    steps falls below this fraction of the probe's (the starting policy's) mean reward; None: never."""
    collapse_window: Annotated[int, IntRange(1, None)] = 10
    """Logged steps that the collapse check averages."""
    save_steps: Annotated[int, IntRange(1, None)] = 50
    """Write a resumable checkpoint every this many steps."""
    logging_steps: Annotated[int, IntRange(1, None)] = 1
    """Log reward, length, entropy, KL and clip ratio every this many steps."""

    @field_validator("rewards")
    @classmethod
    def _known_rewards(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("needs at least one reward")
        for name in value:
            if is_code_ref(name):
                check_code_ref_syntax(name)
            elif name not in BUILTIN_REWARDS:
                raise ValueError(f"{name!r} is not one of: {', '.join(BUILTIN_REWARDS)}, or python:module:function")
        return value

    @model_validator(mode="after")
    def _weights_match(self) -> GRPOModifier:
        if self.reward_weights is not None and len(self.reward_weights) != len(self.rewards):
            raise ValueError(f"reward_weights has {len(self.reward_weights)} entries for {len(self.rewards)} rewards")
        if self.generation == "vllm-server" and not self.vllm_server_url:
            raise ValueError("generation 'vllm-server' needs vllm_server_url")
        if self.cache_implementation != "dynamic" and self.generation != "transformers":
            raise ValueError(f"cache_implementation {self.cache_implementation} is for generation transformers; "
                             f"{self.generation} manages its own KV cache")
        return self

    def model_problems(self, config: Any, at: Position) -> list[str]:
        if self.cache_implementation not in ("preallocated", "cuda_graph"):
            return []
        # transformers' cache classes load lazily (import rqat_sdk loads torch alone)
        from rqat_sdk.preallocated_cache import check_full_attention

        try:
            check_full_attention(config, self.cache_implementation)
        except ValueError as exc:
            return [f"{at.path}.cache_implementation: {exc}"]
        return []

    def warnings(self, recipe: Recipe, at: Position) -> list[str]:
        found = []
        trained_before = any(m.type == "qat_kd" and p < at for p, m in recipe.positions())
        if recipe.scheme.weights.num_bits <= 3 and not trained_before:
            found.append(
                f"{at.path}: grpo on a {recipe.scheme.label} model without a qat_kd stage before it: the seed paper "
                f"finds cold-start GRPO after plain PTQ collapses; add a qat_kd stage first"
            )
        quantized_in_flight = [
            part
            for part, args in (("activations", recipe.scheme.input_activations), ("KV cache", recipe.scheme.kv_cache))
            if args is not None
        ]
        if self.generation != "transformers" and quantized_in_flight:
            found.append(
                f"{at.path}.generation: {self.generation} rollouts get the fake-quantized weights but run the "
                f"{' and '.join(quantized_in_flight)} in full precision, so they sample from a neighbour of the "
                f"{recipe.scheme.label} policy (trl's importance-sampling correction weighs the gap); 'transformers' "
                f"samples the trained policy itself"
            )
        return found

    # --- lifecycle -------------------------------------------------------------------------------

    def apply(self, state: SessionState) -> None:
        from datasets import Dataset

        at = f"stages[{state.stage_index}].modifiers"
        rewards = resolve_rewards(self.rewards, allow_code=state.allow_code, field=f"{at}.rewards")
        examples = state.stage_examples()
        rows = [
            {"prompt": row["messages"][:-1] if row["messages"][-1]["role"] == "assistant" else row["messages"],
             "answer": row["answer"], "meta": row["meta"]}
            for row in examples
            if row["messages"] is not None and row["answer"] is not None
        ]
        if not rows:
            raise RqatError(f"stage {state.stage.name!r}: grpo needs chat examples with gold answers")
        prompts = Dataset.from_list(rows)
        # fp32 masters: updates of 5e-7 vanish in bf16 (trl autocasts to bf16 on GPUs)
        self.attach_training(state, learn_clipping=False, float32=True)
        probe = mean_reward(
            state.model, state.tokenizer, prompts.select(range(min(self.probe_size, len(prompts)))), rewards,
            self.reward_weights, max_new_tokens=self.max_completion_length, temperature=self.temperature,
        )
        state.stage_metrics["cold_start_probe_reward"] = probe
        log.info("stage %r: cold-start probe mean reward %.3f", state.stage.name, probe)
        if probe < self.cold_start_threshold and not self.allow_cold_start:
            raise ColdStartError(
                f"stage {state.stage.name!r}: the quantized model's mean reward on "
                f"{min(self.probe_size, len(prompts))} probe prompts is {probe:.3f}, below cold_start_threshold "
                f"{self.cold_start_threshold}. GRPO learns from reward differences within a group and has nothing to "
                f"learn from here (the seed paper finds GRPO straight after RTN collapses). Add a qat_kd stage before "
                f"this one, or set allow_cold_start: true to train anyway."
            )
        progress = state.progress_dir()
        if progress is None:
            progress = Path(tempfile.mkdtemp(prefix="rqat-grpo-"))
        log_file = state.log_file()
        with tracking_codes(state.model) as codes:
            margin = codes["grid_margin_at_start"]
            log.info("stage %r: %.1f%% of the latent weights lie within 0.1 quantization step of a rounding boundary "
                     "(mean distance from the grid %.3f steps); updates of a fraction of a step flip those codes",
                     state.stage.name, 100 * margin["share_within_0.1_step_of_a_boundary"],
                     margin["mean_distance_from_grid_in_steps"])
            summary = run_grpo(
                state.model, state.tokenizer, prompts, self, rewards,
                progress_dir=progress, log_file=log_file, seed=state.recipe.seed + state.stage_index,
                reference_reward=probe, fingerprint=state.recipe.fingerprint(state.stage_index),
            )
        summary = {**summary, **codes}
        state.stage_metrics[self.type] = summary
        if log_file is not None and log_file.is_file():
            plot_training(log_file, log_file.with_suffix(".png"))
        if summary["collapsed"] is not None:
            collapse = summary["collapsed"]
            if distributed.is_main():
                shutil.rmtree(progress, ignore_errors=True)  # its checkpoints hold the collapsing policy
            raise PolicyCollapseError(
                f"stage {state.stage.name!r} stopped at step {collapse['step']}: the mean training reward of the "
                f"last {self.collapse_window} logged steps is {collapse['recent_reward']:.3f}, below "
                f"collapse_fraction {self.collapse_fraction} x the starting reward {probe:.3f}; GRPO was destroying "
                f"the quantized policy, and had changed {100 * codes['codes_changed']:.2f}% of its weight codes "
                f"(curves: {log_file or 'not logged without an output directory'}). Lower "
                f"learning_rate (on the testbed lr 1e-3 helped GPTQ+KD at W3G128 and W2G64 but destroyed RTN+KD "
                f"at W2G64 and rotation+GPTQ+KD at W4A4KV4; docs/results.md), then rerun with --resume: the "
                f"stages before this one are kept and this one starts afresh (its mid-stage checkpoints were "
                f"removed). collapse_fraction: null turns this check off."
            )
