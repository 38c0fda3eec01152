"""Every benchmark the docs cite still runs: each one's QUICK mode, end to end, into a temporary folder.

These check the tooling (servers start, requests flow, the JSON is written with its acceptance
evaluated), not the figures: QUICK runs are too short to mean anything and nothing here asserts a
time. Marked ``slow`` and ``bench``: about 15 minutes on the 2-core machine, one benchmark at a time.

    pytest -m bench tests/e2e/test_benchmark_tooling.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.bench]

ROOT = Path(__file__).resolve().parents[2]


def run_module(module: str, *args: str, env: dict | None = None, timeout: int = 1500,
               ok: tuple[int, ...] = (0,)) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
    assert proc.returncode in ok, f"{module} exited {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def test_kv_blocks_quick(tmp_path):
    out = tmp_path / "kv.json"
    run_module("benchmarks.kv_blocks", "--quick", "--out", str(out))
    report = json.loads(out.read_text())
    assert report["measurements"] and report["ratios_vs_vanilla"] and "acceptance" in report
    assert (tmp_path / "kv.png").is_file()


def test_serve_quick(tmp_path):
    out = tmp_path / "serve.json"
    run_module("benchmarks.serve", "--quick", "--concurrency", "1,4", "--out", str(out))
    report = json.loads(out.read_text())
    assert report["points"] and report["ratios_vs_vanilla"] and report["probe"]
    assert {p["server_kind"] for p in report["points"]} == {"vanilla", "civic"}


def test_depth_probe_tiny(tmp_path):
    out = tmp_path / "depth.json"
    run_module("benchmarks.depth_probe", "--preset", "tiny", "--size", "224", "--exit-layers", "2",
               "--rounds", "1", "--out", str(out))
    report = json.loads(out.read_text())
    assert report["rounds_done"] >= 1 and report["results"] and report["planner_limits"]


def test_soak_smoke(tmp_path):
    out = tmp_path / "soak.json"
    # 30 s, sampled every second: the memory fit needs 10 samples after the 15 s warm-up (5 s sampling gives 5).
    # Exit 1 means a check failed (a 30 s run cannot judge memory growth), not that the tool broke.
    run_module("benchmarks.soak", env={"SOAK_SECONDS": "30", "SOAK_SAMPLE_SECONDS": "1", "SOAK_OUT": str(out)},
               ok=(0, 1))
    report = json.loads(out.read_text())
    assert report["locust"]["requests"] > 0 and report["checks"]
    assert report["checks"]["zero_failures"] and report["checks"]["server_alive"]


def test_kernel_bench_quick(tmp_path):
    run_module("benchmarks.kernels.bench_kernels", "--quick", "--device", "cpu", "--out-dir", str(tmp_path))
    reports = [json.loads(p.read_text()) for p in tmp_path.glob("*.json")]
    assert reports and all(reports)
