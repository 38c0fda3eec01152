"""``civic make-model``: a Qwen3-VL checkpoint of a preset with seeded random weights."""

from __future__ import annotations

import argparse

from civic_vllm.model_factory import PRESETS, make_model


def _make_model(args: argparse.Namespace) -> int:
    path = make_model(args.preset, args.out, seed=args.seed, weights=not args.no_weights)
    print(path)
    return 0


def add_make_model_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``civic make-model --preset P --out DIR [--seed S] [--no-weights]``."""
    make = subparsers.add_parser("make-model", help="write a Qwen3-VL checkpoint with seeded random weights")
    make.add_argument("--preset", required=True, choices=sorted(PRESETS))
    make.add_argument("--out", required=True, help="output directory")
    make.add_argument("--seed", type=int, default=0)
    make.add_argument("--no-weights", action="store_true", help="config, tokenizer and processor only")
    make.set_defaults(handler=_make_model)
    return make
