"""A checkpoint that carries its CIVIC recipe is served with it by default, over HTTP.

The recipe checkpoint is the tiny model plus a recipe (r = 1/3, learned policy at vision block 1,
a seeded random-weight scorer): the same weights as the plain tiny servers, so ratio 1.0 on it
can be compared token for token with vanilla vLLM, and an overriding request with the plain
civic server.
"""

from __future__ import annotations

import shutil

import openai
import pytest
from helpers import MAX_TOKENS, chat, client_for, hf_reference, make_image, test_server

from civic_vllm.recipe import CivicRecipe, attach_recipe, load_scorer, read_recipe
from civic_vllm.retention.learned import ScorerConfig

pytestmark = pytest.mark.e2e

QUESTION = "What is in the picture?"
SIZES = [(448, 448), (640, 320), (320, 512)]


@pytest.fixture(scope="module")
def recipe_model(tiny_model, tmp_path_factory) -> str:
    import json
    from pathlib import Path

    out = tmp_path_factory.mktemp("recipe") / "tiny-recipe"
    shutil.copytree(tiny_model, out)
    vision_hidden = json.loads((Path(tiny_model) / "config.json").read_text())["vision_config"]["hidden_size"]
    attach_recipe(out, CivicRecipe(ratio=1 / 3, policy="learned", exit_layer=1,
                                   scorer=ScorerConfig(in_dim=vision_hidden)), seed=5)
    return str(out)


@pytest.fixture(scope="module")
def recipe_server(recipe_model):
    with test_server(recipe_model, civic=True) as server:
        yield server


@pytest.mark.parametrize("count", [1, 3], ids=["1img", "3img"])
def test_a_request_without_settings_gets_the_checkpoint_recipe(recipe_server, recipe_model, hf, count):
    images = [make_image(w, h, seed=11 * i + w) for i, (w, h) in enumerate(SIZES[:count])]
    recipe = read_recipe(recipe_model)
    scorer = load_scorer(recipe_model, recipe)
    prompt_len, tokens, logprobs = hf_reference(hf, images, QUESTION, recipe.ratio, recipe.policy,
                                                recipe.exit_layer, scorer=scorer)
    served = chat(recipe_server, images, QUESTION, max_tokens=MAX_TOKENS, ignore_eos=True)
    assert served.prompt_tokens == prompt_len
    assert served.token_ids == tokens
    assert served.logprobs == pytest.approx(logprobs, abs=2e-3)
    civic_prior = hf_reference(hf, images, QUESTION, recipe.ratio, "civic", recipe.exit_layer)
    assert civic_prior[1:] != (tokens, logprobs)  # the scorer, not the training-free prior, chose


def test_ratio_one_on_a_recipe_checkpoint_is_vanilla(recipe_server, vanilla_server):
    images = [make_image(w, h, seed=w + h) for w, h in SIZES]
    ours = chat(recipe_server, images, QUESTION, ratio=1.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    theirs = chat(vanilla_server, images, QUESTION, max_tokens=MAX_TOKENS, ignore_eos=True)
    assert (ours.prompt_tokens, ours.token_ids) == (theirs.prompt_tokens, theirs.token_ids)


def test_request_settings_override_the_recipe(recipe_server, civic_server):
    images = [make_image(448, 448, seed=9)]
    settings = {"ratio": 0.5, "policy": "civic", "exit_layer": None}
    ours = chat(recipe_server, images, QUESTION, max_tokens=MAX_TOKENS, ignore_eos=True, **settings)
    plain = chat(civic_server, images, QUESTION, max_tokens=MAX_TOKENS, ignore_eos=True, **settings)
    assert (ours.prompt_tokens, ours.token_ids) == (plain.prompt_tokens, plain.token_ids)


def test_the_learned_policy_on_a_checkpoint_without_a_scorer_is_a_400(civic_server):
    with pytest.raises(openai.BadRequestError, match="trained CIVIC scorer"):
        chat(civic_server, [make_image(256, 256)], ratio=0.5, policy="learned")
    assert client_for(civic_server).models.list().data  # still serving
