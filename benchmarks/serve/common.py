"""Constants, metric names, the benchmark's settings (workloads, configurations, the run) and /metrics
readings."""

from __future__ import annotations

import argparse
import itertools
import math
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import requests

from benchmarks.load import Workload
from civic_vllm.prometheus import histogram, metric_value
from civic_vllm.serving import VllmServer

ROOT = Path(__file__).resolve().parents[2]
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





def relroot(path: Path) -> str:
    """``path`` relative to the repository when inside it (what the JSON records), else absolute."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)





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

    def _name(self, default: str, ratio: str, exit_layer: str) -> str:
        if self.server == "vanilla":
            return "vanilla"
        if self.default:
            return default
        return ratio + (exit_layer.format(self.exit_layer) if self.exit_layer else "")

    @property
    def label(self) -> str:
        return self._name("civic default", f"civic r={self.ratio}", " exit {}")

    @property
    def slug(self) -> str:
        """``label`` as a file name."""
        return self._name("civic_default", f"civic_r{str(self.ratio).replace('/', '-')}", "_exit{}")

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


# ---- /metrics ----

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
    """Polls ``metrics_url`` every ``poll_s`` in a thread; keeps (wall time, parsed) samples."""

    def __init__(self, metrics_url: str, poll_s: float, max_samples: int):
        self.metrics_url, self.poll_s, self.max_samples = metrics_url, poll_s, max_samples
        self.samples: list[tuple[float, dict]] = []
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        session = requests.Session()
        for _ in range(self.max_samples):
            try:
                text = session.get(self.metrics_url, timeout=5).text
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


def fmt(value: Any, spec: str = ".3f") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float) and math.isnan(value):
        return "n/a"
    return format(value, spec)


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
