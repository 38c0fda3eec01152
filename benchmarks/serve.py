"""Serving benchmark: vanilla vLLM vs CIVIC under locust load, same checkpoint, KV pool and flags.

    python -m benchmarks.serve [--preset bench] [--quick] [--out benchmarks/results/serve.json]
    make bench-serve [QUICK=1]

What it does, in order (every loop is bounded in count and time; all traffic goes to 127.0.0.1):

1. Builds (or reuses) the checkpoint of ``--preset`` and sizes one KV pool in bytes so that vanilla
   holds ``VANILLA_RESIDENT`` image-dominated requests (prompt + output): the regime where the pool,
   not only compute, limits how many requests decode together.
   The served checkpoint carries a CIVIC recipe (ratio 1/3, policy learned, exit layer max(1, depth // 4),
   a seeded random-weight scorer; ``--recipe-*``, ``--no-recipe``), attached to a copy of the checkpoint
   that both servers serve (vanilla vLLM ignores it).
2. Starts ``vllm serve`` (vanilla) and then ``vllm serve --model-impl civic`` on 127.0.0.1 with that
   pool and otherwise identical flags (``--trust-request-mm-kwargs`` on both; CIVIC's ratio is sent
   per request). Both stay up; an idle server costs ~1% of a core. vLLM's default OMP binding
   (``VLLM_CPU_OMP_THREADS_BIND=auto``) is kept and read back from the server logs; the load client
   runs on the same machine, pinned to the CPUs vLLM reserves for the frontend.
3. Measures the vision encoder's cost in-process: the HF transformers vision tower of the same
   checkpoint on the same pixels, one thread pinned to the model worker's core (plus the HF full
   and CIVIC-compact prefills, for reference), while both servers are idle.
4. For each workload and configuration (vanilla, civic r=RATIO, and civic r=RATIO with each early exit
   layer of ``--exit-layers``, all per-request settings on the same civic server, each sending ratio,
   policy and exit layer explicitly; then "civic default", requests with no civic_* key at all, which
   the civic server serves with the checkpoint's recipe), warms the server up,
   then runs locust headless (``benchmarks/locust/civic_locustfile.py``) at each concurrency: a
   warm-up that lasts until every user finished a request (bounded), a measuring window, then
   in-flight requests finish; ``/metrics`` is sampled all along; the warm-up is excluded.
5. Paired TTFT probe: single requests alternating between those configurations, civic r=1 and extra
   ratios down to K = 1 (rotating order, fresh image each), so machine drift cancels in the TTFT
   ratios; per request, client TTFT and the server's own TTFT / queue / prefill times from
   ``/metrics`` deltas. The prefill times against prompt tokens give a second, server-side split
   of prefill into a part that shrinks with K (the LLM) and one that does not (the encoder).
6. Writes ``serve.json``, CSVs, PNG plots and ``summary.md`` with civic/vanilla ratios, the
   LLM-side limit (T+N)/(T+K) and the measured vision share next to each TTFT ratio, CIVIC's own
   metrics, and PASS/FAIL lines for the issue's "done when", computed from the measurements.

Exit status: 0 when the tooling worked (whatever PASS/FAIL says), 1 when it could not measure.
Timing numbers are only meaningful on an otherwise idle machine: the load average is recorded and
the report warns when it was not.
"""

from __future__ import annotations

import argparse
import base64
import csv
import io
import itertools
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import requests

from benchmarks.kv_blocks import BenchError as KvBenchError
from benchmarks.kv_blocks import Geometry, add_served_model_args, environment_info, pool_geometry, wait_idle
from benchmarks.locust import Record, StreamError, Workload, model_id, stream_chat, summarize_sizes
from civic_vllm.budget import num_merged_tokens, num_retained
from civic_vllm.cost import image_encoder_cost
from civic_vllm.model_factory import make_model, models_root
from civic_vllm.prometheus import histogram, metric_value
from civic_vllm.serving import ServerConfig, ServerError, VllmServer

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
LOCUSTFILE = ROOT / "benchmarks" / "locust" / "civic_locustfile.py"

CPU_BLOCK_SIZE = 128  # vLLM's CPU block size; the served one is read back from /metrics
VANILLA_RESIDENT = 4  # the pool holds this many vanilla image-dominated requests (prompt + output)
MAX_NUM_BATCHED_TOKENS = 2048  # vLLM's CPU default for the API server, passed explicitly to both
ACCEPT_WORKLOAD = "image-dominated"
GOAL_TTFT_SPEEDUP = 1.5  # issue 6: retention on the encoder output
GOAL_TTFT_SPEEDUP_EXIT = 2.0  # issue 8: retention at an early exit layer of the vision tower
GOAL_TTFT_SPEEDUP_DEFAULT = 2.0  # a recipe checkpoint served with no per-request settings ("civic default")
P95_MIN_CONCURRENCY = 8  # "under load": p95 TTFT compared at these concurrencies and above
GOAL_THROUGHPUT_C8 = 2.0
GOAL_R1_TOLERANCE = 0.02
# Extra civic ratios probed at concurrency 1 only, so the server-side fit of prefill time against
# prompt tokens has more than two points.
# 1/1000 keeps K = 1 token per image: that request's prefill is the vision tower + merger + the text
# tokens' LLM pass, an almost direct server-side reading of the encoder's cost.
PROBE_FIT_RATIOS = (Fraction(1, 2), Fraction(1, 10), Fraction(1, 1000))
IDLE_LOAD = 0.5  # 1-min load average above this at the start: the report says the machine was busy

# Prometheus names (vLLM 0.32, v1 engine) and CIVIC's.
M_TTFT = "vllm:time_to_first_token_seconds"
M_ITL = "vllm:inter_token_latency_seconds"
M_E2E = "vllm:e2e_request_latency_seconds"
M_QUEUE = "vllm:request_queue_time_seconds"
M_PREFILL = "vllm:request_prefill_time_seconds"
M_RUNNING = "vllm:num_requests_running"
M_WAITING = "vllm:num_requests_waiting"
M_KV = "vllm:kv_cache_usage_perc"
M_PREEMPT = "vllm:num_preemptions_total"
M_PROMPT = "vllm:prompt_tokens_total"
M_GEN = "vllm:generation_tokens_total"
M_SUCCESS = "vllm:request_success_total"
M_MM_HITS = "vllm:mm_cache_hits_total"
M_PREFIX_HITS = "vllm:prefix_cache_hits_total"
C_SEEN = "civic:visual_tokens_total"
C_KEPT = "civic:visual_tokens_retained_total"
C_IMAGES = "civic:images_total"
C_RATIO = "civic:retention_ratio"
HISTOGRAMS = (M_TTFT, M_ITL, M_E2E, M_QUEUE, M_PREFILL, C_RATIO)
SCALARS = (M_RUNNING, M_WAITING, M_KV, M_PREEMPT, M_PROMPT, M_GEN, M_SUCCESS, M_MM_HITS, M_PREFIX_HITS,
           C_SEEN, C_KEPT, C_IMAGES)


class BenchError(RuntimeError):
    """The benchmark could not measure something (a tooling failure, not a FAIL)."""


