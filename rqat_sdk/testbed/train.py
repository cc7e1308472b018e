"""Train a reasoning testbed: a model that learns worked step-by-step solutions of reasoning-gym tasks.

The testbed exists so that this project has a reasoning model on which low-bit PTQ visibly hurts and QAT
visibly recovers, without any Hub access. It is trained with the SDK's own training loop (cross-entropy on
the worked solutions, response tokens only), seeded, so that ``python -m rqat_sdk.testbed.train`` rebuilds
it. Two sizes are Qwen3-architecture models trained from scratch: the ``short`` size, on short worked solutions,
is committed with the package (``rqat_sdk/testbed/short``) and is the embedded default of ``rqat demo``; the
``long`` size (committed as ``rqat_sdk/testbed/long``) is the one that W3G128 hurts, for the result tables.
The short testbed's former names still work: the size ``cpu`` and, in a source tree, the path
``rqat_sdk/testbed/cpu`` (a symbolic link). The pretrained sizes
(``smollm2``, ``gemma3``) fine-tune a real pretrained LLM, read from its offline package, into a reasoning
teacher; they are rebuilt on a GPU from a seed rather than committed.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from rqat_sdk.data import tokenize_examples
from rqat_sdk.files import atomic_directory
from rqat_sdk.models import load_model, load_tokenizer, resolve_device
from rqat_sdk.modifiers.qat.batches import StepBatches
from rqat_sdk.modifiers.qat.trainer import DistillationTrainer, TrainerConfig, TrainerPaths
from rqat_sdk.ops.distill import LossSpec
from rqat_sdk.testbed.tasks import MIXES, testbed_rows
from rqat_sdk.testbed.tiny import build_model, build_tokenizer
from rqat_sdk.threads import configure_threads

log = logging.getLogger(__name__)

EMBEDDED = Path(__file__).parent / "short"
"""The committed short-solution testbed (bf16 safetensors, tokenizer, training record)."""
LONG = Path(__file__).parent / "long"
"""The committed long-chain testbed: worked solutions of 5 to 12 steps, which W3G128 PTQ hurts (docs/results.md)."""


@dataclass(frozen=True)
class TestbedSize:
    mix: str
    """The task mix (:data:`rqat_sdk.testbed.tasks.MIXES`), also the testbed's benchmark name."""
    hidden_size: int
    intermediate_size: int
    num_layers: int
    vocab_size: int
    examples: int
    steps: int
    batch_size: int
    micro_batch_size: int
    learning_rate: float
    warmup_steps: int
    weight_decay: float
    max_seq_length: int = 256
    base_model: str | None = None
    """A pretrained model to fine-tune (anything ``--model`` takes); None trains a Qwen3 model from scratch."""


SIZES = {
    # Every Linear's input width is a multiple of 128, so W3G128 and W2G64 apply. The short size is small on
    # purpose: wider models (hidden 256, 4 layers, 3.3M parameters) solve these tasks with so much margin that
    # even 2-bit RTN barely hurts them; at 0.46M parameters 2-bit RTN hurts (measured in docs/evaluation.md).
    "short": TestbedSize("testbed", 128, 384, 2, 512, examples=60_000, steps=3000, batch_size=64, micro_batch_size=64,
                       learning_rate=3e-3, warmup_steps=100, weight_decay=0.0),
    # The same model on worked solutions of 5 to 12 steps, which W3G128 symmetric RTN hurts too (docs/results.md).
    "long": TestbedSize("testbed-long", 128, 384, 2, 512, examples=60_000, steps=3000, batch_size=64,
                        micro_batch_size=64, learning_rate=3e-3, warmup_steps=100, weight_decay=0.0,
                        max_seq_length=384),
    # Pretrained LLMs fine-tuned (all parameters) into reasoning teachers on the longer worked-math mix.
    "smollm2": TestbedSize("worked-math", 576, 1536, 30, 49152, examples=48_000, steps=1500, batch_size=32,
                           micro_batch_size=32, learning_rate=1e-4, warmup_steps=50, weight_decay=0.0,
                           max_seq_length=512, base_model="gguf:smollm2-135m-instruct"),
    "gemma3": TestbedSize("worked-math", 640, 2048, 18, 262144, examples=48_000, steps=1500, batch_size=32,
                          micro_batch_size=32, learning_rate=5e-5, warmup_steps=50, weight_decay=0.0,
                          max_seq_length=512, base_model="gguf:gemma3-270m"),
}

SIZE_ALIASES = {"cpu": "short"}
"""Former size names, kept for the commands and scripts that use them."""


def testbed_size(name: str) -> tuple[str, TestbedSize]:
    """The size called ``name`` (or a former name of it) and its current name."""
    name = SIZE_ALIASES.get(name, name)
    if name not in SIZES:
        raise ValueError(f"testbed size {name!r} is not one of {', '.join(sorted([*SIZES, *SIZE_ALIASES]))}")
    return name, SIZES[name]


