"""``python -m benchmarks.serve``: options, a quiet machine, then measure and report."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime, timezone
from fractions import Fraction
from pathlib import Path

from benchmarks.harness import add_served_model_args, log
from benchmarks.serve.common import IDLE_LOAD, WORKLOADS, parse_workload, relroot
from benchmarks.serve.probe import vision_probe_main
from benchmarks.serve.report import write_report
from benchmarks.serve.run import build_run, load_state, measure, save_state, size_pool


def wait_for_quiet_machine(timeout_s: float = 300.0) -> tuple[float, float, float]:
    """The load average once its 1-minute value is below IDLE_LOAD (it lags the CPUs by about a
    minute, so a run started right after other work would be flagged as not idle), or at timeout."""
    deadline = time.monotonic() + timeout_s
    while (load := os.getloadavg())[0] > IDLE_LOAD and time.monotonic() < deadline:
        log(f"waiting for the machine to be idle: 1-min load average {load[0]:.2f} > {IDLE_LOAD}")
        time.sleep(15)
    return load


def exit_layers_arg(text: str) -> tuple[int, ...]:
    if text.strip().lower() in ("", "none"):
        return ()
    try:
        layers = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"exit layers must be integers like 1,3 or 'none', got {text!r}") from None
    if any(layer < 1 for layer in layers):
        raise argparse.ArgumentTypeError(f"exit layers start at 1 (after the first vision block), got {text!r}")
    return layers


def recipe_exit_layer_arg(text: str) -> int:
    """--recipe-exit-layer: a vision block >= 1, or 'none' (after the last block), kept as 0."""
    if text.strip().lower() == "none":
        return 0
    try:
        layer = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"the recipe's exit layer must be an integer >= 1 or 'none', got {text!r}") from None
    if layer < 1:
        raise argparse.ArgumentTypeError(f"the recipe's exit layer must be >= 1 or 'none', got {text!r}")
    return layer


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.serve",
                                     description=sys.modules["benchmarks.serve"].__doc__.split("\n\n")[0])
    add_served_model_args(parser, "bench", "short bounds (also: QUICK=1 in the environment)")
    parser.add_argument("--ratio", type=Fraction, default=Fraction(1, 3), help="CIVIC ratio to compare (default 1/3)")
    parser.add_argument("--workload", type=parse_workload, action="append",
                        help=f"{sorted(WORKLOADS)} or NAME:WxH:IMAGES:WORDS; repeatable "
                             "(default: image-dominated, the goals' workload)")
    parser.add_argument("--concurrency", type=lambda s: tuple(int(x) for x in s.split(",")), default=None,
                        help="comma-separated locust user counts (default 1,4,8,16; QUICK 1,8)")
    parser.add_argument("--duration", type=float, default=None, help="measured seconds per point (60; QUICK 12)")
    parser.add_argument("--warmup", type=float, default=None,
                        help="shortest excluded warm-up per point, seconds (15; QUICK 3)")
    parser.add_argument("--warmup-max", type=float, default=None,
                        help="longest warm-up per point while waiting for every user's first request (150; QUICK 45)")
    parser.add_argument("--probe-rounds", type=int, default=None, help="paired TTFT probe rounds (8; QUICK 2)")
    parser.add_argument("--max-tokens", type=int, default=64, help="output tokens per request (ignore_eos)")
    parser.add_argument("--exit-layers", type=exit_layers_arg, default=(1,),
                        help="comma-separated civic_exit_layer values, each compared as its own configuration "
                             "next to retention on the encoder output (default 1; 'none' for none)")
    parser.add_argument("--civic-settings", type=json.loads, default=None,
                        help='other civic_* settings for the civic requests, JSON without the prefix '
                             '(e.g. \'{"min_tokens": 4}\'); recorded in the report')
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path; CSVs, plots, summary.md go to the directory of the same stem")
    parser.add_argument("--client-cpus", default="reserved",
                        help="pin locust to: 'reserved' (the CPUs vLLM keeps for its frontend; default), 'none', "
                             "or a list like '1'")
    parser.add_argument("--from-state", type=Path, default=None,
                        help="rebuild the report from a run's state.json (under benchmarks/results/tmp/) "
                             "without measuring")
    recipe = parser.add_argument_group(
        "recipe", "the served checkpoint carries a CIVIC recipe (civic_vllm.recipe), measured as 'civic default': "
                  "requests with no civic_* key. A checkpoint with its own recipe keeps it unless a --recipe-* flag "
                  "is given; otherwise a copy of it gets this one (seeded random-weight scorer), and both servers "
                  "serve that copy")
    recipe.add_argument("--no-recipe", action="store_true",
                        help="serve the checkpoint as it is, without the 'civic default' configuration")
    recipe.add_argument("--recipe-ratio", type=Fraction, default=None, help="the recipe's ratio (default 1/3)")
    recipe.add_argument("--recipe-policy", default=None,
                        help="the recipe's policy (default learned: a scorer as wide as the vision tower)")
    recipe.add_argument("--recipe-exit-layer", type=recipe_exit_layer_arg, default=None,
                        help="the recipe's exit layer: a vision block, or 'none' (default max(1, depth // 4))")
    recipe.add_argument("--recipe-exit-context", action="store_const", const=True, default=None,
                        help="the recipe's civic_exit_context: later vision blocks also read the dropped groups")
    recipe.add_argument("--recipe-seed", type=int, default=None, help="seed of the scorer's random weights (0)")
    parser.add_argument("--vision-probe", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.vision_probe:
        return vision_probe_main(args.vision_probe)
    if args.from_state:
        run, state = load_state(args.from_state, args)
        run.out_dir.mkdir(parents=True, exist_ok=True)
        write_report(run, state)
        return 0

    started = time.monotonic()
    load_start = wait_for_quiet_machine()
    run = build_run(args)
    run.out_dir.mkdir(parents=True, exist_ok=True)
    run.raw_dir.mkdir(parents=True, exist_ok=True)
    sizing = size_pool(run)
    log(f"model {run.model} ({run.args.preset or 'custom'}, {run.dtype}); {'QUICK' if args.quick else 'full'} run; "
        f"pool {run.pool_bytes} bytes, max_model_len {run.max_model_len}; load average {load_start[0]:.2f}")
    if load_start[0] > IDLE_LOAD:
        log(f"WARNING: load average {load_start[0]:.2f} > {IDLE_LOAD}: the machine is busy, timings are not results")
    final = measure(run)
    command = "python -m benchmarks.serve " + " ".join(sys.argv[1:] if argv is None else argv)
    state_path = save_state(run, {
        "load_start": load_start, "load_end": os.getloadavg(), "sizing": sizing, "final_civic": final,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command.strip() + (" (QUICK=1)" if args.quick and "--quick" not in command else ""),
        "duration_s": round(time.monotonic() - started, 1),
    })
    log(f"measurements saved to {relroot(state_path)}")
    write_report(run, json.loads(state_path.read_text()))
    return 0

