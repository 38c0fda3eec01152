"""The fair accuracy protocol's statistics, choice rule and recipe check (benchmarks/accuracy.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks import accuracy as A
from civic_vllm.evaluation import request_kwargs


def _scored(correct, small, ground) -> A.Scored:
    correct = np.array(correct, dtype=bool)
    return A.Scored(correct, {"overall": np.ones(len(correct), dtype=bool), "small": np.array(small, dtype=bool),
                              "ground": np.array(ground, dtype=bool)})


def test_figures_and_paired_intervals():
    rng = np.random.default_rng(0)
    n = 600
    small, ground = rng.random(n) < 0.3, rng.random(n) < 0.2
    ref = _scored(rng.random(n) < 0.6, small, ground)
    same = _scored(ref.correct.copy(), small, ground)
    idx = A.bootstrap_indices(n)
    f = A.figure(ref, "overall", idx)
    assert f["ci95"][0] < f["value"] < f["ci95"][1] and f["n"] == n
    assert A.figure(ref, "small", idx)["n"] == int(small.sum())
    p = A.paired(same, ref, "ground", idx)
    assert p["share"] == 1.0 and p["share_ci95"] == [1.0, 1.0] and p["difference_ci95"] == [0.0, 0.0]
    better = _scored(ref.correct | (rng.random(n) < 0.5), small, ground)
    p = A.paired(better, ref, "overall", idx)
    assert p["difference"] > 0 and p["difference_ci95"][0] > 0  # paired: a sure gain has a positive interval


def test_checks_and_choice():
    n = 400
    small = np.arange(n) % 4 == 0
    ground = np.arange(n) % 5 == 0
    ref = _scored(np.arange(n) % 10 < 6, small, ground)
    civic = _scored(np.arange(n) % 10 < 6, small, ground)
    weak = _scored(np.arange(n) % 10 < 3, small, ground)
    close = _scored(np.arange(n) % 10 < 5, small, ground)
    idx = A.bootstrap_indices(n)
    result = A.checks(civic, ref, {"pool": weak, "random": close}, idx)
    by_goal = {c["goal"]: c["pass"] for c in result}
    assert by_goal["civic overall >= 99% of full, same budget"]
    assert by_goal["civic overall >= pool + 5 points"] and by_goal["civic small >= pool + 5 points"]
    assert by_goal["civic overall >= random + 5 points"]  # exactly +10 points here
    assert len(result) == len(A.METRICS) + 2 * len(A.MARGIN_METRICS)
    worse = A.checks(weak, ref, {}, idx)
    assert not any(c["pass"] for c in worse)
    chosen, worst = A.choose({"a": weak, "b": civic}, ref)
    assert chosen == "b" and worst["b"] == 1.0 and worst["a"] < 1.0


def test_recipe_match_requires_the_same_recipe_and_budget(tmp_path: Path):
    from dataclasses import asdict

    from civic_vllm.cli.distill import parse_recipe
    from civic_vllm.training.distill import DISTILL_MARKER

    teacher = tmp_path / "teacher"
    by_name = {c.name: c for c in A.CONTENDERS}
    learned = by_name["learned-exit1"]
    student = tmp_path / learned.name
    student.mkdir()
    recipe = asdict(parse_recipe([*A.COMMON_DISTILL, *learned.distill_args]))  # what civic distill records
    done = {**recipe, "teacher": str(teacher.resolve()), "stopped_early": False, "cpu_min": 15.0}
    (student / DISTILL_MARKER).write_text(json.dumps(done))
    assert A.recipe_matches(student, str(teacher), learned, 15.0)
    assert not A.recipe_matches(student, str(teacher), learned, 20.0)  # budget not met ...
    assert A.same_recipe(student, str(teacher), learned)["cpu_min"] == 15.0  # ... but it can be continued
    assert A.same_recipe(student, str(tmp_path / "other"), learned) is None
    assert not A.recipe_matches(student, str(teacher), by_name["pool-exit1"], 15.0)  # another policy
    # the same policy with other scorer settings is another contender
    assert not A.recipe_matches(student, str(teacher), by_name["learned-st-exit1"], 15.0)
    for key, value in (("exit_layer", None), ("lr", 1e-4), ("ce_weight", 0.0), ("stopped_early", True),
                       ("scorer_lr", 0.0), ("straight_through", True), ("seed", 1)):
        (student / DISTILL_MARKER).write_text(json.dumps({**done, key: value}))
        assert not A.recipe_matches(student, str(teacher), learned, 15.0), key
    # a record from before a recipe field existed ran with that field's default
    (student / DISTILL_MARKER).write_text(json.dumps({k: v for k, v in done.items() if k != "exit_context"}))
    assert A.recipe_matches(student, str(teacher), learned, 15.0)
    (student / DISTILL_MARKER).write_text(json.dumps({**done, "exit_context": True}))
    assert not A.recipe_matches(student, str(teacher), learned, 15.0)
    # scorer settings do not matter to a student without a scorer, nor the serve ratio to a full one
    full = by_name["full-same-budget"]
    (student / DISTILL_MARKER).write_text(json.dumps({**done, "policy": "civic", "exit_layer": None, "ratios": [1.0],
                                                      "scorer_lr": 1e-3, "serve_ratio": 0.5}))
    assert A.recipe_matches(student, str(teacher), full, 15.0)


def test_the_protocols_feature_weight_is_every_contenders_recipe_but_downscales(tmp_path: Path):
    """--feature-weight W is part of each student's recipe (a student without it is not reused), and
    downscale, whose image has other groups, trains without it."""
    from dataclasses import asdict

    from civic_vllm.cli.distill import parse_recipe
    from civic_vllm.training.distill import DISTILL_MARKER

    by_name = {c.name: c for c in A.CONTENDERS}
    for c in A.CONTENDERS:
        recipe = parse_recipe(c.recipe_args(0.5))
        assert recipe.feature_weight == (0.0 if c.name == "downscale" else 0.5), c.name
        assert parse_recipe(c.recipe_args()).feature_weight == 0.0
    teacher, civic = tmp_path / "teacher", by_name["civic-ctx-exit1"]
    student = tmp_path / civic.name
    student.mkdir()
    done = {**asdict(parse_recipe(civic.recipe_args(0.5))), "teacher": str(teacher.resolve()),
            "stopped_early": False, "cpu_min": 15.0}
    (student / DISTILL_MARKER).write_text(json.dumps(done))
    assert A.recipe_matches(student, str(teacher), civic, 15.0, feature_weight=0.5)
    assert not A.recipe_matches(student, str(teacher), civic, 15.0)  # the protocol without the term
    assert not A.recipe_matches(student, str(teacher), civic, 15.0, feature_weight=1.0)


def test_every_contender_shares_the_recipe_and_differs_only_in_retention():
    names = [c.name for c in A.CONTENDERS]
    assert len(set(names)) == len(names)
    assert {c.role for c in A.CONTENDERS} == {"reference", "civic", "baseline"}
    for c in A.CONTENDERS:
        assert not set(c.distill_args[::2]) & set(A.COMMON_DISTILL[::2])  # nobody overrides the shared recipe
        if c.role != "reference":
            assert c.ratio == A.GOAL_RATIO and c.exit_layer in (None, 1)


def test_the_default_method_sends_no_civic_setting():
    assert request_kwargs("default", 1 / 3, None, (448, 448), None) == {}
    assert request_kwargs("civic", 0.5, 1, (448, 448), None) == {"civic_policy": "civic", "civic_ratio": 0.5,
                                                                  "civic_exit_layer": 1}


@pytest.mark.parametrize("seed", [A.VAL_SEED, A.TEST_SEED])
def test_protocol_seeds_are_fresh(seed):
    from civic_vllm.training import train as T

    assert seed not in (A.DATA_SEED, T.EVAL_SEED, 0, 77, 2026)
