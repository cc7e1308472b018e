"""The evaluation harness: answer checking, benchmarks, pass@1 bookkeeping, reports, the CLI."""

import json

import pytest
import torch

import rqat_sdk
from rqat_sdk.cli import main
from rqat_sdk.data.reasoning_gym import HELD_OUT_SEED_OFFSET, parse_tasks
from rqat_sdk.errors import DatasetError
from rqat_sdk.evaluation import EvalReport, extract_boxed, harness, load_benchmark, markdown_table, math_equal, plot
from rqat_sdk.generation import Completion, Sampling, generate
from rqat_sdk.models import load_model, load_tokenizer


def test_extract_boxed_takes_the_last_and_balances_braces():
    assert extract_boxed("first \\boxed{1} then \\boxed{\\frac{1}{2}} done") == "\\frac{1}{2}"
    assert extract_boxed("no answer") is None
    assert extract_boxed("\\boxed{unclosed") is None


def test_math_equal_uses_math_verify():
    assert math_equal("0.5", "so the answer is \\boxed{\\frac{1}{2}}")
    assert math_equal("42", "\\boxed{42}")
    assert not math_equal("42", "\\boxed{41}")
    assert not math_equal("42", "I am not sure")


def test_reasoning_gym_specs_take_settings_and_check_names():
    (chain, legs) = parse_tasks("chain_sum(max_terms=3, max_digits=2), leg_counting")
    assert chain.name == "chain_sum" and chain.config == {"max_terms": 3, "max_digits": 2}
    assert legs.config == {}
    with pytest.raises(DatasetError, match="no task 'chain_sums'"):
        parse_tasks("chain_sums")
    with pytest.raises(DatasetError, match="is not key=value"):
        parse_tasks("chain_sum(max_terms)")
    with pytest.raises(DatasetError, match="rejects settings"):
        load_benchmark("reasoning-gym:chain_sum(max_terms=1,min_terms=3)", num_examples=2)


def test_generated_benchmarks_use_held_out_seeds():
    from rqat_sdk.data import load_examples

    train = load_examples("reasoning-gym:chain_sum", num_samples=5, seed=0)
    problems = load_benchmark("reasoning-gym:chain_sum", num_examples=5)
    assert json.loads(problems[0].meta)["seed"] == HELD_OUT_SEED_OFFSET
    assert json.loads(train[0]["meta"])["seed"] == 0
    assert [p.prompt[-1]["content"] for p in problems] != [r["messages"][0]["content"] for r in train]
    assert all(p.prompt[-1]["role"] == "user" for p in problems)


@pytest.mark.parametrize("mix, tasks", [
    ("testbed", {"chain_sum", "leg_counting", "simple_equations"}),
    ("testbed-long", {"chain_sum", "leg_counting", "products"}),
    ("worked-math", {"chain_sum", "leg_counting", "products", "gcd"}),
])
def test_testbed_solutions_are_correct_and_scored_by_reasoning_gym(mix, tasks):
    from rqat_sdk.evaluation import score_response
    from rqat_sdk.testbed.tasks import testbed_rows

    rows = testbed_rows(num_samples=600, seed=3, mix=mix)  # each worked solution is checked against reasoning-gym
    assert {json.loads(r["meta"])["task"] for r in rows} == tasks
    for row in rows[:60]:
        reply = row["messages"][1]["content"]
        assert score_response(reply, row["answer"], row["meta"]) == 1.0
        wrong = reply.replace(f"\\boxed{{{row['answer']}}}", "\\boxed{123456}")
        assert score_response(wrong, row["answer"], row["meta"]) == 0.0


def test_long_testbed_solutions_work_step_by_step():
    from rqat_sdk.testbed.tasks import solution

    product = {"metadata": {"expression": "57 * 80"}, "answer": 4560}
    assert solution("products", product) == "57 * 8 = 456\n57 * 80 = 4560\n\\boxed{4560}"
    product = {"metadata": {"expression": "42 * 25"}, "answer": 1050}
    assert solution("products", product).splitlines() == [
        "42 * 5 = 210", "42 * 2 = 84", "42 * 20 = 840", "210 + 840 = 1050", "\\boxed{1050}"]
    problems = load_benchmark("testbed-long", num_examples=30)
    assert len(problems) == 30 and json.loads(problems[0].meta)["seed"] >= HELD_OUT_SEED_OFFSET


