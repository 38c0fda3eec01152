"""Argument types the subcommands share, and ``python -m MODULE`` = ``civic COMMAND``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

from civic_vllm.planner import PlanError, parse_ratios


def plan_error_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """Wrap a value parser so argparse reports its PlanError message (one line, exit 2)."""
    def convert(text: str):
        try:
            return parse(text)
        except PlanError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    convert.__name__ = parse.__name__
    return convert


def ratio_list(text: str) -> list[float]:
    """Comma list of retention ratios ("0.5,1/3"), each checked like a request's civic_ratio."""
    return [r for _, r in plan_error_type(parse_ratios)([text])]


def one_ratio(text: str) -> float:
    """One retention ratio in (0, 1], a decimal or a fraction ("1/3")."""
    ratios = ratio_list(text)
    if len(ratios) != 1:
        raise argparse.ArgumentTypeError(f"one ratio expected, got {text!r}")
    return ratios[0]


def run_as_module(add_parser, command: str, module: str, argv: Sequence[str] | None) -> int:
    """``python -m MODULE ARGS`` = ``civic COMMAND ARGS`` (no console script needed, e.g. under nice/taskset)."""
    parser = argparse.ArgumentParser(prog=f"python -m {module}")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args([command, *(sys.argv[1:] if argv is None else argv)])
    return args.handler(args)
