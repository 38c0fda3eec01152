"""Soak test: a civic server under mixed load for a bounded time, 0 failures and flat memory.

Starts `vllm serve --model-impl civic` (tiny preset by default) on 127.0.0.1, runs locust
headless with benchmarks/locust/soak_locustfile.py (mixed ratios, policies, sizes and image
counts) for SOAK_SECONDS, samples the resident memory of the server's whole process group
(API server, engine core, worker) and its finished-request counter every few seconds, and
checks:

* locust reports 0 failed requests;
* memory is flat after the warm-up: the least-squares slope of the group's RSS over the second
  half of the run (the first half is the warm-up: caches filling, allocator arenas growing) is
  at most MAX_SLOPE_MIB_PER_MIN, a fixed figure, whatever the run's length. A relative growth
  threshold is not used: 5% of 3 GiB over 8 minutes would pass a leak of about 19 MiB/min;
* the server is idle afterwards (no running request, KV usage 0).

The RSS growth from the warm-up's end to the end and the slope's standard error are reported
too. Writes benchmarks/results/soak.json and soak.png (RSS with the fitted line, and req/s, over
time); exits 1 when a check fails. Environment (all optional):

    SOAK_SECONDS=1800 SOAK_USERS=4 SOAK_SAMPLE_SECONDS=5
    SOAK_PRESET=tiny SOAK_OUT=benchmarks/results/soak.json

    make soak                      # 30 minutes
    SOAK_SECONDS=120 make soak     # 2 minutes (a smoke run: a 1-minute fit says little)
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import psutil

from civic_vllm.model_factory import default_model_dir
from civic_vllm.prometheus import metric_value
from civic_vllm.serving import ServerConfig, VllmServer

ROOT = Path(__file__).resolve().parents[1]
LOCUSTFILE = ROOT / "benchmarks" / "locust" / "soak_locustfile.py"


def _env_float(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


ROLES = {"vllm": "api_server", "VLLM::EngineCore": "engine_core", "VLLM::Worker": "worker"}


def group_rss(pgid: int) -> dict[str, int]:
    """RSS in bytes of the group's live processes, summed per role (API server, engine core, worker, other)."""
    sizes: dict[str, int] = {}
    for process in psutil.process_iter(["name"]):
        try:
            if os.getpgid(process.pid) == pgid:
                role = ROLES.get(process.info["name"], "other")
                sizes[role] = sizes.get(role, 0) + process.memory_info().rss
        except (ProcessLookupError, psutil.Error):
            continue
    return sizes


class Sampler(threading.Thread):
    """Every `interval` seconds: elapsed time, group RSS, finished requests (from /metrics)."""

    def __init__(self, server: VllmServer, interval: float):
        super().__init__(daemon=True)
        self.server, self.interval = server, interval
        self.samples: list[dict] = []
        self.stop_event = threading.Event()
        self.start_time = time.monotonic()

    def sample(self) -> None:
        try:
            finished = metric_value(self.server.metrics(), "vllm:request_success_total")
        except Exception:  # a slow /metrics must not end the soak; the gap shows in the data
            finished = None
        rss = group_rss(self.server.process.pid)
        self.samples.append({
            "t": round(time.monotonic() - self.start_time, 2),
            "rss_bytes": sum(rss.values()),
            "rss_by_role_mib": {role: round(size / 2**20, 1) for role, size in sorted(rss.items())},
            "requests_finished": finished,
        })

    def run(self) -> None:
        while not self.stop_event.is_set():
            self.sample()
            self.stop_event.wait(self.interval)


def locust_totals(csv_prefix: str) -> dict:
    with open(f"{csv_prefix}_stats.csv", newline="") as handle:
        rows = {row["Name"]: row for row in csv.DictReader(handle)}
    total = rows["Aggregated"]
    failures = {}
    failures_path = Path(f"{csv_prefix}_failures.csv")
    if failures_path.exists():
        with open(failures_path, newline="") as handle:
            failures = {f"{r['Method']} {r['Name']}: {r['Error']}": int(r["Occurrences"])
                        for r in csv.DictReader(handle)}
    return {
        "requests": int(total["Request Count"]),
        "failures": int(total["Failure Count"]),
        "requests_per_second": float(total["Requests/s"]),
        "latency_ms": {"median": float(total["Median Response Time"]), "p95": float(total["95%"]),
                       "max": float(total["Max Response Time"])},
        "by_name": {name: {"requests": int(r["Request Count"]), "failures": int(r["Failure Count"]),
                           "median_ms": float(r["Median Response Time"])}
                    for name, r in rows.items() if name != "Aggregated"},
        "failure_messages": failures,
    }


