"""KV-cache benchmark: how many PagedAttention blocks a request takes, and how many requests
one fixed KV pool holds at once, vanilla Qwen3-VL vs CIVIC at several retention ratios.

CIVIC's claim is about memory, not speed: only K = ceil(r*N) of an image's N merged visual
tokens enter the prompt, so vLLM allocates KV blocks for K tokens, and the same pool holds
about 1/r times more image-dominated requests. Everything here is measured on real
``vllm serve`` processes (started one at a time through :mod:`civic_vllm.serving`) from their
Prometheus ``/metrics``, next to the analytic expectation, so a mismatch shows up:

* blocks per request: one streaming request is held in decode; around its ``PROBE_TOKENS``-th
  token, ``vllm:kv_cache_usage_perc`` x the pool's usable blocks is read.
* resident requests: several times more sequences than the pool can hold are queued at once
  (one chat request with ``n`` sequences, see :func:`measure_residency`); the peak
  ``vllm:num_requests_running`` while ``vllm:num_requests_waiting`` > 0 is kept.

Counts, not times: other work on the machine makes the run slower, not different.

    python -m benchmarks.kv_blocks [--preset tiny] [--quick] [--out benchmarks/results/kv_blocks.json]

The package: common (bounds, workloads), inputs, measure (one server), report and cli.
"""

from __future__ import annotations

from benchmarks.kv_blocks.cli import build_setup, main

__all__ = ["build_setup", "main"]
