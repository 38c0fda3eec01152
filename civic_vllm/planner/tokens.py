"""Prompt tokens of a request: image and video resizing as the processor does, timestamps, and
the checkpoint's own chat template (or Qwen's chat format, estimated)."""

from __future__ import annotations

import functools
from typing import Any

from civic_vllm.planner.model_info import PlanError


def resized_image(width: int, height: int, patch_size: int, merge_size: int,
                  min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(width, height) the Qwen-VL image processor resizes to: transformers' smart_resize, the
    function vLLM's Qwen3-VL processor calls, with factor patch_size * merge_size."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    try:
        h, w = smart_resize(height, width, factor=patch_size * merge_size,
                            min_pixels=min_pixels, max_pixels=max_pixels)
    except ValueError as exc:
        raise PlanError(f"image {width}x{height}: {exc}") from None
    return int(w), int(h)


def estimated_template_tokens(num_images: int, num_videos: int = 0) -> int:
    """Qwen3-VL chat format around one user turn, without a tokenizer: ``<|im_start|> user \\n``,
    ``<|vision_start|> … <|vision_end|>`` per image or video, ``<|im_end|> \\n <|im_start|> assistant \\n``.
    Every piece is one token in Qwen's tokenizer (tested against a real template render)."""
    return 8 + 2 * (num_images + num_videos)


def _user_turn(num_images: int, question: str, num_videos: int = 0) -> list[dict[str, Any]]:
    """The conversation vLLM hands the chat template for an OpenAI request with ``num_videos``
    video and ``num_images`` image parts then one text part (OpenAI content format, which
    Qwen3-VL's template uses)."""
    parts: list[dict[str, Any]] = [{"type": "video"} for _ in range(num_videos)]
    parts += [{"type": "image"} for _ in range(num_images)]
    parts.append({"type": "text", "text": question})
    return [{"role": "user", "content": parts}]


@functools.lru_cache(maxsize=64)
def exact_template_tokens(tokenizer: Any, num_images: int, question: str, num_videos: int = 0) -> tuple[int, int]:
    """(non-visual prompt tokens, question tokens) of the rendered prompt, each image's
    ``<|image_pad|>`` and each video's ``<|video_pad|>`` (which the processor expands) not counted."""
    prompt = tokenizer.apply_chat_template(_user_turn(num_images, question, num_videos), tokenize=False,
                                           add_generation_prompt=True)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    for token, count in (("<|image_pad|>", num_images), ("<|video_pad|>", num_videos)):
        pad = tokenizer.convert_tokens_to_ids(token)
        if ids.count(pad) != count:
            raise PlanError(f"the chat template rendered {ids.count(pad)} {token} for {count} items")
    question_ids = tokenizer(question, add_special_tokens=False)["input_ids"] if question else []
    return len(ids) - num_images - num_videos, len(question_ids)


def video_replaces_markers() -> bool:
    """Whether the processor replaces a video's whole ``<|vision_start|><|video_pad|><|vision_end|>``
    (transformers < 5.10) rather than the pad alone: vLLM's ``_expands_only_video_token`` test."""
    from transformers import ProcessorMixin
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

    own = getattr(Qwen3VLProcessor, "replace_video_token", None)
    return own is None or own is getattr(ProcessorMixin, "replace_video_token", None)


def video_timestamps(frames: int, temporal_patch_size: int, fps: float = 2.0) -> list[float]:
    """Seconds of each frame group, as vLLM's Qwen3-VL processor computes them for frames
    0..frames-1 sampled at ``fps`` (the last frame repeated to fill the last group)."""
    indices = list(range(frames)) + [frames - 1] * (-frames % temporal_patch_size)
    return [(indices[i] + indices[i + temporal_patch_size - 1]) / 2 / fps
            for i in range(0, len(indices), temporal_patch_size)]


def resized_video(width: int, height: int, frames: int, patch_size: int, merge_size: int, temporal_patch_size: int,
                  min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(width, height) Qwen3-VL's video processor resizes every frame to (transformers' video smart_resize)."""
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize

    try:
        h, w = smart_resize(frames, height, width, temporal_factor=temporal_patch_size,
                            factor=patch_size * merge_size, min_pixels=min_pixels, max_pixels=max_pixels)
    except ValueError as exc:
        raise PlanError(f"video {width}x{height}x{frames}: {exc}") from None
    return int(w), int(h)