def test_worked_math_numbers_its_steps_and_runs_euclid():
    from rqat_sdk.testbed.tasks import numbered_solution

    gcd = {"metadata": {"numbers": [1071, 462]}, "answer": 21}
    assert numbered_solution("gcd", gcd).splitlines() == [
        "Step 1: 1071 = 2 * 462 + 147", "Step 2: 462 = 3 * 147 + 21", "Step 3: 147 = 7 * 21 + 0",
        "Answer: \\boxed{21}"]
    problems = load_benchmark("worked-math", num_examples=8)
    assert {json.loads(p.meta)["task"] for p in problems} == {"chain_sum", "leg_counting", "products", "gcd"}
    assert all(json.loads(p.meta)["seed"] >= HELD_OUT_SEED_OFFSET for p in problems)


def test_perplexity_is_exp_of_the_mean_token_loss(tiny_qwen3):
    import math

    import torch

    from rqat_sdk.evaluation import perplexity
    from rqat_sdk.models import load_model, load_tokenizer

    model, tokenizer = load_model(tiny_qwen3, dtype="float32", device="cpu"), load_tokenizer(tiny_qwen3)
    texts = ["Step 1: 12 + 30 = 42", "Answer: 42 is the sum of twelve and thirty, computed in one step"]
    ids = [torch.tensor([tokenizer(t)["input_ids"]]) for t in texts]
    with torch.no_grad():
        losses = [model(input_ids=i, labels=i).loss.item() for i in ids]
    counts = [i.shape[1] - 1 for i in ids]
    expected = math.exp(sum(loss * n for loss, n in zip(losses, counts, strict=True)) / sum(counts))
    assert perplexity(model, tokenizer, texts, batch_size=2) == pytest.approx(expected, rel=1e-4)
    assert perplexity(model, tokenizer, texts, batch_size=1) == pytest.approx(expected, rel=1e-4)
    with pytest.raises(ValueError, match="at least one text"):
        perplexity(model, tokenizer, [])


def test_jsonl_benchmarks_need_gold_answers(tmp_path):
    path = tmp_path / "bench.jsonl"
    path.write_text(json.dumps({"question": "What is 6 * 7?", "answer": "#### 42"}) + "\n")
    (problem,) = load_benchmark(str(path), num_examples=10)
    assert problem.answer == "42" and problem.meta is None
    path.write_text(json.dumps({"prompt": "Say hi", "response": "hi"}) + "\n")
    with pytest.raises(DatasetError, match="no gold answer"):
        load_benchmark(str(path), num_examples=10)


def test_hub_benchmarks_fail_clearly_offline():
    with pytest.raises(DatasetError, match="could not load hf:openai/gsm8k:main@test .*Offline"):
        load_benchmark("gsm8k", num_examples=10)


def test_pass_at_1_is_the_mean_over_samples_with_its_spread(tiny_qwen3, monkeypatch):
    problems = load_benchmark("testbed", num_examples=4)
    calls = {"k": 0}

    def canned(model, tokenizer, prompts, sampling, *, batch_size, seed):
        # sample 0 answers every problem right, sample 1 only the first one; sample 1 also runs out of tokens
        k = calls["k"]
        calls["k"] += 1
        right = [f"\\boxed{{{p.answer}}}" for p in problems]
        texts = right if k == 0 else right[:1] + ["\\boxed{-99999}"] * 3
        return [Completion(t, 10 + k, truncated=bool(k)) for t in texts]

    monkeypatch.setattr(harness, "generate", canned)
    report = rqat_sdk.evaluate(tiny_qwen3, "testbed", samples=2, num_examples=4, label="canned")
    assert report.per_sample == [1.0, 0.25]
    assert report.pass_at_1 == pytest.approx(0.625)
    assert report.std == pytest.approx(0.5303, abs=1e-3)
    assert report.mean_response_tokens == pytest.approx(10.5) and report.truncation_rate == 0.5
    assert [r["score"] for r in report.items[1]["responses"]] == [1.0, 0.0]
    assert [item["task"] for item in report.items] == ["chain_sum", "leg_counting", "simple_equations", "chain_sum"]
    assert report.pass_at_1_by_task() == {"chain_sum": 0.75, "leg_counting": 0.5, "simple_equations": 0.5}


