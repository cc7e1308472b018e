import json
import sys
from pathlib import Path

import pytest
import yaml

from rqat_sdk.errors import RecipeError
from rqat_sdk.recipe import Recipe, load_recipe
from rqat_sdk.recipe.schema import recipe_json_schema, reference_markdown
from rqat_sdk.recipes import bundled

REPO = Path(__file__).resolve().parents[1]
GOOD = """
version: 1
name: example
scheme: {weights: {num_bits: 3, group_size: 128, symmetric: false}}
stages:
  - name: ptq
    data: {source: "reasoning-gym:chain_sum", num_samples: 32, max_seq_length: 256}
    modifiers:
      - {type: rotation, rotations: [R1]}
      - {type: gptq, dampening_frac: 0.05, actorder: null}
"""


def problems(text: str) -> list[str]:
    with pytest.raises(RecipeError) as info:
        Recipe.from_yaml(text)
    return info.value.problems


def with_stage(modifiers: str, scheme: str = "W4A16", data: str = "{}") -> str:
    return f"version: 1\nscheme: {scheme}\nstages:\n  - name: s\n    data: {data}\n    modifiers: {modifiers}\n"


@pytest.mark.parametrize("name", sorted(bundled()))
def test_bundled_recipes_validate_and_round_trip(name):
    recipe = Recipe.from_file(bundled()[name])
    text = recipe.to_yaml()
    again = Recipe.from_yaml(text)
    assert again == recipe
    assert again.to_yaml() == text


def test_yaml_round_trip_keeps_every_value():
    recipe = Recipe.from_yaml(GOOD)
    again = Recipe.from_yaml(recipe.to_yaml())
    assert again == recipe
    gptq = again.stages[0].modifiers[1]
    assert (gptq.type, gptq.dampening_frac, gptq.actorder) == ("gptq", 0.05, None)
    assert again.stages[0].modifiers[0].rotations == ["R1"]
    assert again.stages[0].data.source == "reasoning-gym:chain_sum"
    dumped = yaml.safe_load(recipe.to_yaml())
    assert dumped["scheme"]["weights"] == {"num_bits": 3, "group_size": 128, "symmetric": False, "observer": "minmax",
                                         "group_size_fallback": "error"}


def test_preset_is_saved_expanded():
    recipe = Recipe.from_yaml(with_stage("[{type: rtn}]", scheme="W2G64"))
    assert yaml.safe_load(recipe.to_yaml())["scheme"]["weights"]["group_size"] == 64


def test_out_of_range_values_name_path_and_range():
    found = problems(
        with_stage("[{type: gptq, dampening_frac: 1.5, block_size: 0}]", scheme="{weights: {num_bits: 9}}")
    )
    assert "scheme.weights.num_bits: 9 is not in 2..8" in found
    assert "stages[0].modifiers[0].dampening_frac: 1.5 is not in 0.0..1.0" in found
    assert "stages[0].modifiers[0].block_size: 0 is below the minimum 1" in found


def test_unknown_keys_are_errors_with_suggestions():
    found = problems(with_stage("[{type: gptq, dampening: 0.1}]", scheme="{weights: {num_bits: 4, symetric: true}}"))
    assert any(p.startswith("scheme.weights.symetric: unknown field (did you mean 'symmetric'?)") for p in found)
    assert any(p.startswith("stages[0].modifiers[0].dampening: unknown field") and "dampening_frac" in p for p in found)
    assert any("unknown field" in p for p in problems("version: 1\nschem: W4A16\nstages: []\n"))


def test_unknown_modifier_type_lists_the_allowed_ones():
    (message,) = problems(with_stage("[{type: gptqq}]"))
    assert message == (
        "stages[0].modifiers[0].type: 'gptqq' is not one of: rtn, gptq, awq, rotation, flatquant, qat_kd, grpo "
        "(did you mean 'gptq'?)"
    )
    (message,) = problems(with_stage("[{block_size: 4}]"))
    assert message == "stages[0].modifiers[0].type: missing; one of: rtn, gptq, awq, rotation, flatquant, qat_kd, grpo"


def test_literal_and_union_errors_list_allowed_values():
    found = problems(with_stage("[{type: gptq, actorder: sometimes}, {type: awq, duo_scaling: maybe}]"))
    assert "stages[0].modifiers[0].actorder: 'sometimes' is not one of: 'static', 'group' or 'weight'" in found
    assert "stages[0].modifiers[1].duo_scaling: 'maybe' is not one of: true, false, 'both'" in found


