"""benchmarks.video_accuracy's report from fixed per-question results (the servers are not started here)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from benchmarks import video_accuracy as V
from civic_vllm.evaluation import Sample


def _fake(tmp_path: Path):
    rng = np.random.default_rng(0)
    tasks = ["appears", "direction", "last_color", "video_count"]
    samples = [Sample(i + 1, {"task": tasks[i % 4], "answer": "x"}, tmp_path / "v.mp4") for i in range(80)]
    p_correct = {"full": 0.8, "civic": 0.75, "evs": 0.6, "subsample": 0.4}
    tokens = {"full": 256, "civic": 88, "evs": 85, "subsample": 64}
    results = {m: {"predictions": [{"correct": bool(rng.random() < p)} for _ in samples], "n": 80,
                   "video_tokens": [tokens[m]] * 80, "mean_video_tokens": float(tokens[m]), "mean_prompt_tokens": 300.0,
                   "mean_kv_blocks": 3.0, "block_size": 128, "wall_s": 1.0, "requests_per_s": 80.0,
                   "baseline": {"accuracy": 0.25, "per_task": dict.fromkeys(tasks, 0.25)}}
               for m, p in p_correct.items()}
    results["evs"]["video_pruning_rate"] = 2 / 3
    return samples, results


def test_report_has_intervals_kept_fractions_and_paired_differences(tmp_path: Path) -> None:
    samples, results = _fake(tmp_path)
    out = {"model": "m", "n": 80, **V.summarise(results, samples, 1 / 3)}
    rows = {r["method"]: r for r in out["rows"]}
    assert rows["civic"]["kept_fraction"] == round(88 / 256, 4) and rows["full"]["kept_fraction"] == 1
    for r in rows.values():
        lo, hi = r["figures"]["overall"]["ci95"]
        assert lo <= r["figures"]["overall"]["value"] <= hi and r["figures"]["video_count"]["n"] == 20
    diff = out["comparisons"]["civic-evs"]["overall"]
    assert diff["difference"] == round(rows["civic"]["figures"]["overall"]["value"]
                                       - rows["evs"]["figures"]["overall"]["value"], 4)
    assert diff["difference_ci95"][0] <= diff["difference"] <= diff["difference_ci95"][1]
    md = V.table(out) + V.comparison_lines(out)
    assert "--video-pruning-rate 0.667" in md and "civic − subsample" in md
    V.plot(out, tmp_path / "v.png")
    assert (tmp_path / "v.png").stat().st_size > 10_000


def test_root_errors_are_the_exception_lines_not_the_http_500s() -> None:
    log = ("(Worker pid=1) ERROR [x.py:1] RuntimeError: The expanded size of the tensor (0) must match\n" * 2
           + 'INFO: 127.0.0.1 - "POST /v1/chat/completions HTTP/1.1" 500 Internal Server Error\n')
    assert V.root_errors(log) == ["RuntimeError: The expanded size of the tensor (0) must match"]


def test_civic_at_evs_tokens_keeps_the_most_that_fit_in_each_videos_evs_count(tmp_path: Path) -> None:
    """Per video the ratio's K_t (the server's own budget function) fills EVS's count, never exceeds it."""
    from civic_vllm import planner
    from civic_vllm.budget import num_retained_per_group

    model = str(Path(__file__).resolve().parents[2] / "models" / "civic-shapes-video-tiny")
    sizes = [(256, 256, 6), (320, 256, 8), (192, 256, 10), (256, 192, 8)]
    samples = [Sample(i + 1, {"task": "appears", "answer": "x", "width": w, "height": h, "frames": f},
                      tmp_path / "v.mp4") for i, (w, h, f) in enumerate(sizes)]
    info = planner.load_model(model)
    plans = [planner.make_plan(info, planner.PlanRequest(images=[], videos=[size], max_tokens=1)).videos[0]
             for size in sizes]
    evs = [max(v.tokens_per_group, v.merged_tokens // 3) for v in plans]  # EVS at q = 2/3
    ratios = V.civic_ratios_at(evs, samples, model)
    for ratio, video, count in zip(ratios, plans, evs):
        groups = video.grid_thw[0]
        k = num_retained_per_group(video.grid_thw, 2, ratio, text_tokens=video.span_text_tokens)
        assert groups * k <= count < groups * (k + 1)
        assert ratio > count / video.merged_tokens  # r counts the span: above EVS's fraction of video tokens


def test_civic_rows_at_evs_tokens_count_videos_above_evs(tmp_path: Path) -> None:
    samples, results = _fake(tmp_path)
    results["civic"]["sample_ratios"] = [0.4] * 80
    results["civic"]["video_tokens"] = [84] * 79 + [90]
    rows = {r["method"]: r for r in V.summarise(results, samples, 1 / 3)["rows"]}
    assert rows["civic"]["ratio"] == "EVS tokens" and rows["civic"]["videos_above_evs"] == 1
    assert "videos_above_evs" not in rows["subsample"]
    assert "| civic | EVS tokens |" in V.table({"model": "m", "n": 80, **V.summarise(results, samples, 1 / 3)})


def test_a_fresh_test_seed_writes_its_own_split_of_other_videos(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(V, "DATA_ROOT", tmp_path)
    default, fresh = V.test_split(4), V.test_split(4, seed=27182)
    assert default.parent.name == f"seed{V.TEST_SEED}-n4" and fresh.parent.name == "seed27182-n4"
    first = [json.loads(path.read_text().splitlines()[0])["video"] for path in (default, fresh)]
    assert (default.parent / first[0]).read_bytes() != (fresh.parent / first[1]).read_bytes()  # other scenes
    assert V.test_split(4, seed=27182).read_text() == fresh.read_text()  # written once, then reused
