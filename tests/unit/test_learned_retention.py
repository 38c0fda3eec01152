"""The learned early-retention scorer, its selection and the recipe a checkpoint carries."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from civic_vllm.hf_compact import _straight_through_gate
from civic_vllm.recipe import SCORER_FILE, CivicRecipe, load_scorer, read_recipe, recipe_of, write_recipe
from civic_vllm.retention.base import cell_ids, lattice_shape
from civic_vllm.retention.learned import (
    FLOOR_FRACTION,
    ScorerConfig,
    TokenScorer,
    keep_logits,
    learned_select,
    prior_score,
    saliency_loss,
)
from civic_vllm.retention.selection import ImageRetention, select_image_tokens
from civic_vllm.settings import CivicSettingsError


def _rows(h: int, w: int, dim: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randn(4 * h * w, dim, generator=torch.Generator().manual_seed(seed))


def _trained_looking(config: ScorerConfig, seed: int = 0) -> TokenScorer:
    """A scorer whose zero-initialised layers hold random weights, as after training."""
    torch.manual_seed(seed)
    scorer = TokenScorer(config)
    for layer in (scorer.out, scorer.query):
        torch.nn.init.normal_(layer.weight, std=0.5)
    return scorer.eval()


@pytest.mark.parametrize("grid,k", [((7, 9), 20), ((4, 4), 1), ((12, 5), 59), ((3, 3), 9), ((1, 10), 4)])
def test_learned_select_keeps_k_sorted_unique_with_a_coverage_floor(grid, k):
    h, w = grid
    scores = torch.randn(h * w, generator=torch.Generator().manual_seed(h * w + k))
    kept = learned_select(scores, grid, k)
    assert kept.dtype == torch.long and len(kept) == k
    assert torch.equal(kept, torch.unique(kept)) and int(kept.min()) >= 0 and int(kept.max()) < h * w
    rows, cols = lattice_shape(h, w, min(k, max(1, round(FLOOR_FRACTION * k))))
    cells = cell_ids(h, w, rows, cols)
    assert set(cells[kept].tolist()) == set(range(rows * cols))  # every coverage cell keeps a token
    for cell in range(rows * cols):  # ... and it is that cell's best
        members = (cells == cell).nonzero().squeeze(1)
        assert int(members[scores[members].argmax()]) in kept.tolist()


def test_learned_select_fills_with_the_best_scores_and_breaks_ties_deterministically():
    scores = torch.zeros(64)
    scores[[5, 17, 40, 63]] = torch.tensor([4.0, 3.0, 2.0, 1.0])
    kept = learned_select(scores, (8, 8), 8)  # floor of 2 cells + 6 best
    assert {5, 17, 40, 63} <= set(kept.tolist())
    assert torch.equal(kept, learned_select(scores.clone(), (8, 8), 8))
    flat = learned_select(torch.zeros(64), (8, 8), 8)
    assert torch.equal(flat, learned_select(torch.zeros(64), (8, 8), 8))
    with pytest.raises(ValueError, match="k must be in"):
        learned_select(scores, (8, 8), 65)


def test_an_untrained_scorer_ranks_exactly_like_the_training_free_prior():
    rows = _rows(6, 7)
    scorer = TokenScorer(ScorerConfig(in_dim=16))
    features = rows.reshape(-1, 4, 16).mean(dim=1)
    torch.testing.assert_close(scorer(rows, (6, 7)), prior_score(features, (6, 7)))


def test_learned_policy_in_the_shared_selection_step():
    rows, grid = _rows(6, 8, seed=3), (6, 8)
    scorer = _trained_looking(ScorerConfig(in_dim=16))
    plan = ImageRetention(grid_hw=grid, num_kept=16, policy="learned", exit_layer=1)
    kept, scores = select_image_tokens(rows, rows, plan, scorer)
    assert torch.equal(kept, learned_select(scores, grid, 16)) and scores.shape == (48,)
    civic, no_scores = select_image_tokens(rows, rows, ImageRetention(grid, 16, "civic"))
    assert no_scores is None and not torch.equal(kept, civic)  # the trained residual changes the choice
    with pytest.raises(ValueError, match="trained CIVIC scorer"):
        select_image_tokens(rows, rows, plan, None)


def test_the_straight_through_gate_is_one_and_passes_gradients_to_the_scores():
    rows, grid = _rows(5, 5, seed=4), (5, 5)
    scorer = _trained_looking(ScorerConfig(in_dim=16))
    plan = ImageRetention(grid_hw=grid, num_kept=8, policy="learned", exit_layer=1)
    kept, scores = select_image_tokens(rows, rows, plan, scorer)
    other = torch.arange(3)  # a second image that did not select at this block
    gate = _straight_through_gate([kept, other], [0], [scores, None], [plan, ImageRetention((1, 3), 3, "civic")])
    assert gate.shape == (4 * (8 + 3),)
    torch.testing.assert_close(gate, torch.ones_like(gate))
    (gate * torch.arange(len(gate), dtype=torch.float32)).sum().backward()
    assert scorer.out.weight.grad is not None and float(scorer.out.weight.grad.abs().sum()) > 0
    assert float(keep_logits(scores, 8).detach().topk(8).values[-1]) == 0.0


def test_recipe_round_trip_and_validation(tmp_path: Path):
    config = {"architectures": ["Qwen3VLForConditionalGeneration"]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert read_recipe(tmp_path) is None and recipe_of(config) is None
    scorer = _trained_looking(ScorerConfig(in_dim=16, hidden=8, context=4))
    recipe = CivicRecipe(ratio=1 / 3, policy="learned", exit_layer=1, scorer=scorer.config)
    write_recipe(tmp_path, recipe, scorer)
    assert read_recipe(tmp_path) == recipe
    assert recipe.as_mm_kwargs() == {"civic_ratio": 1 / 3, "civic_policy": "learned", "civic_exit_layer": 1,
                                     "civic_exit_context": False}
    context = CivicRecipe(ratio=1 / 3, policy="civic", exit_layer=1, exit_context=True)
    assert recipe_of({"civic": context.to_dict()}) == context and context.settings().exit_context
    legacy = {"ratio": 0.5, "policy": "civic", "exit_layer": 1, "scorer": None}  # written before exit_context
    assert recipe_of({"civic": legacy}).exit_context is False
    from civic_vllm.recipe import layered_settings

    assert layered_settings(recipe, {"civic_ratio": 0.5}) == {**recipe.as_mm_kwargs(), "civic_ratio": 0.5}
    assert layered_settings(None, None) == {}
    loaded = load_scorer(tmp_path, recipe)
    rows = _rows(4, 4)
    torch.testing.assert_close(loaded(rows, (4, 4)), scorer(rows, (4, 4)))

    for bad, match in (({"ratio": 0}, "ratio"), ({"policy": "best"}, "policy"), ({"exit_layer": 0}, "exit_layer"),
                       ({"policy": "learned"}, "needs a scorer"), ({"ratio": 0.5, "speed": 2}, "unknown key")):
        with pytest.raises(CivicSettingsError, match=match):
            recipe_of({"civic": bad})
    with pytest.raises(ValueError, match="exactly when scorer weights"):
        write_recipe(tmp_path, CivicRecipe(ratio=0.5, policy="civic", exit_layer=None), scorer)


def test_the_scorer_file_stays_out_of_the_weight_files_vllm_streams(tmp_path: Path):
    """vLLM loads every top-level *.safetensors; vanilla Qwen3-VL would fail on scorer names."""
    (tmp_path / "config.json").write_text("{}")
    config = ScorerConfig(in_dim=16, hidden=8, context=4)
    write_recipe(tmp_path, CivicRecipe(ratio=0.5, policy="learned", exit_layer=2, scorer=config),
                 _trained_looking(config))
    assert (tmp_path / SCORER_FILE).is_file() and not list(tmp_path.glob("*.safetensors"))
    (tmp_path / SCORER_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="is missing"):
        load_scorer(tmp_path, read_recipe(tmp_path))


def test_attach_recipe_gives_random_checkpoints_a_working_scorer(tmp_path: Path):
    (tmp_path / "config.json").write_text("{}")
    recipe = CivicRecipe(ratio=0.25, policy="learned", exit_layer=1, scorer=ScorerConfig(in_dim=16))
    from civic_vllm.recipe import attach_recipe

    attach_recipe(tmp_path, recipe, seed=3)
    scorer = load_scorer(tmp_path, read_recipe(tmp_path))
    rows = _rows(6, 6)
    prior = prior_score(rows.reshape(-1, 4, 16).mean(dim=1), (6, 6))
    assert not torch.allclose(scorer(rows, (6, 6)), prior)  # not the untrained prior
    attach_recipe(tmp_path, CivicRecipe(ratio=0.5, policy="civic", exit_layer=None))
    assert read_recipe(tmp_path).scorer is None


def test_saliency_loss_is_zero_at_the_target_ranking_and_learnable():
    target = torch.randn(50, generator=torch.Generator().manual_seed(1))
    assert float(saliency_loss(6.0 * target + 3.0, target, 6.0)) == pytest.approx(0.0, abs=1e-5)
    rows = _rows(5, 10, seed=2)
    scorer = TokenScorer(ScorerConfig(in_dim=16))
    optimizer = torch.optim.AdamW(scorer.parameters(), lr=1e-2)
    first = None
    for _ in range(30):
        loss = saliency_loss(scorer(rows, (5, 10)), target, 6.0)
        first = float(loss.detach()) if first is None else first
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert float(loss) < 0.5 * first  # a proper loss of the parameters: gradient steps reduce it
