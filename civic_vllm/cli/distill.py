"""``civic distill`` and ``civic soup``: the command line over :mod:`civic_vllm.training.distill`."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from civic_vllm.cli.common import ratio_list, run_as_module
from civic_vllm.model_factory import default_model
from civic_vllm.training.distill import PARAM_CHOICES, POLICY_CHOICES, DistillRecipe, distill, soup


def recipe_from_args(args: argparse.Namespace) -> DistillRecipe:
    """The DistillRecipe that ``civic distill``'s parsed arguments ask for."""
    return DistillRecipe(ratios=args.ratios, policy=args.policy, exit_layer=args.exit_layer,
                         exit_context=args.exit_context, params=args.params,
                         lr=args.lr, ce_weight=args.ce_weight, temperature=args.temperature, seed=args.seed,
                         serve_ratio=args.serve_ratio, scorer_lr=args.scorer_lr, scorer_weight=args.scorer_weight,
                         scorer_sharpness=args.scorer_sharpness,
                         straight_through=args.straight_through, feature_weight=args.feature_weight,
                         proportional_attention=args.proportional_attention)


def parse_recipe(argv: Sequence[str]) -> DistillRecipe:
    """The DistillRecipe of a ``civic distill`` command line (``--out`` may be left out)."""
    parser = argparse.ArgumentParser()
    add_distill_parser(parser.add_subparsers())
    return recipe_from_args(parser.parse_args(["distill", "--out", "-", *argv]))


def _distill_cmd(args: argparse.Namespace) -> int:
    recipe = recipe_from_args(args)
    path = distill(args.model or default_model(), args.out, recipe=recipe, minutes=args.minutes,
                   max_steps=args.max_steps, threads=args.threads, resume=args.resume)
    print(path)
    return 0


def add_distill_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``civic distill --out DIR [--model M] [--params merger|vision|all] ...``."""
    d = DistillRecipe()
    p = subparsers.add_parser("distill", help="KL-distil the compact path from the full-token model")
    p.add_argument("--model", default=None, help="teacher checkpoint (default: models/civic-shapes-tiny)")
    p.add_argument("--out", required=True, help="output checkpoint directory")
    p.add_argument("--params", choices=PARAM_CHOICES, default=d.params, help="which parameters learn")
    p.add_argument("--ratios", type=ratio_list, default=d.ratios,
                   help="student ratios, one drawn per chat (e.g. 0.5,1/3)")
    p.add_argument("--policy", default=d.policy, choices=POLICY_CHOICES,
                   help="student's retention (learned: train a scorer; downscale: shrink the image)")
    p.add_argument("--exit-layer", type=int, default=None, help="student's civic_exit_layer")
    p.add_argument("--exit-context", action="store_true",
                   help="student's civic_exit_context: the blocks after the exit layer also read the dropped groups")
    p.add_argument("--serve-ratio", type=float, default=d.serve_ratio,
                   help="ratio the exported checkpoint serves by default (its CIVIC recipe)")
    p.add_argument("--scorer-lr", type=float, default=d.scorer_lr, help="learned policy: scorer learning rate")
    p.add_argument("--scorer-weight", type=float, default=d.scorer_weight,
                   help="learned policy: weight of the saliency loss towards the late civic saliency")
    p.add_argument("--scorer-sharpness", type=float, default=d.scorer_sharpness,
                   help="learned policy: softmax sharpness of the late-saliency target")
    p.add_argument("--straight-through", action="store_true",
                   help="learned policy: also train the scorer through a straight-through gate on the kept rows")
    p.add_argument("--feature-weight", type=float, default=d.feature_weight,
                   help="weight of the kept groups' feature distillation: the student's merged rows (and "
                        "DeepStack rows) against the teacher's full-path rows of the same groups (0: off)")
    p.add_argument("--proportional-attention", action="store_true",
                   help="experimental, HF path only: the student's language model weighs each kept visual "
                        "token by the tokens it stands for (ToMe's proportional attention); vLLM cannot serve "
                        "it yet, so the checkpoint gets no CIVIC recipe (benchmarks.proportional_attention "
                        "scores it)")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--ce-weight", type=float, default=d.ce_weight, help="weight of the answers' cross-entropy")
    p.add_argument("--temperature", type=float, default=d.temperature)
    p.add_argument("--minutes", type=float, default=15.0,
                   help="budget in training CPU-minutes (with --resume: the total)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps instead")
    p.add_argument("--resume", default=None, metavar="DIR",
                   help="continue this student (same teacher and recipe) up to the total budget")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=d.seed)
    p.set_defaults(handler=_distill_cmd)
    return p


def _soup_cmd(args: argparse.Namespace) -> int:
    print(soup(args.students, args.out))
    return 0


def add_soup_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``civic soup --out DIR STUDENT STUDENT [...]``."""
    p = subparsers.add_parser("soup", help="average the weights of civic distill students of one teacher")
    p.add_argument("students", nargs="+", help="student checkpoints written by civic distill (two or more)")
    p.add_argument("--out", required=True, help="output checkpoint directory")
    p.set_defaults(handler=_soup_cmd)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return run_as_module(add_distill_parser, "distill", "civic_vllm.training.distill", argv)

