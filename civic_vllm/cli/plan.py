"""``civic plan``: the command line over :mod:`civic_vllm.planner` (``python -m civic_vllm.planner`` too)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from civic_vllm import model_factory as mf
from civic_vllm.cli.common import plan_error_type as _arg
from civic_vllm.model_factory import default_model
from civic_vllm.planner import model_info
from civic_vllm.planner.model_info import PlanError
from civic_vllm.planner.parse import parse_bytes, parse_image_size, parse_ratios, parse_video_size
from civic_vllm.planner.plan import PlanRequest, make_plan
from civic_vllm.planner.render import render_table


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise PlanError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise PlanError(f"must be >= {low}, got {value}")
        return value
    return _arg(parse)


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text!r}")
    return value


def _one_line_error(prog: str):
    def error(message: str):
        print(f"{prog}: error: {' '.join(str(message).split())}", file=sys.stderr)
        raise SystemExit(2)
    return error


def _configure(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.error = _one_line_error("civic plan")  # type: ignore[method-assign]
    parser.add_argument("--model", default=None,
                        help="checkpoint directory, Hugging Face repo id (local cache only) or preset "
                             f"({', '.join(sorted(mf.PRESETS))}); default: the trained models/civic-shapes-tiny")
    parser.add_argument("--image", action="append", default=[], type=_arg(parse_image_size), metavar="WxH",
                        help="image size in pixels; repeat for several images of different sizes")
    parser.add_argument("--video", action="append", default=[], type=_arg(parse_video_size), metavar="WxHxFRAMES",
                        help="video frame size in pixels and the frames that reach the model (after sampling, "
                             "2 per second by default); repeat for several videos")
    parser.add_argument("--video-ratio", type=_fraction, default=None, metavar="R",
                        help="civic_video_ratio: retention of each frame group (default: each --ratio)")
    parser.add_argument("--video-exit-layer", type=_int_at_least(1), default=None, metavar="L",
                        help="like civic_video_exit_layer: blocks after the first L run on each group's kept tokens")
    parser.add_argument("--images", type=_int_at_least(1), default=None, metavar="N",
                        help="number of images of the (single) --image size (default 1)")
    text = parser.add_mutually_exclusive_group()
    text.add_argument("--text-tokens", type=_int_at_least(0), default=None, metavar="T",
                      help="question tokens (default 0)")
    text.add_argument("--question", default=None, help="the question text: counted exactly with the model's tokenizer")
    parser.add_argument("--ratio", action="append", default=None, metavar="R",
                        help="CIVIC retention ratio(s) in (0, 1]; repeat or comma-separate, fractions ok "
                             "(default 1/3)")
    parser.add_argument("--min-tokens", type=_int_at_least(1), default=1, help="civic_min_tokens (default 1)")
    parser.add_argument("--exit-layer", type=_int_at_least(1), default=None, metavar="L",
                        help="like civic_exit_layer: blocks after the first L run on the kept groups only")
    parser.add_argument("--exit-context", action="store_true",
                        help="like civic_exit_context: those blocks also attend to the dropped groups (K/V only)")
    parser.add_argument("--max-tokens", type=_int_at_least(0), default=256, help="output tokens (default 256)")
    parser.add_argument("--device", choices=("gpu", "cpu"), default="gpu")
    parser.add_argument("--gpu-memory", type=_arg(parse_bytes), default=80 * model_info.GiB, metavar="SIZE",
                        help="device memory, e.g. 80GiB (default 80GiB)")
    parser.add_argument("--gpu-memory-utilization", type=_fraction, default=model_info.GPU_MEMORY_UTILIZATION,
                        help="vLLM's --gpu-memory-utilization (default 0.9)")
    parser.add_argument("--reserve", type=_arg(parse_bytes), default=model_info.DEFAULT_RESERVE_BYTES, metavar="SIZE",
                        help="assumed activation/profile/CUDA-graph memory besides weights (default 4GiB)")
    parser.add_argument("--kv-cache-memory", type=_arg(parse_bytes), default=None, metavar="SIZE",
                        help="exact KV pool size (vLLM's --kv-cache-memory-bytes / VLLM_CPU_KVCACHE_SPACE)")
    parser.add_argument("--block-size", type=_int_at_least(1), default=None,
                        help=f"KV block size in tokens (default {model_info.GPU_BLOCK_SIZE} on gpu, "
                             f"{model_info.CPU_BLOCK_SIZE} on cpu)")
    parser.add_argument("--dtype", choices=model_info.WEIGHT_DTYPES, default="auto",
                        help="weights dtype (auto: the config's; float32 checkpoints -> bfloat16 as in vLLM)")
    parser.add_argument("--kv-dtype", choices=model_info.KV_DTYPES, default="auto",
                        help="KV cache dtype (auto: weights dtype)")
    parser.add_argument("--mamba-ssm-cache-dtype", choices=model_info.SSM_DTYPES, default="auto",
                        help="vLLM's --mamba-ssm-cache-dtype, Qwen3.5's recurrent state (auto: the KV dtype; "
                             "float32 on a CPU with AVX-512 BF16, as vLLM's CPU backend does)")
    parser.add_argument("--tensor-parallel-size", type=_int_at_least(1), default=1, metavar="TP",
                        help="vLLM's --tensor-parallel-size: KV heads per GPU (default 1)")
    parser.add_argument("--pipeline-parallel-size", type=_int_at_least(1), default=1, metavar="PP",
                        help="vLLM's --pipeline-parallel-size: layers per GPU (default 1)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.set_defaults(handler=run_plan)
    return parser


def add_plan_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``plan`` on the ``civic`` command's subparsers; its handler returns an exit code."""
    parser = subparsers.add_parser(
        "plan", help="tokens, KV blocks, requests per GPU and prefill FLOPs of an image or video request",
        description="Plan an image or video request for vanilla Qwen3-VL and CIVIC without a GPU run.",
    )
    return _configure(parser)


