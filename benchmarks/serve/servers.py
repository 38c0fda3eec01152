"""The two servers (same KV pool, pinned cores) and the load client."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from benchmarks.harness import BenchError
from benchmarks.load import Record, Workload
from benchmarks.serve.common import LOCUSTFILE, ROOT, Bounds


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
        locust, "-f", str(LOCUSTFILE), "--headless", "-u", str(users), "-r", str(users), "-t", f"{run_time}s",
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
