"""Recipes are parsed, validated and format-checked before any work starts."""

import pytest

from kfopt.errors import KfoptError
from kfopt.plugins.manager import registry
from kfopt.recipe import parse_recipe, plan


@pytest.fixture(scope="module")
def techniques():
    return registry()


def test_inline_recipe_keeps_order_and_typed_values():
    recipe = parse_recipe("prune(target_sparsity=0.8, method=structured, m_by_n=2:4)>quantize(mode=int8)")
    assert [s.technique for s in recipe.steps] == ["prune", "quantize"]
    assert recipe.steps[0].config == {"target_sparsity": 0.8, "method": "structured", "m_by_n": "2:4"}
    assert str(parse_recipe(str(recipe))) == str(recipe)


def test_yaml_recipe(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: small\nsteps:\n  - prune: {target_sparsity: 0.9}\n  - quantize: {mode: int8}\n")
    recipe = parse_recipe(str(path))
    assert recipe.label == "small"
    assert recipe.steps[1].config == {"mode": "int8"}


def test_plan_fills_defaults(techniques):
    planned = plan(parse_recipe("prune>quantize(mode=dynamic)"), techniques)
    assert planned[0].config.target_sparsity == pytest.approx(0.8)
    assert [p.output_format for p in planned] == ["keras", "tflite"]


def test_wrong_order_fails_saying_what_comes_first(techniques):
    with pytest.raises(KfoptError) as err:
        plan(parse_recipe("quantize(mode=int8)>prune"), techniques)
    text = str(err.value)
    assert "'prune' needs a keras model" in text and "produces a tflite model" in text
    assert "put 'prune' before 'quantize'" in text


def test_unknown_technique_suggests_nearest(techniques):
    with pytest.raises(
        KfoptError,
        match=r"Unknown technique 'prun'\. Did you mean 'prune'\?.*Valid techniques: accelerate, distill, prune, quantize",
    ):
        plan(parse_recipe("prun"), techniques)


def test_unknown_key_lists_valid_keys(techniques):
    with pytest.raises(KfoptError, match=r"unknown config key 'sparsity'.*Valid keys: method, target_sparsity, epochs"):
        plan(parse_recipe("prune(sparsity=0.5)"), techniques)


def test_out_of_range_value_names_it(techniques):
    with pytest.raises(KfoptError, match=r"target_sparsity=1\.5 is invalid: Input should be less than 1"):
        plan(parse_recipe("prune(target_sparsity=1.5)"), techniques)


def test_bad_choice_lists_choices(techniques):
    with pytest.raises(
        KfoptError, match=r"mode='int4' is invalid: Input should be 'dynamic', 'float16', 'int8' or 'qat'"
    ):
        plan(parse_recipe("quantize(mode=int4)"), techniques)


@pytest.mark.parametrize("text", ["", "prune>>quantize", "prune(target_sparsity)", "prune(0.5"])
def test_malformed_inline_recipes_are_user_errors(text):
    with pytest.raises(KfoptError):
        parse_recipe(text)


def test_missing_recipe_file():
    with pytest.raises(KfoptError, match="does not exist"):
        parse_recipe("nope.yaml")
