"""benchmarks/video_serve/ and benchmarks/video_load.py, pure parts: videos, request bodies, token maths,
ratios and the acceptance checks on a synthetic state. No server, no timing thresholds."""

from __future__ import annotations

import argparse
import json
import math
from fractions import Fraction

import numpy as np
import pytest

from benchmarks import video_serve as vs
from benchmarks.video_load import CELL, VideoWorkload, random_video, subsample, video_seed
from civic_vllm.client import video_data_url


def test_random_video_is_seeded_and_fresh():
    a, b = random_video(96, 64, 6, seed=1), random_video(96, 64, 6, seed=1)
    assert a.shape == (6, 64, 96, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, random_video(96, 64, 6, seed=2))


def test_random_video_changes_about_a_quarter_of_the_cells_per_frame():
    video = random_video(320, 320, 8, seed=3).astype(int)
    cells = video[:, CELL // 2 :: CELL, CELL // 2 :: CELL]  # one pixel per cell (noise is +-8)
    changed = (np.abs(np.diff(cells, axis=0)).max(-1) > 16).mean()
    assert 0.15 < changed < 0.3


def test_random_video_rejects_tiny_or_empty():
    with pytest.raises(ValueError):
        random_video(16, 64, 4, seed=0)
    with pytest.raises(ValueError):
        random_video(64, 64, 0, seed=0)


def test_subsample_keeps_every_stride_th_frame():
    frames = np.arange(12)[:, None, None, None] * np.ones((1, 2, 2, 3), dtype=np.uint8)
    assert subsample(frames, 3)[:, 0, 0, 0].tolist() == [0, 3, 6, 9]
    assert len(subsample(frames, 1)) == 12
    with pytest.raises(ValueError):
        subsample(frames, 0)


def test_video_seed_is_unique_per_run_and_request():
    seeds = {video_seed(run, index) for run in range(3) for index in range(100)}
    assert len(seeds) == 300


def test_video_workload_body_vanilla_and_civic():
    vanilla = VideoWorkload(video_size=(64, 64), frames=4, seed=7)
    body = vanilla.body("m")
    parts = body["messages"][0]["content"]
    assert [p["type"] for p in parts] == ["video_url", "text"]
    assert parts[0]["video_url"]["url"].startswith("data:video/mp4;base64,")
    assert "mm_processor_kwargs" not in body and body["stream"] and body["ignore_eos"]
    assert vanilla.body("m")["messages"][0]["content"][0] != parts[0]  # the next request, a new video
    civic = VideoWorkload(video_size=(64, 64), frames=4, ratio=0.25)
    kwargs = civic.body("m")["mm_processor_kwargs"]
    assert kwargs == {"civic_ratio": 0.25, "civic_video_ratio": 0.25}


def test_video_workload_subsampling_and_locust_args():
    wl = VideoWorkload(video_size=(64, 96), frames=12, stride=3, seed=1)
    assert wl.sent_frames == 4 and wl.video(0).shape == (4, 96, 64, 3)
    assert wl.locust_args() == ["--video-size", "64x96", "--video-frames", "12", "--frame-stride", "3",
                                "--video-fps", "2"]
    assert wl.locustfile_path().exists() and wl.images_per_request == 0
    with pytest.raises(ValueError):
        VideoWorkload(frames=2, stride=3)


def test_video_data_url_round_trip_frame_count():
    cv2 = pytest.importorskip("cv2")
    import base64
    import tempfile
    from pathlib import Path

    url = video_data_url(random_video(64, 64, 6, seed=0))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "v.mp4"
        path.write_bytes(base64.b64decode(url.split(",", 1)[1]))
        assert int(cv2.VideoCapture(str(path)).get(cv2.CAP_PROP_FRAME_COUNT)) == 6


def test_spec_token_maths():
    spec = vs.VideoSpec("v", 384, 384, 12)
    assert spec.tokens_per_group == 144 and spec.groups() == 6 and spec.video_tokens() == 864
    assert spec.groups(3) == 2 and spec.video_tokens(3) == 288


def test_prompt_bound_covers_the_timestamps_of_a_long_video():
    """Measured vanilla prompts: 12 frames of 256x256 -> 384 video tokens in 470 (bench preset,
    benchmarks/results/video_serve.json), 32 frames of 448x448 -> 3136 in 3308 (civic-shapes-video-tiny,
    video_kv_long.json; 16 timestamps of 6-7 tokens)."""
    assert vs.VideoSpec("v", 256, 256, 12).prompt_bound() >= 470
    assert vs.VideoSpec("v", 448, 448, 32).prompt_bound() >= 3308


def test_parser_civic_ratio_and_idle_wait():
    args = vs.build_parser().parse_args(["--civic-ratio", "1/3", "--idle-wait", "0", "--pruning-rate", "33/50"])
    assert args.civic_ratio == Fraction(1, 3) and args.idle_wait == 0 and args.pruning_rate == Fraction(33, 50)
    assert vs.build_parser().parse_args([]).civic_ratio is None
    assert vs.build_parser().parse_args([]).civic_video_exit_layer is None
    assert vs.build_parser().parse_args(["--civic-video-exit-layer", "1"]).civic_video_exit_layer == 1
    defaults = vs.build_parser().parse_args([])
    assert (defaults.load_rounds, defaults.block_size) == (0, None)  # off and vLLM's block size unless asked
    asked = vs.build_parser().parse_args(["--load-rounds", "6", "--block-size", "32"])
    assert (asked.load_rounds, asked.block_size) == (6, 32)


def test_evs_kept_matches_vllm():
    evs = pytest.importorskip("vllm.multimodal.video_prune.evs")
    for n, t, q in ((144, 6, 2 / 3), (64, 6, 2 / 3), (64, 4, 0.5), (64, 2, 0.9), (100, 3, 0.75)):
        assert vs.evs_kept(n, t, q) == evs.compute_retained_tokens_count(n, t, q)


@pytest.mark.parametrize("text", [0, 54])
@pytest.mark.parametrize("n,t,q", [(144, 6, 2 / 3), (64, 6, 2 / 3), (64, 4, 0.5), (64, 2, 0.9), (196, 8, 0.75)])
def test_matching_ratio_keeps_no_more_than_evs_and_is_the_largest(n, t, q, text):
    kept = vs.evs_kept(n, t, q)
    r = vs.matching_ratio(kept, n, t, text)
    per_group = vs.civic_kept(n, t, r, text) // t
    assert vs.civic_kept(n, t, r, text) <= kept or per_group == 1
    assert vs.civic_kept(n, t, Fraction(t * (per_group + 1) + text, t * n + text), text) > kept or per_group == n
    assert r == Fraction(t * per_group + text, t * n + text)  # the span fraction civic keeps


def test_matching_ratio_at_two_thirds_on_384_is_a_third():
    assert vs.matching_ratio(vs.evs_kept(144, 6, 2 / 3), 144, 6) == Fraction(1, 3)
    assert vs.matching_ratio(vs.evs_kept(144, 6, 2 / 3), 144, 6, 54) == Fraction(288 + 54, 864 + 54)


def test_contender_labels():
    assert vs.Contender("evs", "evs", prune_rate=Fraction(2, 3)).label == "EVS q=2/3"
    assert vs.Contender("civic", "civic", ratio=Fraction(1, 3)).label == "civic r=1/3"
    assert vs.Contender("subsample", "vanilla", stride=3).label == "subsample 1/3"
    assert vs.Contender("civic", "civic", ratio=Fraction(1, 3), exit_layer=1).label == "civic r=1/3 exit 1"


def test_the_civic_server_gets_the_video_exit_layer_as_its_default():
    from benchmarks.video_serve.servers import civic_defaults

    def run(layer):
        return argparse.Namespace(args=argparse.Namespace(civic_video_exit_layer=layer))

    assert civic_defaults(run(None)) == {}
    assert civic_defaults(run(2)) == {"civic_video_exit_layer": 2}


LABELS = {"vanilla": "vanilla", "evs": "EVS q=2/3", "civic": "civic r=1/3", "subsample": "subsample 1/3"}


def synthetic_state(ttft: dict[str, float], tok_s: dict[str, dict[int, float]], video: dict[str, int]) -> dict:
    """Probe rows (3 rounds, +-1% noise), locust points and token counts for the four contenders."""
    probe = [{"config": LABELS[name], "round": r, "client_ttft_s": t * (1 + 0.01 * (r - 1)), "server_ttft_s": t}
             for r in range(3) for name, t in ttft.items()]
    points = [{"config": LABELS[name], "concurrency": c,
               "client": {"output_tok_per_s": v, "req_per_s": v / 64, "ttft_p50_s": ttft[name], "ttft_p95_s": None,
                          "requests_completed": 5},
               "server": {"kv_usage_max": video[name] / 10000}}
              for name, per_c in tok_s.items() for c, v in per_c.items()]
    counts = [{"contender": LABELS[name], "prompt_tokens": n + 60, "video_tokens": n}
              for name, n in video.items() for _ in range(2)]
    return {"contenders": [{"name": k, "label": v} for k, v in LABELS.items()], "probe": probe, "points": points,
            "counts": counts, "block_size": 128, "max_tokens": 64, "pool": {"num_blocks": 101, "usable_blocks": 100},
            "quick": True, "preset": "bench", "dtype": "bfloat16", "command": "x", "created": "now", "duration_s": 1.0,
            "load_start": [0.1, 0.1, 0.1], "spec": {"width": 256, "height": 256, "frames": 12, "fps": 2.0},
            "notes": ["n"], "random_mm": [{"contender": "vanilla", "concurrency": 1, "num_prompts": 2, "ok": True,
                                           "output_throughput": 3.0}, {"contender": "EVS q=2/3", "concurrency": 8,
                                           "num_prompts": 2, "ok": False, "error": "Traceback\nValueError: no"}]}


def passing_state(video: dict[str, int]) -> dict:
    """civic faster than EVS at concurrency 1 and 8, and EVS than vanilla; ``video`` tokens per contender."""
    return synthetic_state({"vanilla": 4.0, "evs": 2.5, "civic": 2.0, "subsample": 1.6},
                           {"vanilla": {1: 10, 8: 20}, "evs": {1: 14, 8: 30}, "civic": {1: 16, 8: 36},
                            "subsample": {1: 18, 8: 40}}, video)


def acceptance_check(state: dict, name: str) -> dict:
    return {c["name"]: c for c in vs.analyse(state)["acceptance"]}[name]


def test_analysis_ratios_and_passing_checks():
    state = passing_state({"vanilla": 9000, "evs": 3000, "civic": 3000, "subsample": 3000})
    report = vs.analyse(state)
    ratios = {r["pair"]: r for r in report["ratios"]}
    assert ratios["civic/vanilla"]["probe_ttft"]["ratio"] == pytest.approx(0.5)
    assert ratios["civic/evs"]["probe_ttft"]["ratio"] == pytest.approx(0.8)
    assert ratios["civic/evs"]["probe_ttft"]["ci95"] is not None
    assert ratios["evs/vanilla"]["c8"]["output_tok_per_s"] == pytest.approx(1.5)
    assert ratios["subsample/vanilla"]["video_tokens"] == pytest.approx(1 / 3)
    checks = {c["name"]: c for c in report["acceptance"]}
    assert all(c["pass"] for c in checks.values()), checks
    assert report["tokens"]["vanilla"]["kv_blocks_end"] == math.ceil((9000 + 60 + 63) / 128)
    json.dumps(report)  # the report is JSON-serialisable


def test_analysis_failing_checks():
    state = synthetic_state({"vanilla": 4.0, "evs": 2.0, "civic": 2.2, "subsample": 1.6},
                            {"vanilla": {1: 10, 8: 20}, "evs": {1: 14, 8: 30}, "civic": {1: 13, 8: 29},
                             "subsample": {1: 18, 8: 40}},
                            {"vanilla": 384, "evs": 128, "civic": 132, "subsample": 128})
    checks = {c["name"]: c for c in vs.analyse(state)["acceptance"]}
    failed = {name for name, c in checks.items() if c["pass"] is False}
    assert any("no more video tokens" in n for n in failed)
    assert any("at least as fast" in n for n in failed)
    assert any("under load" in n for n in failed)
    # 132/384 = 0.34 placeholders pass; KV blocks 2/4 (text and output do not shrink) fail
    assert any("placeholders" in n for n in checks if checks[n]["pass"])
    assert any("KV blocks" in n for n in failed)


def _load_rows(civic: list[float], evs: list[float]) -> list[dict]:
    """Bursts of 1536 output tokens whose median TTFT is 10 / output tok/s."""
    return [{"config": LABELS[name], "round": r, "users": 8, "output_tok_per_s": v, "ttft_p50_s": 10 / v,
             "wall_s": 1536 / v} for name, values in (("civic", civic), ("evs", evs)) for r, v in enumerate(values)]


def test_paired_load_passes_only_when_the_whole_interval_is_above_one():
    state = passing_state({"vanilla": 9000, "evs": 3000, "civic": 3000, "subsample": 3000})
    name = "civic faster than EVS under load, paired bursts of 8 (output tok/s)"
    state["load"] = _load_rows([12.0, 12.5, 11.8, 12.2, 12.1], [10.0, 10.2, 9.9, 10.1, 10.0])
    check = acceptance_check(state, name)
    per_round = [c / e for c, e in zip([12.0, 12.5, 11.8, 12.2, 12.1], [10.0, 10.2, 9.9, 10.1, 10.0])]
    assert check["value"] == pytest.approx(math.prod(per_round) ** (1 / 5)) and check["pass"] is True
    assert "5 rounds" in check["detail"] and f"ratio of medians {12.1 / 10.0:.3f}" in check["detail"]
    ttft = acceptance_check(state, "civic's TTFT under load below EVS's, paired bursts of 8 (median TTFT)")
    assert ttft["value"] == pytest.approx(1 / check["value"]) and ttft["pass"] is True
    state["load"] = _load_rows([12.0, 8.0, 12.5, 7.9, 12.1], [10.0, 10.2, 9.9, 10.1, 10.0])  # a noisy lead
    check = acceptance_check(state, name)
    assert check["value"] > 1 and check["pass"] is False


def test_paired_geomean_cancels_swings_both_contenders_share():
    # The machine is 3-4x slower in rounds 1 and 3 for both; civic leads by 10-25% in every round.
    evs = [10.0, 40.0, 12.0, 45.0, 11.0, 38.0]
    civic = [e * f for e, f in zip(evs, [1.1, 1.25, 1.15, 1.1, 1.2, 1.15])]
    r = vs.paired_ratio(_load_rows(civic, evs), LABELS["civic"], LABELS["evs"], "output_tok_per_s")
    low, high = r["paired_geomean_ci95"]
    assert 1.1 <= low < r["paired_geomean"] < high <= 1.25
    assert high - low < r["ci95"][1] - r["ci95"][0]  # the ratio of medians mixes slow and fast rounds


def test_load_rounds_pair_bursts_and_record_who_went_first():
    state = passing_state({"vanilla": 9000, "evs": 3000, "civic": 3000, "subsample": 3000})
    civic, evs = _load_rows([12.0, 9.0], [10.0, 10.0])[:2], _load_rows([12.0, 9.0], [10.0, 10.0])[2:]
    lone = _load_rows([5.0, 5.0, 5.0], [])[2]
    state["load"] = [civic[0], evs[0], evs[1], civic[1], lone]  # order rotated; round 2 has no EVS burst
    report = vs.analyse(state)
    assert [(r["round"], r["first"]) for r in report["load_rounds"]] == [(0, "civic"), (1, "evs")]
    assert [r["ratio"] for r in report["load_rounds"]] == pytest.approx([1.2, 0.9])
    assert report["load_summary"]["rounds"] == 2 and report["load_summary"]["paired_geomean_ci95"] is None
    assert "| 1 | evs | 170.7 | 153.6 | 9.0 | 10.0 | 0.900 |" in vs.markdown(state, report)


def test_placeholder_check_counts_the_span_when_the_run_recorded_it():
    state = passing_state({"vanilla": 384, "evs": 128, "civic": 96, "subsample": 128})
    name = "video placeholders at r = 1/3 vs vanilla"
    assert acceptance_check(state, name)["value"] == pytest.approx(96 / 384)
    state["span_text_tokens"] = 48  # 6 groups: a timestamp and 2 markers each
    check = acceptance_check(state, name)
    assert check["value"] == pytest.approx(144 / 432) and check["pass"] and "span 144 vs 432" in check["detail"]


def test_paired_ratio_uses_rounds_both_have():
    rows = [{"config": "a", "round": 0, "client_ttft_s": 1.0}, {"config": "b", "round": 0, "client_ttft_s": 2.0},
            {"config": "a", "round": 1, "client_ttft_s": 1.0}]
    r = vs.paired_ratio(rows, "a", "b")
    assert r["rounds"] == 1 and r["ratio"] == pytest.approx(0.5) and r["ci95"] is None
    assert vs.paired_ratio(rows, "a", "c")["ratio"] is None


def test_parse_video():
    assert vs.parse_video("384x256x12") == (384, 256, 12)
    for bad in ("300x300x12", "384x384", "384x384x1"):
        with pytest.raises(argparse.ArgumentTypeError):
            vs.parse_video(bad)


def test_report_files_from_a_synthetic_state(tmp_path):
    state = passing_state({"vanilla": 384, "evs": 128, "civic": 126, "subsample": 128})
    out = tmp_path / "v.json"
    report = vs.write_report(state, out)
    assert report["kv_blocks_from_metrics_c1"]["vanilla"] == round(384 / 10000 * 100)
    text = out.with_suffix(".md").read_text()
    assert "civic r=1/3 / vanilla" in text and "ValueError: no" in text and "**FAIL**" in text
    assert out.with_suffix(".png").stat().st_size > 1000
    assert json.loads(out.read_text())["benchmark"] == "video_serve"


def test_analysis_when_evs_failed_on_the_backend(tmp_path):
    state = synthetic_state({"vanilla": 4.0, "civic": 2.0, "subsample": 1.6},
                            {"vanilla": {1: 10, 8: 20}, "civic": {1: 16, 8: 36}, "subsample": {1: 18, 8: 40}},
                            {"vanilla": 384, "civic": 126, "subsample": 128})
    state["contenders"] = [c for c in state["contenders"] if c["name"] != "evs"]
    state["random_mm"] = []
    state["evs"] = {"label": "EVS q=2/3", "ok": False, "error": "RuntimeError: boom", "kept_by_formula": 128}
    report = vs.write_report(state, tmp_path / "v.json")
    assert {r["pair"] for r in report["ratios"]} == {"civic/vanilla", "subsample/vanilla"}
    checks = {c["name"]: c for c in report["acceptance"]}
    assert checks["civic keeps no more video tokens than EVS"]["pass"] is True
    assert [c["pass"] for n, c in checks.items() if "EVS" in n and "fast" in n] == [None, None]
    assert "RuntimeError: boom" in (tmp_path / "v.md").read_text()


def test_engine_error_finds_the_worker_exception():
    log = ("(Worker pid=1) ERROR 12-05 [x.py:1] Traceback (most recent call last):\n"
           "(Worker pid=1) ERROR 12-05 [x.py:1] RuntimeError: The expanded size of the tensor (0) must match\n"
           "(APIServer pid=2) ERROR 12-05 [y.py:2] vllm.v1.engine.exceptions.EngineDeadError: dead\n")
    assert vs.engine_error(log) == "RuntimeError: The expanded size of the tensor (0) must match"
    assert vs.engine_error("all fine") is None


def test_whole_run_counts_completed_requests_from_the_test_start(tmp_path):
    records = tmp_path / "c8.jsonl"
    lines = [{"event": "test_start", "t": 100.0},
             {"start": 100.0, "ok": True, "e2e": 20.0, "completion_tokens": 64, "tok": [[10.0, 1], [20.0, 64]]},
             {"start": 100.0, "ok": True, "e2e": 40.0, "completion_tokens": 64, "tok": [[30.0, 1], [40.0, 64]]},
             {"start": 120.0, "ok": False, "aborted": True, "e2e": None, "completion_tokens": 3, "tok": []},
             {"event": "measure_start", "t": 130.0}]
    records.write_text("".join(json.dumps(d) + "\n" for d in lines))
    w = vs.whole_run(records)
    assert w["requests_completed"] == 2 and w["elapsed_s"] == pytest.approx(40.0)
    assert w["output_tok_per_s"] == pytest.approx(128 / 40) and w["ttft_p50_s"] == pytest.approx(20.0)
    assert vs.whole_run(tmp_path / "missing.jsonl") is None
