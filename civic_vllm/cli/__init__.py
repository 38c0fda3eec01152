"""The ``civic`` command: a thin layer of argparse over the libraries.

One module per subcommand registers its parser (``add_*_parser``) and turns the parsed arguments
into one library call (``make_model``, ``plan``, ``viz``, ``data``, ``train``, ``eval``,
``distill`` and ``soup``); ``common`` holds the argument types they share. The libraries
themselves hold no argparse. ``python -m civic_vllm.cli ARGS`` = ``civic ARGS``.
"""

from __future__ import annotations

import argparse
import sys

from civic_vllm.cli.data import add_data_parser
from civic_vllm.cli.distill import add_distill_parser, add_soup_parser
from civic_vllm.cli.eval import add_eval_parser
from civic_vllm.cli.make_model import add_make_model_parser
from civic_vllm.cli.plan import add_plan_parser
from civic_vllm.cli.train import add_train_parser
from civic_vllm.cli.viz import add_viz_parser
from civic_vllm.serving import ServerError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="civic", description="CIVIC for vLLM: compact visual sequences.")
    commands = parser.add_subparsers(dest="command", required=True)
    add_make_model_parser(commands)
    add_plan_parser(commands)
    add_viz_parser(commands)
    add_data_parser(commands)
    add_train_parser(commands)
    add_eval_parser(commands)
    add_distill_parser(commands)
    add_soup_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError, ServerError) as exc:
        print(f"civic {args.command}: error: {exc}", file=sys.stderr)
        return 2
