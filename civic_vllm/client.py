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


def write_video(frames: np.ndarray, path: str | Path, fps: float = 2.0) -> Path:
    """[F, H, W, 3] uint8 RGB frames -> an mp4 file (OpenCV's mp4v codec, ``fps`` frames a second).

    The one video writer of the project: data sets on disk and data URLs use the same codec.
    """
    import cv2

    frames = np.asarray(frames, dtype=np.uint8)
    if frames.ndim != 4 or frames.shape[-1] != 3 or not len(frames):
        raise ValueError(f"frames must be [F >= 1, H, W, 3] uint8, got shape {frames.shape}")
    path = Path(path)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (frames.shape[2], frames.shape[1]))
    for frame in frames:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()
    return path


def video_file_url(path: str | Path) -> str:
    """An mp4 file -> a data URL."""
    return "data:video/mp4;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def video_data_url(frames: np.ndarray, fps: float = 2.0) -> str:
    """[F, H, W, 3] uint8 RGB frames -> an mp4 data URL (:func:`write_video`).

    vLLM decodes it with OpenCV; Qwen3-VL's processor samples 2 frames a second, so at fps 2
    every frame reaches the model.
    """
    with tempfile.TemporaryDirectory() as folder:
        return video_file_url(write_video(frames, Path(folder) / "video.mp4", fps))


def decode_video(url: str) -> tuple[np.ndarray, dict]:
    """(frames, metadata) of a video data URL exactly as a vLLM server decodes it (vLLM's media IO)."""
    from vllm.multimodal.media.image import ImageMediaIO
    from vllm.multimodal.media.video import VideoMediaIO

    mime, data = url.removeprefix("data:").split(";base64,", 1)
    return VideoMediaIO(ImageMediaIO()).load_base64(mime, data).media


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
