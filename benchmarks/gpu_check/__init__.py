"""The prepared GPU check: the Triton kernels compiled on CUDA, the fused merger's call site, kernel
microbenchmarks and the HF compact prefill, in one run that fits a short GPU lease.

    PYTHONPATH=. python -m benchmarks.gpu_check [--out DIR] [--budget-s 420] [--parts kernels,call_site,bench,prefill]
    make gpu-check                      # the same with the machine's own python; GPU_CHECK_ARGS=... passes options

Installs nothing and needs no vLLM: torch, triton, transformers, numpy, pillow and requests are what it imports.
Four parts, each recorded on its own (an error in one is written down and the next part still runs):

1. ``kernels``: ``gather_rows`` and ``gather_merge_project`` against their torch references, fp32 and bf16, odd
   sizes (index unsorted with repeats, int32, empty, one row; strided sources; C, K and D_out off the block sizes;
   the real Qwen3-VL-2B/8B merger shapes). On CUDA the kernels must be *compiled* (``TRITON_INTERPRET`` unset). A
   copy must be exact; a projection passes when its error against a float64 reference is at most 1.5x the torch
   reference's own error in the same dtype plus a small floor.
2. ``call_site``: ``civic_vllm.vllm_adapter.vision.merge_kept_groups``, the production function, on mergers built
   like vLLM's ``Qwen3_VisionPatchMerger`` (per-patch norm for the main merger, post-shuffle norm for the three
   DeepStack mergers, ``linear_fc1`` unquantized). On CUDA it must take the fused path (one ``gather_merge_project``
   per level, counted), elsewhere the gather + stock-merger path; either must match the stock merger on all N
   groups, then indexed.
3. ``bench``: ``triton.testing.do_bench`` medians for the Qwen3-VL-2B and -8B vision widths at one 1344x1344 image
   (N = 1764 merged tokens), r = 1, 1/2, 1/3, bf16: the fused gather + LayerNorm + ``linear_fc1`` on K groups vs the
   unfused torch path on K groups (index_select, layer_norm, linear) vs the stock path on all N; ``gather_rows`` of
   the compacted tensors (patch rows, rotary cos/sin, one DeepStack tap) vs one ``index_select`` each. Each row has
   its minimum bytes moved and FLOPs, and those as a share of the GPU's bandwidth (from its memory clock and bus
   width, and a measured device-to-device copy) and of a measured bf16 matmul rate.
4. ``prefill``: ``civic_vllm.hf_compact`` (through ``benchmarks.serve.hf_compact_prefill``) on the ``qwen3-vl-2b``
   preset with random weights, one 1344x1344 image, bf16: full vs civic r = 1/3 (policy learned, a seeded random
   scorer) with exit none and exit 6, timed with CUDA events, warm-up round then rounds in rotating order; the
   speed-up (TTFT ratio) next to ``civic plan``'s FLOP limit for the same model, image, question and exit layer.

Without CUDA it runs the same code at small sizes, as a harness check whose times mean nothing: the kernels under
the Triton interpreter, the call site's non-fused path, the benchmarks timed with perf_counter, the prefill on the
``tiny`` preset. It says that CUDA is absent and exits 0 when every part passed or was skipped, 1 otherwise.

``--budget-s`` (default 420) is the whole run's allowance: no case, benchmark row or prefill round starts when the
time it is expected to take (the last one's) would pass it; what was left out is listed under ``skipped``. The JSON
(``gpu_check.json``) and a Markdown summary (``gpu_check.md``) are rewritten after every part, so a killed run still
leaves what it measured. Default directory: ``$OUT`` when set, else ``benchmarks/results/gpu/`` on CUDA and
``benchmarks/results/tmp/gpu_check/`` without it.

Without vLLM: ``benchmarks.serve`` and ``civic_vllm.vllm_adapter.vision`` import vLLM names at module level that
the functions used here never call; they are then imported with empty placeholder ``vllm`` modules (listed in the
JSON under ``environment.vllm.placeholders``), removed again right after.

The package: common (constants, budget, placeholders, environment), one module per part
(kernels, call_site, bench, prefill), report (schema, Markdown, files) and cli (main).
"""

from __future__ import annotations

from benchmarks.gpu_check.bench import part_bench
from benchmarks.gpu_check.call_site import part_call_site
from benchmarks.gpu_check.cli import build_parser, main
from benchmarks.gpu_check.common import (
    BENCH_RATIOS,
    DEEPSTACK_LEVELS,
    PARTS,
    SCHEMA_VERSION,
    Budget,
    Steps,
    part_status,
    vllm_placeholders,
)
from benchmarks.gpu_check.kernels import accuracy, gather_cases, merge_cases, part_kernels
from benchmarks.gpu_check.prefill import part_prefill, scorer_for
from benchmarks.gpu_check.report import default_out_dir, markdown, validate_report, write

__all__ = [
    "BENCH_RATIOS",
    "DEEPSTACK_LEVELS",
    "PARTS",
    "SCHEMA_VERSION",
    "Budget",
    "Steps",
    "accuracy",
    "build_parser",
    "default_out_dir",
    "gather_cases",
    "main",
    "markdown",
    "merge_cases",
    "part_bench",
    "part_call_site",
    "part_kernels",
    "part_prefill",
    "part_status",
    "scorer_for",
    "validate_report",
    "vllm_placeholders",
    "write",
]
