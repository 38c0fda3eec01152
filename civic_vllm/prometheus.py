"""Reading vLLM's ``/metrics`` (Prometheus text exposition format): the one parser of the project.

Tests, evaluation, the demo and the benchmarks read counters (``civic:*``, ``vllm:*``), the
labels of info gauges (``vllm:cache_config_info``: block size, blocks) and histograms (TTFT)
through these functions only.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from typing import NamedTuple

__all__ = ["Sample", "histogram", "metric_labels", "metric_value", "samples"]

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


class Sample(NamedTuple):
    name: str
    labels: dict[str, str]
    value: float


def samples(text: str) -> Iterator[Sample]:
    """Every sample line (comments, blank and malformed lines skipped; timestamps ignored)."""
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        match = _SAMPLE.match(line)
        if match is None:
            continue
        try:
            value = float(match.group(3))
        except ValueError:
            continue
        yield Sample(match.group(1), dict(_LABEL.findall(match.group(2) or "")), value)


def metric_value(text: str, name: str) -> float:
    """Sum of all samples of one metric over its label sets (0 when absent)."""
    return sum(s.value for s in samples(text) if s.name == name)


def metric_labels(text: str, name: str) -> dict[str, str]:
    """Labels of the first sample of ``name`` (info-style gauges carry their data there); {} when absent."""
    return next((s.labels for s in samples(text) if s.name == name), {})


def histogram(text: str, name: str) -> dict:
    """{"buckets": {le: cumulative count}, "sum": s, "count": n} of one histogram, summed over label sets."""
    hist = {"buckets": {}, "sum": 0.0, "count": 0.0}
    for s in samples(text):
        if s.name == f"{name}_bucket" and "le" in s.labels:
            le = math.inf if s.labels["le"] == "+Inf" else float(s.labels["le"])
            hist["buckets"][le] = hist["buckets"].get(le, 0.0) + s.value
        elif s.name == f"{name}_sum":
            hist["sum"] += s.value
        elif s.name == f"{name}_count":
            hist["count"] += s.value
    return hist
