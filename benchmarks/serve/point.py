"""One measured point: locust at one concurrency, with /metrics sampled throughout."""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import requests

from benchmarks.harness import BenchError, log, wait_idle
from benchmarks.load import Record, StreamError, stream_chat
from benchmarks.serve.common import (
    C_IMAGES,
    C_KEPT,
    C_RATIO,
    C_SEEN,
    M_E2E,
    M_GEN,
    M_ITL,
    M_MM_HITS,
    M_PREEMPT,
    M_PREFILL,
    M_PREFIX_HITS,
    M_PROMPT,
    M_QUEUE,
    M_SUCCESS,
    M_TTFT,
    Config,
    MetricsSampler,
    Run,
    WorkloadSpec,
    fmt,
    hist_delta,
    hist_mean,
    hist_quantile,
    relroot,
    scalar_delta,
)
from benchmarks.serve.servers import run_locust
from civic_vllm.serving import VllmServer


def pct(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(np.asarray(values, dtype=float), q)) if len(values) else None


def mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


def client_stats(recs: list[Record], t0: float, t1: float) -> dict:
    """Per-request statistics over the window [t0, t1] (wall clock).

    Latencies (TTFT, TPOT, end-to-end) are of the requests *started* in the window; locust lets
    them finish after it closes (``--stop-timeout``), so slow ones are not cut off. Rates count
    what happened inside the window: completions (req/s) and token arrivals (tok/s)."""
    window = t1 - t0
    started = [r for r in recs if t0 <= r.start <= t1]
    ttft, censored, e2e, tpot = [], 0, [], []
    for r in started:
        if r.ttft is not None:
            ttft.append(r.ttft)
        elif not r.error or r.aborted:
            censored += 1  # still without a token when locust's stop timeout ended it
        if r.ok and r.e2e is not None:
            e2e.append(r.e2e)
            if (v := r.tpot()) is not None:
                tpot.append(v)
    completed = [r for r in recs if r.ok and r.e2e is not None and t0 <= r.start + r.e2e <= t1]
    itl, tokens_in_window = [], 0
    for r in recs:
        prev = None
        for t, n in r.tok:
            at = r.start + t
            if prev is not None and t0 <= at <= t1:
                d = int(n - prev[1])
                itl.extend([(t - prev[0]) / d] * d if d > 0 else [])
            if t0 <= at <= t1:
                tokens_in_window += int(n - (prev[1] if prev else 0))
            prev = (t, n)
    failed = [r for r in recs if r.error and not r.aborted and t0 <= r.start <= t1]
    # Delivery stalls: at least half of a request's tokens reached the client within 5 ms of its last
    # one, i.e. the stream arrived in one burst (the API server or the client was starved of CPU).
    streamed = [r for r in started if r.ok and len(r.tok) >= 4]
    bunched = sum(1 for r in streamed
                  if sum(1 for t, _ in r.tok if r.tok[-1][0] - t <= 0.005) >= len(r.tok) / 2)
    prompts = [r.prompt_tokens for r in completed if r.prompt_tokens]
    n_ttft = len(ttft) + censored
    return {
        "window_s": window,
        "requests_started": len(started),
        "requests_completed": len(completed),
        "requests_failed": len(failed),
        "failure_examples": sorted({r.error for r in failed})[:3],
        "requests_finished_after_window": sum(1 for r in started if r.ok and r.start + (r.e2e or 0) > t1),
        "ttft_samples": len(ttft),
        "ttft_censored": censored,
        # A censored request had no token when the stop timeout ended it: when they are more than
        # 5% (50%) of the started ones, p95 (p50) of the others is only a lower bound.
        "ttft_p95_lower_bound": n_ttft > 0 and censored / n_ttft > 0.05,
        "ttft_p50_lower_bound": n_ttft > 0 and censored / n_ttft > 0.5,
        "ttft_p50_s": pct(ttft, 50), "ttft_p95_s": pct(ttft, 95), "ttft_mean_s": mean(ttft),
        "itl_p50_s": pct(itl, 50), "itl_p95_s": pct(itl, 95), "itl_samples": len(itl),
        "itl_max_s": max(itl) if itl else None,  # the longest decode stall a streaming request saw
        "tpot_p50_s": pct(tpot, 50), "e2e_p50_s": pct(e2e, 50), "e2e_p95_s": pct(e2e, 95),
        "req_per_s": len(completed) / window if window > 0 else None,
        "output_tok_per_s": tokens_in_window / window if window > 0 else None,
        "prompt_tokens_mean": mean(prompts),
        "delivery_bunched_fraction": bunched / len(streamed) if streamed else None,
    }


