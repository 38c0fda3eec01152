"""``civic eval``: civic-shapes accuracy through ``vllm serve --model-impl civic`` (:mod:`civic_vllm.evaluation`)."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

from civic_vllm.cli.common import one_ratio
from civic_vllm.evaluation import (
    METHODS,
    VIDEO_METHODS,
    evaluate,
    geometry_of,
    load_samples,
    server_config,
    summary,
)
from civic_vllm.model_factory import default_model, resolve_model
from civic_vllm.serving import VllmServer


def run_eval(args: argparse.Namespace) -> int:
    samples = load_samples(args.data)
    model = resolve_model(args.model or default_model())
    geometry = geometry_of(model) if args.method == "downscale" else None
    with contextlib.ExitStack() as stack:
        url = args.server.rstrip("/") if args.server else None
        if url is None:
            print(f"starting vllm serve {model} --model-impl civic ...", file=sys.stderr)
            config = server_config(model, samples, dtype=args.dtype)
            url = stack.enter_context(VllmServer(config)).url
        result = evaluate(samples, url, method=args.method, ratio=args.ratio, exit_layer=args.exit_layer,
                          geometry=geometry, concurrency=args.concurrency, api_key=args.api_key)
    result["data"] = str(Path(args.data).resolve())
    predictions = result.pop("predictions")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    if args.predictions:
        Path(args.predictions).write_text("".join(json.dumps(p) + "\n" for p in predictions))
    print(summary(result))
    print(f"-> {out}")
    return 0


def add_eval_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``civic eval --data FILE.jsonl --method M --ratio R --out RESULT.json [--model M]``."""
    p = subparsers.add_parser("eval", help="accuracy on a civic-shapes JSONL (images or videos) through "
                                           "vllm serve --model-impl civic")
    p.add_argument("--model", default=None,
                   help="checkpoint directory or HF repo id (default: the trained models/civic-shapes-tiny)")
    p.add_argument("--data", required=True,
                   help="JSONL in the civic-shapes format (image or video paths relative to it)")
    p.add_argument("--method", required=True, choices=METHODS,
                   help=f"video samples: {', '.join(VIDEO_METHODS)} (subsample: uniform frame-group subsampling "
                        "to about RATIO of the groups in the client)")
    p.add_argument("--ratio", type=one_ratio, default=1.0, help="retention ratio in (0, 1], e.g. 0.5 or 1/3")
    p.add_argument("--exit-layer", type=int, default=None, help="civic_exit_layer (vision block to retain after; "
                   "for video data civic_video_exit_layer)")
    p.add_argument("--out", required=True, help="result JSON")
    p.add_argument("--predictions", default=None, help="also write every output as JSONL here")
    p.add_argument("--server", default=None, help="use a running server (URL) instead of starting one")
    p.add_argument("--api-key", default=None, help="with --server: its --api-key")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    p.add_argument("--dtype", default="float32",
                   help="serving dtype (default float32: on CPUs without AMX it is faster than bfloat16)")
    p.set_defaults(handler=run_eval)
    return p
