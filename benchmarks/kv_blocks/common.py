"""Constants, bounds and the workloads of the KV benchmark."""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "kv_blocks.json"

CPU_BLOCK_SIZE = 128  # vLLM's CPU default; the measured block size (from /metrics) is what is used
PROBE_TOKENS = 16  # decode tokens a request holds when its blocks are counted (the "output")
PROBE_ATTEMPTS = 6  # a /metrics call can span tens of tokens; each retry is a fresh draw
VANILLA_REQUESTS_IN_POOL = 4  # the pool is sized so vanilla holds this many image-dominated requests
FIRE_FACTOR = 3  # queue at least this many times the requests vanilla can hold
RATIOS_FULL = (Fraction(1), Fraction(1, 2), Fraction(1, 3), Fraction(1, 4))
RATIOS_QUICK = (Fraction(1), Fraction(1, 3))
# The acceptance: at r = 1/3 on image-dominated prompts ...
ACCEPT_RATIO = Fraction(1, 3)
ACCEPT_WORKLOAD = "image-dominated"
ACCEPT_MAX_SHRINK = 0.36  # ... prompt tokens and blocks/request <= 0.36x vanilla
ACCEPT_MIN_GROWTH = 2.7  # ... and resident requests >= 2.7x vanilla

M_CIVIC_SEEN = "civic:visual_tokens_total"
M_CIVIC_KEPT = "civic:visual_tokens_retained_total"








def ratio_label(r: Fraction | None) -> str:
    return "vanilla" if r is None else f"r={r}"


@dataclass(frozen=True)
class Bounds:
    """Every loop is bounded in count and time; --quick only shortens the bounds."""

    settle_s: float  # stop sampling once the resident peak has not grown for this long
    deadline_s: float  # hard limit of one residency run
    max_fire: int  # most sequences queued at once in one residency run
    hold_cap: int  # most decode tokens a residency request asks for
    poll_s: float = 0.05  # faster polling makes the API server spend its CPU on /metrics
    residency_runs: int = 2  # the peak is the max over runs: a short peak can fall between samples
    max_samples: int = 4000
    probe_timeout_s: float = 180.0
    idle_timeout_s: float = 60.0
    startup_timeout_s: float = 900.0


FULL = Bounds(settle_s=6.0, deadline_s=240.0, max_fire=48, hold_cap=512)
QUICK = Bounds(settle_s=2.0, deadline_s=120.0, max_fire=36, hold_cap=384, residency_runs=1)


@dataclass(frozen=True)
class Workload:
    """One image of ``side`` x ``side`` px and a question; ``text`` is the question/context."""

    name: str
    side: int
    text: str