WARMUP_FRACTION = 0.5  # the RSS slope is fitted on the second half of the run
MAX_SLOPE_MIB_PER_MIN = 2.0  # fixed: 30 MiB over a 30-minute run's second half
MIN_FIT_SAMPLES = 10


def fit_line(ts: list[float], ys: list[float]) -> tuple[float, float, float]:
    """Least squares y = a + b·t: (a, b, standard error of b)."""
    if len(ts) < 3:
        raise ValueError(f"a line needs at least 3 points to fit with an error, got {len(ts)}")
    mean_t, mean_y = statistics.mean(ts), statistics.mean(ys)
    sxx = sum((t - mean_t) ** 2 for t in ts)
    if sxx == 0:
        raise ValueError("all samples at the same time")
    slope = sum((t - mean_t) * (y - mean_y) for t, y in zip(ts, ys)) / sxx
    intercept = mean_y - slope * mean_t
    residual = sum((y - intercept - slope * t) ** 2 for t, y in zip(ts, ys))
    return intercept, slope, (residual / (len(ts) - 2) / sxx) ** 0.5


def memory_trend(samples: list[dict], run_seconds: float, max_slope: float = MAX_SLOPE_MIB_PER_MIN) -> dict:
    """RSS slope (MiB/min) over the post-warm-up half of the run, against the fixed limit."""
    warmup = WARMUP_FRACTION * run_seconds
    after = [s for s in samples if s["t"] >= warmup and s.get("rss_bytes")]
    if len(after) < MIN_FIT_SAMPLES:
        raise RuntimeError(f"only {len(after)} samples after the warm-up ({warmup:.0f} s): run longer "
                           f"or sample more often (at least {MIN_FIT_SAMPLES})")
    minutes = [s["t"] / 60 for s in after]
    mib = [s["rss_bytes"] / 2**20 for s in after]
    intercept, slope, error = fit_line(minutes, mib)
    return {
        "warmup_seconds": warmup,
        "fit_window_seconds": [after[0]["t"], after[-1]["t"]],
        "fit_samples": len(after),
        "slope_mib_per_min": round(slope, 3),
        "slope_stderr_mib_per_min": round(error, 3),
        "intercept_mib": round(intercept, 1),
        "max_slope_mib_per_min": max_slope,
        "slope_ok": slope <= max_slope,
        "rss_after_warmup_mib": round(mib[0], 1),
        "rss_end_mib": round(mib[-1], 1),
        "rss_peak_after_warmup_mib": round(max(mib), 1),
        "growth": round((mib[-1] - mib[0]) / mib[0], 4),
    }


def request_rate(samples: list[dict]) -> list[tuple[float, float]]:
    points = []
    for a, b in zip(samples, samples[1:]):
        if a["requests_finished"] is not None and b["requests_finished"] is not None and b["t"] > a["t"]:
            points.append((b["t"], (b["requests_finished"] - a["requests_finished"]) / (b["t"] - a["t"])))
    return points