def test_unknown_preset_and_version():
    found = problems("version: 0\nscheme: W5A5\nstages: [{name: a, modifiers: [{type: rtn}]}]\n")
    assert "version: 0 is not a recipe version this rqat_sdk reads (it reads version 1)" in found
    assert any(p.startswith("scheme: unknown preset 'W5A5'") for p in found)
    # a newer format is reported alone: its other fields may be valid there
    assert problems("version: 2\nscheme: W5A5\nstages: []\n") == [
        "version: 2 is a newer recipe format than this rqat_sdk reads (format version 1); install a release of "
        "rqat_sdk that reads format version 2"]


def test_duplicate_yaml_keys_and_syntax_errors_give_lines():
    (message,) = problems("version: 1\nscheme: W4A16\nversion: 1\n")
    assert message == "line 3, column 1: YAML error: duplicate key 'version' (first at line 1)"
    (message,) = problems("version: 1\nscheme: [W4A16\n")
    assert message.startswith("line 3") and "YAML error" in message
    (message,) = problems("- just a list")
    assert "a recipe is a YAML mapping" in message


def billion_laughs(levels: int = 9) -> str:
    lines = ['a0: &a0 "lol"']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, levels + 1)]
    return "\n".join(lines) + f"\nversion: 1\nscheme: W4A16\nname: *a{levels}\nstages: []\n"


def test_a_yaml_alias_bomb_is_refused_quickly_with_a_short_message(tmp_path):
    import time

    path = tmp_path / "bomb.yaml"
    path.write_text(billion_laughs())
    started = time.perf_counter()
    with pytest.raises(RecipeError) as info:
        load_recipe(str(path))
    assert time.perf_counter() - started < 5
    (message,) = info.value.problems
    assert "aliases (*name) written out" in message and "more than a recipe may hold" in message
    assert len(str(info.value)) < 1000
    # A few aliases are fine, and a value echoed by an error message is cut short.
    assert Recipe.from_yaml("version: 1\nscheme: &s W4A16\nname: n\nstages: [{name: a, modifiers: [{type: rtn}]}]\n")
    (message,) = problems(
        f"version: 1\nscheme: W4A16\nname: {['x' * 10_000] * 50}\nstages: [{{name: a, modifiers: [{{type: rtn}}]}}]\n"
    )
    assert message.startswith("name: ") and len(message) < 600


