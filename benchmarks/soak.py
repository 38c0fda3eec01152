"""Soak test: a civic server under mixed load for a bounded time, 0 failures and flat memory.

Starts `vllm serve --model-impl civic` (tiny preset by default) on 127.0.0.1, runs locust
headless with benchmarks/locust/soak_locustfile.py (mixed ratios, policies, sizes and image
counts) for SOAK_SECONDS, samples the resident memory of the server's whole process group
(API server, engine core, worker) and its finished-request counter every few seconds, and
checks:

* locust reports 0 failed requests;
* memory growth after the warm-up (the first SOAK_WARMUP of the run) stays under
  SOAK_MAX_GROWTH: RSS at the end (mean of the last 3 samples) against RSS right after the
  warm-up (mean of the first 3 samples after it);
* the server is idle afterwards (no running request, KV usage 0).

Writes benchmarks/results/soak.json and soak.png (RSS and req/s over time); exits 1 when a
check fails. Environment (all optional):

    SOAK_SECONDS=600 SOAK_USERS=4 SOAK_WARMUP=0.2 SOAK_SAMPLE_SECONDS=5 SOAK_MAX_GROWTH=0.05
    SOAK_PRESET=tiny SOAK_OUT=benchmarks/results/soak.json

    make soak                      # 10 minutes
    SOAK_SECONDS=120 make soak     # 2 minutes
"""

from __future__ import annotations

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
from civic_vllm.serving import ServerConfig, VllmServer, metric_value

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


def memory_growth(samples: list[dict], warmup_seconds: float) -> dict:
    after = [s for s in samples if s["t"] >= warmup_seconds]
    if len(after) < 6:
        raise RuntimeError(f"only {len(after)} samples after the warm-up: run longer or sample more often")
    start = statistics.mean(s["rss_bytes"] for s in after[:3])
    end = statistics.mean(s["rss_bytes"] for s in after[-3:])
    peak = max(s["rss_bytes"] for s in after)
    half = after[len(after) // 2 :]
    return {
        "rss_after_warmup_mib": round(start / 2**20, 1),
        "rss_end_mib": round(end / 2**20, 1),
        "rss_peak_after_warmup_mib": round(peak / 2**20, 1),
        "growth": round((end - start) / start, 4),
        # Least-squares slopes (MiB/min): a leak keeps the second half's slope up, a cache
        # filling up flattens it.
        "slope_mib_per_min": round(_slope(after) * 60, 2),
        "slope_second_half_mib_per_min": round(_slope(half) * 60, 2),
    }


def _slope(samples: list[dict]) -> float:
    ts = [s["t"] for s in samples]
    ys = [s["rss_bytes"] / 2**20 for s in samples]
    mean_t, mean_y = statistics.mean(ts), statistics.mean(ys)
    return sum((t - mean_t) * (y - mean_y) for t, y in zip(ts, ys)) / sum((t - mean_t) ** 2 for t in ts)


def request_rate(samples: list[dict]) -> list[tuple[float, float]]:
    points = []
    for a, b in zip(samples, samples[1:]):
        if a["requests_finished"] is not None and b["requests_finished"] is not None and b["t"] > a["t"]:
            points.append((b["t"], (b["requests_finished"] - a["requests_finished"]) / (b["t"] - a["t"])))
    return points


def plot(samples: list[dict], warmup_seconds: float, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    top.plot([s["t"] for s in samples], [s["rss_bytes"] / 2**20 for s in samples], color="tab:blue")
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


def main() -> int:
    seconds = int(_env_float("SOAK_SECONDS", 600))
    users = int(_env_float("SOAK_USERS", 4))
    warmup = _env_float("SOAK_WARMUP", 0.2)
    interval = _env_float("SOAK_SAMPLE_SECONDS", 5)
    max_growth = _env_float("SOAK_MAX_GROWTH", 0.05)
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
    growth = memory_growth(sampler.samples, warmup * seconds)
    idle = {
        "num_requests_running": metric_value(idle_metrics, "vllm:num_requests_running"),
        "kv_cache_usage_perc": metric_value(idle_metrics, "vllm:kv_cache_usage_perc"),
    }
    checks = {
        "zero_failures": totals["failures"] == 0 and totals["requests"] > 0,
        "memory_flat": growth["growth"] < max_growth,
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
        "memory": {"warmup_seconds": warmup * seconds, "max_growth": max_growth, **growth},
        "idle_after": idle,
        "checks": checks,
        "passed": all(checks.values()),
        "samples": sampler.samples,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    title = (f"civic soak: {seconds}s, {users} users, {totals['requests']} requests, "
             f"{totals['failures']} failures, RSS growth {growth['growth']:+.1%}")
    plot(sampler.samples, warmup * seconds, out.with_suffix(".png"), title)

    print(locust.stdout[-3000:] if locust.returncode else "", end="")
    print(f"[soak] requests {totals['requests']}, failures {totals['failures']}, "
          f"{totals['requests_per_second']:.2f} req/s, median {totals['latency_ms']['median']:.0f} ms, "
          f"p95 {totals['latency_ms']['p95']:.0f} ms")
    print(f"[soak] RSS after warm-up {growth['rss_after_warmup_mib']} MiB -> end {growth['rss_end_mib']} MiB "
          f"({growth['growth']:+.2%}; slope {growth['slope_mib_per_min']:+.1f} MiB/min, second half "
          f"{growth['slope_second_half_mib_per_min']:+.1f} MiB/min; limit {max_growth:.0%})")
    print(f"[soak] idle after: {idle}; checks {checks}")
    print(f"[soak] wrote {out} and {out.with_suffix('.png')}: {'PASSED' if result['passed'] else 'FAILED'}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