def relroot(path: Path) -> str:
    """``path`` relative to the repository when inside it (what the JSON records), else absolute."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bounds:
    """Every loop is bounded in count and time; QUICK only shortens the bounds."""

    concurrency: tuple[int, ...]
    warmup_s: float  # per point, excluded from every statistic: at least this long, and until every
    duration_s: float  # locust user finished warmup_requests requests (at most warmup_max_s); then
    warmup_max_s: float  # the measuring window of duration_s
    probe_rounds: int  # paired TTFT probe: rounds of the probe configurations (one request each)
    vision_reps: int  # in-process timing repetitions (after one untimed warm-up)
    warmup_requests: int = 1
    warm_requests: int = 2  # sequential requests per configuration before its first point
    probe_max_tokens: int = 4
    poll_s: float = 0.5
    idle_timeout_s: float = 180.0  # waiting for a server to drain between points
    startup_timeout_s: float = 900.0
    stop_timeout_s: float = 120.0  # in-flight requests may finish after the window (their TTFT counts)
    locust_grace_s: float = 90.0  # locust start-up + shutdown on top of warm-up + duration + stop timeout
    request_timeout_s: float = 600.0


FULL = Bounds(concurrency=(1, 4, 8, 16), warmup_s=15.0, duration_s=60.0, warmup_max_s=150.0, probe_rounds=8,
              vision_reps=3)
QUICK = Bounds(concurrency=(1, 8), warmup_s=3.0, duration_s=12.0, warmup_max_s=45.0, probe_rounds=2, vision_reps=1,
               warm_requests=1, stop_timeout_s=45.0)


@dataclass(frozen=True)
class WorkloadSpec:
    """A named request shape; ``side`` x ``side`` images (multiples of 32), ``words`` of context."""

    name: str
    width: int
    height: int
    images: int
    words: int
    why: str = ""

    def workload(self, **kw: Any) -> Workload:
        return Workload(image_size=(self.width, self.height), images_per_request=self.images,
                        context_words=self.words, **kw)


WORKLOADS = {
    "image-dominated": WorkloadSpec(
        "image-dominated", 896, 896, 1, 0,
        "one 896x896 image (N = 784 visual tokens) + a one-line question: ~97% of the prompt is visual. "
        "896 rather than 1344: on the bench preset a 1344x1344 request prefills in ~12 s, so at "
        "concurrency 16 one round of requests would outlast a 60-90 s point; 896 (~3.7 s) keeps the run "
        "bounded while the image still dominates the prompt.",
    ),
    "mixed": WorkloadSpec(
        "mixed", 448, 448, 1, 220,
        "one 448x448 image (N = 196) + ~220 words of context and the question: text and image tokens "
        "of the same order.",
    ),
}


def parse_workload(text: str) -> WorkloadSpec:
    """A preset name, or NAME:WxH:IMAGES:WORDS (e.g. big:1344:1:0)."""
    if text in WORKLOADS:
        return WORKLOADS[text]
    try:
        name, size, images, words = text.split(":")
        w, _, h = size.partition("x")
        return WorkloadSpec(name, int(w), int(h or w), int(images), int(words), "custom")
    except ValueError:
        raise argparse.ArgumentTypeError(f"workload must be one of {sorted(WORKLOADS)} or NAME:WxH:IMAGES:WORDS, "
                                         f"got {text!r}") from None


@dataclass(frozen=True)
class Config:
    """One served configuration: which server, the CIVIC ratio (None: vanilla) and ``civic_exit_layer``
    (None: retention on the encoder output, after the last vision block).

    Every civic configuration sends ratio, policy and exit layer explicitly per request (exit layer
    null included), so a server whose checkpoint carries a CIVIC recipe applies what the label says,
    not the recipe. ``default``: the recipe checkpoint's own default, requested with no civic_* key at
    all; ``ratio`` / ``exit_layer`` / ``policy`` then record what the recipe applies (for the limits)."""

    server: str  # "vanilla" | "civic"
    ratio: Fraction | None
    exit_layer: int | None = None
    default: bool = False
    policy: str | None = None  # ``default`` only: the recipe's policy (the others send EXPLICIT_SETTINGS')

    @property
    def label(self) -> str:
        if self.server == "vanilla":
            return "vanilla"
        if self.default:
            return "civic default"
        return f"civic r={self.ratio}" + (f" exit {self.exit_layer}" if self.exit_layer else "")

    @property
    def slug(self) -> str:
        if self.server == "vanilla":
            return "vanilla"
        if self.default:
            return "civic_default"
        return f"civic_r{str(self.ratio).replace('/', '-')}" + (f"_exit{self.exit_layer}" if self.exit_layer else "")

    @property
    def sends_settings(self) -> bool:
        """Whether its requests carry civic_* keys (vanilla and the recipe default send none)."""
        return self.server == "civic" and not self.default

    @property
    def settings(self) -> dict[str, Any]:
        """civic_* request settings of this configuration besides the ratio (on top of the explicit policy
        and --civic-settings): the exit layer, null meaning after the last block."""
        return {"exit_layer": self.exit_layer} if self.sends_settings else {}


# What a civic configuration sends unless --civic-settings says otherwise: explicit values, so a
# checkpoint's recipe (served by default) never fills in a setting the configuration leaves out.
EXPLICIT_SETTINGS: dict[str, Any] = {"policy": "civic", "exit_layer": None}


# --------------------------------------------------------------------------------------------
# /metrics parsing
# --------------------------------------------------------------------------------------------

def parse_metrics(text: str) -> dict[str, Any]:
    """The scalars and histograms this benchmark reads, summed over label sets.

    Histograms become {"buckets": {le: cumulative count}, "sum": s, "count": n}."""
    return {"scalars": {name: metric_value(text, name) for name in SCALARS},
            "hists": {name: histogram(text, name) for name in HISTOGRAMS}}


def hist_delta(after: dict, before: dict, name: str) -> dict:
    a, b = after["hists"][name], before["hists"][name]
    buckets = {le: a["buckets"].get(le, 0.0) - b["buckets"].get(le, 0.0) for le in a["buckets"]}
    return {"buckets": buckets, "sum": a["sum"] - b["sum"], "count": a["count"] - b["count"]}


def hist_quantile(h: dict, q: float) -> float | None:
    """Prometheus-style histogram_quantile: linear inside the bucket (coarse: vLLM's buckets)."""
    if h["count"] <= 0:
        return None
    bounds = sorted(h["buckets"])
    rank = q * h["count"]
    prev_le, prev_count = 0.0, 0.0
    for le in bounds:
        count = h["buckets"][le]
        if count >= rank:
            if math.isinf(le):
                return prev_le  # above the last finite bucket: its bound is all we know
            if count == prev_count:
                return le
            return prev_le + (le - prev_le) * (rank - prev_count) / (count - prev_count)
        prev_le, prev_count = le, count
    return prev_le


def hist_mean(h: dict) -> float | None:
    return h["sum"] / h["count"] if h["count"] > 0 else None


def scalar_delta(after: dict, before: dict, name: str) -> float:
    return after["scalars"][name] - before["scalars"][name]


class MetricsSampler:
    """Polls a server's /metrics every ``poll_s`` in a thread; keeps (wall time, parsed) samples."""

    def __init__(self, url: str, poll_s: float, max_samples: int):
        self.url, self.poll_s, self.max_samples = url, poll_s, max_samples
        self.samples: list[tuple[float, dict]] = []
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        session = requests.Session()
        for _ in range(self.max_samples):
            try:
                text = session.get(self.url + "/metrics", timeout=5).text
                self.samples.append((time.time(), parse_metrics(text)))
            except requests.RequestException:
                self.errors += 1
            if self._stop.wait(self.poll_s):
                break
        session.close()

    def __enter__(self) -> MetricsSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def at(self, t: float) -> dict:
        """The first sample taken at or after ``t`` (else the last one)."""
        for ts, parsed in self.samples:
            if ts >= t:
                return parsed
        return self.samples[-1][1]

    def before(self, t: float) -> dict:
        """The last sample taken at or before ``t`` (else the first one)."""
        best = self.samples[0][1]
        for ts, parsed in self.samples:
            if ts > t:
                break
            best = parsed
        return best

    def gauges(self, t0: float, t1: float) -> list[tuple[float, float, float, float]]:
        return [(ts, p["scalars"][M_RUNNING], p["scalars"][M_WAITING], p["scalars"][M_KV])
                for ts, p in self.samples if t0 <= ts <= t1]


# --------------------------------------------------------------------------------------------
# Servers, binding, the load client
# --------------------------------------------------------------------------------------------


def omp_binding(log_text: str) -> dict[str, Any]:
    """vLLM's "OpenMP thread binding info" block, as the server logged it."""
    info: dict[str, Any] = {}
    if m := re.search(r"VLLM_CPU_OMP_THREADS_BIND='([^']*)'", log_text):
        info["VLLM_CPU_OMP_THREADS_BIND"] = m.group(1)
    if m := re.search(r"reserve_cpu_num=(\d+)", log_text):
        info["reserve_cpu_num"] = int(m.group(1))
    workers = re.findall(r"local_rank=(\d+), core ids=\[([\d, ]*)\]", log_text)
    if workers:
        info["worker_cores"] = {int(r): [int(c) for c in ids.split(",") if c.strip()] for r, ids in workers}
    if m := re.search(r"reserved_cpus=\[([\d, ]*)\]", log_text):
        info["reserved_cpus"] = [int(c) for c in m.group(1).split(",") if c.strip()]
    return info


def worker_cpus(binding: dict) -> list[int]:
    cores = sorted({c for ids in binding.get("worker_cores", {}).values() for c in ids})
    return cores or [0]


def client_cpus(binding: dict, choice: str = "reserved") -> list[int] | None:
    """CPUs for the load client. ``reserved``: vLLM's reserved (frontend) CPUs, else all but the
    worker's; ``none``: no pinning (the OS schedules it, also on the worker's core); or a list "1,2"."""
    if choice == "none":
        return None
    if choice != "reserved":
        return [int(c) for c in choice.split(",")]
    available = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    reserved = [c for c in binding.get("reserved_cpus", []) if c in available]
    if reserved:
        return reserved
    rest = [c for c in available if c not in worker_cpus(binding)]
    return rest or None


def run_locust(url: str, model: str, workload: Workload, users: int, bounds: Bounds, prefix: Path,
               records: Path, cpus: list[int] | None) -> dict:
    """One headless locust run; returns its wall-clock window from the records file's events."""
    locust = str(Path(sys.executable).with_name("locust"))
    # The locustfile ends the run itself after warm-up + measuring window; -t is only the hard bound.
    run_time = int(math.ceil(max(bounds.warmup_s, bounds.warmup_max_s) + bounds.duration_s + 30))
    cmd = [
        locust, "-f", str(LOCUSTFILE.with_name(workload.locustfile)), "--headless", "-u", str(users), "-r", str(users),
        "-t", f"{run_time}s",
        "--host", url, "--csv", str(prefix), "--json-file", str(prefix), "--only-summary",
        "--exit-code-on-error", "0", "--stop-timeout", f"{bounds.stop_timeout_s:g}", "--loglevel", "WARNING",
        "--model-name", model, "--image-size", f"{workload.image_size[0]}x{workload.image_size[1]}",
        "--images-per-request", str(workload.images_per_request), "--image-source", workload.image_source,
        "--image-format", workload.image_format, "--context-words", str(workload.context_words),
        "--question", workload.question, "--max-tokens", str(workload.max_tokens),
        "--image-seed", str(workload.seed), "--records-file", str(records), "--warmup-s", f"{bounds.warmup_s:g}",
        "--warmup-requests", str(bounds.warmup_requests), "--warmup-max-s", f"{bounds.warmup_max_s:g}",
        "--measure-s", f"{bounds.duration_s:g}",
        "--request-timeout-s", f"{bounds.request_timeout_s:g}",
    ]
    cmd += workload.locust_args()
    if workload.ratio is not None:
        cmd += ["--civic-ratio", repr(float(workload.ratio))]
    if workload.policy:
        cmd += ["--civic-policy", workload.policy]
    if workload.settings:
        cmd += ["--civic-settings", json.dumps(workload.settings)]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))

    def pin() -> None:
        if cpus:
            os.sched_setaffinity(0, cpus)

    out = prefix.with_name(prefix.name + "_locust.log")
    with open(out, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                preexec_fn=pin, start_new_session=True)
        try:
            proc.wait(timeout=run_time + bounds.stop_timeout_s + bounds.locust_grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            limit = run_time + bounds.stop_timeout_s + bounds.locust_grace_s
            raise BenchError(f"locust did not finish within {limit:.0f}s (see {out})") from None
    if proc.returncode != 0:
        raise BenchError(f"locust exited with {proc.returncode}:\n{out.read_text()[-2000:]}")
    events: dict[str, Any] = {}
    recs = []
    for line in records.read_text().splitlines():
        d = json.loads(line)
        if "event" in d:
            events[d["event"]] = d["t"]
            if d["event"] == "measure_start":
                events["measure_start_steady"] = d.get("steady")
        elif d.get("start"):
            recs.append(Record(**d))
    if "test_start" not in events or "measure_start" not in events:
        raise BenchError(f"locust wrote no test_start / measure_start event to {records} (see {out})")
    start, t0 = events["test_start"], events["measure_start"]
    t1 = events.get("measure_end") or min(events.get("test_stopping", math.inf), t0 + bounds.duration_s)
    return {"test_start": start, "window_start": t0, "window_end": t1, "records": recs, "events": events}


# --------------------------------------------------------------------------------------------
# One point: locust at one concurrency, with /metrics sampled throughout
# --------------------------------------------------------------------------------------------


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


@dataclass
class Run:
    """Everything one benchmark invocation accumulates."""

    args: argparse.Namespace
    bounds: Bounds
    model: Path
    dtype: str
    specs: list[WorkloadSpec]
    configs: list[Config]
    probe_configs: list[Config]  # configs + extra civic ratios for the server-side fit
    out_json: Path
    out_dir: Path
    raw_dir: Path
    max_tokens: int
    pool_bytes: int = 0
    max_model_len: int = 0
    servers: dict[str, VllmServer] = field(default_factory=dict)
    server_info: dict[str, dict] = field(default_factory=dict)
    client_cpus: list[int] | None = None
    points: list[dict] = field(default_factory=list)
    timeseries: list[list] = field(default_factory=list)
    probe: list[dict] = field(default_factory=list)
    vision: dict[str, dict] = field(default_factory=dict)
    seeds: Iterable[int] = field(default_factory=lambda: itertools.count(1))
    served_model: str = ""
    notes: list[str] = field(default_factory=list)
    recipe: dict | None = None  # the served checkpoint's CIVIC recipe (what "civic default" gets), or None

    def workload(self, spec: WorkloadSpec, config: Config, **kw: Any) -> Workload:
        """The request shape of ``config``: vanilla and the recipe default send no civic_* key; every
        other civic configuration sends ratio, policy and exit layer (and --civic-settings)."""
        sends = config.sends_settings
        settings = {**EXPLICIT_SETTINGS, **(getattr(self.args, "civic_settings", None) or {}), **config.settings}
        return spec.workload(max_tokens=kw.pop("max_tokens", self.max_tokens),
                             ratio=float(config.ratio) if sends else None,
                             seed=kw.pop("seed", None) or next(self.seeds),
                             settings=settings if sends else {},
                             **kw)

    @property
    def full_tower_labels(self) -> set[str]:
        """Probed civic configurations whose vision tower runs on every patch (no early exit)."""
        return {c.label for c in self.probe_configs if c.server == "civic" and not c.exit_layer and not c.default}

    @property
    def main_configs(self) -> list[Config]:
        """The compared civic configurations: --ratio at the default exit, then each exit layer, then the
        recipe default (whatever its ratio)."""
        return [c for c in self.configs if c.server == "civic" and (c.ratio == self.args.ratio or c.default)]


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
    with MetricsSampler(server.url, run.bounds.poll_s, max_samples) as sampler:
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


# --------------------------------------------------------------------------------------------
# Paired TTFT probe (drift-cancelling)
# --------------------------------------------------------------------------------------------


def wait_for_count(server: VllmServer, before: dict, name: str, timeout: float = 5.0) -> dict:
    """/metrics after the request's histograms (observed when it finished) were updated."""
    deadline = time.monotonic() + timeout
    while True:
        after = parse_metrics(server.metrics())
        if after["hists"][name]["count"] > before["hists"][name]["count"] or time.monotonic() > deadline:
            return after
        time.sleep(0.05)


def paired_probe(run: Run, spec: WorkloadSpec) -> list[dict]:
    rows = []
    configs = run.probe_configs
    workloads = {c.label: run.workload(spec, c, max_tokens=run.bounds.probe_max_tokens) for c in configs}
    sessions = {name: requests.Session() for name in run.servers}
    last_server = None

    def send(config: Config, rec: Record) -> None:
        try:
            body = workloads[config.label].body(run.served_model)
            stream_chat(sessions[config.server], run.servers[config.server].url, body, rec,
                        run.bounds.request_timeout_s)
        except (StreamError, requests.RequestException) as exc:
            raise BenchError(f"probe request to {config.label} failed: {exc}") from exc

    try:
        for rnd in range(run.bounds.probe_rounds):
            k = rnd % len(configs)
            for config in configs[k:] + configs[:k]:  # rotate the order every round
                server = run.servers[config.server]
                if config.server != last_server:
                    # The first request after the other server worked was measured up to 3x slower (tiny
                    # preset): vanilla, alone on its server, would pay that every time. An untimed request
                    # first makes every measured request follow one on the same server.
                    wait_idle(server, run.bounds)
                    send(config, Record())
                    last_server = config.server
                wait_idle(server, run.bounds)
                before = parse_metrics(server.metrics())
                rec = Record()
                send(config, rec)
                after = wait_for_count(server, before, M_PREFILL)
                rows.append({
                    "workload": spec.name, "config": config.label, "round": rnd,
                    "client_ttft_s": rec.ttft,
                    "server_ttft_s": hist_delta(after, before, M_TTFT)["sum"],
                    "server_queue_s": hist_delta(after, before, M_QUEUE)["sum"],
                    "server_prefill_s": hist_delta(after, before, M_PREFILL)["sum"],
                    "prompt_tokens": rec.prompt_tokens,
                    "visual_tokens": scalar_delta(after, before, C_SEEN),
                    "visual_tokens_retained": scalar_delta(after, before, C_KEPT),
                })
    finally:
        for s in sessions.values():
            s.close()
    return rows


def bootstrap_ratio_ci(num: Sequence[float], den: Sequence[float], n: int = 2000, seed: int = 0) -> list[float] | None:
    """95% CI of median(num)/median(den), resampling rounds in pairs (a rough guide to noise)."""
    if len(num) < 3 or len(num) != len(den):
        return None
    rng = np.random.default_rng(seed)
    a, b = np.asarray(num), np.asarray(den)
    idx = rng.integers(0, len(a), size=(n, len(a)))
    ratios = np.median(a[idx], axis=1) / np.median(b[idx], axis=1)
    return [float(np.percentile(ratios, 2.5)), float(np.percentile(ratios, 97.5))]


# --------------------------------------------------------------------------------------------
# Vision-encoder share: the HF vision tower on the same pixels, one thread, the worker's core
# --------------------------------------------------------------------------------------------


def decode_data_url(url: str):
    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")


def hf_prompt_inputs(processor: Any, images: list, text: str) -> tuple[Any, Any]:
    """HF processor outputs of one user turn [images..., text] (batch size 1, generation prompt added)
    and the raw uint8 patch pixels vLLM ships (the random policy's seed)."""
    import torch

    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                           tokenize=False)
    inputs = processor(text=[prompt], images=images, return_tensors="pt")
    raw = processor.image_processor(images=images, do_rescale=False, do_normalize=False, return_tensors="pt")
    return inputs, raw["pixel_values"].round().to(torch.uint8)


