"""``civic train``: train the civic-shapes Qwen3-VL from scratch (:mod:`civic_vllm.training.train`)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from civic_vllm.cli.common import run_as_module
from civic_vllm.data import shapes
from civic_vllm.training.loop import export_from_state, train
from civic_vllm.training.recipe import PRESETS, SHAPES_PRESET, Recipe


def _task_weight(text: str) -> tuple[str, float]:
    task, _, value = text.partition("=")
    if task not in shapes.TASKS or not value:
        raise argparse.ArgumentTypeError(f"expected TASK=WEIGHT with TASK in {shapes.TASKS}, got {text!r}")
    return task, float(value)


def _curriculum(text: str) -> list[tuple[float, int]]:
    try:
        stages = [(float(u), int(px)) for u, px in (part.split(":") for part in text.split(",") if part)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected UNTIL:PIXELS[,UNTIL:PIXELS...], got {text!r}") from None
    if [u for u, _ in stages] != sorted(u for u, _ in stages):
        raise argparse.ArgumentTypeError("curriculum stages must have increasing UNTIL")
    return stages


def _train_cmd(args: argparse.Namespace) -> int:
    if args.export_only:
        print(export_from_state(args.out))
        return 0
    recipe = Recipe(
        lr=args.lr, vision_lr_mult=args.vision_lr_mult, weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps, images_per_step=args.images_per_step, p_single=args.p_single,
        presence=args.presence, presence_pairs=args.presence_pairs, single_presence_pairs=args.single_presence_pairs,
        task_weights={**Recipe().task_weights, **dict(args.task_weight)},
        size_curriculum=args.size_curriculum, dense_weight=args.dense_weight,
        init_from=str(Path(args.init_from).resolve()) if args.init_from else None, p_video=args.p_video,
        seed=args.seed,
    )
    work = train(
        args.out, minutes=args.minutes, resume=args.resume, threads=args.threads, recipe=recipe,
        preset=PRESETS[args.preset], max_steps=args.max_steps, eval_every_min=args.eval_every,
        eval_per_task=args.eval_per_task, checkpoint_every_min=args.checkpoint_every,
    )
    print(work)
    return 0


def add_train_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``civic train --out DIR [--minutes M] [--resume] [--threads T] [--lr ...]``."""
    d = Recipe()
    p = subparsers.add_parser(
        "train", help="train the civic-shapes Qwen3-VL from scratch (resumable)",
        description="Work dir gets state.pt (resumable), curve.jsonl (learning curve) and model/ (HF + vLLM "
                    "checkpoint, bf16) at the end. Recipe flags are ignored with --resume (the saved recipe is used).",
    )
    p.add_argument("--out", required=True, help="working directory")
    p.add_argument("--minutes", type=float, default=150.0, help="training budget in CPU-minutes (default 150)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")
    p.add_argument("--resume", action="store_true", help="continue from OUT/state.pt")
    p.add_argument("--export-only", action="store_true", help="write OUT/model from OUT/state.pt and exit")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--preset", choices=sorted(PRESETS), default=SHAPES_PRESET.name)
    p.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate (default {d.lr})")
    p.add_argument("--vision-lr-mult", type=float, default=d.vision_lr_mult)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--images-per-step", type=int, default=d.images_per_step)
    p.add_argument("--p-single", type=float, default=d.p_single, help="fraction of single-object images")
    p.add_argument("--presence", choices=shapes.PRESENCE_MODES, default=d.presence,
                   help="presence questions: one independent has_color/has_shape per multi image, or "
                        "balanced yes/no pairs (leaky; the earlier recipe)")
    p.add_argument("--presence-pairs", type=int, default=d.presence_pairs,
                   help="yes/no pairs of has_color and of has_shape questions per multi-object image")
    p.add_argument("--single-presence-pairs", type=int, default=d.single_presence_pairs,
                   help="... and per single-object image")
    p.add_argument("--task-weight", type=_task_weight, action="append", default=[], metavar="TASK=W",
                   help=f"per-answer loss weight of a task (repeatable), on top of {d.task_weights}")
    p.add_argument("--size-curriculum", type=_curriculum, default=d.size_curriculum, metavar="UNTIL:PIXELS,...",
                   help="image-size curriculum, e.g. 0.15:65536,0.35:143360 (256x256 only for the first 15%% "
                        "of the budget, then <= 320x448 until 35%%, then all sizes; the default); '' disables it")
    p.add_argument("--dense-weight", type=float, default=d.dense_weight,
                   help="weight of the per-visual-token colour/shape/box losses (0: off)")
    p.add_argument("--init-from", default=None, metavar="CHECKPOINT",
                   help="start from this exported checkpoint's weights (fresh optimizer and schedule)")
    p.add_argument("--p-video", type=float, default=d.p_video,
                   help="fraction of chats that are civic-shapes-video chats (mp4 through vLLM's decoder, "
                        "HF processor videos=...); the rest are image chats (default 0: images only)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--eval-every", type=float, default=5.0, help="quick eval every this many CPU-minutes")
    p.add_argument("--eval-per-task", type=int, default=25, help="quick-eval samples per task (0: none)")
    p.add_argument("--checkpoint-every", type=float, default=5.0, help="save state every this many wall minutes")
    p.set_defaults(handler=_train_cmd)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return run_as_module(add_train_parser, "train", "civic_vllm.training.train", argv)

