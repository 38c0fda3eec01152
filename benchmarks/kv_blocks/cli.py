"""``python -m benchmarks.kv_blocks``: size the pool, run vanilla and civic, write JSON and PNG."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

from benchmarks.harness import (
    M_RUNNING,
    M_USAGE,
    M_WAITING,
    BenchError,
    Geometry,
    add_served_model_args,
    environment_info,
    log,
)
from benchmarks.kv_blocks.common import (
    CPU_BLOCK_SIZE,
    DEFAULT_OUT,
    FULL,
    PROBE_TOKENS,
    QUICK,
    RATIOS_FULL,
    RATIOS_QUICK,
    VANILLA_REQUESTS_IN_POOL,
)
from benchmarks.kv_blocks.inputs import make_workloads, template_tokens
from benchmarks.kv_blocks.measure import Setup, run_server
from benchmarks.kv_blocks.report import acceptance, add_ratios, plot, print_acceptance, print_table
from civic_vllm.cost import kv_blocks
from civic_vllm.model_factory import make_model, models_root


def build_setup(args: argparse.Namespace) -> Setup:
    from transformers import AutoTokenizer

    model = Path(args.model).resolve() if args.model else make_model(args.preset, models_root() / args.preset)
    geometry = Geometry.from_checkpoint(model, args.dtype)
    tokenizer = AutoTokenizer.from_pretrained(str(model))
    workloads = make_workloads(tokenizer)
    text_tokens = {w.name: template_tokens(tokenizer, w.text) for w in workloads}
    setup = Setup(
        model=model, dtype=args.dtype, geometry=geometry, workloads=workloads,
        ratios=RATIOS_QUICK if args.quick else RATIOS_FULL, text_tokens=text_tokens,
        max_model_len=0, max_num_batched_tokens=0, pool_bytes=0, hold_tokens={},
        bounds=QUICK if args.quick else FULL,
    )
    longest = max(setup.expected_prompt(w, None) for w in workloads)
    # Just above the longest prompt + output (a multiple of 256), so the pool (which must hold one
    # max_model_len request) can be small enough that vanilla holds only a few requests.
    setup.max_model_len = 256 * math.ceil((longest + PROBE_TOKENS + 64) / 256)
    setup.max_num_batched_tokens = setup.max_model_len  # whole prompts per step: admission = all blocks
    image = next(w for w in workloads if w.name == "image-dominated")
    vanilla_blocks = kv_blocks(setup.expected_prompt(image, None) + PROBE_TOKENS, CPU_BLOCK_SIZE)
    usable = max(VANILLA_REQUESTS_IN_POOL * vanilla_blocks, math.ceil(setup.max_model_len / CPU_BLOCK_SIZE))
    setup.pool_bytes = (usable + 1) * geometry.block_bytes(CPU_BLOCK_SIZE)  # +1: vLLM's null block
    # Residency requests decode long enough to overlap, within max_model_len for every config.
    setup.hold_tokens = {
        w.name: min(setup.bounds.hold_cap, setup.max_model_len - setup.expected_prompt(w, None) - 8) for w in workloads
    }
    return setup





def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.kv_blocks",
                                     description=sys.modules["benchmarks.kv_blocks"].__doc__.split("\n\n")[0])
    add_served_model_args(parser, "tiny", "ratios 1 and 1/3, shorter bounds")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON path; the PNG goes beside it")
    args = parser.parse_args(argv)

    started = time.monotonic()
    setup = build_setup(args)
    log(f"model {setup.model} ({args.preset if not args.model else 'custom'}), {args.dtype}; pool "
        f"{setup.pool_bytes} bytes, max_model_len {setup.max_model_len}, text tokens {setup.text_tokens}")
    total = 2 + 2 * len(setup.workloads) * (1 + len(setup.ratios))
    step = (f"[{i}/{total}]" for i in range(1, total + 1))
    run_server(setup, civic=False, step=step)  # one server at a time: vanilla, then civic
    run_server(setup, civic=True, step=step)

    ratios = add_ratios(setup.results)
    acc = acceptance(setup.results)
    pool = setup.servers["civic"]["pool"]
    if pool["num_blocks"] != setup.servers["vanilla"]["pool"]["num_blocks"]:
        raise BenchError("vanilla and civic servers got different KV pools")
    report = {
        "benchmark": "kv_blocks",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "quick": args.quick,
        "duration_s": None,
        **environment_info(),
        "model": {
            "preset": None if args.model else args.preset, "path": str(setup.model), "dtype": setup.dtype,
            "geometry": asdict(setup.geometry),
            "kv_bytes_per_block": setup.geometry.block_bytes(pool["block_size"]),
        },
        "pool": {"bytes": setup.pool_bytes, **{k: v for k, v in pool.items() if k != "cache_config_info"},
                 "sized_for_vanilla_image_requests": VANILLA_REQUESTS_IN_POOL},
        "server": {
            "max_model_len": setup.max_model_len, "max_num_batched_tokens": setup.max_num_batched_tokens,
            "prefix_caching": False, "watermark": "vLLM default (0)",
            "cache_config_info": pool["cache_config_info"], "runs": setup.servers,
        },
        "method": {
            "blocks_per_request": f"one streaming request (ignore_eos) held in decode; {M_USAGE} x usable "
                                  f"blocks from a /metrics sample taken while the streamed completion tokens "
                                  f"stayed within the range where the request holds as many blocks as at "
                                  f"{PROBE_TOKENS} tokens (same_blocks_token_window)",
            "resident_requests": f"one non-streaming chat request with n sequences (ignore_eos, prefix caching "
                                 f"off, so no block is shared) queues them all at once; peak {M_RUNNING} "
                                 f"while {M_WAITING} > 0, sampled every {setup.bounds.poll_s}s until it has "
                                 f"not grown for {setup.bounds.settle_s}s; the max over "
                                 f"{setup.bounds.residency_runs} run(s)",
            "analytic": "blocks = ceil((prompt + output) / block_size) with output = "
                        f"{PROBE_TOKENS}; resident = floor(usable_blocks / blocks); "
                        "resident_at_admission = floor(usable_blocks / ceil(prompt / block_size)), "
                        "what the scheduler admits before decode grows the requests",
        },
        "notes": [
            "kv_cache_usage_perc is relative to num_gpu_blocks - 1 (vLLM keeps one null block).",
            "Residency queues all sequences with one n-sequence request: separate HTTP requests reach "
            "the engine one image-preprocessing apart while the tiny model decodes hundreds of tokens/s, "
            "so the pool never filled with the same prompts (measured 3 of 4 vanilla residents "
            "limited by arrival/encoder, not by KV).",
            "After the peak, running drops as residents decode past a block edge and get preempted; "
            "vllm:num_preemptions_total only counts a preemption when that request emits its next "
            "output, so it lags (preemptions_reported is a lower bound).",
            "Blocks are 128 tokens: a request's block count jumps at block edges, so ratios depend on "
            "how far prompt+output is from an edge (tokens_to_next_block). The measured peak of "
            "residents is taken at admission, so when prompt and prompt+output fall in different "
            "block counts it can reach resident_requests_expected_at_admission for a few steps.",
        ],
        "bounds": asdict(setup.bounds),
        "workloads": [{**asdict(w), "text_tokens_in_prompt": setup.text_tokens[w.name],
                       "visual_tokens_N": setup.geometry.visual_tokens(w.side),
                       "hold_max_tokens": setup.hold_tokens[w.name]} for w in setup.workloads],
        "measurements": setup.results,
        "ratios_vs_vanilla": ratios,
        "acceptance": acc,
    }
    report["duration_s"] = round(time.monotonic() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    png = args.out.with_suffix(".png")
    plot(setup.results, png, pool)
    print()
    print_table(setup.results)
    print_acceptance(acc)
    log(f"wrote {args.out} and {png} in {report['duration_s']:.0f}s")
    return 0

