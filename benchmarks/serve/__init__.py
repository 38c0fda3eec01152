"""Serving benchmark: vanilla vLLM vs CIVIC under locust load, same checkpoint, KV pool and flags.

    python -m benchmarks.serve [--preset bench] [--quick] [--out benchmarks/results/serve.json]
    make bench-serve [QUICK=1]

What it does, in order (every loop is bounded in count and time; all traffic goes to 127.0.0.1):

1. Builds (or reuses) the checkpoint of ``--preset`` and sizes one KV pool in bytes so that vanilla
   holds ``VANILLA_RESIDENT`` image-dominated requests (prompt + output): the regime where the pool,
   not only compute, limits how many requests decode together.
   The served checkpoint carries a CIVIC recipe (ratio 1/3, policy learned, exit layer max(1, depth // 4),
   a seeded random-weight scorer; ``--recipe-*``, ``--no-recipe``), attached to a copy of the checkpoint
   that both servers serve (vanilla vLLM ignores it).
2. Starts ``vllm serve`` (vanilla) and then ``vllm serve --model-impl civic`` on 127.0.0.1 with that
   pool and otherwise identical flags (``--trust-request-mm-kwargs`` on both; CIVIC's ratio is sent
   per request). Both stay up; an idle server costs ~1% of a core. vLLM's default OMP binding
   (``VLLM_CPU_OMP_THREADS_BIND=auto``) is kept and read back from the server logs; the load client
   runs on the same machine, pinned to the CPUs vLLM reserves for the frontend.
3. Measures the vision encoder's cost in-process: the HF transformers vision tower of the same
   checkpoint on the same pixels, one thread pinned to the model worker's core (plus the HF full
   and CIVIC-compact prefills, for reference), while both servers are idle.
4. For each workload and configuration (vanilla, civic r=RATIO, and civic r=RATIO with each early exit
   layer of ``--exit-layers``, all per-request settings on the same civic server, each sending ratio,
   policy and exit layer explicitly; then "civic default", requests with no civic_* key at all, which
   the civic server serves with the checkpoint's recipe), warms the server up,
   then runs locust headless (``benchmarks/locust/civic_locustfile.py``) at each concurrency: a
   warm-up that lasts until every user finished a request (bounded), a measuring window, then
   in-flight requests finish; ``/metrics`` is sampled all along; the warm-up is excluded.
5. Paired TTFT probe: single requests alternating between those configurations, civic r=1 and extra
   ratios down to K = 1 (rotating order, fresh image each), so machine drift cancels in the TTFT
   ratios; per request, client TTFT and the server's own TTFT / queue / prefill times from
   ``/metrics`` deltas. The prefill times against prompt tokens give a second, server-side split
   of prefill into a part that shrinks with K (the LLM) and one that does not (the encoder).
6. Writes ``serve.json``, CSVs, PNG plots and ``summary.md`` with civic/vanilla ratios, the
   LLM-side limit (T+N)/(T+K) and the measured vision share next to each TTFT ratio, CIVIC's own
   metrics, and PASS/FAIL lines for the issue's "done when", computed from the measurements.

Exit status: 0 when the tooling worked (whatever PASS/FAIL says), 1 when it could not measure.
Timing numbers are only meaningful on an otherwise idle machine: the load average is recorded and
the report warns when it was not.

The package: common (settings, metric names, the run), servers (the pair and the load client),
point (one locust point), probe (paired TTFT, vision share, the HF compact prefill), analysis
(ratios, intervals, acceptance), report (CSV, plots, Markdown, JSON), run (a whole run, resumable)
and cli (``python -m benchmarks.serve``).
"""

from __future__ import annotations

from benchmarks.harness import BenchError
from benchmarks.serve.analysis import config_checks
from benchmarks.serve.cli import build_parser, exit_layers_arg, main
from benchmarks.serve.common import ACCEPT_WORKLOAD, WORKLOADS, Config, Run, WorkloadSpec
from benchmarks.serve.probe import bootstrap_ratio_ci, hf_compact_prefill, hf_prompt_inputs, image_retentions
from benchmarks.serve.run import RECIPE_COPY_SUFFIX, build_run, load_state, save_state

__all__ = [
    "ACCEPT_WORKLOAD",
    "RECIPE_COPY_SUFFIX",
    "WORKLOADS",
    "BenchError",
    "Config",
    "Run",
    "WorkloadSpec",
    "bootstrap_ratio_ci",
    "build_parser",
    "build_run",
    "config_checks",
    "exit_layers_arg",
    "hf_compact_prefill",
    "hf_prompt_inputs",
    "load_state",
    "main",
    "image_retentions",
    "save_state",
]
