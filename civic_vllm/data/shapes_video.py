"""civic-shapes-video: short videos of civic-shapes objects that move, appear and change colour.

Questions need what happens *over time*, so a method that drops frames (or the tokens of the
frames where something happens) loses the answer, while the objects are drawn exactly as in
:mod:`civic_vllm.data.shapes` (same shapes, colours, background):

| task | question | answer |
|---|---|---|
| direction | ``Which way does the {colour} object move?`` | ``left`` / ``right`` / ``up`` / ``down`` |
| appears | ``Which color appears during the video?`` | the colour of an object shown for 2-4 mid frames |
| video_count | ``How many objects are there in the video?`` | ``1``...``4``: distinct objects (some come and go) |
| last_color | ``What color is the {shape} in the last frame?`` | the colour the named shape changed to mid-video |

Every object in a video has its own colour and its own shape (names are unambiguous and no
question binds a colour to a shape). Answers are scored like the image task
(:func:`civic_vllm.data.shapes.is_correct`: exact match after strip + lower case). Frame count
and size are drawn per video from :data:`FRAME_COUNTS` and :data:`VIDEO_SIZES`; videos are written
as mp4 at :data:`FPS` frames a second (the codec of :func:`civic_vllm.client.video_data_url`), so
every frame reaches Qwen3-VL (it samples 2 frames a second, 2 frames make one frame group).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from civic_vllm.data import shapes

__all__ = [
    "VIDEO_TASKS", "VIDEO_QUESTIONS", "VIDEO_SIZES", "FRAME_COUNTS", "FPS", "DIRECTIONS", "Track", "VideoScene",
    "sample_video", "video_question", "chat_questions", "video_record", "generate_video_sample", "write_video_dataset",
]

VIDEO_TASKS: tuple[str, ...] = ("direction", "appears", "video_count", "last_color")
VIDEO_QUESTIONS: dict[str, str] = {
    "direction": "Which way does the {colour} object move?",
    "appears": "Which color appears during the video?",
    "video_count": "How many objects are there in the video?",
    "last_color": "What color is the {shape} in the last frame?",
}
# (width, height), multiples of 32: small, so a tiny model serves and trains fast on CPU.
VIDEO_SIZES: tuple[tuple[int, int], ...] = ((256, 256), (320, 256), (256, 320), (256, 192), (192, 256))
FRAME_COUNTS: tuple[int, ...] = (6, 8, 10)  # even: whole frame groups of 2
FPS = 2.0
OBJ_MIN, OBJ_MAX = 24, 56  # object side in pixels
MAX_VIDEO_OBJECTS = 4
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}


@dataclass(frozen=True)
class Track:
    """One object over the video: ``xy[t]`` its box's top-left at frame t (None: not visible),
    ``colors[t]`` its colour there."""

    shape: str
    size: int
    xy: tuple[tuple[int, int] | None, ...]
    colors: tuple[str, ...]

    def visible(self, t: int) -> bool:
        return self.xy[t] is not None

    def obj(self, t: int) -> shapes.Obj | None:
        if self.xy[t] is None:
            return None
        x, y = self.xy[t]
        return shapes.Obj(self.shape, self.colors[t], x, y, self.size)

    def swept(self) -> tuple[int, int, int, int]:
        """The box covering every position it takes."""
        pts = [p for p in self.xy if p is not None]
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        return (min(xs), min(ys), max(xs) + self.size, max(ys) + self.size)


@dataclass
class VideoScene:
    """Rendered frames ``[F, H, W, 3]`` uint8 and the tracks drawn in them."""

    frames: np.ndarray
    tracks: list[Track]
    task: str
    subject: int = 0  # the track the question is about (direction, appears, last_color): the first

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])


def _disjoint(a: Sequence[int], b: Sequence[int], gap: int = 4) -> bool:
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def _static(rng: np.random.Generator, width: int, height: int, size: int, frames: int,
            visible: Sequence[bool] | None = None) -> tuple[tuple[int, int] | None, ...]:
    x, y = int(rng.integers(0, width - size + 1)), int(rng.integers(0, height - size + 1))
    return tuple((x, y) if visible is None or visible[t] else None for t in range(frames))


def _moving(rng: np.random.Generator, width: int, height: int, size: int, frames: int,
            direction: str) -> tuple[tuple[int, int], ...]:
    """Constant speed along ``direction``, travelling 40-70% of the free room (at least 8 px a frame)."""
    dx, dy = DIRECTIONS[direction]
    room = (width if dx else height) - size
    travel = max(int(rng.uniform(0.4, 0.7) * room), 8 * (frames - 1))
    along0 = int(rng.integers(0, room - travel + 1))
    across = int(rng.integers(0, (height if dx else width) - size + 1))
    out = []
    for t in range(frames):
        along = along0 + round(travel * t / (frames - 1))
        if dx < 0 or dy < 0:
            along = room - along
        out.append((along, across) if dx else (across, along))
    return tuple(out)


def _window(rng: np.random.Generator, frames: int) -> list[bool]:
    """Visible for 2-4 frames somewhere strictly after the first frame and before the last."""
    length = int(rng.integers(2, min(4, frames - 2) + 1))
    start = int(rng.integers(1, frames - 1 - length + 1))
    return [start <= t < start + length for t in range(frames)]


def _tracks(rng: np.random.Generator, task: str, n: int, width: int, height: int, frames: int) -> list[Track]:
    colors = [str(c) for c in rng.permutation(list(shapes.COLORS))]
    shape_names = [str(s) for s in rng.permutation(list(shapes.SHAPES))]
    tracks: list[Track] = []
    for k in range(n):
        size = int(rng.integers(OBJ_MIN, OBJ_MAX + 1))
        color_seq = (colors[k],) * frames
        if task == "direction" and k == 0:
            xy = _moving(rng, width, height, size, frames, str(rng.choice(list(DIRECTIONS))))
        elif task == "appears" and k == 0:
            xy = _static(rng, width, height, size, frames, _window(rng, frames))
        elif task == "video_count" and k > 0 and rng.random() < 0.5:  # comes late and/or leaves early
            a, b = sorted(int(v) for v in rng.choice(frames + 1, size=2, replace=False))
            xy = _static(rng, width, height, size, frames, [a <= t < b for t in range(frames)])
        else:
            xy = _static(rng, width, height, size, frames)
        if task == "last_color" and k == 0:
            change = int(rng.integers(1, frames))  # the new colour from this frame on
            color_seq = tuple(colors[k] if t < change else colors[n] for t in range(frames))
        tracks.append(Track(shape_names[k], size, xy, color_seq))
    return tracks


def sample_video(rng: np.random.Generator, task: str, sizes: Sequence[tuple[int, int]] = VIDEO_SIZES,
                 frame_counts: Sequence[int] = FRAME_COUNTS) -> VideoScene:
    """One video built for ``task``; objects never overlap (their swept boxes are disjoint)."""
    if task not in VIDEO_TASKS:
        raise ValueError(f"unknown video task {task!r}; choose one of {VIDEO_TASKS}")
    width, height = sizes[int(rng.integers(len(sizes)))]
    frames = int(frame_counts[int(rng.integers(len(frame_counts)))])
    # Drawn once, outside the placement retries: redrawing it there would favour fewer objects.
    n = int(rng.integers(1 if task in ("direction", "video_count") else 2, MAX_VIDEO_OBJECTS + 1))
    while True:
        tracks = _tracks(rng, task, n, width, height, frames)
        boxes = [t.swept() for t in tracks]
        if all(_disjoint(boxes[i], boxes[j]) for i in range(len(boxes)) for j in range(i)):
            break
    background = Image.fromarray(shapes._background(rng, width, height))
    out = np.empty((frames, height, width, 3), dtype=np.uint8)
    for t in range(frames):
        image = background.copy()
        draw = ImageDraw.Draw(image)
        for track in tracks:
            if (obj := track.obj(t)) is not None:
                shapes._draw(draw, obj)
        out[t] = np.asarray(image)
    return VideoScene(out, tracks, task)


def direction_of(track: Track) -> str:
    """Where a track went from its first to its last visible position."""
    pts = [p for p in track.xy if p is not None]
    dx, dy = pts[-1][0] - pts[0][0], pts[-1][1] - pts[0][1]
    if abs(dx) >= abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


def video_question(scene: VideoScene) -> shapes.QA:
    """The question the scene was built for, with its answer (read off the tracks)."""
    subject = scene.tracks[scene.subject]
    q = VIDEO_QUESTIONS[scene.task]
    if scene.task == "direction":
        return shapes.QA("direction", q.format(colour=subject.colors[0]), direction_of(subject))
    if scene.task == "appears":
        first = [subject.visible(t) for t in range(scene.num_frames)].index(True)
        return shapes.QA("appears", q, subject.colors[first])
    if scene.task == "video_count":
        return shapes.QA("video_count", q, str(len(scene.tracks)))
    return shapes.QA("last_color", q.format(shape=subject.shape), subject.colors[-1])


def generate_video_sample(rng: np.random.Generator, task: str | None = None,
                          sizes: Sequence[tuple[int, int]] = VIDEO_SIZES) -> tuple[VideoScene, shapes.QA]:
    task = VIDEO_TASKS[int(rng.integers(len(VIDEO_TASKS)))] if task is None else task
    scene = sample_video(rng, task, sizes)
    return scene, video_question(scene)


def chat_questions(rng: np.random.Generator, scene: VideoScene, qa: shapes.QA) -> list[shapes.QA]:
    """A training chat's questions about a video: its own question and (always true) the count, in random order."""
    count = shapes.QA("video_count", VIDEO_QUESTIONS["video_count"], str(len(scene.tracks)))
    qas = [qa] if scene.task == "video_count" else [qa, count]
    return [qas[int(i)] for i in rng.permutation(len(qas))]