def test_real_generation_on_a_tiny_model(tiny_qwen3, tmp_path):
    report = rqat_sdk.evaluate(tiny_qwen3, "testbed", samples=2, num_examples=6, max_new_tokens=8, batch_size=4)
    assert report.num_problems == 6 and len(report.items[0]["responses"]) == 2
    assert report.pass_at_1 == 0.0  # an untrained model
    assert 0 < report.mean_response_tokens <= 8
    greedy = rqat_sdk.evaluate(tiny_qwen3, "testbed", greedy=True, num_examples=6, max_new_tokens=8)
    again = rqat_sdk.evaluate(tiny_qwen3, "testbed", greedy=True, num_examples=6, max_new_tokens=8)
    assert greedy.samples == 1 and greedy.items == again.items
    report.save(tmp_path / "r.json")
    assert EvalReport.load(tmp_path / "r.json") == report



def test_static_and_preallocated_kv_caches_decode_what_the_dynamic_one_does(monkeypatch):
    """The static cache (which transformers compiles decoding for on GPUs) and the preallocated one (written in
    place) change how, not what: greedy answers of the trained short testbed, over left-padded batches, are the
    same."""
    from rqat_sdk.testbed.train import EMBEDDED

    model, tokenizer = load_model(EMBEDDED, dtype="float32", device="cpu"), load_tokenizer(EMBEDDED)
    caches = []
    decode = model.generate

    def recording(**kw):
        caches.append(kw.get("cache_implementation") or type(kw.get("past_key_values")).__name__)
        return decode(**kw)

    monkeypatch.setattr(model, "generate", recording)
    prompts = [problem.prompt for problem in load_benchmark("testbed", num_examples=16, seed=0)]
    answers = {cache: generate(model, tokenizer, prompts, Sampling(max_new_tokens=48, greedy=True,
                                                                   cache_implementation=cache), batch_size=8, seed=0)
               for cache in ("dynamic", "static", "preallocated")}
    assert caches == ["NoneType"] * 2 + ["static"] * 2 + ["PreallocatedCache"] * 2
    assert answers["static"] == answers["dynamic"] == answers["preallocated"] and any(c.text for c in answers["static"])
    with pytest.raises(ValueError, match="cache_implementation 'paged' is not one of dynamic, static, preallocated"):
        rqat_sdk.evaluate(EMBEDDED, "testbed", cache_implementation="paged")