def test_an_oversized_recipe_is_refused_before_it_is_parsed(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text("version: 1\n" + "# padding\n" * 200_000)
    with pytest.raises(RecipeError, match=r"2000011 bytes is more than a recipe may hold \(1048576\)"):
        Recipe.from_file(path)
    (message,) = problems("[" * 100_000)
    assert message == "the YAML is nested too deeply to be a recipe"


def test_semantic_checks():
    twice = problems(with_stage("[{type: rtn}, {type: gptq}]"))
    assert twice == [
        "stages[0].modifiers[1]: the model is already quantized by stages[0].modifiers[0]; a recipe quantizes once"
    ]
    late = problems(with_stage("[{type: gptq}, {type: rotation}]"))
    assert late == [
        "stages[0].modifiers[1]: rotation must come before the quantizing modifier at stages[0].modifiers[0]"
    ]
    no_quantizer = problems(with_stage("[{type: rotation}]"))
    assert no_quantizer == ["stages: no modifier quantizes the model; add one of rtn, gptq or awq"]
    awq = problems(with_stage("[{type: awq}]", scheme="W8A8"))
    assert awq == ["stages[0].modifiers[0]: awq is weight-only; scheme W8A8 quantizes activations or the KV cache"]
    names = ("version: 1\nscheme: W4A16\n"
             "stages: [{name: a, modifiers: [{type: rtn}]}, {name: a, modifiers: [{type: rotation}]}]")
    found = problems(names)
    assert "stages[1].name: 'a' is already the name of stages[0]" in found
    assert "stages[1].modifiers[0]: rotation must come before the quantizing modifier at stages[0].modifiers[0]" \
        in found


def test_schemes_the_exporter_cannot_write_are_refused_at_load():
    w4a8 = "{weights: {num_bits: 4}, input_activations: {num_bits: 8}}"
    (message,) = problems(with_stage("[{type: rtn}]", scheme=w4a8))
    assert message.startswith("scheme: W4A8 is not exportable")


def test_stage_names_are_checked():
    (message,) = problems("version: 1\nscheme: W4A16\nstages: [{name: 'bad name', modifiers: [{type: rtn}]}]")
    assert message.startswith("stages[0].name: string should match pattern")


def test_recipe_naming_code_validates_without_importing_it(tmp_path, monkeypatch):
    marker = tmp_path / "imported"
    (tmp_path / "evil_loader.py").write_text(f"open({str(marker)!r}, 'w').write('x')\ndef load(**kw): return []\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    recipe = Recipe.from_yaml(with_stage("[{type: gptq}]", data="{source: 'python:evil_loader:load'}"))
    assert recipe.code_references() == [("stages[0].data.source", "python:evil_loader:load")]
    assert not marker.exists() and "evil_loader" not in sys.modules
    bad = problems(with_stage("[{type: gptq}]", data="{source: 'python:evil_loader'}"))
    assert bad == ["stages[0].data.source: 'python:evil_loader' is not of the form 'python:package.module:function'"]


def test_a_data_mixture_weighs_its_sources_and_names_its_code():
    recipe = Recipe.from_yaml(with_stage("[{type: gptq}]", data="{source: {testbed: 3, 'python:pkg.mod:rows': 1}}"))
    assert recipe.stages[0].data.source == {"testbed": 3.0, "python:pkg.mod:rows": 1.0}
    assert recipe.code_references() == [("stages[0].data.source", "python:pkg.mod:rows")]
    (message,) = problems(with_stage("[{type: gptq}]", data="{source: {testbed: 0}}"))
    assert message == "stages[0].data.source: testbed: a share must be a positive number, got 0.0"
    (message,) = problems(with_stage("[{type: gptq}]", data="{source: {}}"))
    assert message == "stages[0].data.source: a mixture needs at least one source"


def test_load_recipe_accepts_every_form(tmp_path):
    recipe = Recipe.from_yaml(GOOD)
    path = tmp_path / "r.yaml"
    recipe.save(path)
    assert load_recipe(path) == recipe
    assert load_recipe(str(path)) == recipe
    assert load_recipe(GOOD) == recipe
    assert load_recipe(yaml.safe_load(GOOD)) == recipe
    assert load_recipe(recipe) is recipe
    with pytest.raises(RecipeError, match="recipe file 'missing.yaml' does not exist"):
        load_recipe("missing.yaml")


def test_fingerprint_tracks_what_a_stage_depends_on():
    recipe = Recipe.from_yaml(GOOD)
    renamed = recipe.model_copy(update={"name": "other", "description": "changed"})
    assert renamed.fingerprint() == recipe.fingerprint()
    reseeded = Recipe.from_yaml(GOOD.replace("name: example", "name: example\nseed: 7"))
    assert reseeded.fingerprint(0) != recipe.fingerprint(0)


def test_json_schema_and_reference_docs_are_up_to_date():
    schema = recipe_json_schema()
    assert schema["$schema"].startswith("https://json-schema.org/")
    assert schema["additionalProperties"] is False
    assert json.loads((REPO / "docs" / "recipe.schema.json").read_text()) == schema, (
        "docs/recipe.schema.json is stale: run `python -m rqat_sdk.recipe.schema docs`"
    )
    assert (REPO / "docs" / "recipe-reference.md").read_text() == reference_markdown() + "\n", (
        "docs/recipe-reference.md is stale: run `python -m rqat_sdk.recipe.schema docs`"
    )


def test_json_schema_accepts_bundled_recipes_and_rejects_unknown_keys():
    jsonschema = pytest.importorskip("jsonschema")
    validator = jsonschema.Draft202012Validator(recipe_json_schema())
    for path in bundled().values():
        validator.validate(yaml.safe_load(path.read_text()))
    bad = yaml.safe_load(GOOD)
    bad["stages"][0]["modifiers"][1]["dampning"] = 0.1
    assert list(validator.iter_errors(bad))


def test_bundled_recipes_can_be_named(tmp_path, monkeypatch):
    assert load_recipe("gptq_w3g128") == Recipe.from_file(bundled()["gptq_w3g128"])
    monkeypatch.chdir(tmp_path)
    (tmp_path / "gptq_w3g128").write_text("version: 1\nscheme: W2G64\nstages: [{name: a, modifiers: [{type: rtn}]}]\n")
    assert load_recipe("gptq_w3g128").scheme.label == "W2G64", "a local file wins over a bundled name"


@pytest.mark.parametrize("document", ["README.md", "docs/recipes.md"])
def test_recipe_examples_in_the_docs_are_valid(document):
    import re

    blocks = re.findall(r"```yaml\n(.*?)```", (REPO / document).read_text(), flags=re.S)
    assert blocks, f"{document} has no YAML example"
    for block in blocks:
        Recipe.from_yaml(block, source=document)
