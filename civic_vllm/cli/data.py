"""``civic data synth``: write a civic-shapes (or civic-shapes-video) data set (:mod:`civic_vllm.data.shapes`)."""

from __future__ import annotations

import argparse

from civic_vllm.data import shapes
from civic_vllm.data.shapes_video import write_video_dataset


def _synth(args: argparse.Namespace) -> int:
    if args.video:
        paths = write_video_dataset(args.out, args.n, args.seed, args.splits, progress=True)
    else:
        paths = shapes.write_dataset(args.out, args.n, args.seed, args.splits)
    for split, path in paths.items():
        print(f"{split}: {sum(1 for _ in path.open())} samples -> {path}")
    return 0


def add_data_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``civic data synth --n N --seed S --out DIR [--video]`` (handler in ``args.handler``)."""
    data = subparsers.add_parser("data", help="synthetic data sets")
    sub = data.add_subparsers(dest="data_command", required=True)
    synth = sub.add_parser("synth", help="write a civic-shapes data set (train/val/test 80/10/10)")
    synth.add_argument("--n", type=int, required=True, help="samples over all splits")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--out", required=True, help="output directory")
    synth.add_argument("--splits", nargs="+", choices=tuple(shapes.SPLITS), default=None,
                       help="write only these splits (same content and ids as in the full set)")
    synth.add_argument("--video", action="store_true",
                       help="civic-shapes-video: mp4 videos of moving / appearing / colour-changing shapes "
                            "(tasks direction, appears, video_count, last_color) instead of images")
    synth.set_defaults(handler=_synth)
    return data
