"""``civic viz``: draw which merged visual tokens CIVIC keeps for one image (:mod:`civic_vllm.viz`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image as PILImage

from civic_vllm import viz as viz_lib
from civic_vllm.model_factory import default_model, resolve_model
from civic_vllm.settings import POLICY_CHOICES


def run_viz(args: argparse.Namespace) -> int:
    if args.model is None:
        args.model = default_model()
    model = resolve_model(args.model)
    if not Path(model).is_dir():
        raise FileNotFoundError(f"model {args.model!r} is not a local checkpoint directory")
    image_path = Path(args.image)
    if not image_path.is_file():
        raise FileNotFoundError(f"image {args.image!r} not found")
    with PILImage.open(image_path) as img:
        result = viz_lib.compute_retention(model, img, args.ratio, args.policy, args.min_tokens, args.dtype,
                                           args.exit_layer)
    picture, _ = viz_lib.draw_retention(result)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    picture.save(out)
    print(f"{out}: {result.title()} (grid {result.grid_hw[0]}x{result.grid_hw[1]}, model {model})")
    return 0


def add_viz_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``civic viz`` on the ``civic`` command's subparsers; the handler is ``args.handler``."""
    viz = subparsers.add_parser("viz", help="draw the visual tokens CIVIC keeps over an image",
                                description=viz_lib.__doc__.split("\n\n")[0])
    viz.add_argument("--image", required=True, help="image file (any format Pillow reads)")
    viz.add_argument("--ratio", type=float, required=True, help="civic_ratio in (0, 1]")
    viz.add_argument("--model", default=None,
                     help="Qwen3-VL checkpoint directory (default: civic_vllm.model_factory.default_model())")
    viz.add_argument("--policy", default="civic", choices=POLICY_CHOICES)
    viz.add_argument("--min-tokens", type=int, default=1, help="civic_min_tokens (floor on K)")
    viz.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                     help="vision tower dtype (match the server's --dtype)")

    viz.add_argument("--exit-layer", type=int, default=None,
                     help="civic_exit_layer: vision blocks run on all patches before retention")
    viz.add_argument("--out", required=True, help="output PNG path")
    viz.set_defaults(handler=run_viz)
    return viz
