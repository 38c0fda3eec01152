"""Measuring: token counts, locust points, the paired probe and random-mm, written to a state dict."""

from __future__ import annotations

import json
import statistics
from fractions import Fraction
from pathlib import Path
from typing import Any

import requests

from benchmarks.harness import log
from benchmarks.load import model_id
from benchmarks.serve.common import ROOT
from benchmarks.serve.probe import paired_load
from benchmarks.serve.run import measure_points, start_server_set, stop_servers
from benchmarks.serve.servers import client_cpus
from benchmarks.video_serve.common import (
    CIVIC_COUNTERS,
    COUNT_REQUESTS,
    BenchError,
    Contender,
    VideoRun,
    VideoSpec,
    evs_kept,
    matching_ratio,
)
from benchmarks.video_serve.servers import engine_error, run_random_mm, server_configs
from civic_vllm.prometheus import metric_value


def count_tokens(run: VideoRun, spec: VideoSpec, contender: Contender, video_token_id: int) -> list[dict]:
    """Prompt and video tokens of COUNT_REQUESTS fresh requests (non-streaming, ``return_token_ids``)."""
    wl = run.workload(spec, contender, max_tokens=1)
    server = run.servers[contender.server]
    rows = []
    for _ in range(COUNT_REQUESTS):
        body = {**wl.body(run.served_model), "stream": False, "return_token_ids": True}
        body.pop("stream_options", None)
        response = requests.post(server.url + "/v1/chat/completions", json=body, timeout=run.bounds.request_timeout_s)
        if response.status_code != 200:
            raise BenchError(f"token count for {contender.label}: HTTP {response.status_code} "
                             f"{response.text[:300]}\n{server.log_tail()}")
        ids = response.json()["prompt_token_ids"]
        rows.append({"contender": contender.label, "prompt_tokens": len(ids),
                     "video_tokens": ids.count(video_token_id)})
    log(f"  {contender.label}: video tokens {[r['video_tokens'] for r in rows]}, prompt {rows[0]['prompt_tokens']}")
    return rows


def whole_run(records: Path) -> dict | None:
    """One locust point over its whole run (test start to the last completion, warm-up included): completed
    requests, their output tokens and TTFTs. On a slow CPU a point's measuring window can close before any
    request of the first wave completes; this is the figure that still compares. Requests cut off at the stop
    are not counted (conservative)."""
    if not records.exists():
        return None
    start, done = None, []
    for line in records.read_text().splitlines():
        d = json.loads(line)
        if d.get("event") == "test_start":
            start = d["t"]
        elif "event" not in d and d.get("ok") and d.get("e2e") is not None:
            done.append(d)
    if start is None or not done:
        return None
    elapsed = max(d["start"] + d["e2e"] for d in done) - start
    tokens = sum(d["completion_tokens"] for d in done)
    ttft = [d["tok"][0][0] for d in done if d["tok"]]
    return {"requests_completed": len(done), "output_tokens": tokens, "elapsed_s": elapsed,
            "output_tok_per_s": tokens / elapsed if elapsed > 0 else None,
            "req_per_s": len(done) / elapsed if elapsed > 0 else None,
            "ttft_p50_s": statistics.median(ttft) if ttft else None}


def add_whole_run(state: dict) -> None:
    """Each point's ``whole_run`` from its records file (kept under benchmarks/results/tmp/)."""
    for p in state["points"]:
        if p.get("whole_run") is None:
            p["whole_run"] = whole_run(ROOT / p["files"]["records"])


def measure(run: VideoRun, spec: VideoSpec, rate: Fraction, stride: int) -> dict:
    """Start the servers; token counts, locust points, the paired probe and random-mm; stop the servers."""
    from transformers import AutoConfig, AutoTokenizer

    video_token_id = AutoConfig.from_pretrained(str(run.model)).video_token_id
    tokenizer = AutoTokenizer.from_pretrained(str(run.model))
    span_text = spec.span_text_tokens(lambda text: len(tokenizer.encode(text, add_special_tokens=False)))
    state: dict[str, Any] = {"counts": [], "random_mm": [], "final_civic": {}, "span_text_tokens": span_text}
    try:
        start_server_set(run, server_configs(run, spec, rate))
        run.client_cpus = client_cpus(run.server_info["vanilla"]["binding"], run.args.client_cpus)
        run.served_model = model_id(requests, run.servers["vanilla"].url)
        vanilla, evs = Contender("vanilla", "vanilla"), Contender("evs", "evs", prune_rate=rate)
        subsample = Contender("subsample", "vanilla", stride=stride)
        log("token counts (fresh videos, prompt_token_ids)")
        for contender in (vanilla, subsample):
            state["counts"] += count_tokens(run, spec, contender, video_token_id)
        state["evs"] = {"label": evs.label, "ok": True, "error": None,
                        "kept_by_formula": evs_kept(spec.tokens_per_group, spec.groups(), float(rate))}
        try:
            state["counts"] += count_tokens(run, spec, evs, video_token_id)
            evs_count = min(r["video_tokens"] for r in state["counts"] if r["contender"] == evs.label)
        except BenchError as exc:  # vLLM's EVS fails on its CPU backend (see the notes)
            state["evs"].update(ok=False, error=engine_error(run.servers["evs"].log_text()) or str(exc)[:500])
            log(f"  EVS failed: {state['evs']['error']}; civic's ratio from vLLM's EVS count formula, EVS not timed")
            run.servers.pop("evs").stop()
            evs_count = state["evs"]["kept_by_formula"]
        ratio = run.args.civic_ratio or matching_ratio(evs_count, spec.tokens_per_group, spec.groups(), span_text)
        exit_layer = run.args.civic_video_exit_layer
        civic = Contender("civic", "civic", ratio=ratio, exit_layer=exit_layer)
        state["counts"] += count_tokens(run, spec, civic, video_token_id)
        if ratio != Fraction(1, 3):  # the placeholder check is at r = 1/3
            state["counts"] += count_tokens(run, spec, Contender("civic", "civic", ratio=Fraction(1, 3),
                                                                 exit_layer=exit_layer), video_token_id)
        run.configs = run.probe_configs = [vanilla, *([evs] if state["evs"]["ok"] else []), civic, subsample]
        measure_points(run, spec)
        if run.args.load_rounds and state["evs"]["ok"]:
            users = max(run.bounds.concurrency)
            log(f"paired load: {run.args.load_rounds} rounds, civic and EVS, bursts {users} at a time")
            state["load"] = paired_load(run, spec, [civic, evs], users, run.args.load_rounds)
        if not run.args.no_random_mm:
            log("vllm bench serve --dataset-name random-mm")
            for contender in run.configs:
                for users in (1, 8):
                    state["random_mm"].append(run_random_mm(run, spec, contender, users))
        text = run.servers["civic"].metrics()
        state["final_civic"] = {k: metric_value(text, k) for k in CIVIC_COUNTERS}
    finally:
        stop_servers(run)
        partial = {**state, "points": run.points, "probe": run.probe}  # kept if the run fails part-way
        (run.raw_dir / "partial.json").write_text(json.dumps(partial, default=str) + "\n")
    state["contenders"] = [{"label": c.label, "name": c.name, "server": c.server,
                            "ratio": None if c.ratio is None else str(c.ratio), "stride": c.stride,
                            "prune_rate": None if c.prune_rate is None else str(c.prune_rate),
                            "exit_layer": c.exit_layer} for c in run.configs]
    return state
