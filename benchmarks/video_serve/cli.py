"""``python -m benchmarks.video_serve``: options, one run (or a report rebuilt from its state)."""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from dataclasses import asdict
from datetime import datetime, timezone
from fractions import Fraction
from pathlib import Path

import benchmarks.video_serve as package
from benchmarks.harness import Geometry, add_served_model_args, log
from benchmarks.serve.cli import wait_for_quiet_machine
from benchmarks.serve.common import RESULTS, Bounds, relroot
from benchmarks.serve.run import plan_pool
from benchmarks.video_serve.common import FULL, MERGED_PX, QUICK, TEMPORAL_PATCH, VideoRun, VideoSpec
from benchmarks.video_serve.measure import add_whole_run, measure
from benchmarks.video_serve.report import NOTES, write_report
from civic_vllm.model_factory import make_model, models_root


def parse_video(text: str) -> tuple[int, int, int]:
    """WxHxFRAMES, e.g. 384x384x12."""
    try:
        w, h, f = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"video must be WxHxFRAMES, got {text!r}") from None
    if w % MERGED_PX or h % MERGED_PX or f < TEMPORAL_PATCH:
        raise argparse.ArgumentTypeError(f"video sides must be multiples of {MERGED_PX} and frames >= 2, got {text!r}")
    return w, h, f


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.video_serve",
                                     description=package.__doc__.split("\n\n")[0])
    add_served_model_args(parser, "bench", "short bounds (also: QUICK=1 in the environment)")
    parser.add_argument("--video", type=parse_video, default=(256, 256, 12), help="WxHxFRAMES (default 256x256x12)")
    parser.add_argument("--pruning-rate", type=Fraction, default=Fraction(2, 3), help="EVS's --video-pruning-rate")
    parser.add_argument("--civic-ratio", type=Fraction, default=None,
                        help="civic's civic_video_ratio (default: the largest that keeps no more tokens than EVS)")
    parser.add_argument("--civic-video-exit-layer", type=int, default=None, metavar="L",
                        help="the civic server's civic_video_exit_layer (default: selection on the encoder output)")
    parser.add_argument("--stride", type=int, default=3, help="subsampling baseline: every N-th frame (3)")
    parser.add_argument("--concurrency", type=lambda s: tuple(int(x) for x in s.split(",")), default=None,
                        help="locust user counts (default 1,8)")
    parser.add_argument("--duration", type=float, default=None, help="measured seconds per point (30; QUICK 12)")
    parser.add_argument("--probe-rounds", type=int, default=None, help="paired TTFT probe rounds (4; QUICK 2)")
    parser.add_argument("--max-tokens", type=int, default=64, help="output tokens per request (ignore_eos)")
    parser.add_argument("--load-rounds", type=int, default=0, metavar="N",
                        help="paired load: N rounds, civic and EVS each a burst of 3 x max(concurrency) (0: off)")
    parser.add_argument("--block-size", type=int, default=None,
                        help="KV block size of every server (default vLLM's: 128 on CPU; multiples of 32 there)")
    parser.add_argument("--client-cpus", default="reserved", help="pin locust: 'reserved', 'none' or a list '1'")
    parser.add_argument("--no-random-mm", action="store_true", help="skip vllm bench serve --dataset-name random-mm")
    parser.add_argument("--out", type=Path, default=None, help="JSON path; .png and .md beside it")
    parser.add_argument("--idle-wait", type=float, default=300.0,
                        help="seconds to wait for an idle machine first (the load average is recorded either way)")
    parser.add_argument("--from-state", type=Path, default=None, help="rebuild the report from a run's state.json")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.quick = args.quick or os.environ.get("QUICK", "").strip().lower() in ("1", "true", "yes", "on")
    out_json = (args.out or RESULTS / ("video_serve_quick.json" if args.quick else "video_serve.json")).resolve()
    if args.from_state:
        state = json.loads(args.from_state.read_text())
        add_whole_run(state)
        write_report(state, out_json)
        return 0
    started = time.monotonic()
    load_start = wait_for_quiet_machine(args.idle_wait)
    bounds = QUICK if args.quick else FULL
    overrides = {k: v for k, v in {"concurrency": args.concurrency, "duration_s": args.duration,
                                   "probe_rounds": args.probe_rounds}.items() if v is not None}
    bounds = Bounds(**{**asdict(bounds), **overrides})
    model = Path(args.model).resolve() if args.model else make_model(args.preset, models_root() / args.preset)
    width, height, frames = args.video
    spec = VideoSpec(f"video-{width}x{height}x{frames}", width, height, frames)
    raw_dir = RESULTS / "tmp" / f"{out_json.stem}-raw-{time.strftime('%Y%m%d-%H%M%S')}"
    raw_dir.mkdir(parents=True, exist_ok=True)
    run = VideoRun(args=args, bounds=bounds, model=model, dtype=args.dtype, specs=[spec], configs=[], probe_configs=[],
                   out_json=out_json, out_dir=raw_dir, raw_dir=raw_dir, max_tokens=args.max_tokens,
                   seeds=itertools.count(int(time.time()) % 100000))
    longest = spec.prompt_bound()
    pool = plan_pool(Geometry.from_checkpoint(model, args.dtype), longest, longest, args.max_tokens)
    run.max_model_len, run.pool_bytes = pool["max_model_len"], pool["pool_bytes"]
    log(f"model {model} ({args.dtype}); {'QUICK' if args.quick else 'full'} run; {spec.name}; pool {pool}; "
        f"load average {load_start[0]:.2f}")
    state = measure(run, spec, args.pruning_rate, args.stride)
    state.update({
        "version": 1, "quick": args.quick, "preset": args.preset if not args.model else str(model), "model": str(model),
        "dtype": args.dtype, "spec": asdict(spec), "bounds": asdict(bounds), "max_tokens": args.max_tokens,
        "pruning_rate": str(args.pruning_rate), "stride": args.stride, "pool_plan": pool,
        "civic_video_exit_layer": args.civic_video_exit_layer,
        "pool": run.server_info["vanilla"]["pool"], "block_size": run.server_info["vanilla"]["pool"]["block_size"],
        "servers": run.server_info, "client_cpus": run.client_cpus, "points": run.points, "probe": run.probe,
        "timeseries": run.timeseries, "notes": NOTES + run.notes, "load_start": load_start, "load_end": os.getloadavg(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m benchmarks.video_serve " + " ".join(sys.argv[1:] if argv is None else argv)
                   + (" (QUICK=1)" if args.quick else ""),
        "duration_s": round(time.monotonic() - started, 1),
    })
    add_whole_run(state)
    (raw_dir / "state.json").write_text(json.dumps(state, default=str) + "\n")
    log(f"measurements saved to {relroot(raw_dir / 'state.json')}")
    write_report(json.loads((raw_dir / "state.json").read_text()), out_json)
    return 0