def video_record(sample_id: str, video_path: str, scene: VideoScene, qa: shapes.QA) -> dict[str, Any]:
    """The JSONL line of a video sample (``video`` relative to the JSONL file)."""
    return {"id": sample_id, "video": video_path, "question": qa.question, "answer": qa.answer, "task": qa.task,
            "fps": FPS, "frames": scene.num_frames, "width": int(scene.frames.shape[2]),
            "height": int(scene.frames.shape[1])}


def write_video_dataset(out_dir: str | Path, n: int, seed: int = 0, splits: Sequence[str] | None = None,
                        progress: bool = False) -> dict[str, Path]:
    """``n`` samples as ``{train,val,test}.jsonl`` (80/10/10) + ``videos/*.mp4`` under ``out_dir``.

    As :func:`civic_vllm.data.shapes.write_dataset`: tasks balanced round robin per split, one
    child seed a split, ids (``v000001``...) unique across splits, ``splits`` writes only those.
    """
    from civic_vllm.client import write_video

    out = Path(out_dir)

    def write(rng: np.random.Generator, task: str, sample_id: str) -> dict[str, Any]:
        scene, qa = generate_video_sample(rng, task)
        rel = f"videos/{sample_id}.mp4"
        write_video(scene.frames, out / rel, FPS)
        return video_record(sample_id, rel, scene, qa)

    return shapes.write_splits(out, n, seed, splits, VIDEO_TASKS, "v", "videos", write, progress)
