"""The video serving benchmark's workload: fresh random videos, frame subsampling, request bodies.

Shared by the video locustfile (``benchmarks/locust/video_locustfile.py``) and the driver
(``benchmarks/video_serve/``: warm-up, token counts and the paired TTFT probe), so both send exactly the
same requests. Nothing here imports locust or gevent.

Every request carries a video generated for it alone (seeded by the run seed and the request number):
a mosaic of random colour cells of which a quarter change from one frame to the next, plus random
pixel noise, so vLLM's prefix, encoder and multimodal processor caches never hit, and EVS (which drops
tokens that barely change between frame groups) sees motion everywhere. Videos travel as mp4 data URLs
at ``fps`` (2 by default: Qwen3-VL samples 2 frames a second, so every sent frame reaches the model).
``stride`` > 1 is the naive baseline: the client keeps every stride-th frame only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from benchmarks.load import Workload
from civic_vllm.client import video_data_url, video_part

DEFAULT_VIDEO_QUESTION = "Describe this video: what happens, what moves, and what colours dominate?"
CELL = 32  # px: one merged token of Qwen3-VL (patch 16 x merge 2)
CHANGED_PER_FRAME = 0.25  # fraction of the cells that get a new colour in the next frame


def random_video(width: int, height: int, frames: int, seed: int) -> np.ndarray:
    """[frames, height, width, 3] uint8: random CELL x CELL colour cells, CHANGED_PER_FRAME of them
    recoloured every frame, plus +-8 of pixel noise. Deterministic in ``seed``."""
    if frames < 1 or width < CELL or height < CELL:
        raise ValueError(f"a video needs >= 1 frame of at least {CELL}x{CELL} px, got {frames} x {width}x{height}")
    rng = np.random.default_rng(seed)
    rows, cols = -(-height // CELL), -(-width // CELL)
    cells = rng.integers(0, 256, (rows, cols, 3), dtype=np.int16)
    out = np.empty((frames, height, width, 3), dtype=np.uint8)
    for t in range(frames):
        if t:
            changed = rng.random((rows, cols)) < CHANGED_PER_FRAME
            cells[changed] = rng.integers(0, 256, (int(changed.sum()), 3), dtype=np.int16)
        frame = np.repeat(np.repeat(cells, CELL, axis=0), CELL, axis=1)[:height, :width]
        noise = rng.integers(-8, 9, frame.shape, dtype=np.int16)
        out[t] = np.clip(frame + noise, 0, 255).astype(np.uint8)
    return out


def subsample(frames: np.ndarray, stride: int) -> np.ndarray:
    """Every ``stride``-th frame from the first (uniform frame subsampling, the naive baseline)."""
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    return frames[::stride]


def video_seed(run_seed: int, index: int) -> int:
    """The seed of request ``index``'s video: unique per (run seed, request) pair."""
    return ((run_seed & 0xFFFF) << 32) | (index & 0xFFFFFFFF)


@dataclass
class VideoWorkload(Workload):
    """One video per request (and no image); the image knobs of :class:`Workload` are unused.

    ``ratio`` None sends no civic keys (vanilla and EVS servers); otherwise ``civic_ratio`` and
    ``civic_video_ratio`` are both ``ratio`` (plus ``settings``)."""

    locustfile: ClassVar[str] = "video_locustfile.py"

    video_size: tuple[int, int] = (256, 256)  # (width, height), multiples of 32
    frames: int = 12  # frames generated per request (before subsampling)
    stride: int = 1  # keep every stride-th frame (1: all)
    fps: float = 2.0

    def __post_init__(self) -> None:
        self.images_per_request = 0
        self.image_size = (32, 32)
        self.image_source = "synthetic"
        if self.question == Workload.question:
            self.question = DEFAULT_VIDEO_QUESTION
        super().__post_init__()
        self.video_size = (int(self.video_size[0]), int(self.video_size[1]))
        if self.frames < 1 or self.stride < 1 or self.frames // self.stride < 1:
            raise ValueError(f"need frames >= stride >= 1, got frames={self.frames}, stride={self.stride}")
        if self.ratio is not None:
            self.settings = {"video_ratio": self.ratio, **self.settings}

    @property
    def sent_frames(self) -> int:
        return len(range(0, self.frames, self.stride))

    def video(self, index: int) -> np.ndarray:
        width, height = self.video_size
        return subsample(random_video(width, height, self.frames, video_seed(self.seed, index)), self.stride)

    def image_urls(self, index: int) -> list[Any]:
        """The request's content parts before the question: one video part."""
        return [video_part(video_data_url(self.video(index), fps=self.fps))]

    def locust_args(self) -> list[str]:
        """The video options of ``video_locustfile.py`` (the image ones come from the base class's fields)."""
        return ["--video-size", f"{self.video_size[0]}x{self.video_size[1]}", "--video-frames", str(self.frames),
                "--frame-stride", str(self.stride), "--video-fps", f"{self.fps:g}"]

    @classmethod
    def locustfile_path(cls) -> Path:
        return Path(__file__).parent / "locust" / cls.locustfile