def train_testbed(
    output_dir: str | Path, size: str | TestbedSize = "short", *, seed: int = 0, steps: int | None = None,
    deterministic: bool = False,
) -> dict:
    """Build the tokenizer and model, train them, and save a ``from_pretrained`` directory (bf16).

    ``size`` names one of :data:`SIZES` or gives a :class:`TestbedSize` (benchmarks/testbed_sensitivity.py
    trains candidates that way). ``deterministic`` trains with torch's deterministic algorithms (see
    :func:`deterministic_algorithms`), so that the same seed on the same kind of GPU and software gives the
    same teacher in every session.
    """
    with deterministic_algorithms(deterministic):
        return _train_testbed(Path(output_dir), size, seed=seed, steps=steps, deterministic=deterministic)


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool) -> Iterator[None]:
    """Within the block, torch's deterministic algorithms (an operation without one raises, naming itself)
    and cuBLAS's fixed workspace, which they need on CUDA: that variable is read when cuBLAS starts, so in a
    process that has already run a CUDA matmul torch refuses the first one instead. Restores the previous
    setting after."""
    if not enabled:
        yield
        return
    previous = torch.are_deterministic_algorithms_enabled()
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def weights_sha256(model: torch.nn.Module) -> str:
    """A digest of the model's parameters and buffers (names, dtypes, shapes and bytes, in state-dict order):
    two teacher builds are the same model exactly when their digests match, so tables measured on them in
    different sessions can be merged."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _train_testbed(
    output_dir: Path, size: str | TestbedSize, *, seed: int, steps: int | None, deterministic: bool
) -> dict:
    from datasets import Dataset
    from transformers import set_seed

    name, spec = testbed_size(size) if isinstance(size, str) else ("custom", size)
    steps = steps or spec.steps
    started = time.perf_counter()
    rows = testbed_rows(num_samples=spec.examples, seed=seed, mix=spec.mix)
    if spec.base_model is not None:
        set_seed(seed)
        model = load_model(spec.base_model)  # bf16 on a GPU; the optimizer keeps fp32 master weights
        tokenizer = load_tokenizer(spec.base_model)
    else:
        corpus = [row["messages"][0]["content"] + "\n" + row["messages"][1]["content"] for row in rows[:5000]]
        tokenizer = build_tokenizer(vocab_size=spec.vocab_size, corpus=corpus, split_digits=True)
        model = build_model(
            tokenizer, "qwen3", hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
            num_layers=spec.num_layers, seed=seed,
        ).to(resolve_device("auto"))  # type: ignore[arg-type]  # @wraps typing gap (pyproject)
    configure_threads(model)
    examples = tokenize_examples(Dataset.from_list(rows), tokenizer, max_seq_length=spec.max_seq_length)
    config = TrainerConfig(
        loss=LossSpec(divergence="ce"), steps=steps, learning_rate=spec.learning_rate,
        warmup_steps=spec.warmup_steps, weight_decay=spec.weight_decay, logging_steps=50, save_steps=500,
    )
    batches = StepBatches(
        examples, batch_size=spec.batch_size, micro_batch_size=spec.micro_batch_size, seed=seed,
        pad_token_id=tokenizer.pad_token_id, packing=False,
    )
    work = output_dir.with_name(output_dir.name + ".partial")
    trainer = DistillationTrainer(
        config, model, None, batches, device=model.device,
        paths=TrainerPaths(work / "progress", work / "train.jsonl"), fingerprint=f"testbed-{name}-{seed}-{steps}",
        stage=f"testbed-{name}",
    )
    summary = trainer.train()
    model.to(torch.bfloat16)  # type: ignore[arg-type]  # @wraps typing gap (pyproject)
    record = {
        "size": name, "spec": asdict(spec), "steps": steps, "seed": seed, "benchmark": spec.mix,
        "tasks": MIXES[spec.mix], "base_model": spec.base_model,
        "parameters": sum(p.numel() for p in model.parameters()), "train": summary,
        "seconds": round(time.perf_counter() - started, 1), "device": str(model.device),
        "device_name": torch.cuda.get_device_name(model.device) if model.device.type == "cuda" else "CPU",
        "date": datetime.date.today().isoformat(),
        "deterministic": deterministic,
        "weights_sha256": weights_sha256(model),
        "command": f"python -m rqat_sdk.testbed.train --size {name} --seed {seed} --steps {steps}"
                   + (" --deterministic" if deterministic else "") + f" {output_dir}",
    }
    with atomic_directory(output_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "testbed.json").write_text(json.dumps(record, indent=2) + "\n")
        if (work / "train.jsonl").is_file():
            (tmp / "train.jsonl").write_text((work / "train.jsonl").read_text())

    shutil.rmtree(work, ignore_errors=True)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description="Train the reasoning testbed from scratch.")
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--size", choices=sorted([*SIZES, *SIZE_ALIASES]), default="short")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--deterministic", action="store_true",
                        help="torch's deterministic algorithms: the same teacher from the same seed, GPU and software")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    record = train_testbed(args.output_dir, args.size, seed=args.seed, steps=args.steps,
                           deterministic=args.deterministic)
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