def retention_plans(grid_thw: Any, merge: int, ratio: float, exit_layer: int | None, policy: str,
                    min_tokens: int = 1) -> list:
    """One ImageRetention per image of ``grid_thw`` (patches): K = num_retained(N, ratio, min_tokens)."""
    from civic_vllm.retention.plan import ImageRetention

    plans = []
    for _, h, w in grid_thw.tolist():
        n = (h // merge) * (w // merge)
        plans.append(ImageRetention(grid_hw=(h // merge, w // merge), num_kept=num_retained(n, ratio, min_tokens),
                                    policy=policy, exit_layer=exit_layer))
    return plans


def hf_compact_prefill(model: Any, inputs: Any, seed_pixels: Any, plans: list, scorer: Any = None,
                       last_token_only: bool = False) -> Any:
    """One HF prefill through CIVIC's compact path (civic_vllm.hf_compact): vision tower with retention at
    each plan's exit layer, mergers, LLM over the compact prompt. ``last_token_only``: the LM head on the
    last position only, as vLLM's prefill does (compact_logits applies it to every position)."""
    from types import SimpleNamespace

    from civic_vllm.hf_compact import build_compact_batch, compact_logits

    batch = build_compact_batch(model, inputs["input_ids"], inputs["pixel_values"], inputs["image_grid_thw"],
                                inputs["mm_token_type_ids"], plans, seed_pixels=seed_pixels, scorer=scorer)
    if last_token_only:
        head = model.lm_head
        model = SimpleNamespace(model=model.model, lm_head=lambda hidden: head(hidden[:, -1:]))
    return compact_logits(model, batch)


def timed(fn, reps: int) -> list[float]:
    """Seconds of ``reps`` calls of ``fn`` after one untimed warm-up call."""
    fn()
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def vision_probe_main(spec_json: str) -> int:
    """Subprocess entry (``--vision-probe``): prints one JSON line with in-process timings."""
    spec = json.loads(spec_json)
    if spec.get("cpus"):
        os.sched_setaffinity(0, spec["cpus"])
    import torch

    torch.set_num_threads(1)
    import transformers
    from transformers import AutoConfig, AutoProcessor

    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[spec["dtype"]]
    settings = spec.get("civic_settings") or {}  # the civic requests' other settings (policy, min_tokens, ...)
    # The checkpoint's own family class (Qwen3-VL, -MoE, Qwen3.5, -MoE): their vision towers differ (DeepStack).
    architecture = AutoConfig.from_pretrained(spec["model"]).architectures[0].removeprefix("Civic")
    model = getattr(transformers, architecture).from_pretrained(spec["model"], dtype=dtype).eval()
    processor = AutoProcessor.from_pretrained(spec["model"])
    wl = Workload(**spec["workload"])
    images = [decode_data_url(u) for u in wl.image_urls(0)]
    inputs, seed_pixels = hf_prompt_inputs(processor, images, wl.text())
    merge = model.config.vision_config.spatial_merge_size
    grid = inputs["image_grid_thw"]

    result: dict[str, Any] = {"threads": torch.get_num_threads(), "cpus": sorted(os.sched_getaffinity(0)),
                              "prompt_tokens": int(inputs["input_ids"].shape[1]),
                              "grid_thw": grid.tolist(), "dtype": spec["dtype"]}
    with torch.inference_mode():
        pixels = inputs["pixel_values"].to(dtype)
        result["vision_s"] = timed(lambda: model.model.visual(pixels, grid_thw=grid), spec["reps"])
        result["full_prefill_s"] = timed(lambda: model(**inputs, logits_to_keep=1), spec["reps"])
        for variant in spec["variants"]:
            # [ratio, exit layer] sent per request, or [ratio, exit layer, policy] for the recipe default
            ratio, exit_layer, recipe_policy = (*variant, None)[:3]
            policy = recipe_policy or settings.get("policy", "civic")
            scorer = recipe_scorer(spec["model"]) if policy == "learned" else None
            min_tokens = 1 if recipe_policy else settings.get("min_tokens", 1)
            plans = retention_plans(grid, merge, ratio, exit_layer, policy, min_tokens)
            result[compact_key(ratio, exit_layer, recipe_policy is not None)] = timed(
                lambda plans=plans, scorer=scorer: hf_compact_prefill(model, inputs, seed_pixels, plans, scorer),
                spec["reps"])
    print("VISION_PROBE " + json.dumps(result), flush=True)
    return 0


def compact_key(ratio: float, exit_layer: int | None, default: bool = False) -> str:
    """The vision probe's key for the HF compact prefill of one civic configuration."""
    return (f"compact_prefill_s_at_r{ratio!r}" + (f"_exit{exit_layer}" if exit_layer else "")
            + ("_recipe_default" if default else ""))


def recipe_scorer(model: str | Path):
    """The token scorer of a checkpoint's CIVIC recipe (fp32, eval mode)."""
    from civic_vllm.recipe import load_scorer, read_recipe

    recipe = read_recipe(model)
    if recipe is None or recipe.scorer is None:
        raise BenchError(f"{model}: policy 'learned' needs a CIVIC recipe with a scorer")
    return load_scorer(model, recipe)


def measure_vision(run: Run, spec: WorkloadSpec, cpus: list[int]) -> dict:
    wl = run.workload(spec, Config("vanilla", None), seed=0xFFF0 + len(run.vision))
    payload = {
        "model": str(run.model), "dtype": run.dtype, "reps": run.bounds.vision_reps, "cpus": cpus,
        "civic_settings": getattr(run.args, "civic_settings", None) or {},
        "variants": [[float(c.ratio), c.exit_layer] + ([c.policy] if c.default else [])
                     for c in run.main_configs if c.ratio != 1],
        "workload": {"image_size": list(wl.image_size), "images_per_request": wl.images_per_request,
                     "context_words": wl.context_words, "question": wl.question, "image_source": wl.image_source,
                     "image_format": wl.image_format, "seed": wl.seed},
    }
    cmd = [sys.executable, "-m", "benchmarks.serve", "--vision-probe", json.dumps(payload)]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("VISION_PROBE ")), None)
    if proc.returncode != 0 or line is None:
        raise BenchError(f"vision timing failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    res = json.loads(line.split(" ", 1)[1])
    summary = {"method": "HF transformers Qwen3VLForConditionalGeneration of the served checkpoint, "
                         f"{run.dtype}, torch.set_num_threads(1), pinned to CPU(s) {cpus} (the vLLM worker's), "
                         "both servers idle; model.model.visual on the processor's pixel_values of the "
                         "workload's first request (the same JPEG pixels the server decodes); median of "
                         f"{run.bounds.vision_reps} after one untimed call",
               **{k: v for k, v in res.items() if not k.endswith("_s") and not k.startswith("compact_prefill_s")}}
    for key, values in res.items():
        if isinstance(values, list) and (key.endswith("_s") or key.startswith("compact_prefill_s_at_r")):
            summary[key] = statistics.median(values)
            summary[key + "_runs"] = values
    summary["vision_share_of_hf_prefill"] = summary["vision_s"] / summary["full_prefill_s"]
    return summary


# --------------------------------------------------------------------------------------------
# Analysis
# --------------------------------------------------------------------------------------------


def fmt(value: Any, spec: str = ".3f") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float) and math.isnan(value):
        return "n/a"
    return format(value, spec)


def div(a: float | None, b: float | None) -> float | None:
    return None if a is None or b in (None, 0) else a / b


def find_point(points: list[dict], workload: str, config: str, c: int) -> dict | None:
    return next((p for p in points
                 if p["workload"] == workload and p["config"] == config and p["concurrency"] == c), None)


def ratio_rows(run: Run) -> list[dict]:
    rows = []
    for p in run.points:
        if p["server_kind"] == "vanilla":
            continue
        base = find_point(run.points, p["workload"], "vanilla", p["concurrency"])
        if base is None:
            continue
        vc, cc, vs, cs = base["client"], p["client"], base["server"], p["server"]
        rows.append({
            "workload": p["workload"], "config": p["config"], "concurrency": p["concurrency"],
            "ttft_p50_speedup": div(vc["ttft_p50_s"], cc["ttft_p50_s"]),
            "ttft_p95_speedup": div(vc["ttft_p95_s"], cc["ttft_p95_s"]),
            "server_ttft_mean_speedup": div(vs["ttft_mean_s"], cs["ttft_mean_s"]),
            "itl_p50_civic_over_vanilla": div(cc["itl_p50_s"], vc["itl_p50_s"]),
            "req_per_s_civic_over_vanilla": div(cc["req_per_s"], vc["req_per_s"]),
            "output_tok_per_s_civic_over_vanilla": div(cc["output_tok_per_s"], vc["output_tok_per_s"]),
            "kv_usage_max_vanilla": vs["kv_usage_max"], "kv_usage_max_civic": cs["kv_usage_max"],
            "waiting_mean_vanilla": vs["waiting_mean"], "waiting_mean_civic": cs["waiting_mean"],
            "running_mean_vanilla": vs["running_mean"], "running_mean_civic": cs["running_mean"],
        })
    return rows


def probe_summary(run: Run, spec: WorkloadSpec) -> dict:
    rows = [r for r in run.probe if r["workload"] == spec.name]
    by = {c.label: [r for r in rows if r["config"] == c.label] for c in run.probe_configs}
    out: dict[str, Any] = {"rounds": run.bounds.probe_rounds, "configs": {}}
    for label, rs in by.items():
        rs = sorted(rs, key=lambda r: r["round"])
        med = {k: statistics.median([r[k] for r in rs]) if rs else None
               for k in ("client_ttft_s", "server_ttft_s", "server_queue_s", "server_prefill_s")}
        out["configs"][label] = {
            **med, "n": len(rs),
            "prompt_tokens": rs[0]["prompt_tokens"] if rs else None,
            "visual_tokens_per_request": rs[0]["visual_tokens"] if rs else None,
            "visual_tokens_retained_per_request": rs[0]["visual_tokens_retained"] if rs else None,
            # what the server spent before the request was queued: image decode + HF processor
            "preprocess_s": (med["server_ttft_s"] - med["server_queue_s"] - med["server_prefill_s"])
            if rs else None,
            "client_minus_server_s": (med["client_ttft_s"] - med["server_ttft_s"]) if rs else None,
        }
    van = by.get("vanilla", [])
    for c in run.probe_configs:
        if c.server == "vanilla":
            continue
        cs = by[c.label]
        entry = out["configs"][c.label]
        for key in ("client_ttft_s", "server_ttft_s", "server_prefill_s"):
            v = [r[key] for r in sorted(van, key=lambda r: r["round"])]
            x = [r[key] for r in sorted(cs, key=lambda r: r["round"])]
            entry[key[:-2] + "_speedup"] = div(statistics.median(v) if v else None,
                                                            statistics.median(x) if x else None)
            ci = bootstrap_ratio_ci(v, x)
            entry[key[:-2] + "_speedup_ci95"] = ci
    out["fit"] = prefill_fit(out, run.full_tower_labels)
    return out


def prefill_fit(probe: dict, labels: set[str]) -> dict | None:
    """Server-side split of the engine's prefill time: a least-squares line through the civic
    server's median prefill time (``vllm:request_prefill_time_seconds``: scheduled -> first token)
    against its prompt tokens (T + K) over the probed ratios. The slope is the LLM's cost per
    prompt token; the intercept is what does not shrink with K: the vision tower on all patches,
    the merger/selection and fixed per-step costs (an upper bound of the vision tower's time).
    Only ``labels``, configurations without an early exit (which shrinks the tower too), count."""
    pts = [(e["prompt_tokens"], e["server_prefill_s"]) for label, e in probe["configs"].items()
           if label in labels and e.get("prompt_tokens") and e.get("server_prefill_s") is not None]
    if len({x for x, _ in pts}) < 2:
        return None
    x, y = np.array([p[0] for p in pts], float), np.array([p[1] for p in pts], float)
    slope, intercept = np.polyfit(x, y, 1)
    pred = intercept + slope * x
    ss_res, ss_tot = float(((y - pred) ** 2).sum()), float(((y - y.mean()) ** 2).sum())
    # Extrapolating to zero tokens is only meaningful when the probed prompts span a wide range
    # (image-dominated); with text-heavy prompts the intercept can even come out negative.
    reliable = bool(intercept > 0 and slope > 0 and x.min() <= 0.5 * x.max())
    return {"points": [[int(a), float(b)] for a, b in pts], "intercept_s": float(intercept),
            "llm_s_per_token": float(slope), "r2": 1 - ss_res / ss_tot if len(pts) > 2 and ss_tot > 0 else None,
            "reliable": reliable}


def tower_fraction(n: int, k: int, exit_layer: int | None, depth: int) -> float:
    """Vision-tower work with retention at ``exit_layer`` relative to the full tower, as the plugin's
    encoder budget counts it (patch rows per block); the blocks' attention is quadratic in rows, so
    the real saving is a little larger."""
    return image_encoder_cost(n, k, exit_layer or depth, depth) / n


