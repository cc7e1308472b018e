"""Loading models and tokenizers the Hugging Face way, with errors that say what is wrong."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from rqat_sdk.errors import ModelLoadError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

_DTYPES = {"auto": "auto", "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``auto``: this process's GPU (``LOCAL_RANK`` under a launcher) when there is one, else the CPU."""
    if device in (None, "auto"):
        from rqat_sdk.distributed import local_device

        return local_device()
    return torch.device(device)


def load_model(
    source: str | os.PathLike,
    *,
    dtype: str = "auto",
    device: torch.device | str | None = None,
    allow_quantized: bool = False,
) -> PreTrainedModel:
    """A causal LM from a local directory or a Hub id: full precision, unless ``allow_quantized``."""
    from transformers import AutoModelForCausalLM

    if dtype not in _DTYPES:
        raise ModelLoadError(f"dtype {dtype!r} is not one of {', '.join(_DTYPES)}")
    location = _check_location(source)
    if location is not None and not allow_quantized:
        config = json.loads((location / "config.json").read_text())
        if "quantization_config" in config:
            method = config["quantization_config"].get("quant_method", "unknown")
            raise ModelLoadError(
                f"{location} is already quantized ({method}); rqat starts from the full-precision model. "
                f"To continue an interrupted run, pass resume=True (rqat run --resume) with the same output directory."
            )
    try:
        model = AutoModelForCausalLM.from_pretrained(str(source), dtype=_DTYPES[dtype])
    except OSError as exc:
        raise ModelLoadError(f"could not load model {str(source)!r}: {exc}") from None
    return model.to(resolve_device(device)).eval()


def load_tokenizer(source: str | os.PathLike) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(source))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"could not load a tokenizer from {str(source)!r}: {exc}. Pass tokenizer= (or --tokenizer) explicitly."
        ) from None


def _check_location(source: str | os.PathLike) -> Path | None:
    """The local directory ``source`` names, None for a Hub id; errors for paths that cannot be a model."""
    text = str(source)
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"model path {text!r} is a file; pass the directory that holds config.json")
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"model directory {text!r} has no config.json, so it is not a transformers model")
        return path
    looks_local = isinstance(source, os.PathLike) or text.startswith(("/", "./", "../", "~")) or text.count("/") > 1
    if looks_local:
        raise ModelLoadError(f"model path {text!r} does not exist")
    return None
