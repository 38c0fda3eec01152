"""Writes the figures of README.md and docs/*.md from benchmarks/results/*.json (`make docs`).

A generated block sits between two markers in a Markdown file:

    <!-- generated:serve -->
    ... written by this script, never by hand ...
    <!-- /generated:serve -->

Everything outside the markers is prose and stays as written. Each block name maps to one
renderer: a function of no arguments that reads its results file(s) and returns Markdown.

Adding a renderer for a new results file is two steps: write `def render_x() -> str` (helpers
in common: `load`, `x`, `ci`, `pct`, `table`, `command_line`) and register it in RENDERERS
(markdown.py); then put `<!-- generated:x -->` and `<!-- /generated:x -->` where it belongs and run
`make docs`. A results family with the schema of benchmarks/serve.py needs no new code:
`"video-serve": partial(render_serve_run, "video_serve.json")`.

`python -m tools.docs_gen --check` writes nothing and exits 1 naming each file and block that
differs from what the JSON says (tests/unit/test_docs.py runs the same check).
This package imports only the standard library: it never imports civic_vllm or vLLM.

The package: common (paths, loading, number and table formatting), serve, accuracy and probes (the
renderers, one module per family of results) and markdown (the registry, rewriting and drift).
"""

from __future__ import annotations

from tools.docs_gen.accuracy import (
    render_accuracy,
    render_accuracy_readout,
    render_distill,
    render_distill_soup,
    render_object_recall,
    render_video_accuracy,
)
from tools.docs_gen.common import MARKER, RESULTS, ROOT, ci, command_line, load, pct, ratio_label, table, x
from tools.docs_gen.markdown import RENDERERS, blocks, doc_files, drift, main, regenerate
from tools.docs_gen.probes import (
    render_depth_probe,
    render_gpu,
    render_kernels,
    render_kv_blocks,
    render_soak,
)
from tools.docs_gen.serve import (
    render_serve_families,
    render_serve_headline,
    render_serve_run,
    render_video_serve,
)

__all__ = [
    "MARKER",
    "RENDERERS",
    "RESULTS",
    "ROOT",
    "blocks",
    "ci",
    "command_line",
    "doc_files",
    "drift",
    "load",
    "main",
    "pct",
    "ratio_label",
    "regenerate",
    "render_accuracy",
    "render_accuracy_readout",
    "render_depth_probe",
    "render_distill",
    "render_distill_soup",
    "render_gpu",
    "render_kernels",
    "render_kv_blocks",
    "render_object_recall",
    "render_serve_families",
    "render_serve_headline",
    "render_serve_run",
    "render_soak",
    "render_video_accuracy",
    "render_video_serve",
    "table",
    "x",
]
