"""Recipes: every shipped YAML validates; bad keys and bad values are rejected with the key named."""

from __future__ import annotations

from pathlib import Path

import pytest

from components.common.config import ConfigError
from components.common.recipe import Recipe, load_recipe, parse_recipe

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))

MINIMAL = """
name: t
model: {name: ViT-B-32}
batch_size: 64
stages: [{name: pretrain, samples: 1000, base_lr: 1.0e-3}]
"""


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_recipes_validate(path):
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe) and recipe.stages


def test_demo_recipe_values():
    recipe = load_recipe(Path(__file__).parents[1] / "configs" / "demo.yaml")
    assert recipe.objective.name == "fastclip" and recipe.objective.fastclip.version == "v3"
    assert [s.name for s in recipe.stages] == ["pretrain", "finetune"]
    assert recipe.lr(recipe.stages[0]) == pytest.approx(recipe.stages[0].base_lr * recipe.batch_size / 256)
    assert recipe.resolutions() == (16, 32)  # stage 1 at 16 px, the model's 32 px in stage 2


def test_defaults_follow_the_spec():
    recipe = parse_recipe(MINIMAL)
    assert recipe.objective.name == "clip"
    assert recipe.optimizer.betas == (0.9, 0.95) and recipe.optimizer.weight_decay == 0.2
    assert recipe.objective.fastclip.gamma_min == 0.2 and recipe.objective.fastclip.eps == 1e-14
    assert recipe.objective.amorlip.rho == [8.5, -8.5, -8.5]
    assert recipe.precision == "auto" and recipe.compile == "auto"  # accelerator.py resolves them per device


def _error(text: str) -> str:
    with pytest.raises(ConfigError) as err:
        parse_recipe(text)
    return str(err.value)


def test_unknown_key_is_named_with_the_allowed_keys():
    message = _error(MINIMAL + "objective: {name: fastclip, fastclip: {gama_min: 0.5}}\n")
    assert "unknown key 'objective.fastclip.gama_min'" in message
    assert "gamma_min" in message.split("allowed keys here:")[1]


def test_unknown_top_level_key():
    assert "unknown key 'bach_size'" in _error(MINIMAL + "bach_size: 3\n")


def test_out_of_range_value_names_the_key():
    message = _error(MINIMAL.replace("batch_size: 64", "batch_size: 0"))
    assert "batch_size" in message and "greater than 0" in message
    message = _error(MINIMAL + "objective: {name: fastclip, fastclip: {gamma_min: 1.5}}\n")
    assert "objective.fastclip.gamma_min" in message and "1.5" in message


def test_bad_choice_lists_allowed_values():
    message = _error(MINIMAL + "objective: {name: infonce}\n")
    assert "objective.name" in message and "'infonce'" in message
    for allowed in ("clip", "siglip", "fastclip", "amorlip"):
        assert allowed in message
    message = _error(MINIMAL.replace("base_lr: 1.0e-3}", "base_lr: 1.0e-3, text: {mask: nouns}}"))
    assert "stages[0].text.mask" in message and "syntax" in message


def test_settings_for_another_objective_are_rejected():
    message = _error(MINIMAL + "objective: {name: clip, amorlip: {lambda_steps: 2}}\n")
    assert "amorlip" in message and "'clip'" in message


def test_every_problem_is_reported_at_once():
    error = pytest.raises(ConfigError, parse_recipe, MINIMAL.replace("batch_size: 64", "batch_size: -1") + "x: 1\n")
    assert len(error.value.problems) == 2


def test_missing_required_key_and_bad_yaml():
    assert "'stages' is required" in _error("name: t\nmodel: {name: ViT-B-32}\nbatch_size: 8\n")
    assert "not valid YAML" in _error("name: [unclosed\n")
    assert "mapping" in _error("- just\n- a list\n")


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="(?s)nope.yaml.*file not found"):
        load_recipe(tmp_path / "nope.yaml")