def limits(run: Run, spec: WorkloadSpec, probe: dict, vision: dict | None) -> list[dict]:
    """Per civic config: LLM-side limit (T+N)/(T+K), the vision share and what is attainable."""
    geometry = Geometry.from_checkpoint(run.model, run.dtype)
    depth = geometry.vision_depth
    n_img = num_merged_tokens((1, spec.height // geometry.patch_size, spec.width // geometry.patch_size),
                              geometry.merge_size)
    van = probe["configs"].get("vanilla", {})
    prompt_v = van.get("prompt_tokens")
    rows = []
    fit = probe.get("fit")
    for c in run.probe_configs:
        if c.ratio is None:
            continue
        k_img = num_retained(n_img, float(c.ratio))
        n, k = n_img * spec.images, k_img * spec.images
        text_tokens = prompt_v - n if prompt_v else None
        llm_limit = div(text_tokens + n, text_tokens + k) if text_tokens is not None else None
        entry = probe["configs"].get(c.label, {})
        tower = tower_fraction(n_img, k_img, c.exit_layer, depth)
        row = {"workload": spec.name, "config": c.label, "ratio": float(c.ratio), "exit_layer": c.exit_layer,
               "T_text_tokens": text_tokens, "N_visual_tokens": n, "K_kept_tokens": k, "llm_side_limit": llm_limit,
               "vision_tower_fraction": tower,
               "prompt_tokens_measured": entry.get("prompt_tokens"),
               "prompt_tokens_expected": text_tokens + k if text_tokens is not None else None}
        ttft_v, pre = van.get("server_ttft_s"), van.get("preprocess_s")
        if vision and ttft_v and llm_limit:
            v_s = vision["vision_s"]
            share = v_s / ttft_v
            rest = max(ttft_v - v_s - (pre or 0.0), 0.0)
            row.update({
                "vision_s": v_s, "vanilla_server_ttft_s": ttft_v, "vision_share": share,
                "preprocess_s": pre,
                # Everything but the vision tower and preprocessing shrinks by the LLM-side limit
                # at best (attention is superlinear in tokens, so this is close to, not exactly, a bound);
                # the tower shrinks to its fraction of patch-row work (1 at the default exit).
                "attainable_speedup": ttft_v / ((pre or 0.0) + v_s * tower + rest / llm_limit),
                "attainable_speedup_simple": 1.0 / (share * tower + (1.0 - share) / llm_limit),
            })
            if (key := compact_key(float(c.ratio), c.exit_layer, c.default)) in vision:
                row["hf_in_process_speedup"] = vision["full_prefill_s"] / vision[key]
        if fit and fit.get("reliable") and ttft_v and text_tokens is not None and tower == 1.0:
            llm_v = fit["llm_s_per_token"] * (text_tokens + n)
            row.update({
                "non_llm_engine_s_fit": fit["intercept_s"], "non_llm_share_fit": fit["intercept_s"] / ttft_v,
                "llm_share_fit": llm_v / ttft_v,
                # vanilla's TTFT with its LLM part (fit slope x tokens) shrunk by exactly (T+N)/(T+K)
                "attainable_speedup_fit": ttft_v / (ttft_v - llm_v + fit["llm_s_per_token"] * (text_tokens + k)),
            })
        row["measured_speedup_probe_client"] = entry.get("client_ttft_speedup")
        row["measured_speedup_probe_server"] = entry.get("server_ttft_speedup")
        p1 = find_point(run.points, spec.name, c.label, 1)
        v1 = find_point(run.points, spec.name, "vanilla", 1)
        row["measured_speedup_sweep_c1_p50"] = (div(v1["client"]["ttft_p50_s"], p1["client"]["ttft_p50_s"])
                                                if p1 and v1 else None)
        # Engine time of one request served alone: prefill (probe) + decode (c=1 TPOT x later tokens). With no
        # batching benefit, throughput civic/vanilla would be this ratio.
        tp_v, tp_c = (v1 or {}).get("client", {}).get("tpot_p50_s"), (p1 or {}).get("client", {}).get("tpot_p50_s")
        pf_v, pf_c = van.get("server_prefill_s"), entry.get("server_prefill_s")
        if None not in (tp_v, tp_c, pf_v, pf_c):
            row["service_time_ratio_c1"] = div(pf_v + (run.max_tokens - 1) * tp_v, pf_c + (run.max_tokens - 1) * tp_c)
        if row.get("attainable_speedup") and row["measured_speedup_probe_client"]:
            row["fraction_of_attainable"] = row["measured_speedup_probe_client"] / row["attainable_speedup"]
        rows.append(row)
    return rows


def every_concurrency_check(base: dict, goal: str, per_concurrency: dict, measured_all: bool, name: str) -> dict:
    """A check that a civic/vanilla ratio is >= 1.0 at every measured concurrency."""
    return {
        **base, "goal": goal, "name": name,
        "value": min((v for v in per_concurrency.values() if v is not None), default=None),
        "requirement": ">= 1.0 at every concurrency",
        "pass": bool(per_concurrency) and measured_all
        and all(v is not None and v >= 1.0 for v in per_concurrency.values()),
        "also": {"per_concurrency": per_concurrency},
    }


def config_checks(run: Run, config: Config, lim: list[dict], probe: dict, ratios: list[dict]) -> list[dict]:
    """The goals of one compared civic configuration: issue 6's for retention on the encoder output,
    issue 8's (a higher TTFT bar) for an early exit layer; the recipe default's: TTFT and throughput at
    concurrency 8 as for an exit layer, and p95 TTFT not worse than vanilla at any concurrency."""
    label = config.label
    goal_ttft = (GOAL_TTFT_SPEEDUP_DEFAULT if config.default
                 else GOAL_TTFT_SPEEDUP_EXIT if config.exit_layer else GOAL_TTFT_SPEEDUP)
    lim_row = next((r for r in lim if r["workload"] == ACCEPT_WORKLOAD and r["config"] == label), {})
    entry = probe.get(label, {})
    speed = entry.get("client_ttft_speedup")
    base = {"config": label, "exit_layer": config.exit_layer, "recipe_default": config.default}
    checks = [{
        **base, "goal": "ttft",
        "name": f"TTFT speedup, {ACCEPT_WORKLOAD}, {label}, concurrency 1 (paired probe, client TTFT)",
        "value": speed, "requirement": f">= {goal_ttft}", "target": goal_ttft,
        "pass": speed is not None and speed >= goal_ttft,
        "ci95": entry.get("client_ttft_speedup_ci95"),
        "also": {"server_ttft_speedup": entry.get("server_ttft_speedup"),
                 "sweep_c1_p50_speedup": lim_row.get("measured_speedup_sweep_c1_p50"),
                 "attainable_speedup": lim_row.get("attainable_speedup"),
                 "attainable_speedup_fit": lim_row.get("attainable_speedup_fit"),
                 "llm_side_limit": lim_row.get("llm_side_limit"), "vision_share": lim_row.get("vision_share"),
                 "vision_tower_fraction": lim_row.get("vision_tower_fraction"),
                 "non_llm_share_fit": lim_row.get("non_llm_share_fit")},
    }]
    rr = {r["concurrency"]: r for r in ratios if r["workload"] == ACCEPT_WORKLOAD and r["config"] == label}
    c8 = rr.get(8, {}).get("output_tok_per_s_civic_over_vanilla")
    checks.append({
        **base, "goal": "throughput_c8",
        "name": f"throughput (output tok/s) civic/vanilla, {ACCEPT_WORKLOAD}, {label}, concurrency 8, fixed KV pool",
        "value": c8, "requirement": f">= {GOAL_THROUGHPUT_C8}", "target": GOAL_THROUGHPUT_C8,
        "pass": c8 is not None and c8 >= GOAL_THROUGHPUT_C8,
        "also": {"req_per_s_ratio": rr.get(8, {}).get("req_per_s_civic_over_vanilla")},
    })
    measured_all = len(rr) == len(run.bounds.concurrency)
    if config.default:
        every = {c: r.get("ttft_p95_speedup") for c, r in sorted(rr.items())}
        checks.append(every_concurrency_check(
            base, "ttft_p95_all", every, measured_all,
            f"p95 TTFT never worse than vanilla (vanilla p95 / civic p95 at concurrency {sorted(every)}), "
            f"{ACCEPT_WORKLOAD}, {label}"))
        return checks
    all_c = {c: r.get("output_tok_per_s_civic_over_vanilla") for c, r in sorted(rr.items())}
    checks.append(every_concurrency_check(
        base, "throughput_all", all_c, measured_all,
        f"throughput civic/vanilla never below 1 at any concurrency ({sorted(all_c)}), {ACCEPT_WORKLOAD}, {label}"))
    loaded = {c: r.get("ttft_p95_speedup") for c, r in sorted(rr.items()) if c >= P95_MIN_CONCURRENCY}
    checks.append({
        **base, "goal": "ttft_p95_under_load",
        "name": f"p95 TTFT under load not worse than vanilla (vanilla p95 / civic p95 at concurrency "
                f"{sorted(loaded)}), {ACCEPT_WORKLOAD}, {label}",
        "value": min((v for v in loaded.values() if v is not None), default=None),
        "requirement": ">= 1.0 at every concurrency >= " + str(P95_MIN_CONCURRENCY),
        "pass": bool(loaded) and measured_all and all(v is not None and v >= 1.0 for v in loaded.values()),
        "also": {"per_concurrency": loaded},
    })
    return checks


def acceptance(run: Run, lim: list[dict], probes: dict[str, dict], ratios: list[dict]) -> dict:
    """The issues' "done when", computed from the measurements; a missing measurement is a FAIL."""
    probe = probes.get(ACCEPT_WORKLOAD, {}).get("configs", {})
    checks = [check for config in run.main_configs for check in config_checks(run, config, lim, probe, ratios)]
    r1 = next((c.label for c in run.probe_configs if c.ratio == 1 and not c.default), None)
    s1 = probe.get(r1, {}).get("client_ttft_speedup")
    dev = None if s1 is None else 1.0 / s1 - 1.0  # civic TTFT / vanilla TTFT - 1
    checks.append({
        "config": r1, "exit_layer": None, "goal": "r1",
        "name": f"civic r=1 TTFT within {GOAL_R1_TOLERANCE:.0%} of vanilla, {ACCEPT_WORKLOAD}, "
                "concurrency 1 (paired probe)",
        "value": dev, "requirement": f"|civic/vanilla - 1| <= {GOAL_R1_TOLERANCE}",
        "pass": dev is not None and abs(dev) <= GOAL_R1_TOLERANCE,
        "ci95": (lambda ci: None if ci is None else [1 / ci[1] - 1, 1 / ci[0] - 1])(
            probe.get(r1, {}).get("client_ttft_speedup_ci95")),
        "also": {"server_ttft_deviation": (lambda s: None if s is None else 1 / s - 1)(
            probe.get(r1, {}).get("server_ttft_speedup"))},
    })
    # The goals are defined on ACCEPT_WORKLOAD; a run without it (a custom workload, e.g. a family's
    # side-by-side) still lists them, each failing for want of a measurement, and says so.
    evaluated = any(spec.name == ACCEPT_WORKLOAD for spec in run.specs)
    return {"checks": checks, "pass": all(c["pass"] for c in checks), "evaluated": evaluated}


def packing_note(run: Run, lim_row: dict, users: int) -> str:
    """How many image prompts fit one scheduler step, and the longest decode stall seen at ``users``.

    vLLM budgets a step's prompt tokens (max_num_batched_tokens) and its encoder work in placeholder
    tokens; a civic image has K placeholders but costs a vision-tower pass over N patches (fewer after an
    early exit), so the plugin's encoder cache manager re-counts encoder work at that cost
    (civic_vllm/vllm_adapter/encoder_budget.py)."""
    t, n, k = lim_row.get("T_text_tokens"), lim_row.get("N_visual_tokens"), lim_row.get("K_kept_tokens")
    if t is None or not n or not k:
        return ""
    civic = find_point(run.points, ACCEPT_WORKLOAD, lim_row["config"], users)
    vanilla = find_point(run.points, ACCEPT_WORKLOAD, "vanilla", users)
    stall = (f"; the longest gap between two tokens of one request was "
             f"{fmt((civic or {}).get('client', {}).get('itl_max_s'), '.1f')} s with civic vs "
             f"{fmt((vanilla or {}).get('client', {}).get('itl_max_s'), '.1f')} s with vanilla") if civic else ""
    cost = n * lim_row.get("vision_tower_fraction", 1.0)  # vision-tower work of one image, in tokens
    return (f"Scheduling: a step's token budget fits {MAX_NUM_BATCHED_TOKENS // (t + k)} civic prompts (T+K = "
            f"{t + k} tokens each) vs {MAX_NUM_BATCHED_TOKENS // (t + n)} vanilla ones (T+N = {t + n}); the plugin's "
            f"encoder budget lets a step start at most {max(1, int(MAX_NUM_BATCHED_TOKENS // cost))} vision passes "
            f"(each {cost:.0f} tokens of tower work){stall}. ")


def diagnose_ttft(check: dict) -> str:
    a, exit_layer = check["also"], check["exit_layer"]
    head = (f"TTFT, {check['config']}: {check['value']:.2f}x measured vs {check['target']}x required "
            f"({(check['value'] / check['target'] - 1) * 100:+.0f}%). Profile: the vision tower alone takes "
            f"{fmt(a.get('vision_share'), '.0%')} of vanilla's TTFT (HF in-process timing)")
    if exit_layer:
        return (head + f"; after exit layer {exit_layer} it does {fmt(a.get('vision_tower_fraction'), '.0%')} of its "
                f"patch-row work, and the LLM-side limit (T+N)/(T+K) is {fmt(a.get('llm_side_limit'), '.2f')}x, so "
                f"shrinking both by exactly that gives {fmt(a.get('attainable_speedup'), '.2f')}x. What remains is "
                "fixed per request (image decode and HF preprocessing, the merger, per-step costs); an earlier "
                "exit layer or a smaller ratio moves the limit, at an accuracy cost to be measured with "
                "`civic eval --exit-layer`.")
    return (head + f" (the server-side fit puts everything that does not shrink with K at "
            f"{fmt(a.get('non_llm_share_fit'), '.0%')}) and runs on every patch whatever r is; the LLM-side limit "
            f"(T+N)/(T+K) is {fmt(a.get('llm_side_limit'), '.2f')}x, so shrinking only the LLM's part by that much "
            f"gives {fmt(a.get('attainable_speedup'), '.2f')}x (HF vision) / "
            f"{fmt(a.get('attainable_speedup_fit'), '.2f')}x (server fit). Closing it needs retention inside the "
            "vision encoder: early retention (civic_exit_layer, measured here with --exit-layers) runs the blocks "
            "after the exit layer, whose attention is quadratic in patches, on the kept patches only. Otherwise only "
            "workloads where the LLM dominates prefill get closer (smaller images, longer text, larger LLMs: the "
            "real Qwen3-VL-8B's LLM share is ~79% by FLOPs).")


def diagnose_throughput(run: Run, check: dict, lim_row: dict, ratios: list[dict]) -> str:
    row = next((r for r in ratios if r["workload"] == ACCEPT_WORKLOAD and r["concurrency"] == 8
                and r["config"] == check["config"]), {})
    kv_bound = (row.get("kv_usage_max_vanilla") or 0) > 0.9 and (row.get("waiting_mean_vanilla") or 0) > 0.5
    tower = "" if check["exit_layer"] else "and the vision tower's cost per image is unchanged, "
    return (f"Throughput at concurrency 8, {check['config']}: {check['value']:.2f}x vs {GOAL_THROUGHPUT_C8}x "
            f"required ({(check['value'] / GOAL_THROUGHPUT_C8 - 1) * 100:+.0f}%). Profile: vanilla KV usage max "
            f"{fmt(row.get('kv_usage_max_vanilla'), '.0%')}, {fmt(row.get('running_mean_vanilla'), '.1f')} running / "
            f"{fmt(row.get('waiting_mean_vanilla'), '.1f')} waiting on average vs civic "
            f"{fmt(row.get('running_mean_civic'), '.1f')} / {fmt(row.get('waiting_mean_civic'), '.1f')}. "
            + ("Vanilla was KV-bound (requests waited for blocks), yet on this one-thread CPU worker "
               if kv_bound else "Vanilla was not KV-bound here: ")
            + f"every step's time grows with the tokens it processes {tower}so throughput tracks the per-request "
              f"engine time: served alone, a civic request takes {fmt(lim_row.get('service_time_ratio_c1'), '.2f')}x "
              "less engine time than a vanilla one (prefill + decode), which bounds what more resident requests "
              "can add on one compute thread. " + packing_note(run, lim_row, 8)
            + "Closing it needs less engine work per request (an earlier exit layer, a smaller ratio) or hardware "
              "where decode is memory-bound so a larger resident batch is nearly free (a GPU).")


def diagnose(run: Run, acc: dict, lim: list[dict], ratios: list[dict]) -> list[str]:
    """Why a goal was missed and what would close it, from the measured profile."""
    out = []
    for check in acc["checks"]:
        if check["pass"] or check["value"] is None:
            continue
        lim_row = next((r for r in lim if r["workload"] == ACCEPT_WORKLOAD and r["config"] == check["config"]), {})
        if check["goal"] == "ttft":
            out.append(diagnose_ttft(check))
        elif check["goal"] == "throughput_c8":
            out.append(diagnose_throughput(run, check, lim_row, ratios))
        elif check["goal"] in ("throughput_all", "ttft_p95_under_load", "ttft_p95_all"):
            bad = {c: v for c, v in check["also"]["per_concurrency"].items() if v is not None and v < 1}
            what = "Throughput" if check["goal"] == "throughput_all" else "p95 TTFT (vanilla/civic)"
            out.append(f"{what} below vanilla for {check['config']} at concurrency {sorted(bad)} (worst "
                       f"{check['value']:.2f}x): see the per-point table and timeseries.png; with few completions "
                       "per window the ratio's noise is large, rerun on an idle machine with a longer --duration "
                       "before reading it as a regression.")
        elif check["goal"] == "r1":
            ci = check.get("ci95")
            noise = ci is not None and ci[0] <= GOAL_R1_TOLERANCE and ci[1] >= -GOAL_R1_TOLERANCE
            out.append(
                f"civic r=1 vs vanilla TTFT: {check['value']:+.1%} (required within ±{GOAL_R1_TOLERANCE:.0%}); 95% "
                f"CI {fmt(ci and ci[0], '+.1%')}..{fmt(ci and ci[1], '+.1%')}"
                + (" includes the tolerance band, so this run cannot resolve it: more probe rounds (--probe-rounds) "
                   "on an idle machine." if noise else
                   ". The civic path at r=1 runs the same tower and LLM; its extra work is the processor's "
                   "budget/metrics, the selection call (skipped when K=N) and the position channels: profile the "
                   "server (py-spy on the worker) to find it."))
    return out


# --------------------------------------------------------------------------------------------
# Output: CSV, plots, Markdown
# --------------------------------------------------------------------------------------------


POINT_COLUMNS = [
    ("workload", lambda p: p["workload"]), ("config", lambda p: p["config"]),
    ("concurrency", lambda p: p["concurrency"]),
    ("window_s", lambda p: p["client"]["window_s"]),
    ("completed", lambda p: p["client"]["requests_completed"]), ("failed", lambda p: p["client"]["requests_failed"]),
    ("ttft_censored", lambda p: p["client"]["ttft_censored"]),
    ("ttft_p50_s", lambda p: p["client"]["ttft_p50_s"]), ("ttft_p95_s", lambda p: p["client"]["ttft_p95_s"]),
    ("server_ttft_mean_s", lambda p: p["server"]["ttft_mean_s"]),
    ("server_ttft_p50_s_hist", lambda p: p["server"]["ttft_p50_s"]),
    ("server_ttft_p95_s_hist", lambda p: p["server"]["ttft_p95_s"]),
    ("itl_p50_s", lambda p: p["client"]["itl_p50_s"]), ("itl_p95_s", lambda p: p["client"]["itl_p95_s"]),
    ("itl_max_s", lambda p: p["client"].get("itl_max_s")),
    ("server_itl_mean_s", lambda p: p["server"]["itl_mean_s"]),
    ("tpot_p50_s", lambda p: p["client"]["tpot_p50_s"]), ("e2e_p50_s", lambda p: p["client"]["e2e_p50_s"]),
    ("req_per_s", lambda p: p["client"]["req_per_s"]), ("output_tok_per_s", lambda p: p["client"]["output_tok_per_s"]),
    ("server_generation_tok_per_s", lambda p: p["server"]["generation_tok_per_s"]),
    ("prompt_tokens_mean", lambda p: p["client"]["prompt_tokens_mean"]),
    ("delivery_bunched_fraction", lambda p: p["client"].get("delivery_bunched_fraction")),
    ("kv_usage_mean", lambda p: p["server"]["kv_usage_mean"]), ("kv_usage_max", lambda p: p["server"]["kv_usage_max"]),
    ("running_mean", lambda p: p["server"]["running_mean"]), ("running_max", lambda p: p["server"]["running_max"]),
    ("waiting_mean", lambda p: p["server"]["waiting_mean"]), ("waiting_max", lambda p: p["server"]["waiting_max"]),
    ("preemptions", lambda p: p["server"]["preemptions"]),
    ("server_queue_mean_s", lambda p: p["server"]["queue_mean_s"]),
    ("server_prefill_mean_s", lambda p: p["server"]["prefill_mean_s"]),
    ("civic_images", lambda p: p["server"]["civic"]["images"]),
    ("civic_visual_tokens", lambda p: p["server"]["civic"]["visual_tokens"]),
    ("civic_visual_tokens_retained", lambda p: p["server"]["civic"]["visual_tokens_retained"]),
    ("civic_retention_ratio_mean", lambda p: p["server"]["civic"]["retention_ratio_mean"]),
]


def write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        for row in rows:
            w.writerow(["" if v is None else (round(v, 6) if isinstance(v, float) else v) for v in row])


def write_csvs(run: Run, ratios: list[dict], lim: list[dict]) -> list[Path]:
    d = run.out_dir
    paths = [d / "points.csv", d / "ratios.csv", d / "limits.csv", d / "probe.csv", d / "timeseries.csv"]
    write_csv(paths[0], [c for c, _ in POINT_COLUMNS], ([f(p) for _, f in POINT_COLUMNS] for p in run.points))
    keys = list(ratios[0]) if ratios else ["workload"]
    write_csv(paths[1], keys, ([r.get(k) for k in keys] for r in ratios))
    lkeys = list(dict.fromkeys(k for r in lim for k in r)) or ["workload"]
    write_csv(paths[2], lkeys, ([r.get(k) for k in lkeys] for r in lim))
    pkeys = list(run.probe[0]) if run.probe else ["workload"]
    write_csv(paths[3], pkeys, ([r.get(k) for k in pkeys] for r in run.probe))
    write_csv(paths[4], ["workload", "config", "concurrency", "t_s", "running", "waiting", "kv_usage"], run.timeseries)
    return paths


COLOURS = {"vanilla": "#777777"}
_PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]


