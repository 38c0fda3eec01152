"""What the serving benchmarks share: the model's KV geometry (so both servers get the same pool),
the pool as the running server reports it, waiting for an idle server, the environment record,
the served-model options and the one error type for "could not measure".

benchmarks.kv_blocks (KV blocks and residency) and benchmarks.serve (TTFT and throughput under
locust) are built on it; /metrics is read through civic_vllm.prometheus.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from civic_vllm import planner
from civic_vllm.budget import num_merged_tokens
from civic_vllm.model_factory import TextDims
from civic_vllm.prometheus import metric_labels, metric_value
from civic_vllm.serving import VllmServer

# vLLM's CPU model runner never enables multimodal pruning, so EVS (--video-pruning-rate) fails on its
# first request there; this folder's sitecustomize.py fixes that one bug in an EVS server's processes.
EVS_CPU_SHIM = Path(__file__).resolve().parent / "evs_cpu"

# Prometheus names in vLLM 0.32 (v1 engine).
M_RUNNING = "vllm:num_requests_running"
M_WAITING = "vllm:num_requests_waiting"
M_USAGE = "vllm:kv_cache_usage_perc"
M_PREEMPT = "vllm:num_preemptions_total"
M_CACHE_INFO = "vllm:cache_config_info"


class BenchError(RuntimeError):
    """The benchmark could not measure something (as opposed to a FAIL of the acceptance)."""


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def add_served_model_args(parser: argparse.ArgumentParser, preset: str, quick_help: str) -> None:
    """--preset / --model / --dtype / --quick, shared by the serving benchmarks."""
    parser.add_argument("--preset", default=preset, help=f"model_factory preset to build and serve (default {preset})")
    parser.add_argument("--model", help="serve this checkpoint directory instead of a preset")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--quick", action="store_true", help=quick_help)


@dataclass(frozen=True)
class Geometry:
    """What the KV pool and the prompt lengths depend on, read from the checkpoint's config."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype_bytes: int
    patch_size: int
    merge_size: int
    vision_depth: int
    dtype: str = "bfloat16"
    text: TextDims | None = None  # the family's layers (hybrid grouping), for civic plan's KV layout

    @classmethod
    def from_checkpoint(cls, model_dir: Path, dtype: str) -> Geometry:
        cfg = json.loads((model_dir / "config.json").read_text())
        text, vision = cfg["text_config"], cfg["vision_config"]
        head_dim = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
        return cls(
            num_layers=text["num_hidden_layers"],
            num_kv_heads=text["num_key_value_heads"],
            head_dim=head_dim,
            dtype_bytes={"float32": 4, "bfloat16": 2, "float16": 2}[dtype],
            patch_size=vision["patch_size"],
            merge_size=vision["spatial_merge_size"],
            vision_depth=vision["depth"],
            dtype=dtype,
            text=planner.load_model(str(model_dir), with_tokenizer=False).dims.text,
        )

    def kv_layout(self, block_size: int) -> planner.KvLayout:
        """How vLLM pages this model's cache (civic plan's rule; hybrids group layers by type)."""
        layout = planner.kv_layout(self.text, block_size, self.dtype)
        if layout.block_size != block_size:
            raise BenchError(f"vLLM would raise the block size to {layout.block_size} for this hybrid model")
        return layout

    def block_bytes(self, block_size: int) -> int:
        """vLLM's bytes per pool block: K and V of every layer (of one layer group for hybrids)."""
        return self.kv_layout(block_size).block_bytes

    def visual_tokens(self, side: int) -> int:
        """N for a square image whose side the processor keeps (a multiple of patch*merge)."""
        unit = self.patch_size * self.merge_size
        if side % unit:
            raise ValueError(f"image side {side} must be a multiple of {unit}")
        grid = side // self.patch_size
        return num_merged_tokens((1, grid, grid), self.merge_size)


@dataclass
class Snapshot:
    running: int
    waiting: int
    usage: float
    preemptions: float

    @classmethod
    def parse(cls, text: str) -> Snapshot:
        return cls(
            running=int(metric_value(text, M_RUNNING)),
            waiting=int(metric_value(text, M_WAITING)),
            usage=metric_value(text, M_USAGE),
            preemptions=metric_value(text, M_PREEMPT),
        )


def pool_geometry(server: VllmServer) -> dict[str, Any]:
    """Block size and block count as the running server reports them: the
    ``vllm:cache_config_info`` labels, else the engine's "KV cache size: N tokens" log line."""
    labels = metric_labels(server.metrics(), M_CACHE_INFO)
    block_size = int(labels["block_size"]) if labels.get("block_size", "None").isdigit() else None
    blocks = int(labels["num_gpu_blocks"]) if labels.get("num_gpu_blocks", "None").isdigit() else None
    source = "vllm:cache_config_info"
    if blocks is None or block_size is None:
        found = re.search(r"KV cache size: ([\d,]+) tokens", server.log_text())
        if not (found and block_size):
            raise BenchError(f"cannot find the KV pool size in /metrics or the log:\n{server.log_tail()}")
        blocks = int(found.group(1).replace(",", "")) // block_size
        source = "server log"
    # vLLM keeps one block aside (the null block); usage is relative to the others.
    return {"num_blocks": blocks, "usable_blocks": blocks - 1, "block_size": block_size, "source": source,
            "cache_config_info": labels}


def wait_idle(server: VllmServer, bounds) -> float:
    """Block until no request runs or waits and the pool is empty, so runs do not overlap;
    return the seconds it took (``bounds.idle_timeout_s`` at most).

    vLLM publishes scheduler stats only when the engine steps, so after the client aborts every
    request the gauges can keep showing the last busy step. Every few seconds a one-token text
    completion makes the engine step once and publish fresh stats (it is done, and its block
    freed, before the stats are made).
    """
    start = time.monotonic()
    next_nudge = start + 3.0
    while True:
        snap = Snapshot.parse(server.metrics())
        if snap.running == 0 and snap.waiting == 0 and snap.usage < 1e-9:
            return time.monotonic() - start
        now = time.monotonic()
        if now - start > bounds.idle_timeout_s:
            raise BenchError(f"server not idle after {bounds.idle_timeout_s:.0f}s: {snap}")
        if now >= next_nudge:
            body = {"model": server.config.model, "prompt": "ping", "max_tokens": 1}
            httpx.post(server.url + "/v1/completions", json=body, timeout=60).raise_for_status()
            next_nudge = time.monotonic() + 3.0
        time.sleep(0.25)


def environment_info() -> dict:
    """Machine, versions and vLLM's OpenMP binding, recorded in every serving benchmark's JSON."""
    import torch
    import transformers
    import vllm

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "machine": {
            "platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
            "affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "python": sys.version.split()[0],
            "load_average_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
        },
        "versions": {"vllm": vllm.__version__, "torch": torch.__version__, "transformers": transformers.__version__},
        "omp_binding": {
            "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto (vLLM default, unset)"),
            "VLLM_CPU_NUM_OF_RESERVED_CPU": os.environ.get("VLLM_CPU_NUM_OF_RESERVED_CPU"),
        },
    }


def evs_cpu_env() -> dict[str, str]:
    """``extra_env`` for an EVS server: the shim first on PYTHONPATH, then the repository."""
    root = EVS_CPU_SHIM.parents[1]
    return {"PYTHONPATH": os.pathsep.join([str(EVS_CPU_SHIM), str(root), os.environ.get("PYTHONPATH", "")])}
