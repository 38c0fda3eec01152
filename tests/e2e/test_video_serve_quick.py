"""`make bench-video QUICK=1` on the tiny preset: three real servers (vanilla, EVS, civic), locust, the paired
probe and random-mm end to end; checks the report's structure and token counts, never timings."""

from __future__ import annotations

import json

import pytest

from benchmarks import video_serve

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_quick_run_writes_a_complete_report(tmp_path):
    out = tmp_path / "video_serve_quick.json"
    argv = ["--quick", "--preset", "tiny", "--dtype", "float32", "--video", "256x256x12", "--out", str(out)]
    assert video_serve.main(argv) == 0
    report = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 0 and "Acceptance" in out.with_suffix(".md").read_text()
    tokens = report["tokens"]
    labels = [c["label"] for c in report["contenders"]]
    assert labels[0] == "vanilla" and labels[1] == "EVS q=2/3" and labels[3] == "subsample 1/3"
    assert tokens["vanilla"]["video_tokens"] == 6 * 64  # 12 frames of 256x256: 6 frame groups of 8x8
    assert tokens["subsample 1/3"]["video_tokens"] == 2 * 64
    assert tokens[labels[2]]["video_tokens"] <= tokens["EVS q=2/3"]["video_tokens"] < tokens["vanilla"]["video_tokens"]
    assert {p["config"] for p in report["points"]} == set(labels)
    assert all(p["client"]["requests_completed"] > 0 and p["server"]["mm_cache_hits"] == 0 for p in report["points"])
    assert {r["config"] for r in report["probe"]} == set(labels)
    assert {c["name"] for c in report["acceptance"]} and len(report["ratios"]) == 4
    assert all(r["ok"] for r in report["random_mm"]), [r.get("error") for r in report["random_mm"]]