def test_reports_table_plot_and_cli(tmp_path, capsys):
    def report(label, value):
        return EvalReport(label, "testbed", value, 0.02, [value], 40.0, 0.1, 100, 3, {}, 1.0)

    reports = [report("BF16", 0.8), report("RTN", 0.2), report("RTN+KD", 0.6)]
    table = markdown_table(reports, baseline="BF16")
    assert "| RTN+KD | testbed | 60.0 | 2.0 | 75% | 40 | 10% |" in table
    plot(reports, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for r in reports:
        r.save(tmp_path / f"{r.label}.json")
    assert main(["compare", *(str(tmp_path / f"{r.label}.json") for r in reports), "--baseline", "BF16",
                 "--plot", str(tmp_path / "c.png")]) == 0
    assert "| RTN | testbed | 20.0" in capsys.readouterr().out and (tmp_path / "c.png").is_file()
    (tmp_path / "bad.json").write_text("{}")
    assert main(["compare", str(tmp_path / "bad.json")]) == 1
    assert "is not an evaluation report" in capsys.readouterr().err


def test_the_committed_long_testbed_is_one_that_w3g128_rtn_hurts():
    """The reason the long testbed exists: symmetric W3G128 RTN costs it ~20 points (measured: 84.1 -> 65.6)."""
    from rqat_sdk.testbed.train import LONG

    record = json.loads((LONG / "testbed.json").read_text())
    assert record["benchmark"] == "testbed-long" and (LONG / "model.safetensors").stat().st_size < 15_000_000
    common = dict(greedy=True, num_examples=60, max_new_tokens=224, batch_size=60, dtype="float32")
    full = rqat_sdk.evaluate(LONG, "testbed-long", **common)
    recipe = {"version": 1, "scheme": {"weights": {"num_bits": 3, "group_size": 128, "symmetric": True}},
              "stages": [{"name": "ptq", "modifiers": [{"type": "rtn"}]}]}
    ptq = rqat_sdk.oneshot(LONG, recipe, dtype="float32")
    quantized = rqat_sdk.evaluate(ptq.model, "testbed-long", tokenizer=ptq.tokenizer, **common)
    assert full.pass_at_1 >= 0.85 and full.pass_at_1 - quantized.pass_at_1 >= 0.15


def test_the_spread_is_the_sample_standard_deviation():
    from rqat_sdk.evaluation import sample_std

    assert sample_std([0.5, 0.7, 0.9]) == pytest.approx(0.2)  # n - 1 in the denominator; the population's is 0.163
    assert sample_std(iter([0.25, 0.75])) == pytest.approx(0.5 ** 0.5 / 2)
    assert sample_std([0.4]) == 0.0 and sample_std([]) == 0.0


def test_the_short_testbed_is_packaged_and_keeps_its_former_names():
    import tomllib
    from fnmatch import fnmatch
    from pathlib import Path

    from rqat_sdk.models import load_model
    from rqat_sdk.testbed.train import EMBEDDED, LONG, SIZES, testbed_size

    assert EMBEDDED.name == "short" and testbed_size("cpu") == ("short", SIZES["short"])
    with pytest.raises(ValueError, match="testbed size 'tiny' is not one of cpu, gemma3, long, short, smollm2"):
        testbed_size("tiny")
    # the wheel carries every committed file of both testbeds
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    globs = pyproject["tool"]["setuptools"]["package-data"]["rqat_sdk.testbed"]
    for testbed in (EMBEDDED, LONG):
        files = [f"{testbed.name}/{f.name}" for f in testbed.iterdir()]
        assert "model.safetensors" in {Path(f).name for f in files}
        assert all(any(fnmatch(f, glob) for glob in globs) for f in files), (files, globs)
    # a recipe or command naming the former path loads the same model (in a source tree, through a link)
    old = load_model(EMBEDDED.parent / "cpu", dtype="float32", device="cpu")
    new = load_model(EMBEDDED, dtype="float32", device="cpu")
    assert all(torch.equal(a, b) for a, b in zip(old.state_dict().values(), new.state_dict().values(), strict=True))


@pytest.mark.parametrize("scheme", [{"weights": {"num_bits": 2, "group_size": 64, "symmetric": False}}, "W4A4KV4"])
def test_a_quantized_model_in_memory_decodes_with_its_weights_quantized_once(scheme, monkeypatch):
    import compressed_tensors.quantization.lifecycle.forward as ct_forward

    from rqat_sdk.modifiers.layers import weights_quantized_once
    from rqat_sdk.testbed.train import EMBEDDED

    ptq = {"version": 1, "scheme": scheme, "stages": [{"name": "ptq", "modifiers": [{"type": "rtn"}]}]}
    result = rqat_sdk.oneshot(EMBEDDED, ptq, dtype="float32")
    model, tokenizer = result.model, result.tokenizer
    prompts = [[{"role": "user", "content": "What is 17 + 25?"}], [{"role": "user", "content": "Add 3 and 4."}]]
    sampling = Sampling(max_new_tokens=12, greedy=True)
    per_token = generate(model, tokenizer, prompts, sampling, batch_size=2, seed=0)
    latent = {name: p.detach().clone() for name, p in model.named_parameters() if name.endswith(".weight")}
    weights = []
    quantize = ct_forward.forward_quantize
    monkeypatch.setattr(ct_forward, "forward_quantize", lambda m, v, name, args: (
        weights.append(1) if name == "weight" else None) or quantize(m, v, name, args))
    with weights_quantized_once(model):
        once = generate(model, tokenizer, prompts, sampling, batch_size=2, seed=0)
    layers = sum(1 for m in model.modules() if getattr(m, "quantization_scheme", None) is not None)
    assert [c.text for c in once] == [c.text for c in per_token]
    assert len(weights) == layers  # once a layer, not once a layer and token
    assert all(torch.equal(p, latent[name]) for name, p in model.named_parameters() if name in latent)
    weights.clear()
    generate(model, tokenizer, prompts, sampling, batch_size=2, seed=0)
    assert len(weights) > layers  # outside the block each forward quantizes again
