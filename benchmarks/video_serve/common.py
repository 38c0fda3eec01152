"""What the video serving benchmark compares: the request shape, the contenders, their token counts, the run."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from benchmarks.harness import BenchError as HarnessError
from benchmarks.serve.common import Bounds, Run
from benchmarks.video_load import VideoWorkload
from civic_vllm.budget import num_retained_per_group, video_span_text_tokens
from civic_vllm.planner.tokens import video_timestamps

MERGED_PX = 32  # one merged token: patch 16 x spatial merge 2
TEMPORAL_PATCH = 2  # frames per frame group
TEXT_ALLOWANCE = 64  # prompt tokens besides the video placeholders and timestamps, for sizing the pool (template)
GROUP_TEXT_ALLOWANCE = 10  # per frame group: its timestamp "<15.5 seconds>" (6-8 tokens) + vision start and end
COUNT_REQUESTS = 2  # token-count requests per contender
PLACEHOLDER_GOAL = 0.36  # issue 19: video placeholders and KV blocks at r = 1/3 <= 0.36x vanilla
CIVIC_COUNTERS = ("civic:video_tokens_total", "civic:video_tokens_retained_total", "civic:videos_total")

FULL = Bounds(concurrency=(1, 8), warmup_s=10.0, duration_s=30.0, warmup_max_s=45.0, probe_rounds=4,
              vision_reps=0, stop_timeout_s=60.0)
QUICK = Bounds(concurrency=(1, 8), warmup_s=3.0, duration_s=12.0, warmup_max_s=45.0, probe_rounds=2,
               vision_reps=0, warm_requests=1, stop_timeout_s=60.0)
RANDOM_MM_PROMPTS = {"full": {1: 2, 8: 8}, "quick": {1: 2, 8: 8}}


class BenchError(HarnessError):
    pass


@dataclass(frozen=True)
class VideoSpec:
    """The request shape: ``frames`` frames of ``width`` x ``height`` px (multiples of 32) at ``fps``."""

    name: str
    width: int
    height: int
    frames: int
    fps: float = 2.0

    @property
    def tokens_per_group(self) -> int:
        return (self.width // MERGED_PX) * (self.height // MERGED_PX)

    def groups(self, stride: int = 1) -> int:
        return math.ceil(len(range(0, self.frames, stride)) / TEMPORAL_PATCH)

    def video_tokens(self, stride: int = 1) -> int:
        """Merged video tokens vanilla Qwen3-VL gives the sent frames (N)."""
        return self.groups(stride) * self.tokens_per_group

    def span_text_tokens(self, count_tokens: Callable[[str], int]) -> int:
        """T of the whole video: each frame group's timestamp and vision markers, all kept."""
        return video_span_text_tokens(video_timestamps(self.frames, TEMPORAL_PATCH, self.fps), count_tokens)

    def prompt_bound(self) -> int:
        """Vanilla's prompt tokens at most (for max_model_len and the pool): video, timestamps, template."""
        return self.video_tokens() + TEXT_ALLOWANCE + GROUP_TEXT_ALLOWANCE * self.groups()


@dataclass(frozen=True)
class Contender:
    """One compared configuration, duck-typed for run_point / warm_up / paired_probe: ``server`` names
    the server, ``ratio`` is civic_video_ratio (civic only), ``stride`` the client's frame subsampling."""

    name: str  # vanilla | evs | civic | subsample
    server: str  # vanilla | evs | civic
    ratio: Fraction | None = None
    stride: int = 1
    prune_rate: Fraction | None = None
    default: bool = False  # run_point records it (recipe defaults do not apply here)
    exit_layer: int | None = None  # civic: the server's civic_video_exit_layer (None: on the encoder output)

    @property
    def label(self) -> str:
        civic = f"civic r={self.ratio}" + (f" exit {self.exit_layer}" if self.exit_layer is not None else "")
        return {"vanilla": "vanilla", "evs": f"EVS q={self.prune_rate}", "civic": civic,
                "subsample": f"subsample 1/{self.stride}"}[self.name]

    @property
    def slug(self) -> str:
        return self.name


def evs_kept(tokens_per_group: int, groups: int, rate: float) -> int:
    """vLLM's EVS token count (vllm/multimodal/video_prune/evs.py): the first frame group at least."""
    return max(tokens_per_group, int(tokens_per_group * groups * (1 - rate)))


def civic_kept(tokens_per_group: int, groups: int, ratio: Fraction, text_tokens: int = 0) -> int:
    """CIVIC's video tokens: groups x K_t, where r counts the video's whole span, its ``text_tokens``
    (timestamps and markers) included (civic_vllm.budget.num_retained_per_group; a 1 x N_t grid)."""
    return groups * num_retained_per_group((groups, 1, tokens_per_group), 1, float(ratio), text_tokens=text_tokens)


def matching_ratio(kept: int, tokens_per_group: int, groups: int, text_tokens: int = 0) -> Fraction:
    """The largest civic_video_ratio whose video tokens (groups x K_t) are <= ``kept`` (at least 1 token
    a group): the span fraction (groups k + T) / (groups N_t + T) with k = kept // groups."""
    per_group = max(1, min(tokens_per_group, kept // groups))
    return Fraction(groups * per_group + text_tokens, groups * tokens_per_group + text_tokens)


@dataclass
class VideoRun(Run):
    """Run with video requests: the same points, probe and warm-up code drive it."""

    def workload(self, spec: VideoSpec, config: Contender, **kw: Any) -> VideoWorkload:
        return VideoWorkload(video_size=(spec.width, spec.height), frames=spec.frames, stride=config.stride,
                             fps=spec.fps, max_tokens=kw.pop("max_tokens", self.max_tokens),
                             ratio=None if config.ratio is None else float(config.ratio),
                             seed=kw.pop("seed", None) or next(self.seeds), **kw)