def server_stats(sampler: MetricsSampler, t0: float, t1: float) -> dict:
    a, b = sampler.before(t1), sampler.at(t0)
    ttft, itl = hist_delta(a, b, M_TTFT), hist_delta(a, b, M_ITL)
    queue, prefill, e2e = hist_delta(a, b, M_QUEUE), hist_delta(a, b, M_PREFILL), hist_delta(a, b, M_E2E)
    gauges = sampler.gauges(t0, t1)
    running = [g[1] for g in gauges]
    waiting = [g[2] for g in gauges]
    kv = [g[3] for g in gauges]
    seen, kept = scalar_delta(a, b, C_SEEN), scalar_delta(a, b, C_KEPT)
    ratio_h = hist_delta(a, b, C_RATIO)
    return {
        "ttft_count": ttft["count"], "ttft_mean_s": hist_mean(ttft),
        "ttft_p50_s": hist_quantile(ttft, 0.5), "ttft_p95_s": hist_quantile(ttft, 0.95),
        "itl_mean_s": hist_mean(itl), "itl_p50_s": hist_quantile(itl, 0.5), "itl_p95_s": hist_quantile(itl, 0.95),
        "queue_mean_s": hist_mean(queue), "prefill_mean_s": hist_mean(prefill), "e2e_mean_s": hist_mean(e2e),
        "finished_requests": scalar_delta(a, b, M_SUCCESS),
        "prompt_tokens": scalar_delta(a, b, M_PROMPT), "generation_tokens": scalar_delta(a, b, M_GEN),
        "generation_tok_per_s": scalar_delta(a, b, M_GEN) / (t1 - t0) if t1 > t0 else None,
        "preemptions": scalar_delta(a, b, M_PREEMPT),
        "mm_cache_hits": scalar_delta(a, b, M_MM_HITS), "prefix_cache_hits": scalar_delta(a, b, M_PREFIX_HITS),
        "kv_usage_mean": mean(kv), "kv_usage_max": max(kv) if kv else None,
        "running_mean": mean(running), "running_max": max(running) if running else None,
        "waiting_mean": mean(waiting), "waiting_max": max(waiting) if waiting else None,
        "samples": len(gauges),
        "civic": {
            "images": scalar_delta(a, b, C_IMAGES), "visual_tokens": seen, "visual_tokens_retained": kept,
            "retained_fraction": kept / seen if seen else None,
            "retention_ratio_mean": hist_mean(ratio_h),
        },
    }





def warm_up(run: Run, server: VllmServer, spec: WorkloadSpec, config: Config) -> list[float]:
    """A few sequential requests of the point's shape (first-request costs are not CIVIC's)."""
    wl = run.workload(spec, config)
    ttfts = []
    with requests.Session() as session:
        for _ in range(run.bounds.warm_requests):
            rec = Record()
            try:
                stream_chat(session, server.url, wl.body(run.served_model), rec, run.bounds.request_timeout_s)
            except (StreamError, requests.RequestException) as exc:
                raise BenchError(f"warm-up request to {config.label} failed: {exc}\n{server.log_tail()}") from exc
            ttfts.append(rec.ttft)
    return ttfts


def run_point(run: Run, server: VllmServer, spec: WorkloadSpec, config: Config, users: int) -> dict:
    wl = run.workload(spec, config)
    folder = run.out_dir / "locust" / spec.name / config.slug
    folder.mkdir(parents=True, exist_ok=True)
    prefix = folder / f"c{users}"
    records = run.raw_dir / "records" / spec.name / config.slug / f"c{users}.jsonl"
    records.parent.mkdir(parents=True, exist_ok=True)
    records.unlink(missing_ok=True)
    wait_idle(server, run.bounds)
    b = run.bounds
    max_samples = int((max(b.warmup_s, b.warmup_max_s) + b.duration_s + b.stop_timeout_s + b.locust_grace_s + 30)
                      / b.poll_s) + 10
    with MetricsSampler(server.metrics_url, run.bounds.poll_s, max_samples) as sampler:
        window = run_locust(server.url, run.served_model, wl, users, run.bounds, prefix, records, run.client_cpus)
        time.sleep(min(2 * run.bounds.poll_s, 2.0))  # one more sample after the window closed
    if len(sampler.samples) < 2:
        raise BenchError(f"/metrics of {config.label} could not be sampled ({sampler.errors} errors)")
    t0, t1 = window["window_start"], window["window_end"]
    client = client_stats(window["records"], t0, t1)
    srv = server_stats(sampler, t0, t1)
    for ts, running, waiting, kv in sampler.gauges(window["test_start"], t1 + 5):
        run.timeseries.append([spec.name, config.label, users, round(ts - t0, 2), running, waiting, round(kv, 5)])
    point = {
        "workload": spec.name, "config": config.label, "server_kind": config.server,
        "ratio": None if config.ratio is None else float(config.ratio),
        "ratio_label": None if config.ratio is None else str(config.ratio),
        "recipe_default": config.default,
        "concurrency": users, "image_seed": wl.seed,
        "window": {"start": t0, "end": t1, "warmup_s": round(t0 - window["test_start"], 2),
                   "steady_after_warmup": window["events"].get("measure_start_steady")},
        "client": client, "server": srv,
        "files": {"locust_csv": relroot(prefix) + "_stats.csv", "locust_json": relroot(prefix) + ".json",
                  "records": relroot(records)},
    }
    if client["requests_completed"] == 0 and client["ttft_samples"] == 0:
        run.notes.append(f"{spec.name} {config.label} c={users}: no request completed in the window "
                         f"({client['requests_failed']} failed: {client['failure_examples']})")
    if srv["mm_cache_hits"] or srv["prefix_cache_hits"]:
        run.notes.append(f"{spec.name} {config.label} c={users}: cache hits in the window "
                         f"(mm {srv['mm_cache_hits']:.0f}, prefix {srv['prefix_cache_hits']:.0f}); "
                         "images should be unique")
    log(f"    c={users:<2} {config.label:<13} TTFT p50 {fmt(client['ttft_p50_s'], '.3f')} s "
        f"p95 {fmt(client['ttft_p95_s'], '.3f')} s (server mean {fmt(srv['ttft_mean_s'], '.3f')}), "
        f"{fmt(client['req_per_s'], '.3f')} req/s, {fmt(client['output_tok_per_s'], '.1f')} tok/s, "
        f"KV max {fmt(srv['kv_usage_max'], '.0%')}, waiting mean {fmt(srv['waiting_mean'], '.1f')}, "
        f"n={client['requests_completed']}")
    return point