def colour(label: str, configs: list[Config]) -> str:
    civic = [c.label for c in configs if c.server == "civic"]
    return COLOURS.get(label) or _PALETTE[civic.index(label) % len(_PALETTE)]


def concurrency_axes(ax, cs: list[int], ylabel: str, xlabel: str) -> None:
    """Concurrency on a log2 x axis with one tick per measured point, y from 0."""
    ax.set_xscale("log", base=2)
    ax.set_xlim(min(cs) / 1.4, max(cs) * 1.4)  # explicit: a plot with no finite point has no data limits
    ax.set_xticks(cs, [str(c) for c in cs])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)


def plot_all(run: Run, ratios: list[dict], lim: list[dict]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = [s.name for s in run.specs]
    labels = [c.label for c in run.configs]
    cs = list(run.bounds.concurrency)
    paths = []

    def series(workload: str, label: str, getter) -> list[float]:
        out = []
        for c in cs:
            p = find_point(run.points, workload, label, c)
            v = getter(p) if p else None
            out.append(np.nan if v is None else v)
        return out

    def grid(rows: list[tuple[str, list[tuple[Any, str]]]], name: str, title: str) -> None:
        """rows: (y label, [(getter, legend suffix), ...]); the 1st series solid, the 2nd dashed."""
        fig, axes = plt.subplots(len(rows), len(workloads), figsize=(5.2 * len(workloads), 3.2 * len(rows)),
                                 squeeze=False)
        for j, wname in enumerate(workloads):
            for i, (ylabel, getters) in enumerate(rows):
                ax = axes[i][j]
                for label in labels:
                    for (g, suffix), st in zip(getters, ["-o", "--s"]):
                        ax.plot(cs, series(wname, label, g), st, color=colour(label, run.configs),
                                label=label + suffix, ms=4)
                concurrency_axes(ax, cs, ylabel, "concurrency (locust users)")
                if i == 0:
                    ax.set_title(wname)
                ax.legend(fontsize=7)
        fig.suptitle(title, fontsize=11)
        fig.tight_layout()
        path = run.out_dir / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)

    blocks = run.server_info.get("pool", {}).get("num_blocks", "?")
    sub = f"{run.args.preset or 'custom'} model, fixed KV pool of {blocks} blocks"
    grid([("TTFT (s)", [(lambda p: p["client"]["ttft_p50_s"], " p50"), (lambda p: p["client"]["ttft_p95_s"], " p95")]),
          ("ITL (s)", [(lambda p: p["client"]["itl_p50_s"], " p50"), (lambda p: p["client"]["itl_p95_s"], " p95")])],
         "latency.png", f"Latency (client-side, warm-up excluded); {sub}")
    grid([("requests / s", [(lambda p: p["client"]["req_per_s"], "")]),
          ("output tokens / s", [(lambda p: p["client"]["output_tok_per_s"], "")])],
         "throughput.png", f"Throughput; {sub}")
    grid([("KV cache usage", [(lambda p: p["server"]["kv_usage_mean"], " mean"),
                              (lambda p: p["server"]["kv_usage_max"], " max")]),
          ("running requests", [(lambda p: p["server"]["running_mean"], " mean"),
                                (lambda p: p["server"]["running_max"], " max")]),
          ("waiting requests", [(lambda p: p["server"]["waiting_mean"], " mean"),
                                (lambda p: p["server"]["waiting_max"], " max")])],
         "scheduler.png", f"vLLM scheduler (/metrics, sampled every {run.bounds.poll_s:g}s); {sub}")

    # Ratios with the limits and the goals.
    civic_labels = [c.label for c in run.configs if c.server == "civic"]
    fig, axes = plt.subplots(2, len(workloads), figsize=(5.2 * len(workloads), 6.6), squeeze=False)
    for j, wname in enumerate(workloads):
        for i, (key, ylabel, goal) in enumerate([
            ("ttft_p50_speedup", "TTFT speedup vanilla/civic (p50)", GOAL_TTFT_SPEEDUP),
            ("output_tok_per_s_civic_over_vanilla", "throughput civic/vanilla (tok/s)", GOAL_THROUGHPUT_C8),
        ]):
            ax = axes[i][j]
            for label in civic_labels:
                ys = []
                for c in cs:
                    r = next((r for r in ratios if r["workload"] == wname and r["config"] == label
                              and r["concurrency"] == c), None)
                    ys.append(np.nan if r is None or r[key] is None else r[key])
                ax.plot(cs, ys, "-o", color=colour(label, run.configs), label=label, ms=4)
                if i == 0:
                    lr = next((r for r in lim if r["workload"] == wname and r["config"] == label), None)
                    if lr and lr.get("llm_side_limit") and float(lr["ratio"]) != 1.0:
                        ax.axhline(lr["llm_side_limit"], ls=":", color=colour(label, run.configs), lw=1,
                                   label=f"LLM-side limit {lr['llm_side_limit']:.2f}")
                        if lr.get("attainable_speedup"):
                            ax.axhline(lr["attainable_speedup"], ls="-.", color=colour(label, run.configs), lw=1,
                                       label=f"attainable (HF vision) {lr['attainable_speedup']:.2f}")
                        if lr.get("attainable_speedup_fit"):
                            ax.axhline(lr["attainable_speedup_fit"], ls=(0, (1, 3)), lw=1.5,
                                       color=colour(label, run.configs),
                                       label=f"attainable (server fit) {lr['attainable_speedup_fit']:.2f}")
            ax.axhline(1.0, color="black", lw=0.8)
            if wname == ACCEPT_WORKLOAD:
                ax.axhline(goal, color="green", ls="--", lw=0.8, label=f"goal {goal}x")
                if i == 0 and any(c.exit_layer for c in run.main_configs):
                    ax.axhline(GOAL_TTFT_SPEEDUP_EXIT, color="darkgreen", ls="--", lw=0.8,
                               label=f"goal {GOAL_TTFT_SPEEDUP_EXIT}x (exit layer)")
            concurrency_axes(ax, cs, ylabel, "concurrency")
            ax.legend(fontsize=7)
            if i == 0:
                ax.set_title(wname)
    fig.suptitle(f"CIVIC / vanilla; {sub}", fontsize=11)
    fig.tight_layout()
    path = run.out_dir / "ratios.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)

    # Time series of the scheduler at the highest concurrency.
    c_max = max(cs)
    fig, axes = plt.subplots(3, len(workloads), figsize=(5.2 * len(workloads), 7.5), squeeze=False)
    for j, wname in enumerate(workloads):
        for label in labels:
            rows = [r for r in run.timeseries if r[0] == wname and r[1] == label and r[2] == c_max]
            if not rows:
                continue
            t = [r[3] for r in rows]
            for i, (idx, ylabel) in enumerate([(4, "running"), (5, "waiting"), (6, "KV usage")]):
                axes[i][j].plot(t, [r[idx] for r in rows], color=colour(label, run.configs), label=label, lw=1)
                axes[i][j].set_ylabel(ylabel)
        for i in range(3):
            axes[i][j].axvline(0.0, color="black", ls=":", lw=0.8)
            axes[i][j].grid(alpha=0.3)
            axes[i][j].legend(fontsize=7)
        axes[0][j].set_title(f"{wname}, concurrency {c_max} (t=0: end of warm-up)")
        axes[2][j].set_xlabel("seconds since the measuring window opened")
    fig.tight_layout()
    path = run.out_dir / "timeseries.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)
    return paths


