"""Build OpenAI chat requests with inline images: shared by the demo, tests and benchmarks."""

from __future__ import annotations

import base64
import io
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image


def image_data_url(image: Image.Image, fmt: str = "PNG") -> str:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format=fmt)
    mime = "image/png" if fmt.upper() == "PNG" else f"image/{fmt.lower()}"
    return f"data:{mime};base64," + base64.b64encode(buffer.getvalue()).decode()


def video_data_url(frames: np.ndarray, fps: float = 2.0) -> str:
    """[F, H, W, 3] uint8 RGB frames -> an mp4 data URL (OpenCV's mp4v codec, ``fps`` frames a second).

    vLLM decodes it with OpenCV; Qwen3-VL's processor samples 2 frames a second, so at fps 2
    every frame reaches the model.
    """
    import cv2

    frames = np.asarray(frames, dtype=np.uint8)
    if frames.ndim != 4 or frames.shape[-1] != 3 or not len(frames):
        raise ValueError(f"frames must be [F >= 1, H, W, 3] uint8, got shape {frames.shape}")
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "video.mp4"
        writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (frames.shape[2], frames.shape[1]))
        for frame in frames:
            writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
        writer.release()
        data = path.read_bytes()
    return "data:video/mp4;base64," + base64.b64encode(data).decode()


def video_part(url: str) -> dict:
    return {"type": "video_url", "video_url": {"url": url}}


def image_message(question: str, images: Sequence[Image.Image | str | dict]) -> list[dict]:
    """One user turn: every image (PIL image or ready URL; a dict is a ready content part, e.g.
    :func:`video_part`) then the question."""
    parts = [
        img if isinstance(img, dict) else
        {"type": "image_url", "image_url": {"url": img if isinstance(img, str) else image_data_url(img)}}
        for img in images
    ]
    parts.append({"type": "text", "text": question})
    return [{"role": "user", "content": parts}]


def civic_body(ratio: float | None = None, **settings) -> dict:
    """``extra_body`` for the openai client: per-request CIVIC settings."""
    kwargs = {f"civic_{k}": v for k, v in settings.items()}
    if ratio is not None:
        kwargs["civic_ratio"] = ratio
    return {"mm_processor_kwargs": kwargs} if kwargs else {}
