"""Build OpenAI chat requests with inline images: shared by the demo, tests and benchmarks."""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence

from PIL import Image


def image_data_url(image: Image.Image, fmt: str = "PNG") -> str:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format=fmt)
    mime = "image/png" if fmt.upper() == "PNG" else f"image/{fmt.lower()}"
    return f"data:{mime};base64," + base64.b64encode(buffer.getvalue()).decode()


def image_message(question: str, images: Sequence[Image.Image] | Sequence[str]) -> list[dict]:
    """One user turn: every image (PIL image or ready URL) then the question."""
    parts = [
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
