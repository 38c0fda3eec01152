"""Train a small Qwen3-VL (HF ``Qwen3VLForConditionalGeneration``) from scratch on civic-shapes.

Why it looks like this (see /work/shared/synth-task.md, "Training notes"):

* data is generated on the fly from a saved ``numpy`` generator: no epochs, no overfitting,
  and a resumed run continues the very same stream;
* each image is one multi-turn chat of all its questions (3 for a single-object image, about 7
  for a multi-object one), so one vision pass teaches several answers;
* the loss is the token-mean cross-entropy *per answer*, then a (task-weighted) mean over the
  answers of the step: otherwise the 20 tokens of a box would drown the one-token answers;
* fp32 on one thread (bf16 autocast was 6.5x slower on this CPU);
* the schedule (linear warmup, cosine decay) runs on training CPU-seconds, because the budget
  is CPU time and step cost varies with image size;
* the state (model, AdamW, schedule position, data/torch RNG, step) is written atomically every
  few minutes and on SIGTERM / Ctrl-C, so ``--resume`` loses at most a few minutes;
* the exported directory is the same layout ``model_factory.make_model`` writes (same
  tokenizer, processor and chat template), with trained bf16 weights: HF and vLLM load it.

The token sequence is built here segment by segment (so answer spans are known exactly); a
unit test checks it equals what the chat template + ``Qwen3VLProcessor`` produce, which is what
serving will feed the model.

The pieces: :mod:`~civic_vllm.training.recipe` (presets, ``Recipe``), ``chats`` (token sequences),
``step`` (losses, dense supervision, one step), ``quick_eval`` and ``loop`` (state, export, the
run). This module is ``civic train``'s command line and keeps every public name of the pieces.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from civic_vllm.data import shapes
from civic_vllm.training.chats import (  # noqa: F401 - the module's names before the split
    ChatEncoder,
    Encoded,
)
from civic_vllm.training.loop import (  # noqa: F401 - the module's names before the split
    export_from_state,
    export_model,
    load_state,
    load_weights,
    train,
)
from civic_vllm.training.quick_eval import (  # noqa: F401 - the module's names before the split
    eval_samples,
    eval_video_samples,
    generate_answer,
    load_jsonl_samples,
    quick_eval,
)
from civic_vllm.training.recipe import (  # noqa: F401 - the module's names before the split
    CURVE_FILE,
    EVAL_SEED,
    EXPORT_DIR,
    MICRO_PRESET,
    PRESETS,
    RECIPE_FIELDS_ADDED,
    SHAPES_PRESET,
    STATE_FILE,
    TRAIN_MARKER,
    Recipe,
)
from civic_vllm.training.step import (  # noqa: F401 - the module's names before the split
    DENSE_MIN_COVER,
    DenseSupervision,
    DenseTargets,
    answer_losses,
    answer_targets,
    build_model,
    dense_targets,
    lr_factor,
    param_groups,
    per_answer_mean,
    sample_chats,
    train_step,
)

__all__ = [
    "SHAPES_PRESET", "MICRO_PRESET", "Recipe", "ChatEncoder", "Encoded", "train", "train_step",
    "quick_eval", "eval_samples", "export_model", "load_state", "add_train_parser", "answer_targets",
    "per_answer_mean",
]


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


def run_as_module(add_parser, command: str, module: str, argv: Sequence[str] | None) -> int:
    """``python -m MODULE ARGS`` = ``civic COMMAND ARGS`` (no console script needed, e.g. under nice/taskset)."""
    parser = argparse.ArgumentParser(prog=f"python -m {module}")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args([command, *(sys.argv[1:] if argv is None else argv)])
    return args.handler(args)


def main(argv: Sequence[str] | None = None) -> int:
    return run_as_module(add_train_parser, "train", "civic_vllm.training.train", argv)


if __name__ == "__main__":
    sys.exit(main())
