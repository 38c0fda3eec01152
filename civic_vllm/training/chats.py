"""Chats as token sequences: one image (or video) and all its questions, built segment by segment so
answer spans are known exactly (a unit test checks it equals the chat template + processor)."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from civic_vllm import model_factory as mf
from civic_vllm.model_factory import ModelPreset
from civic_vllm.training.recipe import SHAPES_PRESET


@dataclass
class Encoded:
    """One chat as model inputs; ``answer_of[i]`` is the answer index token i belongs to, or -1.

    An image chat has ``pixel_values`` / ``image_grid_thw``, a video chat ``pixel_values_videos`` /
    ``video_grid_thw`` instead.
    """

    input_ids: torch.Tensor  # [1, L]
    mm_token_type_ids: torch.Tensor  # [1, L]
    pixel_values: torch.Tensor | None  # [patches, C * T * P * P]
    image_grid_thw: torch.Tensor | None  # [1, 3]
    answer_of: torch.Tensor  # [L]
    pixel_values_videos: torch.Tensor | None = None
    video_grid_thw: torch.Tensor | None = None

    @property
    def is_video(self) -> bool:
        return self.video_grid_thw is not None

    def model_inputs(self) -> dict[str, torch.Tensor]:
        out = {"input_ids": self.input_ids, "mm_token_type_ids": self.mm_token_type_ids}
        for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out


class ChatEncoder:
    """Token ids of an image chat exactly as the model factory's chat template + processor make them.

    Every user turn is ``<|im_start|>user\\n[image]question<|im_end|>\\n`` (the image, first, in
    turn one only, as an HF/vLLM client sends image-then-text), every assistant turn
    ``<|im_start|>assistant\\nanswer<|im_end|>\\n``; no system prompt. An answer's tokens and its
    closing ``<|im_end|>`` are its training targets (so the model learns to stop).
    """

    def __init__(self, preset: ModelPreset = SHAPES_PRESET) -> None:
        self.processor = mf.build_processor(preset)
        self.tokenizer = self.processor.tokenizer
        ids = mf.special_token_ids()
        self.im_start, self.im_end = ids["<|im_start|>"], ids["<|im_end|>"]
        self.vision = [ids["<|vision_start|>"], ids["<|image_pad|>"], ids["<|vision_end|>"]]
        self.pad_id = ids["<|endoftext|>"]
        self.video_pad = ids["<|video_pad|>"]
        self.merge = preset.vision.spatial_merge_size ** 2

    @functools.lru_cache(maxsize=4096)  # noqa: B019 - a few hundred distinct strings, encoder lives all run
    def text(self, s: str) -> tuple[int, ...]:
        return tuple(self.tokenizer.encode(s, add_special_tokens=False))

    def encode(self, image: Image.Image, questions: Sequence[str], answers: Sequence[str] | None,
               size: dict[str, int] | None = None) -> Encoded:
        """All turns; with ``answers=None`` the chat ends in a generation prompt after the last question.

        ``size``: the image processor's resize bounds for this image (as a request's
        ``mm_processor_kwargs`` ``size`` would set them), e.g. to downscale it.
        """
        extra = {"size": size} if size is not None else {}
        pix = self.processor.image_processor(images=[image], return_tensors="pt", **extra)
        grid = pix["image_grid_thw"]
        n_image = int(grid.prod()) // self.merge
        start, pad, end = self.vision
        enc = self._chat([start, *[pad] * n_image, end], questions, answers)
        enc.pixel_values, enc.image_grid_thw = pix["pixel_values"], grid
        return enc

    def encode_video(self, video_url: str, questions: Sequence[str], answers: Sequence[str] | None) -> Encoded:
        """A video chat (``video_url``: an mp4 data URL), the video decoded as a vLLM server decodes it.

        The video segment (per frame group ``<t seconds><|vision_start|><|video_pad|>...<|vision_end|>``
        inside the template's ``<|vision_start|>...<|vision_end|>``) is the processor's own expansion.
        """
        from transformers.video_utils import VideoMetadata

        from civic_vllm.client import decode_video

        frames, meta = decode_video(video_url)
        start, _, end = self.vision
        out = self.processor(
            text=[self.tokenizer.decode([start]) + "<|video_pad|>" + self.tokenizer.decode([end])],
            videos=[frames], do_sample_frames=meta["do_sample_frames"], return_tensors="pt",
            video_metadata=[VideoMetadata(**{k: v for k, v in meta.items() if k != "do_sample_frames"})],
        )
        enc = self._chat(out["input_ids"][0].tolist(), questions, answers)
        enc.mm_token_type_ids = torch.where(enc.mm_token_type_ids > 0, 2, 0)
        enc.pixel_values_videos, enc.video_grid_thw = out["pixel_values_videos"], out["video_grid_thw"]
        return enc

    def _chat(self, vision: list[int], questions: Sequence[str], answers: Sequence[str] | None) -> Encoded:
        """The chat's token ids with ``vision`` (the media segment) first in turn one; no pixels yet."""
        nl = self.text("\n")
        ids: list[int] = []
        owner: list[int] = []

        def add(tokens: Sequence[int], answer: int = -1) -> None:
            ids.extend(tokens)
            owner.extend([answer] * len(tokens))

        for k, question in enumerate(questions):
            add([self.im_start, *self.text("user\n")])
            if k == 0:
                add(vision)
            add([*self.text(question), self.im_end, *nl])
            add([self.im_start, *self.text("assistant\n")])
            if answers is not None:
                add([*self.text(answers[k]), self.im_end], answer=k)
                add(nl)
        input_ids = torch.tensor([ids])
        return Encoded(
            input_ids=input_ids,
            mm_token_type_ids=((input_ids == self.vision[1]) | (input_ids == self.video_pad)).long(),
            pixel_values=None,
            image_grid_thw=None,
            answer_of=torch.tensor(owner),
        )
