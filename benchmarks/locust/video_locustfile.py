"""Locust load of video requests: ``civic_locustfile.py``'s users, warm-up and records, video workload.

Every option, event listener and the user class come from ``civic_locustfile.py`` (imported below);
this file adds the video knobs and swaps the request shape for :class:`benchmarks.video_load.VideoWorkload`
(one freshly generated random video per request, no image):

    locust -f benchmarks/locust/video_locustfile.py --headless -u 8 -r 8 -t 120s \\
        --host http://127.0.0.1:8000 --records-file out/c8.jsonl --measure-s 60 \\
        --video-size 256x256 --video-frames 12 --frame-stride 1 --max-tokens 64 [--civic-ratio 0.3333]

``--civic-ratio`` sets both civic_ratio and civic_video_ratio; omit it for vanilla and EVS servers.
``--frame-stride 3`` sends every third frame only (the uniform subsampling baseline).
"""

from __future__ import annotations

import sys
from pathlib import Path

from locust import events

try:
    from benchmarks.locust import civic_locustfile as base
except ImportError:  # started from another directory: the repository root is two levels up
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from benchmarks.locust import civic_locustfile as base
from benchmarks.load import parse_size
from benchmarks.video_load import VideoWorkload

ChatUser = base.ChatUser  # the user class locust runs: a streaming request, then the next


@events.init_command_line_parser.add_listener
def _video_options(parser) -> None:
    group = parser.add_argument_group("civic video workload")
    group.add_argument("--video-size", default="256", env_var="CIVIC_VIDEO_SIZE",
                       help="WIDTH or WIDTHxHEIGHT of the frames in px (multiples of 32)")
    group.add_argument("--video-frames", type=int, default=12, env_var="CIVIC_VIDEO_FRAMES",
                       help="frames generated per request, before subsampling")
    group.add_argument("--frame-stride", type=int, default=1, env_var="CIVIC_FRAME_STRIDE",
                       help="send every N-th frame only (1: all)")
    group.add_argument("--video-fps", type=float, default=2.0, env_var="CIVIC_VIDEO_FPS")


@events.init.add_listener
def _video_init(environment, **_) -> None:
    """Runs after civic_locustfile's init (registered first): replaces its image workload."""
    options = environment.parsed_options
    image = base._state["workload"]
    if options is None or image is None:
        return
    base._state["workload"] = VideoWorkload(
        video_size=parse_size(options.video_size), frames=options.video_frames, stride=options.frame_stride,
        fps=options.video_fps, question=image.question, max_tokens=image.max_tokens, ratio=image.ratio,
        policy=image.policy, ignore_eos=image.ignore_eos, seed=image.seed, settings=dict(image.settings),
        context_words=image.context_words,
    )