def md_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def recipe_line(recipe: dict | None) -> str:
    if not recipe:
        return "* CIVIC recipe: none (--no-recipe or a state from before recipes): no `civic default` configuration."
    return (f"* CIVIC recipe of the served checkpoint ({recipe.get('source')}; `{recipe.get('checkpoint')}`): ratio "
            f"{fmt(recipe['ratio'], '.4f')}, policy {recipe['policy']}, exit layer {recipe['exit_layer']}, scorer "
            f"{recipe.get('scorer')}, seed {recipe.get('seed')}. `civic default` = requests with no civic_* key at "
            "all, which the civic server serves with this recipe; vanilla serves the same checkpoint and ignores it.")


def summary_markdown(report: dict, run: Run) -> str:
    rel = lambda p: os.path.relpath(p, run.out_dir)  # noqa: E731
    lines = [f"# Serving benchmark: vanilla vLLM vs CIVIC ({'QUICK' if report['quick'] else 'full'} run)", ""]
    if report["warnings"]:
        lines += ["**Warnings:**", ""] + [f"* {w}" for w in report["warnings"]] + [""]
    env, pool, srv = report["machine"], report["pool"], report["server"]
    lines += [
        f"Created {report['created']} by `{report['command']}` in {report['duration_s']:.0f} s.",
        "",
        "## Setup",
        "",
        f"* Model: `{report['model']['path']}` (preset `{report['model']['preset']}`), {report['model']['dtype']}.",
        f"* Machine: {env['cpu']}, {env['cpu_count']} CPUs; load average at start "
        f"{fmt(env['load_average_at_start'][0], '.2f')}. "
        f"The load client (locust) runs on the same machine, pinned to CPU(s) {report['client']['cpus']}.",
        f"* OMP binding: VLLM_CPU_OMP_THREADS_BIND="
        f"{report['omp_binding']['vanilla'].get('VLLM_CPU_OMP_THREADS_BIND', '?')}"
        f" (vLLM default, kept); worker cores {report['omp_binding']['vanilla'].get('worker_cores')}, reserved "
        f"{report['omp_binding']['vanilla'].get('reserved_cpus')} (identical for both servers: "
        f"{report['omp_binding']['identical']}).",
        f"* KV pool (both servers): {pool['bytes']} bytes = {pool['num_blocks']} blocks x {pool['block_size']} tokens "
        f"(sized so vanilla holds {VANILLA_RESIDENT} image-dominated requests, prompt + output).",
        f"* Flags (both): {srv['common_flags']}; civic adds `--model-impl civic`; the ratio and the exit layer "
        "(`civic r=R exit L`: retention after vision block L; without it, on the encoder output) are sent per "
        "request to the same civic server"
        + (f", with the settings {report['civic_settings']}" if report.get("civic_settings") else "")
        + "; each of those requests names ratio, policy (civic unless the settings say otherwise) and exit layer "
          "(null: after the last block), so the checkpoint's recipe never fills one in.",
        recipe_line(report.get("recipe")),
        f"* Per point: a warm-up (excluded) of at least {report['bounds']['warmup_s']:g} s that lasts until every "
        f"locust user finished {report['bounds']['warmup_requests']} request(s) (at most "
        f"{report['bounds']['warmup_max_s']:g} s), then {report['bounds']['duration_s']:g} s measured; in-flight "
        f"requests then finish (up to {report['bounds']['stop_timeout_s']:g} s); concurrency "
        f"{list(report['bounds']['concurrency'])}; closed loop, no think time; "
        f"{run.max_tokens} output tokens per request (ignore_eos); every image unique.",
        "",
        "| workload | request |",
        "|---|---|",
    ]
    lines += [f"| {w['name']} | {w['why']} |" for w in report["workloads"]]
    lines += ["", "## Done when (computed)", ""]
    if not report["acceptance"].get("evaluated", True):
        lines += [f"Not evaluated: the goals are defined on the `{ACCEPT_WORKLOAD}` workload, which this run did "
                  "not measure, so every check below fails for want of a measurement. The ratios below are the "
                  "result.", ""]
    for c in report["acceptance"]["checks"]:
        ci = c.get("ci95")
        ci_s = f" (95% CI {fmt(ci[0], '.3f')}..{fmt(ci[1], '.3f')})" if ci else ""
        lines.append(f"* **{'PASS' if c['pass'] else 'FAIL'}** {c['name']}: {fmt(c['value'], '.3f')}{ci_s}, "
                     f"needs {c['requirement']}")
    if report["diagnosis"]:
        lines += ["", "### Why, and what would close it", ""] + [f"* {d}" for d in report["diagnosis"]]
    lines += ["", "## TTFT speedup next to its limits (concurrency 1)", "",
              "Measured = paired probe (configurations alternating one request at a time, medians; client TTFT = "
              "send to first token; server = `vllm:time_to_first_token_seconds`). LLM-side limit = (T+N)/(T+K). "
              "Vision share (HF) = the vision tower alone, timed in-process (see method), / vanilla's server TTFT; "
              "attainable (HF) = vanilla TTFT / (preprocessing + vision + rest / limit). Non-LLM share (fit) = "
              "intercept of the server's prefill time against prompt tokens over the probed ratios (vLLM's own "
              "modules; includes merger, selection and per-step costs) / vanilla TTFT; attainable (fit) = vanilla "
              "TTFT with its fitted LLM part divided by the limit. Engine time ratio = vanilla/civic (prefill + "
              "decode) of one request served alone: what throughput would gain with no batching benefit.", ""]
    lines.append(md_table(
        ["workload", "config", "T", "N", "K", "prompt tok", "measured (client)", "measured (server)", "sweep c=1 p50",
         "LLM-side limit", "vision s (HF)", "vision share (HF)", "attainable (HF)", "non-LLM s (fit)",
         "non-LLM share (fit)", "attainable (fit)", "HF in-process", "engine time ratio (1 request)"],
        [[r["workload"], r["config"], r["T_text_tokens"], r["N_visual_tokens"], r["K_kept_tokens"],
          r["prompt_tokens_measured"], fmt(r["measured_speedup_probe_client"], ".2f"),
          fmt(r["measured_speedup_probe_server"], ".2f"), fmt(r["measured_speedup_sweep_c1_p50"], ".2f"),
          fmt(r["llm_side_limit"], ".2f"), fmt(r.get("vision_s"), ".3f"), fmt(r.get("vision_share"), ".0%"),
          fmt(r.get("attainable_speedup"), ".2f"), fmt(r.get("non_llm_engine_s_fit"), ".3f"),
          fmt(r.get("non_llm_share_fit"), ".0%"), fmt(r.get("attainable_speedup_fit"), ".2f"),
          fmt(r.get("hf_in_process_speedup"), ".2f"), fmt(r.get("service_time_ratio_c1"), ".2f")]
         for r in report["limits"]]))
    for wname, pr in report["probe"].items():
        if fit := pr.get("fit"):
            lines.append(f"\nServer-side fit, {wname}: prefill = {fit['intercept_s']:.3f} s + "
                         f"{fit['llm_s_per_token'] * 1000:.3f} ms x prompt tokens (R² {fmt(fit['r2'], '.3f')}, "
                         f"points {fit['points']})"
                         + ("." if fit.get("reliable") else ": not used (the prompts span too narrow a range "
                            "to extrapolate to zero tokens, or the intercept is not positive)."))
    lines += ["", "## Profile at concurrency 1 (paired probe, medians, seconds)", ""]
    rows = []
    for wname, pr in report["probe"].items():
        vis = report["vision"].get(wname, {})
        for label, e in pr["configs"].items():
            rows.append([wname, label, e["n"], fmt(e["client_ttft_s"]), fmt(e["server_ttft_s"]),
                         fmt(e["client_minus_server_s"]), fmt(e["preprocess_s"]), fmt(e["server_queue_s"]),
                         fmt(e["server_prefill_s"]), fmt(vis.get("vision_s")),
                         fmt(None if e["server_prefill_s"] is None or not vis
                             else e["server_prefill_s"] - vis["vision_s"])])
    lines.append(md_table(["workload", "config", "n", "client TTFT", "server TTFT", "HTTP/SSE (client-server)",
                           "preprocess (derived)", "queue", "prefill (engine)", "vision tower (HF)",
                           "prefill - vision"], rows))
    lines += ["", "Vision method: " + (next(iter(report["vision"].values()), {}).get("method", "not measured")), ""]
    lines += ["## Sweep (client-side unless marked; warm-up excluded)", ""]
    lines.append(md_table(
        ["workload", "config", "c", "n", "TTFT p50", "TTFT p95", "server TTFT mean", "ITL p50", "TPOT p50", "req/s",
         "out tok/s", "KV mean/max", "running", "waiting", "preempt"],
        [[p["workload"], p["config"], p["concurrency"], p["client"]["requests_completed"],
          fmt(p["client"]["ttft_p50_s"]) + ("≥" if p["client"]["ttft_p50_lower_bound"] else ""),
          fmt(p["client"]["ttft_p95_s"]) + ("≥" if p["client"]["ttft_p95_lower_bound"] else ""),
          fmt(p["server"]["ttft_mean_s"]), fmt(p["client"]["itl_p50_s"], ".4f"), fmt(p["client"]["tpot_p50_s"], ".4f"),
          fmt(p["client"]["req_per_s"]), fmt(p["client"]["output_tok_per_s"], ".1f"),
          f"{fmt(p['server']['kv_usage_mean'], '.0%')}/{fmt(p['server']['kv_usage_max'], '.0%')}",
          fmt(p["server"]["running_mean"], ".1f"), fmt(p["server"]["waiting_mean"], ".1f"),
          fmt(p["server"]["preemptions"], ".0f")] for p in report["points"]]))
    lines += ["", "≥: more than 5% (p95) / 50% (p50) of the requests started in the window had no token when the "
              "stop timeout ended them, so the value is a lower bound.", "", "## CIVIC / vanilla", ""]
    lines.append(md_table(
        ["workload", "config", "c", "TTFT p50 speedup", "TTFT p95 speedup", "server TTFT speedup", "req/s ratio",
         "tok/s ratio", "ITL ratio"],
        [[r["workload"], r["config"], r["concurrency"], fmt(r["ttft_p50_speedup"], ".2f"),
          fmt(r["ttft_p95_speedup"], ".2f"),
          fmt(r["server_ttft_mean_speedup"], ".2f"), fmt(r["req_per_s_civic_over_vanilla"], ".2f"),
          fmt(r["output_tok_per_s_civic_over_vanilla"], ".2f"), fmt(r["itl_p50_civic_over_vanilla"], ".2f")]
         for r in report["ratios_vs_vanilla"]]))
    lines += ["", "## CIVIC's own metrics (`/metrics` deltas over each window)", ""]
    lines.append(md_table(
        ["workload", "config", "c", "images", "civic:visual_tokens_total", "civic:visual_tokens_retained_total",
         "kept", "civic:retention_ratio mean"],
        [[p["workload"], p["config"], p["concurrency"], fmt(p["server"]["civic"]["images"], ".0f"),
          fmt(p["server"]["civic"]["visual_tokens"], ".0f"), fmt(p["server"]["civic"]["visual_tokens_retained"], ".0f"),
          fmt(p["server"]["civic"]["retained_fraction"], ".3f"),
          fmt(p["server"]["civic"]["retention_ratio_mean"], ".3f")]
         for p in report["points"] if p["server_kind"] == "civic"]))
    lines += ["", "## Plots", ""] + [f"![{Path(p).stem}]({rel(ROOT / p)})" for p in report["files"]["plots"]]
    lines += ["", "## Files", ""] + [f"* `{p}`" for p in report["files"]["csv"] + [report["files"]["locust_dir"]]]
    if report["notes"]:
        lines += ["", "## Notes", ""] + [f"* {n}" for n in report["notes"]]
    lines += ["", "## Method notes", ""] + [f"* {k}: {v}" for k, v in report["method"].items()]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def text_tokens(tokenizer: Any, text: str, images: int) -> int:
    """Prompt tokens of one user turn [images..., text], image placeholders counted as 0."""
    content = [{"type": "image"} for _ in range(images)] + [{"type": "text", "text": text}]
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                           tokenize=False)
    pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return len(ids) - ids.count(pad)


