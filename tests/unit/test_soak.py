"""The soak's memory check: an RSS slope fitted on the post-warm-up half, against a fixed limit.

Synthetic sample series only (no server): the fit must recover known slopes, ignore a warm-up
ramp, and fail a leak that a relative-growth threshold would have passed.
"""

from __future__ import annotations

import math
import random

import pytest

from benchmarks.soak import MAX_SLOPE_MIB_PER_MIN, MIN_FIT_SAMPLES, WARMUP_FRACTION, fit_line, memory_trend

MIB = 2**20


def series(seconds: float, interval: float, rss_mib) -> list[dict]:
    """Samples every `interval` seconds with RSS rss_mib(t) (MiB)."""
    count = int(seconds / interval) + 1
    return [{"t": i * interval, "rss_bytes": int(rss_mib(i * interval) * MIB)} for i in range(count)]


def test_fit_line_recovers_an_exact_line():
    ts = [0.0, 1.0, 2.5, 4.0, 7.0]
    intercept, slope, error = fit_line(ts, [3.0 - 0.5 * t for t in ts])
    assert intercept == pytest.approx(3.0) and slope == pytest.approx(-0.5) and error == pytest.approx(0.0, abs=1e-12)


def test_fit_line_error_shrinks_with_more_points():
    rng = random.Random(0)
    errors = []
    for count in (20, 2000):
        ts = [i / count for i in range(count)]
        errors.append(fit_line(ts, [rng.gauss(0.0, 1.0) for _ in ts])[2])
    assert errors[1] < errors[0]


@pytest.mark.parametrize("ts", [[1.0, 2.0], [5.0, 5.0, 5.0]])
def test_fit_line_refuses_degenerate_input(ts):
    with pytest.raises(ValueError):
        fit_line(ts, [1.0] * len(ts))


@pytest.mark.parametrize("slope_mib_per_min", [0.0, 0.7, 8.0, -3.0])
def test_slope_is_reported_in_mib_per_minute(slope_mib_per_min):
    memory = memory_trend(series(1800, 5, lambda t: 3000 + slope_mib_per_min * t / 60), 1800)
    assert memory["slope_mib_per_min"] == pytest.approx(slope_mib_per_min, abs=1e-3)
    assert memory["slope_ok"] == (slope_mib_per_min <= MAX_SLOPE_MIB_PER_MIN)


def test_warm_up_growth_does_not_count():
    # Steep growth that saturates well inside the first half (caches filling), then flat.
    seconds = 1800
    memory = memory_trend(series(seconds, 5, lambda t: 3000 + 400 * (1 - math.exp(-t / 60))), seconds)
    assert memory["warmup_seconds"] == WARMUP_FRACTION * seconds
    assert memory["fit_window_seconds"][0] >= memory["warmup_seconds"]
    assert memory["slope_ok"] and memory["slope_mib_per_min"] < MAX_SLOPE_MIB_PER_MIN


def test_a_leak_a_relative_threshold_passes_fails_the_slope():
    # 8 MiB/min on a 3 GiB process: under 5% growth over 15 minutes, yet a leak.
    rng = random.Random(1)
    seconds = 1800
    memory = memory_trend(series(seconds, 5, lambda t: 3072 + 8 * t / 60 + rng.gauss(0, 10)), seconds)
    assert memory["growth"] < 0.05
    assert not memory["slope_ok"]
    assert memory["slope_mib_per_min"] - 3 * memory["slope_stderr_mib_per_min"] > MAX_SLOPE_MIB_PER_MIN


def test_noise_alone_passes():
    rng = random.Random(2)
    memory = memory_trend(series(1800, 5, lambda t: 3072 + rng.gauss(0, 20)), 1800)
    assert memory["slope_ok"]


def test_the_limit_is_a_fixed_slope_not_a_fraction_of_memory():
    seconds, slope = 1800, MAX_SLOPE_MIB_PER_MIN * 1.5
    small, large = (memory_trend(series(seconds, 5, lambda t, base=base: base + slope * t / 60), seconds)
                    for base in (500, 50_000))
    assert not small["slope_ok"] and not large["slope_ok"]


def test_too_few_samples_after_the_warm_up_is_an_error():
    interval = 5
    seconds = 2 * interval * (MIN_FIT_SAMPLES - 2)  # the second half holds fewer samples than a fit needs
    with pytest.raises(RuntimeError, match="samples after the warm-up"):
        memory_trend(series(seconds, interval, lambda t: 3000), seconds)
