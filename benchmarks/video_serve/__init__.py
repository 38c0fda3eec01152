"""Video serving benchmark: vanilla Qwen3-VL, vLLM's EVS pruning, CIVIC and uniform frame subsampling.

    python -m benchmarks.video_serve [--quick] [--preset bench] [--out benchmarks/results/video_serve.json]
    make bench-video [QUICK=1]

Four contenders on the same checkpoint, dtype, KV pool (bytes), batching and flags; prefix caching and
the multimodal processor cache off; every request carries its own freshly generated random video
(``benchmarks/video_load.py``), so no cache can hit:

* ``vanilla``: ``vllm serve`` with every video token;
* ``EVS q``: vanilla vLLM with ``--video-pruning-rate q`` (Efficient Video Sampling: keeps the first frame
  group whole and the most changed tokens of the others, ``max(N_t, int(N (1 - q)))`` tokens in all);
* ``civic r``: ``--model-impl civic`` with per-request ``civic_video_ratio`` r, chosen from EVS's *measured*
  kept count (``<|video_pad|>`` tokens in ``prompt_token_ids``) so civic keeps as many tokens or fewer (r
  counts the whole span, timestamps and markers included, so it is above the kept fraction of video tokens);
* ``subsample 1/s``: the vanilla server, the client sends every s-th frame (the naive baseline).

Three servers (vanilla, EVS, civic) run side by side, each idle while another is measured. In order:
token counts per contender (non-streaming requests with ``return_token_ids``); per contender a warm-up, then
locust (``benchmarks/locust/video_locustfile.py``, the image suite's users, warm-up and records) at each
concurrency, ``/metrics`` sampled throughout; the paired TTFT probe at concurrency 1 (contenders alternating
one request at a time, rotating order, bootstrap CIs on ratios of medians); with ``--load-rounds N`` the
paired load (civic and EVS alternating bursts of 3 x max(concurrency) fresh videos, max(concurrency) at a
time; output tok/s and median TTFT per burst, the same bootstrap over rounds); then vLLM's own
``vllm bench serve --dataset-name random-mm`` with a video bucket against each contender at concurrency 1
and 8. Measuring (:func:`measure`) writes ``state.json`` before any analysis; :func:`analyse` turns it into
the report (ratios civic/vanilla, civic/EVS, EVS/vanilla, subsample/vanilla and the acceptance checks) and
:func:`write_report` writes the JSON, PNG and markdown (``--from-state`` rebuilds them without measuring).

vLLM 0.32's EVS fails on its CPU backend (the runner never enables its multimodal-pruning path) and, with
transformers >= 5.10, on any backend (its M-RoPE recomputation misreads the prompt's outer vision-start marker);
the EVS server runs with ``benchmarks/evs_cpu/sitecustomize.py`` on its PYTHONPATH, which fixes both (see
that file). ``--civic-ratio`` fixes civic's ratio (e.g. 1/3 for the issue's KV check on a long video);
``--block-size`` sets every server's KV block size (vLLM's CPU default 128 rounds a short request's blocks
coarsely; 32 is the smallest the CPU backend takes).
Exit status 0 when the tooling worked (whatever PASS/FAIL says), 1 when it could not measure.
Timings mean something only on an otherwise idle machine; the load average is recorded.

The package, like benchmarks/serve/: common (the request shape, the contenders, token counts, the run),
servers (the three servers, random-mm, engine errors), measure (token counts, points, probe: the state),
analysis (ratios and acceptance, pure), report (JSON, PNG, Markdown) and cli (``python -m benchmarks.video_serve``).
"""

from __future__ import annotations

from benchmarks.video_serve.analysis import (
    PAIRS,
    acceptance,
    analyse,
    check,
    fmt_ci,
    labels_by_name,
    metrics_blocks,
    paired_ratio,
    point,
    ratio_table,
    throughput_ratio,
    token_summary,
)
from benchmarks.video_serve.cli import (
    build_parser,
    main,
    parse_video,
)
from benchmarks.video_serve.common import (
    CIVIC_COUNTERS,
    COUNT_REQUESTS,
    FULL,
    GROUP_TEXT_ALLOWANCE,
    MERGED_PX,
    PLACEHOLDER_GOAL,
    QUICK,
    RANDOM_MM_PROMPTS,
    TEMPORAL_PATCH,
    TEXT_ALLOWANCE,
    BenchError,
    Contender,
    VideoRun,
    VideoSpec,
    civic_kept,
    evs_kept,
    matching_ratio,
)
from benchmarks.video_serve.measure import (
    add_whole_run,
    count_tokens,
    measure,
    whole_run,
)
from benchmarks.video_serve.report import (
    NOTES,
    markdown,
    plot,
    write_report,
)
from benchmarks.video_serve.servers import (
    RANDOM_MM_FIELDS,
    engine_error,
    random_mm_command,
    run_random_mm,
    server_configs,
)

__all__ = [
    "BenchError",
    "CIVIC_COUNTERS",
    "COUNT_REQUESTS",
    "Contender",
    "FULL",
    "MERGED_PX",
    "NOTES",
    "PAIRS",
    "PLACEHOLDER_GOAL",
    "QUICK",
    "RANDOM_MM_FIELDS",
    "RANDOM_MM_PROMPTS",
    "TEMPORAL_PATCH",
    "GROUP_TEXT_ALLOWANCE",
    "TEXT_ALLOWANCE",
    "VideoRun",
    "VideoSpec",
    "acceptance",
    "add_whole_run",
    "analyse",
    "build_parser",
    "check",
    "civic_kept",
    "count_tokens",
    "engine_error",
    "evs_kept",
    "fmt_ci",
    "labels_by_name",
    "main",
    "markdown",
    "matching_ratio",
    "measure",
    "metrics_blocks",
    "paired_ratio",
    "parse_video",
    "plot",
    "point",
    "random_mm_command",
    "ratio_table",
    "run_random_mm",
    "server_configs",
    "throughput_ratio",
    "token_summary",
    "whole_run",
    "write_report",
]