def plot(samples: list[dict], memory: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    warmup_seconds = memory["warmup_seconds"]
    top.plot([s["t"] for s in samples], [s["rss_bytes"] / 2**20 for s in samples], color="tab:blue")
    window = memory["fit_window_seconds"]
    top.plot(window, [memory["intercept_mib"] + memory["slope_mib_per_min"] * t / 60 for t in window],
             color="tab:red", label=f"fit {memory['slope_mib_per_min']:+.2f} MiB/min "
                                    f"(limit {memory['max_slope_mib_per_min']:g})")
    top.set_ylabel("server group RSS (MiB)")
    rate = request_rate(samples)
    bottom.plot([t for t, _ in rate], [r for _, r in rate], color="tab:green")
    bottom.set_ylabel("finished requests / s")
    bottom.set_xlabel("seconds since start of load")
    for axis in (top, bottom):
        axis.axvspan(0, warmup_seconds, color="grey", alpha=0.15, label="warm-up")
        axis.grid(alpha=0.3)
    top.legend(loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    # Settings come from the environment (make soak passes them); the parser gives --help and
    # refuses stray arguments instead of starting a 30-minute run.
    argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    seconds = int(_env_float("SOAK_SECONDS", 1800))
    users = int(_env_float("SOAK_USERS", 4))
    interval = _env_float("SOAK_SAMPLE_SECONDS", 5)
    preset = os.environ.get("SOAK_PRESET", "tiny")
    out = Path(os.environ.get("SOAK_OUT", ROOT / "benchmarks" / "results" / "soak.json"))
    if not 30 <= seconds <= 6 * 3600:
        raise SystemExit("SOAK_SECONDS must be between 30 and 21600")
    if not 1 <= users <= 64:
        raise SystemExit("SOAK_USERS must be between 1 and 64")

    model = str(default_model_dir(preset))
    config = ServerConfig(model=model, civic=True, images_per_prompt=4)
    workdir = Path(tempfile.mkdtemp(prefix="civic-soak-"))
    csv_prefix = str(workdir / "locust")
    print(f"[soak] {seconds}s, {users} users, model {preset}; server log and locust CSV in {workdir}", flush=True)

    with VllmServer(config, log_path=workdir / "server.log") as server:
        sampler = Sampler(server, interval)
        sampler.start()
        command = [
            str(Path(sys.executable).with_name("locust")), "-f", str(LOCUSTFILE), "--headless",
            "-u", str(users), "-r", str(users), "-t", f"{seconds}s", "--stop-timeout", "120",
            "--host", server.url, "--csv", csv_prefix, "--only-summary", "--loglevel", "WARNING",
        ]
        env = dict(os.environ, SOAK_MODEL=model)
        started = time.monotonic()
        locust = subprocess.run(command, env=env, cwd=ROOT, timeout=seconds + 600,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        wall = time.monotonic() - started
        sampler.stop_event.set()
        sampler.join(timeout=30)
        sampler.sample()  # one idle sample after the load
        idle_metrics = server.metrics()
        deadline = time.monotonic() + 60
        while (metric_value(idle_metrics, "vllm:num_requests_running") or
               metric_value(idle_metrics, "vllm:kv_cache_usage_perc")) and time.monotonic() < deadline:
            time.sleep(1)
            idle_metrics = server.metrics()
        server_alive = server.process.poll() is None

    totals = locust_totals(csv_prefix)
    memory = memory_trend(sampler.samples, seconds)
    idle = {
        "num_requests_running": metric_value(idle_metrics, "vllm:num_requests_running"),
        "kv_cache_usage_perc": metric_value(idle_metrics, "vllm:kv_cache_usage_perc"),
    }
    checks = {
        "zero_failures": totals["failures"] == 0 and totals["requests"] > 0,
        "memory_flat": memory["slope_ok"],
        "idle_after": idle["num_requests_running"] == 0 and idle["kv_cache_usage_perc"] == 0,
        "server_alive": server_alive,
    }
    result = {
        "command": f"SOAK_SECONDS={seconds} SOAK_USERS={users} make soak",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
                    "omp_binding": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto (vLLM default)")},
        "server": {"model": preset, "dtype": config.dtype, "max_model_len": config.max_model_len,
                   "kv_cache_gib": config.kv_cache_gib, "command": " ".join(config.command()[1:])},
        "load": {"seconds": seconds, "users": users, "wall_seconds": round(wall, 1),
                 "locustfile": str(LOCUSTFILE.relative_to(ROOT))},
        "locust": totals,
        "memory": memory,
        "idle_after": idle,
        "checks": checks,
        "passed": all(checks.values()),
        "samples": sampler.samples,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    title = (f"civic soak: {seconds}s, {users} users, {totals['requests']} requests, "
             f"{totals['failures']} failures, RSS slope {memory['slope_mib_per_min']:+.2f} MiB/min")
    plot(sampler.samples, memory, out.with_suffix(".png"), title)

    print(locust.stdout[-3000:] if locust.returncode else "", end="")
    print(f"[soak] requests {totals['requests']}, failures {totals['failures']}, "
          f"{totals['requests_per_second']:.2f} req/s, median {totals['latency_ms']['median']:.0f} ms, "
          f"p95 {totals['latency_ms']['p95']:.0f} ms")
    print(f"[soak] RSS slope over the second half {memory['slope_mib_per_min']:+.2f} "
          f"± {memory['slope_stderr_mib_per_min']:.2f} MiB/min (limit {memory['max_slope_mib_per_min']:g}); "
          f"RSS after warm-up {memory['rss_after_warmup_mib']} MiB -> end {memory['rss_end_mib']} MiB "
          f"({memory['growth']:+.2%})")
    print(f"[soak] idle after: {idle}; checks {checks}")
    print(f"[soak] wrote {out} and {out.with_suffix('.png')}: {'PASSED' if result['passed'] else 'FAILED'}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