def request_from_args(args: argparse.Namespace) -> PlanRequest:
    images = list(args.image)
    if not images and not args.video:
        raise PlanError("at least one --image or --video is needed")
    if args.images is not None:
        if len(images) != 1:
            raise PlanError("--images N repeats one --image size; with several --image, leave --images out")
        images = images * args.images
    return PlanRequest(
        images=images, videos=list(args.video), video_ratio=args.video_ratio, video_exit_layer=args.video_exit_layer,
        ratios=parse_ratios(args.ratio or ["1/3"]), text_tokens=args.text_tokens,
        question=args.question, max_tokens=args.max_tokens, min_tokens=args.min_tokens,
        exit_layer=args.exit_layer, exit_context=args.exit_context, dtype=args.dtype, kv_dtype=args.kv_dtype,
        mamba_ssm_cache_dtype=args.mamba_ssm_cache_dtype, device=args.device,
        block_size=args.block_size, gpu_memory=args.gpu_memory,
        gpu_memory_utilization=args.gpu_memory_utilization, reserve=args.reserve,
        kv_cache_memory=args.kv_cache_memory, tensor_parallel_size=args.tensor_parallel_size,
        pipeline_parallel_size=args.pipeline_parallel_size,
    )


def run_plan(args: argparse.Namespace) -> int:
    """The ``plan`` handler: 0 and the table (or JSON) on stdout, 2 and one line on stderr."""
    try:
        request = request_from_args(args)
        if args.model is None:
            args.model = default_model()
        plan = make_plan(model_info.load_model(args.model), request)
    except PlanError as exc:
        print(f"civic plan: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    try:
        print(plan.to_json() if args.json else render_table(plan))
    except BrokenPipeError:  # `civic plan ... | head`: not an error
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - keeps the interpreter's final flush quiet
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m civic_vllm.planner ARGS`` = ``civic plan ARGS``."""
    parser = _configure(argparse.ArgumentParser(prog="civic plan"))
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    return args.handler(args)

