"""benchmarks.serve without servers: the configurations' request settings and the recipe checkpoint."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import pytest

from benchmarks import serve
from civic_vllm.model_factory import make_model
from civic_vllm.recipe import SCORER_FILE, load_scorer, read_recipe


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_model("tiny", tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture()
def models_dir(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("CIVIC_MODELS_DIR", str(tmp_path / "models"))  # where the recipe copy goes
    return tmp_path / "models"


def run_for(tiny: Path, *extra: str) -> serve.Run:
    args = serve.build_parser().parse_args(["--model", str(tiny), "--out", "/tmp/civic-test-serve.json", *extra])
    args.quick = False
    return serve.build_run(args)


def mm_kwargs(run: serve.Run, label: str) -> dict | None:
    config = next(c for c in run.probe_configs if c.label == label)
    spec = serve.WORKLOADS["image-dominated"]
    return run.workload(spec, config).body("m", index=0).get("mm_processor_kwargs")


def test_recipe_is_attached_to_a_copy_that_both_servers_serve(tiny, models_dir):
    config_before = (tiny / "config.json").read_text()
    run = run_for(tiny)
    # tiny: vision depth 4, hidden 128 -> exit layer max(1, 4 // 4) = 1
    assert run.model == models_dir / f"tiny{serve.RECIPE_COPY_SUFFIX}"
    recipe = read_recipe(run.model)
    assert (recipe.ratio, recipe.policy, recipe.exit_layer) == (pytest.approx(1 / 3), "learned", 1)
    assert recipe.scorer.in_dim == 128
    scorer = load_scorer(run.model, recipe)
    assert any(p.abs().sum() > 0 for name, p in scorer.named_parameters() if name.startswith("out"))  # not the prior
    assert run.recipe["exit_layer"] == 1 and run.recipe["policy"] == "learned"
    assert run.recipe["scorer"] == {"in_dim": 128, "hidden": 64, "context": 32}
    # the source checkpoint is untouched; the weights are the same files
    assert (tiny / "config.json").read_text() == config_before and not (tiny / SCORER_FILE).exists()
    assert (run.model / "model.safetensors").read_bytes() == (tiny / "model.safetensors").read_bytes()
    # rebuilt idempotently on the next run
    assert run_for(tiny).model == run.model


def test_civic_default_sends_no_settings_and_the_others_send_all(tiny, models_dir):
    run = run_for(tiny)
    labels = [c.label for c in run.configs]
    assert labels == ["vanilla", "civic r=1/3", "civic r=1/3 exit 1", "civic default"]
    default = run.configs[-1]
    assert default.default and default.ratio == Fraction(1, 3) and default.exit_layer == 1
    assert default.policy == "learned" and default.settings == {}
    assert "civic default" in [c.label for c in run.probe_configs]
    assert default in run.main_configs
    assert mm_kwargs(run, "civic default") is None
    assert mm_kwargs(run, "vanilla") is None
    # every other civic configuration names ratio, policy and exit layer (null: after the last block)
    assert mm_kwargs(run, "civic r=1/3") == {"civic_ratio": pytest.approx(1 / 3), "civic_policy": "civic",
                                             "civic_exit_layer": None}
    assert mm_kwargs(run, "civic r=1/3 exit 1") == {"civic_ratio": pytest.approx(1 / 3), "civic_policy": "civic",
                                                    "civic_exit_layer": 1}
    assert mm_kwargs(run, "civic r=1") == {"civic_ratio": 1.0, "civic_policy": "civic", "civic_exit_layer": None}


def test_default_config_checks(tiny, models_dir):
    run = run_for(tiny)
    default = run.configs[-1]
    rows = [{"workload": serve.ACCEPT_WORKLOAD, "config": "civic default", "concurrency": c,
             "output_tok_per_s_civic_over_vanilla": 2.5, "ttft_p95_speedup": 0.9 if c == 1 else 3.0}
            for c in run.bounds.concurrency]
    probe = {"civic default": {"client_ttft_speedup": 2.1, "client_ttft_speedup_ci95": [2.0, 2.2]}}
    checks = {c["goal"]: c for c in serve.config_checks(run, default, [], probe, rows)}
    assert set(checks) == {"ttft", "throughput_c8", "ttft_p95_all"}
    assert checks["ttft"]["target"] == 2.0 and checks["ttft"]["pass"]
    assert checks["throughput_c8"]["pass"]
    assert not checks["ttft_p95_all"]["pass"] and checks["ttft_p95_all"]["value"] == 0.9  # c=1 counts too


def test_recipe_flags_and_no_recipe(tiny, models_dir):
    run = run_for(tiny, "--recipe-exit-layer", "none", "--recipe-seed", "3")
    assert read_recipe(run.model).exit_layer is None and run.recipe["seed"] == 3
    assert run.configs[-1].label == "civic default" and run.configs[-1].exit_layer is None
    plain = run_for(tiny, "--no-recipe")
    assert plain.model == tiny and plain.recipe is None
    assert "civic default" not in [c.label for c in plain.probe_configs]
    # a checkpoint that already has its own recipe is served with it
    own = run_for(run.model)
    assert own.model == run.model and own.recipe["source"] == "checkpoint"


def test_state_round_trip_keeps_the_default_config(tiny, models_dir, tmp_path):
    run = run_for(tiny)
    run.raw_dir = tmp_path
    path = serve.save_state(run, {})
    state = json.loads(path.read_text())
    assert state["recipe"]["exit_layer"] == 1
    args = serve.build_parser().parse_args(["--from-state", str(path)])
    loaded, _ = serve.load_state(path, args)
    assert [c.label for c in loaded.configs] == [c.label for c in run.configs]
    assert loaded.recipe == run.recipe