def size_pool(run: Run) -> dict:
    """max_model_len and the KV pool (bytes) from the workloads' vanilla prompt lengths."""
    from transformers import AutoTokenizer

    geometry = Geometry.from_checkpoint(run.model, run.dtype)
    tokenizer = AutoTokenizer.from_pretrained(str(run.model))
    expected = {}
    for spec in run.specs:
        for size in (spec.width, spec.height):
            if size % (geometry.patch_size * geometry.merge_size):
                raise BenchError(f"{spec.name}: image side {size} is not a multiple of "
                                 f"{geometry.patch_size * geometry.merge_size}")
        n = num_merged_tokens((1, spec.height // geometry.patch_size, spec.width // geometry.patch_size),
                              geometry.merge_size)
        expected[spec.name] = text_tokens(tokenizer, spec.workload().text(), spec.images) + n * spec.images
    longest = max(expected.values())
    pool = plan_pool(geometry, longest, expected.get(ACCEPT_WORKLOAD, longest), run.max_tokens)
    run.max_model_len, run.pool_bytes = pool["max_model_len"], pool["pool_bytes"]
    return {"expected_vanilla_prompt_tokens": expected, "vanilla_blocks_per_image_request": pool["blocks_per_request"],
            "usable_blocks_planned": pool["usable_blocks"], "geometry": asdict(geometry)}


def plan_pool(geometry: Geometry, longest: int, anchor: int, max_tokens: int) -> dict[str, int]:
    """max_model_len (room for the ``longest`` prompt) and a KV pool in bytes that holds VANILLA_RESIDENT
    requests of ``anchor`` prompt tokens (prompt + output), at least one max_model_len request."""
    max_model_len = 256 * math.ceil((longest + max_tokens + 64) / 256)
    blocks_per_request = geometry.kv_layout(CPU_BLOCK_SIZE).blocks(anchor + max_tokens)
    usable = max(VANILLA_RESIDENT * blocks_per_request, math.ceil(max_model_len / CPU_BLOCK_SIZE))
    return {"max_model_len": max_model_len, "blocks_per_request": blocks_per_request, "usable_blocks": usable,
            "pool_bytes": (usable + 1) * geometry.block_bytes(CPU_BLOCK_SIZE)}  # +1: vLLM's null block


def start_servers(run: Run) -> None:
    images = max(s.images for s in run.specs)
    for name, civic in (("vanilla", False), ("civic", True)):
        if not any(c.server == name for c in run.configs):
            continue
        cfg = ServerConfig(
            model=str(run.model), civic=civic, max_model_len=run.max_model_len,
            max_num_batched_tokens=MAX_NUM_BATCHED_TOKENS, images_per_prompt=max(images, 1), dtype=run.dtype,
            kv_cache_gib=None, kv_cache_bytes=run.pool_bytes, trust_request_mm_kwargs=True, prefix_caching=False,
        )
        server = VllmServer(cfg, startup_timeout=run.bounds.startup_timeout_s, log_path=run.raw_dir / f"{name}.log")
        log(f"starting {name}: {' '.join(cfg.command()[1:])}")
        run.servers[name] = server
        server.start()
        pool = pool_geometry(server)
        run.server_info[name] = {"url": server.url, "command": cfg.command()[1:], "pool": pool,
                                 "binding": omp_binding(server.log_text())}
        log(f"  {name} up at {server.url}: {pool['num_blocks']} blocks x {pool['block_size']} tokens, "
            f"binding {run.server_info[name]['binding']}")
    pools = {n: (i["pool"]["num_blocks"], i["pool"]["block_size"]) for n, i in run.server_info.items()}
    if len(set(pools.values())) != 1:
        raise BenchError(f"the servers got different KV pools: {pools}")
    run.server_info["pool"] = next(iter(run.server_info.values()))["pool"]


def stop_servers(run: Run) -> None:
    for server in run.servers.values():
        server.stop()


def build_run(args: argparse.Namespace, build_model: bool = True, recipe: dict | None = None) -> Run:
    """The run's configurations and bounds. ``build_model``: build the preset and attach the recipe
    (see :func:`serve_recipe`); otherwise (``--from-state``) ``recipe`` is the recorded one."""
    quick = args.quick or os.environ.get("QUICK", "").strip().lower() in ("1", "true", "yes", "on")
    args.quick = quick
    bounds = QUICK if quick else FULL
    overrides = {k: v for k, v in {"concurrency": args.concurrency, "duration_s": args.duration,
                                   "warmup_s": args.warmup, "warmup_max_s": args.warmup_max,
                                   "probe_rounds": args.probe_rounds}.items() if v is not None}
    if overrides:
        bounds = Bounds(**{**asdict(bounds), **overrides})
    if args.model:
        model = Path(args.model).resolve()
        if build_model:
            args.preset = None
    else:
        model = make_model(args.preset, models_root() / args.preset)
    if build_model:
        model, recipe = serve_recipe(model, args)
    stem = "serve" + ("_quick" if quick else "") + (f"_{args.preset}" if args.preset not in (None, "bench") else "")
    out_json = (args.out or RESULTS / f"{stem}.json").resolve()
    out_dir = out_json.with_suffix("")
    raw_dir = RESULTS / "tmp" / f"{out_json.stem}-raw-{time.strftime('%Y%m%d-%H%M%S')}"
    if "exit_layer" in (args.civic_settings or {}):
        raise BenchError("pass exit layers with --exit-layers (each becomes a configuration next to the default "
                         "one), not in --civic-settings")
    # The sweep: vanilla, civic at --ratio, and the same with each early exit layer. civic r=1 (vanilla's
    # twin) and the fit ratios run in the paired probe only: a 4-point sweep of each would double the run.
    configs = [Config("vanilla", None), Config("civic", args.ratio)]
    configs += [Config("civic", args.ratio, layer) for layer in args.exit_layers if args.ratio != 1]
    # The recipe default: what a user of the recipe checkpoint gets with no civic_* setting at all.
    configs += [default_config(recipe)] if recipe else []
    probe_only = [Config("civic", r) for r in (Fraction(1), *PROBE_FIT_RATIOS) if r != args.ratio]
    return Run(args=args, bounds=bounds, model=model, dtype=args.dtype, specs=args.workload or
               [WORKLOADS["image-dominated"]], configs=configs,
               probe_configs=configs + sorted(probe_only, key=lambda c: -c.ratio), out_json=out_json,
               out_dir=out_dir, raw_dir=raw_dir, max_tokens=args.max_tokens, recipe=recipe)


RECIPE_COPY_SUFFIX = "-civic-recipe"
RECIPE_COPY_MARKER = "civic_bench_recipe.json"


def _recipe_flags(args: argparse.Namespace) -> dict[str, Any]:
    return {k: getattr(args, k, None) for k in ("recipe_ratio", "recipe_policy", "recipe_exit_layer", "recipe_seed")
            if getattr(args, k, None) is not None}


def bench_recipe(model: Path, args: argparse.Namespace):
    """The recipe ``--recipe-*`` describe for ``model``: ratio 1/3, policy learned, exit layer
    max(1, depth // 4), a scorer as wide as the vision tower (seeded random weights)."""
    from civic_vllm.recipe import CivicRecipe
    from civic_vllm.retention.learned import ScorerConfig

    vision = json.loads((model / "config.json").read_text())["vision_config"]
    depth = vision["depth"]
    exit_layer = getattr(args, "recipe_exit_layer", None)
    exit_layer = max(1, depth // 4) if exit_layer is None else (None if exit_layer == 0 else exit_layer)
    if exit_layer is not None and exit_layer > depth:
        raise BenchError(f"--recipe-exit-layer {exit_layer} exceeds the vision depth {depth}")
    policy = getattr(args, "recipe_policy", None) or "learned"
    ratio = getattr(args, "recipe_ratio", None) or Fraction(1, 3)
    scorer = ScorerConfig(in_dim=vision["hidden_size"]) if policy == "learned" else None
    return CivicRecipe(ratio=float(ratio), policy=policy, exit_layer=exit_layer, scorer=scorer)


def recipe_checkpoint(model: Path, recipe, seed: int) -> Path:
    """A copy of ``model`` carrying ``recipe`` (via civic_vllm.recipe.attach_recipe), rebuilt every run.

    Weight shards are hard links (same bytes, no disk; a copy across file systems), config.json is a
    real copy, so the source checkpoint is never modified. Both servers serve the copy: vanilla vLLM
    ignores the ``civic`` key and the ``civic/`` folder, so they serve the same weights."""
    from civic_vllm.recipe import SCORER_FILE, attach_recipe

    out = models_root() / f"{model.name}{RECIPE_COPY_SUFFIX}"
    if out.resolve() == model.resolve():
        raise BenchError(f"{model} is itself a recipe copy; pass its source checkpoint")
    if out.exists():
        if not (out / RECIPE_COPY_MARKER).is_file():
            raise BenchError(f"{out} exists and was not written by benchmarks.serve; not touching it")
        shutil.rmtree(out)

    def link_or_copy(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(model, out, copy_function=link_or_copy,
                    ignore=shutil.ignore_patterns(Path(SCORER_FILE).parent.name, RECIPE_COPY_MARKER))
    (out / "config.json").unlink()  # attach_recipe rewrites it: never through a link to the source
    shutil.copy2(model / "config.json", out / "config.json")
    attach_recipe(out, recipe, seed=seed)
    (out / RECIPE_COPY_MARKER).write_text(json.dumps({"source": str(model), "seed": seed,
                                                       "recipe": recipe.to_dict()}, indent=2) + "\n")
    return out


def serve_recipe(model: Path, args: argparse.Namespace) -> tuple[Path, dict | None]:
    """The checkpoint both servers serve and its recipe record (None with --no-recipe).

    A checkpoint that already carries a recipe is served as it is unless a --recipe-* flag is given;
    otherwise the recipe of :func:`bench_recipe` goes onto a copy (:func:`recipe_checkpoint`)."""
    from civic_vllm.recipe import SCORER_FILE, read_recipe

    if getattr(args, "no_recipe", False):
        if _recipe_flags(args):
            raise BenchError("--no-recipe and --recipe-* flags exclude each other")
        return model, None
    own = read_recipe(model)
    if own is not None and not _recipe_flags(args):
        return model, {**own.to_dict(), "source": "checkpoint", "checkpoint": str(model), "seed": None,
                       "scorer_file": SCORER_FILE if own.scorer else None}
    recipe = bench_recipe(model, args)
    seed = getattr(args, "recipe_seed", None) or 0
    out = recipe_checkpoint(model, recipe, seed)
    return out, {**recipe.to_dict(), "source": "attached (seeded random-weight scorer)", "checkpoint": str(out),
                 "from_checkpoint": str(model), "seed": seed, "scorer_file": SCORER_FILE if recipe.scorer else None}


def default_config(recipe: dict) -> Config:
    """The recipe default: requests carry no civic_* key; ratio / exit layer / policy say what it applies."""
    return Config("civic", Fraction(recipe["ratio"]).limit_denominator(1000), recipe["exit_layer"], default=True,
                  policy=recipe["policy"])


STATE_FIELDS = ("points", "timeseries", "probe", "vision", "notes", "server_info", "client_cpus", "pool_bytes",
                "max_model_len", "served_model")


def save_state(run: Run, extra: dict) -> Path:
    """Everything measured, written before any analysis: ``--from-state`` rebuilds the report from it."""
    state = {
        "version": 1, "quick": run.args.quick, "preset": run.args.preset, "model": str(run.model), "dtype": run.dtype,
        "ratio": str(run.args.ratio), "exit_layers": list(run.args.exit_layers),
        "workloads": [asdict(s) for s in run.specs], "bounds": asdict(run.bounds),
        "max_tokens": run.max_tokens, "out": str(run.out_json), "raw_dir": str(run.raw_dir),
        "civic_settings": getattr(run.args, "civic_settings", None), "recipe": run.recipe,
        **{f: getattr(run, f) for f in STATE_FIELDS}, **extra,
    }
    path = run.raw_dir / "state.json"
    path.write_text(json.dumps(state, default=str) + "\n")
    return path


def load_state(path: Path, args: argparse.Namespace) -> tuple[Run, dict]:
    state = json.loads(path.read_text())
    args.quick, args.preset, args.ratio = state["quick"], state["preset"], Fraction(state["ratio"])
    args.model, args.dtype, args.max_tokens = state["model"], state["dtype"], state["max_tokens"]
    args.workload = [WorkloadSpec(**w) for w in state["workloads"]]
    args.out = args.out or Path(state["out"])
    args.civic_settings = state.get("civic_settings")
    args.exit_layers = tuple(state.get("exit_layers", ()))
    run = build_run(args, build_model=False, recipe=state.get("recipe"))  # states before recipes: None
    run.args.preset = state["preset"]
    base = asdict(QUICK if state["quick"] else FULL)
    run.bounds = Bounds(**{**base, **state["bounds"], "concurrency": tuple(state["bounds"]["concurrency"])})
    run.raw_dir = Path(state["raw_dir"])
    for f in STATE_FIELDS:
        setattr(run, f, state[f])
    for point in run.points:  # client statistics are recomputed from the per-request records when kept
        records = ROOT / point["files"]["records"]
        if records.is_file():
            recs = [Record(**d) for d in map(json.loads, records.read_text().splitlines())
                    if "event" not in d and d.get("start")]
            point["client"] = client_stats(recs, point["window"]["start"], point["window"]["end"])
    return run, state


def measure(run: Run) -> dict:
    """Start the servers, time the vision tower, run every point and the probe; stop the servers."""
    final: dict[str, float] = {}
    try:
        start_servers(run)
        binding = run.server_info["vanilla"]["binding"]
        run.client_cpus = client_cpus(binding, getattr(run.args, "client_cpus", None) or "reserved")
        run.served_model = model_id(requests, run.servers["vanilla"].url)
        for spec in run.specs:
            log(f"{spec.name}: vision tower timing in-process (pinned to {worker_cpus(binding)}, one thread)")
            run.vision[spec.name] = measure_vision(run, spec, worker_cpus(binding))
            v = run.vision[spec.name]
            log(f"  vision {v['vision_s']:.3f} s, HF full prefill {v['full_prefill_s']:.3f} s "
                f"({v['vision_share_of_hf_prefill']:.0%} vision)")
        for spec in run.specs:
            for config in run.configs:
                server = run.servers[config.server]
                warm = warm_up(run, server, spec, config)
                log(f"{spec.name} / {config.label}: warm-up TTFT {[round(t, 3) for t in warm]} s")
                for users in run.bounds.concurrency:
                    run.points.append(run_point(run, server, spec, config, users))
            log(f"{spec.name}: paired TTFT probe, {run.bounds.probe_rounds} rounds x "
                f"{[c.label for c in run.probe_configs]}")
            run.probe.extend(paired_probe(run, spec))
        if "civic" in run.servers:
            text = run.servers["civic"].metrics()
            final = {k: metric_value(text, k) for k in (C_SEEN, C_KEPT, C_IMAGES)}
    finally:
        stop_servers(run)
    return final


METHOD = {
    "client_ttft": "send of the request to the first SSE chunk whose usage.completion_tokens >= 1 (requests stream "
                   "with continuous usage stats); ITL = gaps between later token chunks; percentiles from the "
                   "per-request records (full resolution; locust's own CSV/JSON round response times above 100 ms "
                   "to 2 significant digits)",
    "server_ttft": f"{M_TTFT} histogram deltas between /metrics samples at the window's edges (mean exact, "
                   "percentiles interpolated in vLLM's coarse buckets); vLLM stamps arrival before image decoding "
                   "and preprocessing, so client - server = HTTP upload/parse + SSE delivery",
    "window": "per point: locust runs warm-up + duration, then lets in-flight requests finish (stop timeout); "
              "latencies (TTFT, ITL, TPOT, e2e) are of the requests started in [start + warm-up, end] (those "
              "still without a token at the stop timeout are counted as censored), req/s counts completions in "
              "the window, output tok/s the tokens arriving in it; gauges are averaged over the window",
    "throughput_check": "output tokens/s (tokens arriving in the window / window length): with a fixed output "
                        "length it is req/s with less quantisation noise",
    "ttft_checks": "paired probe at concurrency 1: one request at a time, configurations alternating in rotating "
                   "order on the two running servers, fresh images; after every switch of server an untimed request "
                   "first, so each measured request follows one on the same server; speedup = ratio of medians, "
                   "95% CI by paired bootstrap over rounds",
    "vision_share": "(1) vision tower alone: HF transformers, in-process, on the pixels of the workload's images, "
                    "one thread pinned to the vLLM worker's core while both servers are idle, / vanilla server "
                    "TTFT at concurrency 1 (probe median); (2) server-side: intercept of a least-squares line of "
                    "the civic server's prefill time (vllm:request_prefill_time_seconds) against prompt tokens over "
                    f"the probed ratios (configs + {[str(r) for r in PROBE_FIT_RATIOS]}), / vanilla server TTFT",
    "limits": "LLM-side limit (T+N)/(T+K) with T = vanilla prompt tokens - N (measured usage), K = ceil(r N); "
              "attainable (HF) = TTFT_v / (preprocess + vision + (TTFT_v - preprocess - vision) / limit); "
              "attainable (fit) = TTFT_v / (TTFT_v - slope (T+N) + slope (T+K))",
    "caches": "prefix caching off on both servers; every image carries a unique stamp, so vLLM's encoder and "
              "multimodal processor caches never hit (their hit counters are checked per point)",
}


def write_report(run: Run, state: dict) -> dict:
    probes = {s.name: probe_summary(run, s) for s in run.specs}
    lim = [row for s in run.specs for row in limits(run, s, probes[s.name], run.vision.get(s.name))]
    ratios = ratio_rows(run)
    acc = acceptance(run, lim, probes, ratios)
    diagnosis = diagnose(run, acc, lim, ratios)
    servers = [n for n in ("vanilla", "civic") if n in run.server_info]
    bindings = {n: run.server_info[n]["binding"] for n in servers}
    env = environment_info(None)  # its only parameter is unused
    load_start = state["load_start"]
    warnings = []
    if load_start[0] > IDLE_LOAD:
        warnings.append(f"The machine was not idle (1-min load average {load_start[0]:.2f} at the start, "
                        f"{state['load_end'][0]:.2f} at the end): timings from this run are not results.")
    if run.args.quick:
        warnings.append("QUICK run: short windows and few samples; a tooling check, not a result.")
    if run.args.preset != "bench":
        warnings.append(f"Model preset {run.args.preset!r}, not the serving preset 'bench'.")
    stalls = [f"{p['workload']} {p['config']} c={p['concurrency']} ({p['client']['delivery_bunched_fraction']:.0%})"
              for p in run.points if (p["client"].get("delivery_bunched_fraction") or 0) > 0.2]
    if stalls:
        warnings.append("Token delivery stalled (half of a request's tokens reached the client in one burst) in "
                        f"more than 20% of the requests at: {', '.join(stalls)}; client TTFT there includes "
                        "the stall: compare with the server-side TTFT, and check for other load on the machine.")
    full_tower = run.full_tower_labels
    for wname, pr in probes.items():
        vis = run.vision.get(wname)
        prefills = [e["server_prefill_s"] for label, e in pr["configs"].items()
                    if label in full_tower and e.get("server_prefill_s") is not None]
        if vis and prefills and vis["vision_s"] > min(prefills):
            run.notes.append(
                f"{wname}: the HF vision tower alone ({vis['vision_s']:.3f} s) took longer than the civic server's "
                f"whole prefill at the smallest probed ratio ({min(prefills):.3f} s): HF's tower is slower than "
                "vLLM's here (or the timing was disturbed), so the HF vision share overstates the encoder; "
                "the server-side fit is measured on vLLM's own modules.")
    csv_paths = write_csvs(run, ratios, lim)
    try:
        plots = plot_all(run, ratios, lim)
    except Exception as exc:  # a plotting bug must not lose a long run's numbers
        plots = []
        run.notes.append(f"plotting failed: {type(exc).__name__}: {exc} (rerun with --from-state)")
    report = {
        "benchmark": "serve", "created": state["created"], "command": state["command"], "quick": run.args.quick,
        "duration_s": state["duration_s"], "warnings": warnings,
        "machine": {**env["machine"], "load_average_at_start": load_start, "load_average_at_end": state["load_end"]},
        "versions": env["versions"],
        "omp_binding": {**bindings, "identical": len({json.dumps(b, sort_keys=True) for b in bindings.values()}) == 1,
                        "environment": env["omp_binding"]},
        "client": {"cpus": run.client_cpus, "tool": "locust (headless, one process per point)",
                   "same_machine": True, "locustfile": relroot(LOCUSTFILE)},
        "model": {"preset": run.args.preset, "path": str(run.model), "dtype": run.dtype, **state["sizing"]},
        "pool": {"bytes": run.pool_bytes,
                 **{k: v for k, v in run.server_info["pool"].items() if k != "cache_config_info"},
                 "sized_for_vanilla_image_requests": VANILLA_RESIDENT},
        "server": {"max_model_len": run.max_model_len, "max_num_batched_tokens": MAX_NUM_BATCHED_TOKENS,
                   "prefix_caching": False,
                   "common_flags": " ".join(a for a in run.server_info[servers[0]]["command"][2:]
                                            if a not in ("--model-impl", "civic")),
                   "runs": {n: {k: v for k, v in run.server_info[n].items() if k != "pool"} for n in servers}},
        "bounds": asdict(run.bounds),
        "workloads": [{**asdict(s), **summarize_sizes(s.workload())} for s in run.specs],
        "configs": [c.label for c in run.configs], "probe_configs": [c.label for c in run.probe_configs],
        "civic_settings": getattr(run.args, "civic_settings", None),
        "explicit_settings": EXPLICIT_SETTINGS,
        "recipe": run.recipe,
        "method": METHOD,
        "vision": run.vision, "points": run.points, "ratios_vs_vanilla": ratios, "probe": probes,
        "probe_requests": run.probe, "limits": lim, "acceptance": acc, "diagnosis": diagnosis, "notes": run.notes,
        "final_metrics_civic": state["final_civic"],
        "files": {"csv": [relroot(p) for p in csv_paths], "plots": [relroot(p) for p in plots],
                  "locust_dir": relroot(run.out_dir / "locust"), "summary": relroot(run.out_dir / "summary.md"),
                  "raw": relroot(run.raw_dir)},
    }
    run.out_json.parent.mkdir(parents=True, exist_ok=True)
    run.out_json.write_text(json.dumps(report, indent=1, default=str) + "\n")
    summary = summary_markdown(report, run)
    (run.out_dir / "summary.md").write_text(summary)
    print()
    print(summary)
    log(f"wrote {relroot(run.out_json)} and {relroot(run.out_dir)}/")
    return report


def wait_for_quiet_machine(timeout_s: float = 300.0) -> tuple[float, float, float]:
    """The load average once its 1-minute value is below IDLE_LOAD (it lags the CPUs by about a
    minute, so a run started right after other work would be flagged as not idle), or at timeout."""
    deadline = time.monotonic() + timeout_s
    while (load := os.getloadavg())[0] > IDLE_LOAD and time.monotonic() < deadline:
        log(f"waiting for the machine to be idle: 1-min load average {load[0]:.2f} > {IDLE_LOAD}")
        time.sleep(15)
    return load


def exit_layers_arg(text: str) -> tuple[int, ...]:
    if text.strip().lower() in ("", "none"):
        return ()
    try:
        layers = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"exit layers must be integers like 1,3 or 'none', got {text!r}") from None
    if any(layer < 1 for layer in layers):
        raise argparse.ArgumentTypeError(f"exit layers start at 1 (after the first vision block), got {text!r}")
    return layers


def recipe_exit_layer_arg(text: str) -> int:
    """--recipe-exit-layer: a vision block >= 1, or 'none' (after the last block), kept as 0."""
    if text.strip().lower() == "none":
        return 0
    try:
        layer = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"the recipe's exit layer must be an integer >= 1 or 'none', got {text!r}") from None
    if layer < 1:
        raise argparse.ArgumentTypeError(f"the recipe's exit layer must be >= 1 or 'none', got {text!r}")
    return layer


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_served_model_args(parser, "bench", "short bounds (also: QUICK=1 in the environment)")
    parser.add_argument("--ratio", type=Fraction, default=Fraction(1, 3), help="CIVIC ratio to compare (default 1/3)")
    parser.add_argument("--workload", type=parse_workload, action="append",
                        help=f"{sorted(WORKLOADS)} or NAME:WxH:IMAGES:WORDS; repeatable "
                             "(default: image-dominated, the goals' workload)")
    parser.add_argument("--concurrency", type=lambda s: tuple(int(x) for x in s.split(",")), default=None,
                        help="comma-separated locust user counts (default 1,4,8,16; QUICK 1,8)")
    parser.add_argument("--duration", type=float, default=None, help="measured seconds per point (60; QUICK 12)")
    parser.add_argument("--warmup", type=float, default=None,
                        help="shortest excluded warm-up per point, seconds (15; QUICK 3)")
    parser.add_argument("--warmup-max", type=float, default=None,
                        help="longest warm-up per point while waiting for every user's first request (150; QUICK 45)")
    parser.add_argument("--probe-rounds", type=int, default=None, help="paired TTFT probe rounds (8; QUICK 2)")
    parser.add_argument("--max-tokens", type=int, default=64, help="output tokens per request (ignore_eos)")
    parser.add_argument("--exit-layers", type=exit_layers_arg, default=(1,),
                        help="comma-separated civic_exit_layer values, each compared as its own configuration "
                             "next to retention on the encoder output (default 1; 'none' for none)")
    parser.add_argument("--civic-settings", type=json.loads, default=None,
                        help='other civic_* settings for the civic requests, JSON without the prefix '
                             '(e.g. \'{"min_tokens": 4}\'); recorded in the report')
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path; CSVs, plots, summary.md go to the directory of the same stem")
    parser.add_argument("--client-cpus", default="reserved",
                        help="pin locust to: 'reserved' (the CPUs vLLM keeps for its frontend; default), 'none', "
                             "or a list like '1'")
    parser.add_argument("--from-state", type=Path, default=None,
                        help="rebuild the report from a run's state.json (under benchmarks/results/tmp/) "
                             "without measuring")
    recipe = parser.add_argument_group(
        "recipe", "the served checkpoint carries a CIVIC recipe (civic_vllm.recipe), measured as 'civic default': "
                  "requests with no civic_* key. A checkpoint with its own recipe keeps it unless a --recipe-* flag "
                  "is given; otherwise a copy of it gets this one (seeded random-weight scorer), and both servers "
                  "serve that copy")
    recipe.add_argument("--no-recipe", action="store_true",
                        help="serve the checkpoint as it is, without the 'civic default' configuration")
    recipe.add_argument("--recipe-ratio", type=Fraction, default=None, help="the recipe's ratio (default 1/3)")
    recipe.add_argument("--recipe-policy", default=None,
                        help="the recipe's policy (default learned: a scorer as wide as the vision tower)")
    recipe.add_argument("--recipe-exit-layer", type=recipe_exit_layer_arg, default=None,
                        help="the recipe's exit layer: a vision block, or 'none' (default max(1, depth // 4))")
    recipe.add_argument("--recipe-seed", type=int, default=None, help="seed of the scorer's random weights (0)")
    parser.add_argument("--vision-probe", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.vision_probe:
        return vision_probe_main(args.vision_probe)
    if args.from_state:
        run, state = load_state(args.from_state, args)
        run.out_dir.mkdir(parents=True, exist_ok=True)
        write_report(run, state)
        return 0

    started = time.monotonic()
    load_start = wait_for_quiet_machine()
    run = build_run(args)
    run.out_dir.mkdir(parents=True, exist_ok=True)
    run.raw_dir.mkdir(parents=True, exist_ok=True)
    sizing = size_pool(run)
    log(f"model {run.model} ({run.args.preset or 'custom'}, {run.dtype}); {'QUICK' if args.quick else 'full'} run; "
        f"pool {run.pool_bytes} bytes, max_model_len {run.max_model_len}; load average {load_start[0]:.2f}")
    if load_start[0] > IDLE_LOAD:
        log(f"WARNING: load average {load_start[0]:.2f} > {IDLE_LOAD}: the machine is busy, timings are not results")
    final = measure(run)
    command = "python -m benchmarks.serve " + " ".join(sys.argv[1:] if argv is None else argv)
    state_path = save_state(run, {
        "load_start": load_start, "load_end": os.getloadavg(), "sizing": sizing, "final_civic": final,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command.strip() + (" (QUICK=1)" if args.quick and "--quick" not in command else ""),
        "duration_s": round(time.monotonic() - started, 1),
    })
    log(f"measurements saved to {relroot(state_path)}")
    write_report(run, json.loads(state_path.read_text()))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (BenchError, KvBenchError, ServerError) as exc:
        print(f"benchmarks.serve: could not measure: {exc}", file=sys.stderr)
        sys.exit(1)
