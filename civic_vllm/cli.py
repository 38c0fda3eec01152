"""The ``civic`` command."""

from __future__ import annotations

import argparse
import sys


def _make_model(args: argparse.Namespace) -> int:
    from civic_vllm.model_factory import make_model

    path = make_model(args.preset, args.out, seed=args.seed, weights=not args.no_weights)
    print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from civic_vllm.model_factory import PRESETS

    parser = argparse.ArgumentParser(prog="civic", description="CIVIC for vLLM: compact visual sequences.")
    commands = parser.add_subparsers(dest="command", required=True)

    make = commands.add_parser("make-model", help="write a Qwen3-VL checkpoint with seeded random weights")
    make.add_argument("--preset", required=True, choices=sorted(PRESETS))
    make.add_argument("--out", required=True, help="output directory")
    make.add_argument("--seed", type=int, default=0)
    make.add_argument("--no-weights", action="store_true", help="config, tokenizer and processor only")
    make.set_defaults(handler=_make_model)

    from civic_vllm.data.shapes import add_data_parser
    from civic_vllm.evaluation import add_eval_parser
    from civic_vllm.planner import add_plan_parser
    from civic_vllm.training.distill import add_distill_parser, add_soup_parser
    from civic_vllm.training.train import add_train_parser
    from civic_vllm.viz import add_viz_parser

    add_plan_parser(commands)
    add_viz_parser(commands)
    add_data_parser(commands)
    add_train_parser(commands)
    add_eval_parser(commands)
    add_distill_parser(commands)
    add_soup_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    from civic_vllm.serving import ServerError

    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError, ServerError) as exc:
        print(f"civic {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
