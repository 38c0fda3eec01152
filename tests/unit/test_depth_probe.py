"""benchmarks.depth_probe on the tiny preset: one round, a small image, the JSON's schema (~20 s)."""

from __future__ import annotations

import json

import pytest

from benchmarks import depth_probe


def test_depth_probe_writes_its_report(tmp_path, monkeypatch):
    monkeypatch.setenv("CIVIC_MODELS_DIR", str(tmp_path / "models"))  # the tiny preset is built here
    out = tmp_path / "results" / "depth_probe.json"
    argv = ["--preset", "tiny", "--size", "128", "--rounds", "1", "--exit-layers", "1,2", "--exit-context",
            "--out", str(out)]
    assert depth_probe.main(argv) == 0
    report = json.loads(out.read_text())
    assert out.with_suffix(".png").is_file() and report["plot"]
    for key in ("machine", "versions", "settings", "model", "image", "method", "configs", "warmup_s", "rounds",
                "rounds_done", "stopped_early", "results", "planner_limits", "created", "command", "duration_s"):
        assert key in report, key
    assert report["versions"]["torch"] and report["machine"]["cpu_count"]
    assert report["settings"]["threads"] == 2 and report["settings"]["dtype"] == "float32"
    assert report["settings"]["policy"] == "learned" and report["settings"]["scorer"]["in_dim"] == 128
    assert report["model"]["vision_depth"] == 4
    labels = ["full", "civic r=1/3 exit none", "civic r=1/3 exit 1", "civic r=1/3 exit 1 + context",
              "civic r=1/3 exit 2", "civic r=1/3 exit 2 + context"]
    assert [c["label"] for c in report["configs"]] == labels
    assert report["rounds_done"] == 1 and report["stopped_early"] is None
    (rnd,) = report["rounds"]
    assert set(rnd["times_s"]) == set(labels) and all(t > 0 for t in rnd["times_s"].values())
    assert sorted(rnd["order"]) == sorted(labels)
    # 128x128: 8x8 merged tokens, K = ceil(64 / 3) = 22
    assert report["image"]["visual_tokens"] == 64
    assert report["image"]["prompt_tokens_full"] == report["image"]["planner_prompt_tokens_full"]
    full = report["results"]["full"]
    assert full["speedup_vs_full"] == pytest.approx(1.0) and full["kept_tokens"] == 64
    assert set(report["planner_limits"]) == set(labels[1:])
    for label in labels[1:]:
        entry, lim = report["results"][label], report["planner_limits"][label]
        assert entry["n"] == 1 and entry["median_s"] > 0 and entry["speedup_vs_full"] > 0
        assert entry["speedup_ci95"] is None  # one round: no interval
        assert entry["kept_tokens"] == 22 and entry["prompt_tokens_hf"] == entry["prompt_tokens_planner"]
        assert entry["flop_limit"] == lim["prefill_speedup_limit"] > 1
        for part in ("vision_flops", "llm_flops", "prefill_flops"):
            assert lim["full"][part] > lim["civic"][part] > 0
    # an earlier exit layer saves more vision FLOPs
    assert (report["planner_limits"]["civic r=1/3 exit 1"]["vision_flops_ratio"]
            > report["planner_limits"]["civic r=1/3 exit 2"]["vision_flops_ratio"]
            > report["planner_limits"]["civic r=1/3 exit none"]["vision_flops_ratio"])
    # the context's K/V rows cost vision FLOPs, less than running the later blocks on every patch
    for layer in (1, 2):
        plain, context = (report["planner_limits"][f"civic r=1/3 exit {layer}{tag}"]["civic"]["vision_flops"]
                          for tag in ("", " + context"))
        assert plain < context < report["planner_limits"]["civic r=1/3 exit none"]["civic"]["vision_flops"]
        assert report["results"][f"civic r=1/3 exit {layer} + context"]["exit_context"] is True


def test_budget_stops_after_a_round(tmp_path, monkeypatch):
    monkeypatch.setenv("CIVIC_MODELS_DIR", str(tmp_path / "models"))
    out = tmp_path / "dp.json"
    argv = ["--preset", "tiny", "--size", "64", "--rounds", "3", "--exit-layers", "none", "--budget-s", "0",
            "--out", str(out)]
    assert depth_probe.main(argv) == 0
    report = json.loads(out.read_text())
    assert report["rounds_done"] == 1 and "budget" in report["stopped_early"]
    assert list(report["results"]) == ["full", "civic r=1/3 exit none"]
