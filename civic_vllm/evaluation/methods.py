"""The methods of ``civic eval``: what one request of a sample sends (``mm_processor_kwargs``, media, body)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from civic_vllm.budget import num_retained
from civic_vllm.client import image_data_url, image_message
from civic_vllm.evaluation.samples import Sample, read_video

METHODS = ("full", "civic", "downscale", "pool", "random", "default", "subsample")
VIDEO_METHODS = ("full", "civic", "subsample", "default")
FRAMES_PER_GROUP = 2  # Qwen3-VL's temporal patch: two frames make one frame group
MAX_TOKENS = 24  # the spec's decoding budget


def subsample_groups(num_frames: int, ratio: float) -> list[int]:
    """The frame groups uniform subsampling keeps: max(1, round(R * G)) of the G groups, evenly spread
    (the middle group of each of that many equal stretches)."""
    groups = -(-num_frames // FRAMES_PER_GROUP)
    keep = max(1, min(groups, round(ratio * groups)))
    return [int((i + 0.5) * groups / keep) for i in range(keep)]


def subsample_frames(frames: np.ndarray, ratio: float) -> np.ndarray:
    """The frames of :func:`subsample_groups` (both frames of every kept group), in order."""
    index = [g * FRAMES_PER_GROUP + k for g in subsample_groups(len(frames), ratio)
             for k in range(FRAMES_PER_GROUP) if g * FRAMES_PER_GROUP + k < len(frames)]
    return frames[index]


def video_content(sample: Sample, method: str, ratio: float) -> dict[str, Any]:
    """The video's chat content part: the file as it is, or (``subsample``) re-encoded from its kept frames."""
    from civic_vllm.client import video_data_url, video_file_url, video_part

    if method == "subsample" and ratio < 1:
        fps = float(sample.record.get("fps", 2.0))
        return video_part(video_data_url(subsample_frames(read_video(sample.image_path), ratio), fps))
    return video_part(video_file_url(sample.image_path))


def video_request_kwargs(method: str, ratio: float, exit_layer: int | None = None) -> dict[str, Any]:
    """``mm_processor_kwargs`` of a video request (subsampling happens in the client: every token kept);
    ``exit_layer`` is the civic method's ``civic_video_exit_layer``."""
    if method not in VIDEO_METHODS:
        raise ValueError(f"method {method!r} does not apply to videos; choose from {', '.join(VIDEO_METHODS)}")
    if exit_layer is not None and method != "civic":
        raise ValueError(f"an exit layer applies to the civic method only, not {method!r}")
    if method == "default":
        return {}
    if method in ("full", "subsample"):
        return {"civic_policy": "full"}
    kwargs = {"civic_policy": "civic", "civic_ratio": ratio, "civic_video_ratio": ratio}
    if exit_layer is not None:
        kwargs["civic_video_exit_layer"] = exit_layer
    return kwargs


@dataclass(frozen=True)
class ImageGeometry:
    """What the model's image processor does to sizes (from its preprocessor config)."""

    patch_size: int
    merge_size: int
    min_pixels: int
    max_pixels: int

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    def tokens(self, width: int, height: int, max_pixels: int | None = None, min_pixels: int | None = None) -> int:
        from civic_vllm.planner import resized_image

        w, h = resized_image(width, height, self.patch_size, self.merge_size,
                             self.min_pixels if min_pixels is None else min_pixels,
                             self.max_pixels if max_pixels is None else max_pixels)
        return (w // self.factor) * (h // self.factor)

    def downscale_max_pixels(self, width: int, height: int, ratio: float) -> tuple[int, int]:
        """(longest_edge, tokens): the processor size that gives the most tokens <= K = round(r * N).

        The budget is the retention policies' K for this image, so downscale is compared at
        the same visual-token count (never more).
        """
        full = self.tokens(width, height)
        budget = num_retained(full, ratio)
        f2 = self.factor ** 2
        best = (budget * f2, self.tokens(width, height, budget * f2, f2))
        for k in range(budget + 1, full + 1):  # smart_resize floors both sides: a larger cap may still fit
            tokens = self.tokens(width, height, k * f2, f2)
            if tokens > budget:
                break
            best = (k * f2, tokens)
        return best


def geometry_of(model: str) -> ImageGeometry:
    from civic_vllm.planner import load_model

    info = load_model(model, with_tokenizer=False)
    return ImageGeometry(info.dims.vision.patch_size, info.dims.vision.spatial_merge_size,
                         info.min_pixels, info.max_pixels)


def request_kwargs(method: str, ratio: float, exit_layer: int | None, image_size: tuple[int, int],
                   geometry: ImageGeometry | None) -> dict[str, Any]:
    """``mm_processor_kwargs`` of one request."""
    if method == "default":
        return {}
    if method in ("full", "downscale"):
        kwargs: dict[str, Any] = {"civic_policy": "full"}
        if method == "downscale" and ratio < 1:
            assert geometry is not None
            longest, _ = geometry.downscale_max_pixels(*image_size, ratio)
            kwargs["size"] = {"shortest_edge": geometry.factor ** 2, "longest_edge": longest}
        return kwargs
    kwargs = {"civic_policy": method, "civic_ratio": ratio}
    if exit_layer is not None:
        kwargs["civic_exit_layer"] = exit_layer
    return kwargs


def chat_body(sample: Sample, model_id: str, method: str, ratio: float, exit_layer: int | None = None,
              geometry: ImageGeometry | None = None) -> dict[str, Any]:
    """The chat request of one sample (greedy, ``MAX_TOKENS``); video requests ask for the prompt's token ids."""
    body: dict[str, Any] = {"model": model_id, "max_tokens": MAX_TOKENS, "temperature": 0.0}
    if sample.is_video:
        return {**body, "messages": image_message(sample.record["question"], [video_content(sample, method, ratio)]),
                "mm_processor_kwargs": video_request_kwargs(method, ratio, exit_layer), "return_token_ids": True}
    with Image.open(sample.image_path) as img:
        image = img.convert("RGB")
    return {**body, "messages": image_message(sample.record["question"], [image_data_url(image)]),
            "mm_processor_kwargs": request_kwargs(method, ratio, exit_layer, image.size, geometry)}
