"""The data of ``civic eval``: a JSONL of samples in the civic-shapes format, checked line by line."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from civic_vllm.data import shapes

REQUIRED_FIELDS = ("question", "answer", "task")  # and one of "image" / "video"


class EvalDataError(ValueError):
    """A problem with the data file, naming the file and line."""


@dataclass(frozen=True)
class Sample:
    line: int
    record: dict[str, Any]
    image_path: Path  # the media file: an image, or an mp4 for a video sample

    @property
    def is_video(self) -> bool:
        return "video" in self.record

    @property
    def size_split(self) -> str | None:
        size = self.record.get("size")
        if size is None:
            return None
        return "small" if size <= shapes.SMALL_MAX else "large"


def _check_record(rec: Any, where: str) -> dict[str, Any]:
    if not isinstance(rec, dict):
        raise EvalDataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    missing = [k for k in REQUIRED_FIELDS if k not in rec]
    if ("image" in rec) == ("video" in rec):
        missing.insert(0, "image" if "image" not in rec else "exactly one of image / video")
    if missing:
        raise EvalDataError(f"{where}: missing field(s) {', '.join(missing)}")
    for key in ("image" if "image" in rec else "video", "question", "task"):
        if not isinstance(rec[key], str) or not rec[key].strip():
            raise EvalDataError(f"{where}: field {key!r} must be a non-empty string")
    if isinstance(rec["answer"], bool) or not isinstance(rec["answer"], str | int):
        raise EvalDataError(f"{where}: field 'answer' must be a string")
    rec = {**rec, "answer": str(rec["answer"])}
    if rec["task"] == "ground":
        box = rec.get("box", shapes.parse_box(rec["answer"]))
        if (not isinstance(box, list) or len(box) != 4
                or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in box)):
            raise EvalDataError(f"{where}: a ground sample needs 'box' (or an answer) of four numbers, got {box!r}")
        rec["box"] = [float(v) for v in box]
    size = rec.get("size")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int | float) or size < 0):
        raise EvalDataError(f"{where}: field 'size' must be a non-negative number, got {size!r}")
    return rec


def load_samples(path: str | Path) -> list[Sample]:
    """Every sample of a JSONL file, checked; a bad line raises :class:`EvalDataError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise EvalDataError(f"{path}: no such data file")
    samples = []
    with path.open(encoding="utf-8") as fh:
        for lineno, text in enumerate(fh, start=1):
            if not text.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                raw = json.loads(text)
            except json.JSONDecodeError as exc:
                raise EvalDataError(f"{where}: not valid JSON ({exc.msg}, column {exc.colno})") from None
            rec = _check_record(raw, where)
            rec.setdefault("id", f"line{lineno}")
            kind = "image" if "image" in rec else "video"
            image_path = (path.parent / rec[kind]).resolve()
            if not image_path.is_file():
                raise EvalDataError(f"{where}: {kind} {rec[kind]!r} not found (looked for {image_path})")
            if kind == "video":
                if not read_video(image_path).shape[0]:
                    raise EvalDataError(f"{where}: video {rec['video']!r} cannot be read (no frames)")
            else:
                try:
                    with Image.open(image_path) as img:
                        img.size  # noqa: B018 - the header parse is the check
                except OSError as exc:
                    raise EvalDataError(f"{where}: image {rec['image']!r} cannot be read: {exc}") from None
            samples.append(Sample(lineno, rec, image_path))
    if not samples:
        raise EvalDataError(f"{path}: no samples")
    return samples


def read_video(path: str | Path) -> np.ndarray:
    """Every frame of a video file as [F, H, W, 3] uint8 RGB (F = 0 when OpenCV cannot read it)."""
    import cv2

    cap = cv2.VideoCapture(str(path))
    frames = []
    try:
        while True:
            ok, frame = cap.read()
            if not ok:
                break
            frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
    finally:
        cap.release()
    return np.stack(frames) if frames else np.zeros((0, 1, 1, 3), dtype=np.uint8)
