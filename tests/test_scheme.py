import pytest
import torch
from compressed_tensors.quantization import QuantizationArgs

from rqat_sdk.errors import SchemeError
from rqat_sdk.recipe import PRESETS, QuantScheme
from rqat_sdk.testbed import build_model, build_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(vocab_size=400, corpus_size=40)


def test_preset_expands_to_compressed_tensors_args():
    scheme = QuantScheme.model_validate("w3g128")
    args = scheme.config_groups()["group_0"].weights
    assert isinstance(args, QuantizationArgs)
    assert (args.num_bits, args.strategy, args.group_size, args.symmetric, args.type) == (3, "group", 128, False, "int")
    assert scheme.config_groups()["group_0"].targets == ["Linear"]
    assert scheme.ignore == ["lm_head"] and scheme.label == "W3G128"


def test_per_channel_and_activation_schemes():
    scheme = QuantScheme.model_validate("W8A8")
    group = scheme.config_groups()["group_0"]
    assert group.weights.strategy == "channel" and group.weights.group_size is None
    acts = group.input_activations
    assert (acts.num_bits, acts.strategy, acts.dynamic, acts.symmetric) == (8, "token", True, True)
    assert scheme.label == "W8A8" and not scheme.weight_only


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_is_valid_and_described(name):
    scheme = QuantScheme.model_validate(name)
    assert scheme.describe().startswith(f"int{scheme.weights.num_bits} weights")


def test_activation_group_size_needs_group_strategy():
    with pytest.raises(ValueError, match="strategy 'group' needs a group_size"):
        QuantScheme.model_validate(
            {"weights": {"num_bits": 4}, "input_activations": {"num_bits": 4, "strategy": "group"}}
        )
    with pytest.raises(ValueError, match="only used with strategy 'group'"):
        QuantScheme.model_validate({"weights": {"num_bits": 4}, "input_activations": {"num_bits": 4, "group_size": 32}})


def test_targeted_modules_skip_ignored_and_embeddings(tokenizer):
    model = build_model(tokenizer, "llama")
    names = [name for name, _ in QuantScheme.model_validate("W4A16").targeted_modules(model)]
    assert len(names) == 14  # 7 Linear layers x 2 blocks
    assert "lm_head" not in names and not any("embed" in n for n in names)


def test_group_size_that_does_not_divide_a_layer_names_the_layer(tokenizer):
    model = build_model(tokenizer, "qwen3", intermediate_size=320)  # down_proj has in_features 320
    with pytest.raises(SchemeError) as info:
        QuantScheme.model_validate("W3G128").check_model(model)
    message = str(info.value)
    assert "scheme.weights.group_size: 128 does not divide" in message
    assert "model.layers.0.mlp.down_proj (in_features=320)" in message
    assert "model.layers.1.mlp.down_proj (in_features=320)" in message
    assert "q_proj" not in message
    assert "set scheme.weights.group_size_fallback to 'largest_divisor' or 'channel'" in message
    QuantScheme.model_validate("W2G64").check_model(model)  # 64 divides 320


def fallback_scheme(fallback: str) -> QuantScheme:
    return QuantScheme.model_validate({"weights": {"num_bits": 3, "group_size": 128, "group_size_fallback": fallback}})


def test_group_size_fallback_resolves_per_layer(tokenizer):
    model = build_model(tokenizer, "llama", hidden_size=256, intermediate_size=320)  # down_proj: in_features 320
    downs = ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert fallback_scheme("largest_divisor").group_size_fallbacks(model) == dict.fromkeys(downs, 64)
    assert fallback_scheme("channel").group_size_fallbacks(model) == dict.fromkeys(downs, None)
    assert fallback_scheme("error").group_size_fallbacks(model) == {}
    fallback_scheme("channel").check_model(model)

    groups = fallback_scheme("largest_divisor").config_groups(model)
    assert [g.weights.group_size for g in groups.values()] == [128, 64]
    assert groups["group_1"].targets == downs and len(groups["group_0"].targets) == 12
    assert fallback_scheme("largest_divisor").config_groups()["group_0"].targets == ["Linear"]  # no model: as written
    assert "the largest of 128/64/32 that fits" in fallback_scheme("largest_divisor").describe()


def test_largest_divisor_without_a_fitting_size_names_the_layer_and_the_other_fallback(tokenizer):
    model = build_model(tokenizer, "qwen3", intermediate_size=336)  # 336 = 16 * 21: no group of 32 fits
    with pytest.raises(SchemeError) as info:
        fallback_scheme("largest_divisor").check_model(model)
    message = str(info.value)
    assert "model.layers.0.mlp.down_proj (in_features=336)" in message and "no smaller vLLM group size" in message
    assert "set scheme.weights.group_size_fallback to 'channel'" in message


def test_group_size_fallback_needs_a_group_size():
    with pytest.raises(ValueError, match="group_size_fallback is only used with a group_size"):
        QuantScheme.model_validate({"weights": {"num_bits": 4, "group_size": None, "group_size_fallback": "channel"}})


def test_targets_matching_nothing_is_an_error(tokenizer):
    model = build_model(tokenizer, "qwen3")
    scheme = QuantScheme.model_validate({"weights": {"num_bits": 4}, "targets": ["re:.*does_not_exist"]})
    with pytest.raises(SchemeError, match="match no layer"):
        scheme.check_model(model)
    assert isinstance(model.lm_head, torch.nn.Linear)
