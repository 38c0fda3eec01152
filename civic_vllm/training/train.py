"""Train a small Qwen3-VL (HF ``Qwen3VLForConditionalGeneration``) from scratch on civic-shapes.

Why it looks like this (see /work/shared/synth-task.md, "Training notes"):

* data is generated on the fly from a saved ``numpy`` generator: no epochs, no overfitting,
  and a resumed run continues the very same stream;
* each image is one multi-turn chat of all its questions (3 for a single-object image, about 7
  for a multi-object one), so one vision pass teaches several answers;
* the loss is the token-mean cross-entropy *per answer*, then a (task-weighted) mean over the
  answers of the step: otherwise the 20 tokens of a box would drown the one-token answers;
* fp32 on one thread (bf16 autocast was 6.5x slower on this CPU);
* the schedule (linear warmup, cosine decay) runs on training CPU-seconds, because the budget
  is CPU time and step cost varies with image size;
* the state (model, AdamW, schedule position, data/torch RNG, step) is written atomically every
  few minutes and on SIGTERM / Ctrl-C, so ``--resume`` loses at most a few minutes;
* the exported directory is the same layout ``model_factory.make_model`` writes (same
  tokenizer, processor and chat template), with trained bf16 weights: HF and vLLM load it.

The token sequence is built here segment by segment (so answer spans are known exactly); a
unit test checks it equals what the chat template + ``Qwen3VLProcessor`` produce, which is what
serving will feed the model.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from civic_vllm import model_factory as mf
from civic_vllm.client import video_data_url
from civic_vllm.data import shapes, shapes_video
from civic_vllm.model_factory import ModelPreset, TextDims, VisionDims

__all__ = [
    "SHAPES_PRESET", "MICRO_PRESET", "Recipe", "ChatEncoder", "Encoded", "train", "train_step",
    "quick_eval", "eval_samples", "export_model", "load_state", "add_train_parser", "answer_targets",
    "per_answer_mean",
]

# The spec's probe shape (text 256 x 4, vision 192 x 4). vLLM CPU: text head_dim 64 is a
# supported attention size; vision 192 / 3 heads = 64; mrope_section sums to head_dim / 2.
SHAPES_PRESET = ModelPreset(
    name="civic-shapes-tiny",
    description="civic-shapes student/teacher: text 256 x 4 layers, vision 192 x 4 layers, trained from scratch.",
    text=TextDims(
        hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        head_dim=64, intermediate_size=768, mrope_section=(12, 10, 10), max_position_embeddings=32_768,
    ),
    vision=VisionDims(
        depth=4, hidden_size=192, intermediate_size=768, num_heads=3, out_hidden_size=256,
        deepstack_visual_indexes=(1, 2, 3),
    ),
)
# Seconds-fast shape for tests of the training machinery (not for accuracy).
MICRO_PRESET = ModelPreset(
    name="civic-shapes-micro",
    description="Unit tests of the training loop only.",
    text=TextDims(
        hidden_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        head_dim=32, intermediate_size=128, mrope_section=(6, 5, 5), max_position_embeddings=4096,
    ),
    vision=VisionDims(
        depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
        deepstack_visual_indexes=(0, 1),
    ),
)
PRESETS: dict[str, ModelPreset] = {p.name: p for p in (SHAPES_PRESET, MICRO_PRESET)}

STATE_FILE = "state.pt"
CURVE_FILE = "curve.jsonl"
EXPORT_DIR = "model"
TRAIN_MARKER = "civic_train.json"
EVAL_SEED = 1_000_003  # the quick-eval set; training streams use other seeds


def _default_task_weights() -> dict[str, float]:
    # Shape and boxes are the slow skills: twice the weight. (With ``presence="pairs"`` a multi
    # image asks up to 4 has_color and 4 has_shape questions: weigh those 1/3 to stay per task.)
    return {"shape": 2.0, "ground": 2.0}


def _default_curriculum() -> list[tuple[float, int]]:
    return [(0.15, 256 * 256), (0.35, 320 * 448)]


@dataclass
class Recipe:
    """Everything that decides what is learnt; saved in the state so a resume uses the same.

    Defaults: the recipe chosen by 12-CPU-minute comparisons (variant F: lr 3e-4, task weights,
    256x256-first size curriculum), plus dense supervision of the visual tokens
    (``DenseSupervision``, weight 0.5: the first recipe whose boxes left chance) and independent
    presence questions (the earlier balanced pairs leaked their answers within a chat).
    """

    lr: float = 3e-4
    vision_lr_mult: float = 1.0  # the vision tower's learning rate = lr * this
    weight_decay: float = 0.05
    warmup_steps: int = 100
    min_lr_frac: float = 0.05  # cosine decays to lr * this at the end of the budget
    clip_norm: float = 1.0
    images_per_step: int = 4
    p_single: float = 0.6  # fraction of single-object images (colour, shape, box questions)
    # Presence questions (see shapes.scene_questions): "independent" (one has_color and one has_shape
    # per multi image, 50/50 each) or "pairs" (the earlier recipe; its chats leak the answers).
    presence: str = "independent"
    presence_pairs: int = 2  # with "pairs": yes/no pairs of has_color and of has_shape per multi image
    single_presence_pairs: int = 1  # ... and per single-object image
    task_weights: dict[str, float] = field(default_factory=_default_task_weights)  # per answer; 1 if absent
    # Image-size curriculum: [(until, max_pixels), ...] in increasing ``until`` (budget fraction):
    # before ``until``, only sizes of at most ``max_pixels``. Fewer visual tokens per object make
    # the first image -> answer signal much easier to find (measured), and are cheaper.
    size_curriculum: list[tuple[float, int]] = field(default_factory=_default_curriculum)
    # Weight of the dense per-visual-token losses (``DenseSupervision``) next to the answer loss; 0: off.
    dense_weight: float = 0.5
    init_from: str | None = None  # start from this checkpoint's weights (fresh optimizer and schedule)
    # Fraction of a step's chats that are civic-shapes-video chats (a video, its question and the
    # count question); the rest are image chats, so a video fine-tune keeps the image skills.
    p_video: float = 0.0
    seed: int = 0

    def weight(self, task: str) -> float:
        return float(self.task_weights.get(task, 1.0))


# What a recipe saved before these fields existed did; newer recipes store their own values.
RECIPE_FIELDS_ADDED: dict[str, Any] = {"dense_weight": 0.0, "init_from": None, "presence": "pairs", "p_video": 0.0}


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


# --------------------------------------------------------------------------------------
# Model, loss, step
# --------------------------------------------------------------------------------------


def build_model(preset: ModelPreset, seed: int):
    """A freshly initialised fp32 HF Qwen3-VL of ``preset`` (HF's own init, seeded)."""
    from transformers import Qwen3VLForConditionalGeneration

    torch.manual_seed(seed)
    cfg = mf.build_config(preset, dtype="float32")
    model = Qwen3VLForConditionalGeneration(cfg).float()
    model.train()
    return model


def answer_targets(enc: Encoded) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions whose next token is an answer token, and the answer each belongs to."""
    target_owner = enc.answer_of[1:]
    pos = torch.nonzero(target_owner >= 0).squeeze(1)
    return pos, target_owner[pos]


def per_answer_mean(values: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
    """Mean of per-token ``values`` over each answer's tokens: shape [n_answers]."""
    n = int(owner.max()) + 1
    sums = torch.zeros(n, dtype=values.dtype).index_add(0, owner, values)
    return sums / torch.bincount(owner, minlength=n).to(values.dtype)


def answer_losses(model, enc: Encoded) -> torch.Tensor:
    """Mean cross-entropy of each answer's tokens: shape [n_answers]."""
    hidden = model.model(**enc.model_inputs(), use_cache=False).last_hidden_state[0]
    pos, owner = answer_targets(enc)
    logits = model.lm_head(hidden[pos])  # only where a target is, the LM head is 1/3 of the FLOPs
    ce = F.cross_entropy(logits, enc.input_ids[0, pos + 1], reduction="none")
    return per_answer_mean(ce, owner)


# --------------------------------------------------------------------------------------
# Dense supervision of the visual tokens
# --------------------------------------------------------------------------------------

DENSE_MIN_COVER = 0.08  # of a token's pixels; besides, every object labels the token of its centre


@dataclass
class DenseTargets:
    """Per merged visual token (raster order): what covers it. Background rows of ``box`` are unused."""

    shape: torch.Tensor  # [K] long: 0 background, 1 + index in shapes.SHAPES
    color: torch.Tensor  # [K] long: 0 background, 1 + index in shapes.COLORS
    box: torch.Tensor  # [K, 4] the covering object's Qwen box / 1000
    centre: torch.Tensor  # [K] float: 1 on the token holding an object's box centre (one per object)


def dense_targets(scene: shapes.Scene, grid_hw: tuple[int, int], cell: int) -> DenseTargets:
    """Targets of a ``grid_hw`` token grid whose tokens each see ``cell`` x ``cell`` pixels.

    A token belongs to the object covering most of its pixels when that is at least
    ``DENSE_MIN_COVER`` of them, and the token holding an object's centre always does, so a
    16-px object (a quarter of a token at best) still owns one token.
    """
    gh, gw = grid_hw
    mask = shapes.object_index_mask(scene)
    if mask.shape != (gh * cell, gw * cell):  # the processor resized the image
        mask = np.asarray(Image.fromarray(mask).resize((gw * cell, gh * cell), Image.NEAREST))
    cover = np.stack([(mask == k + 1).reshape(gh, cell, gw, cell).sum(axis=(1, 3))
                      for k in range(len(scene.objects))])  # [n_objects, gh, gw]
    owner = np.where(cover.max(axis=0) >= DENSE_MIN_COVER * cell * cell, cover.argmax(axis=0) + 1, 0)
    sx, sy = gw / scene.width, gh / scene.height
    centre = np.zeros((gh, gw), dtype=np.float32)
    for k, obj in enumerate(scene.objects):
        cy = min(gh - 1, int((obj.y + obj.size / 2) * sy))
        cx = min(gw - 1, int((obj.x + obj.size / 2) * sx))
        centre[cy, cx] = 1.0
        if owner[cy, cx] == 0:
            owner[cy, cx] = k + 1
    shape_ids = np.array([0] + [1 + shapes.SHAPES.index(o.shape) for o in scene.objects])
    color_ids = np.array([0] + [1 + list(shapes.COLORS).index(o.color) for o in scene.objects])
    boxes = np.array([[0.0] * 4] + [shapes.to_qwen_box(o, scene.width, scene.height) for o in scene.objects]) / 1000
    owner = owner.reshape(-1)
    return DenseTargets(shape=torch.from_numpy(shape_ids[owner]).long(),
                        color=torch.from_numpy(color_ids[owner]).long(),
                        box=torch.from_numpy(boxes[owner]).float(), centre=torch.from_numpy(centre.reshape(-1)))


def _half_and_half(values: torch.Tensor, rare: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` with the ``rare`` tokens and the rest weighing half each (background is
    most of an image); the plain mean when either side is empty."""
    if rare.any() and (~rare).any():
        return 0.5 * values[rare].mean() + 0.5 * values[~rare].mean()
    return values.mean()


class DenseSupervision(torch.nn.Module):
    """Linear heads on the merged visual tokens (what the LLM reads): colour, shape, box and centre.

    The answer loss reaches the vision tower only through a few answer tokens; these heads
    supervise every token with what covers it, so the tower learns shapes and positions directly;
    the centre flag marks one token per object, so counting objects becomes counting flagged tokens.
    Targets are local on purpose (no count or presence per token): an answer must still come from
    the retained tokens of its objects, which is what retention is measured on. The heads are
    training-only: export drops them. A forward hook on the vision tower captures its output,
    so the model runs once per chat.
    """

    BOX_SCALE = 10.0  # L1 in units of 1/100 of the image side: a 15/1000 error costs 0.15

    def __init__(self, model, preset: ModelPreset) -> None:
        super().__init__()
        dim = preset.vision.out_hidden_size
        self.shape = torch.nn.Linear(dim, 1 + len(shapes.SHAPES))
        self.color = torch.nn.Linear(dim, 1 + len(shapes.COLORS))
        self.box = torch.nn.Linear(dim, 4)
        self.centre = torch.nn.Linear(dim, 1)
        self.merge = preset.vision.spatial_merge_size
        self.cell = preset.vision.patch_size * self.merge
        self._tokens: torch.Tensor | None = None
        model.model.visual.register_forward_hook(self._capture)

    def _capture(self, _module, _args, output) -> None:
        self._tokens = output.pooler_output

    def losses(self, scene: shapes.Scene, enc: Encoded) -> dict[str, torch.Tensor]:
        """Losses on the tokens of the last forward (one image), by head."""
        tokens, self._tokens = self._tokens, None
        if tokens is None:
            raise RuntimeError("no vision forward since the last dense loss")
        _, h, w = (int(v) for v in enc.image_grid_thw[0])
        t = dense_targets(scene, (h // self.merge, w // self.merge), self.cell)
        obj = t.shape > 0
        out = {"shape": _half_and_half(F.cross_entropy(self.shape(tokens), t.shape, reduction="none"), obj),
               "color": _half_and_half(F.cross_entropy(self.color(tokens), t.color, reduction="none"), obj),
               "centre": _half_and_half(F.binary_cross_entropy_with_logits(
                   self.centre(tokens)[:, 0], t.centre, reduction="none"), t.centre > 0)}
        if obj.any():
            out["box"] = self.BOX_SCALE * F.l1_loss(self.box(tokens[obj]), t.box[obj])
        return out


def param_groups(model, recipe: Recipe) -> list[dict[str, Any]]:
    """Vision / language x decay / no-decay (norms, biases and embeddings are not decayed)."""
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = defaultdict(list)
    for name, p in model.named_parameters():
        vision = name.startswith("model.visual.")
        decay = p.ndim >= 2 and "embed" not in name
        groups[(vision, decay)].append(p)
    return [
        {"params": ps, "weight_decay": recipe.weight_decay if decay else 0.0,
         "lr_mult": recipe.vision_lr_mult if vision else 1.0, "name": f"{'vision' if vision else 'text'}"
         f"{'' if decay else '_nodecay'}"}
        for (vision, decay), ps in sorted(groups.items())
    ]


def lr_factor(recipe: Recipe, step: int, progress: float) -> float:
    """Linear warmup over steps, then cosine from 1 to ``min_lr_frac`` over the budget fraction."""
    warm = min(1.0, (step + 1) / max(1, recipe.warmup_steps))
    cos = 0.5 * (1 + math.cos(math.pi * min(1.0, max(0.0, progress))))
    return warm * (recipe.min_lr_frac + (1 - recipe.min_lr_frac) * cos)


def sample_chats(
    rng: np.random.Generator, recipe: Recipe, progress: float
) -> list[tuple[shapes.Scene | shapes_video.VideoScene, list[shapes.QA]]]:
    """The step's images (or videos, ``p_video``) and questions; early on (``size_curriculum``) only
    the cheap image sizes."""
    sizes = shapes.IMAGE_SIZES
    stage = next((px for until, px in recipe.size_curriculum if progress < until), None)
    if stage is not None:
        sizes = tuple(s for s in sizes if s[0] * s[1] <= stage) or sizes[:1]
    chats: list[tuple[shapes.Scene | shapes_video.VideoScene, list[shapes.QA]]] = []
    for _ in range(recipe.images_per_step):
        if recipe.p_video > 0 and rng.random() < recipe.p_video:  # no draw at all without video
            scene, qa = shapes_video.generate_video_sample(rng)
            chats.append((scene, shapes_video.chat_questions(rng, scene, qa)))
            continue
        kind = "single" if rng.random() < recipe.p_single else "multi"
        scene = shapes.sample_scene(rng, kind, sizes)
        qas = shapes.scene_questions(rng, scene, recipe.presence_pairs, recipe.single_presence_pairs, recipe.presence)
        chats.append((scene, qas))
    return chats


def train_step(model, optimizer, encoder: ChatEncoder, rng: np.random.Generator, recipe: Recipe,
               progress: float, dense: DenseSupervision | None = None) -> dict[str, list[float]]:
    """One optimizer step over ``images_per_step`` chats; returns per-task answer losses.

    Chats are forwarded one at a time (no padding waste, one graph in memory) and their
    gradients accumulate, scaled so the step loss is the weighted mean over all its answers
    (plus ``dense_weight`` x the mean dense loss per image, logged as ``dense_<head>``).
    """
    chats = sample_chats(rng, recipe, progress)
    total_w = sum(recipe.weight(qa.task) for _, qas in chats for qa in qas)
    optimizer.zero_grad(set_to_none=True)
    by_task: dict[str, list[float]] = defaultdict(list)
    for scene, qas in chats:
        questions, answers = [q.question for q in qas], [q.answer for q in qas]
        if isinstance(scene, shapes_video.VideoScene):
            enc = encoder.encode_video(video_data_url(scene.frames, shapes_video.FPS), questions, answers)
        else:
            enc = encoder.encode(scene.image, questions, answers)
        losses = answer_losses(model, enc)
        w = torch.tensor([recipe.weight(q.task) for q in qas])
        loss = (losses * w).sum() / total_w
        if dense is not None and enc.is_video:
            dense._tokens = None  # the dense heads supervise image tokens only
        elif dense is not None:
            parts = dense.losses(scene, enc)
            loss = loss + recipe.dense_weight * sum(parts.values()) / len(chats)
            for head, value in parts.items():
                by_task[f"dense_{head}"].append(float(value.detach()))
        loss.backward()
        for qa, value in zip(qas, losses.tolist()):
            by_task[qa.task].append(value)
    if recipe.clip_norm > 0:
        params = [p for g in optimizer.param_groups for p in g["params"]]
        torch.nn.utils.clip_grad_norm_(params, recipe.clip_norm)
    optimizer.step()
    return by_task


# --------------------------------------------------------------------------------------
# Quick evaluation (greedy HF generate on the full-token model)
# --------------------------------------------------------------------------------------


def eval_samples(n_per_task: int, seed: int = EVAL_SEED) -> list[tuple[Image.Image, dict[str, Any]]]:
    """A fixed held-out set: ``n_per_task`` samples of every task, as (image, JSONL record)."""
    rng = np.random.default_rng(seed)
    out = []
    for task in shapes.TASKS:
        for i in range(n_per_task):
            image, qa = shapes.generate_sample(rng, task)
            out.append((image, shapes.record(f"e{task}{i:04d}", "", qa)))
    return out


def eval_video_samples(n_per_task: int, seed: int = EVAL_SEED + 1) -> list[tuple[str, dict[str, Any]]]:
    """A fixed held-out video set: ``n_per_task`` samples of every video task, as (mp4 data URL, record)."""
    rng = np.random.default_rng(seed)
    out = []
    for task in shapes_video.VIDEO_TASKS:
        for i in range(n_per_task):
            scene, qa = shapes_video.generate_video_sample(rng, task)
            out.append((video_data_url(scene.frames, shapes_video.FPS),
                        shapes_video.video_record(f"e{task}{i:04d}", "", scene, qa)))
    return out


def load_jsonl_samples(path: str | Path) -> list[tuple[Image.Image, dict[str, Any]]]:
    """A civic-shapes JSONL file (image paths relative to it) as (image, record) pairs."""
    path = Path(path)
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [(Image.open(path.parent / r["image"]).convert("RGB"), r) for r in recs]


@torch.inference_mode()
def generate_answer(model, encoder: ChatEncoder, image: Image.Image | str, question: str,
                    max_new_tokens: int = 24) -> str:
    """Greedy answer about an image, or a video (``image``: an mp4 data URL)."""
    if isinstance(image, str):
        enc = encoder.encode_video(image, [question], None)
    else:
        enc = encoder.encode(image, [question], None)
    model.model.rope_deltas = None  # it persists across generate calls
    out = model.generate(
        **enc.model_inputs(), attention_mask=torch.ones_like(enc.input_ids), max_new_tokens=max_new_tokens,
        do_sample=False, eos_token_id=encoder.im_end, pad_token_id=encoder.pad_id,
    )
    return encoder.tokenizer.decode(out[0, enc.input_ids.shape[1]:], skip_special_tokens=True)


def quick_eval(model, encoder: ChatEncoder,
               samples: Sequence[tuple[Image.Image | str, dict[str, Any]]]) -> dict[str, Any]:
    """Accuracy overall, per task, and small/large (by ``size``) for single-object tasks."""
    was_training = model.training
    model.eval()
    hits: dict[str, list[bool]] = defaultdict(list)
    examples: dict[str, str] = {}
    for image, rec in samples:
        text = generate_answer(model, encoder, image, rec["question"])
        ok = shapes.is_correct(rec, text)
        hits[rec["task"]].append(ok)
        hits["overall"].append(ok)
        if "size" in rec:
            hits[f"{rec['task']}_{'small' if rec['size'] <= shapes.SMALL_MAX else 'large'}"].append(ok)
        examples.setdefault(rec["task"], f"{rec['answer']} -> {text!r}")
    model.train(was_training)
    acc = {k: round(sum(v) / len(v), 4) for k, v in sorted(hits.items())}
    return {"acc": acc, "n": len(samples), "examples": examples}


# --------------------------------------------------------------------------------------
# State, export
# --------------------------------------------------------------------------------------


def _atomic_torch_save(obj: Any, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _preset_from_dict(d: dict[str, Any]) -> ModelPreset:
    def dims(cls, values: dict[str, Any]):
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})

    return ModelPreset(name=d["name"], text=dims(TextDims, d["text"]), vision=dims(VisionDims, d["vision"]),
                       description=d.get("description", ""))


def load_state(work_dir: str | Path) -> dict[str, Any]:
    """The resumable state a run wrote to ``work_dir`` (everything but tensors is plain data)."""
    return torch.load(Path(work_dir) / STATE_FILE, map_location="cpu", weights_only=False)


def export_model(model, preset: ModelPreset, out_dir: str | Path, info: dict[str, Any] | None = None) -> Path:
    """A clean checkpoint dir (config, bf16 safetensors, tokenizer, processor, chat template).

    Files other than the weights are written by the model factory, so the tokenizer and
    processor are byte-identical to the random-weight checkpoints'. ``civic_train.json``
    (not the factory's marker) records the training, so ``make_model`` never overwrites it.
    Built in a sibling temp dir and renamed into place.
    """
    from safetensors.torch import save_file

    out = Path(out_dir).resolve()
    if out.exists() and any(out.iterdir()) and not (out / TRAIN_MARKER).exists():
        raise FileExistsError(f"{out} exists and was not written by civic train; not touching it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        mf.write_checkpoint(preset, tmp, seed=0, weights=False, dtype="bfloat16")
        tensors = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / TRAIN_MARKER).write_text(json.dumps({"preset": asdict(preset), **(info or {})}, indent=2) + "\n")
        mf.make_readable(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# --------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------


class _Stop:
    """SIGTERM sets a flag; the loop checkpoints and exits at the next step boundary."""

    def __init__(self) -> None:
        self.requested = False
        self._old = None

    def __enter__(self) -> _Stop:
        try:
            self._old = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread
            self._old = None
        return self

    def _handle(self, *_: Any) -> None:
        self.requested = True

    def __exit__(self, *_: Any) -> None:
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def _append_jsonl(path: Path, rec: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(rec) + "\n")


def _truncate_curve(path: Path, step: int) -> None:
    """On resume, drop records logged after the checkpoint (their steps are re-run)."""
    if path.exists():
        keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in keep))


def train(
    model_dir_out: str | Path,
    *,
    minutes: float = 150.0,
    resume: bool = False,
    threads: int = 1,
    recipe: Recipe | None = None,
    preset: ModelPreset = SHAPES_PRESET,
    max_steps: int | None = None,
    eval_every_min: float = 5.0,
    eval_per_task: int = 25,
    checkpoint_every_min: float = 5.0,
    log_every: int = 20,
    export: bool = True,
    progress: bool = True,
) -> Path:
    """Train until ``minutes`` training CPU-minutes (or ``max_steps``) are spent; return the work dir.

    ``model_dir_out`` is a working directory: ``state.pt`` (resumable), ``curve.jsonl``
    (learning curve), ``model/`` (exported checkpoint, written at the end). With ``resume``
    the recipe and model shape come from ``state.pt``; ``minutes`` / ``max_steps`` may extend
    the budget (the cosine then stretches from where it is).
    """
    from tqdm import tqdm

    torch.set_num_threads(threads)
    work = Path(model_dir_out).resolve()
    work.mkdir(parents=True, exist_ok=True)
    curve = work / CURVE_FILE
    if resume and not (work / STATE_FILE).exists():
        raise FileNotFoundError(f"nothing to resume: {work / STATE_FILE} does not exist")
    state = load_state(work) if resume else None
    if state is not None:
        # A state written before a recipe field existed ran without it: resume it the same way.
        recipe = Recipe(**{**RECIPE_FIELDS_ADDED, **state["recipe"]})
        preset = _preset_from_dict(state["preset"])
    elif (work / STATE_FILE).exists():
        raise FileExistsError(f"{work / STATE_FILE} exists: pass resume=True (--resume) or use another directory")
    recipe = recipe or Recipe()
    model = build_model(preset, recipe.seed)
    if state is None and recipe.init_from:
        load_weights(model, recipe.init_from)
    groups = param_groups(model, recipe)
    dense = DenseSupervision(model, preset) if recipe.dense_weight > 0 else None
    if dense is not None:
        groups.append({"params": list(dense.parameters()), "weight_decay": 0.0, "lr_mult": 1.0, "name": "dense_heads"})
    optimizer = torch.optim.AdamW(groups, lr=recipe.lr, betas=(0.9, 0.95), eps=1e-8)
    rng = np.random.default_rng([recipe.seed, 1])
    step, train_cpu, total_cpu, wall = 0, 0.0, 0.0, 0.0
    if state is not None:
        model.load_state_dict(state["model"])
        if dense is not None:
            missing = set(dense.state_dict()) - set(state["dense_heads"])
            if missing:
                raise ValueError(f"{work / STATE_FILE} was written by a civic train without the dense heads "
                                 f"{sorted(missing)}; continue it with that version or start a new run")
            dense.load_state_dict(state["dense_heads"])
        optimizer.load_state_dict(state["optimizer"])
        rng.bit_generator.state = state["data_rng"]
        torch.set_rng_state(state["torch_rng"])
        step, train_cpu, total_cpu, wall = state["step"], state["train_cpu_s"], state["total_cpu_s"], state["wall_s"]
        _truncate_curve(curve, step)
    else:
        curve.write_text("")
        (work / "recipe.json").write_text(json.dumps(
            {"recipe": asdict(recipe), "preset": asdict(preset), "minutes": minutes, "max_steps": max_steps,
             "params": sum(p.numel() for p in model.parameters())}, indent=2) + "\n")
    budget_s = minutes * 60.0
    encoder = ChatEncoder(preset)
    evalset: list[tuple[Any, dict[str, Any]]] = eval_samples(eval_per_task) if eval_per_task > 0 else []
    if eval_per_task > 0 and recipe.p_video > 0:
        evalset += eval_video_samples(eval_per_task)

    def progress_of(step: int, cpu: float) -> float:
        return max(cpu / budget_s, step / max_steps if max_steps else 0.0)

    def save() -> None:
        _atomic_torch_save({
            "version": 1, "step": step, "train_cpu_s": train_cpu, "total_cpu_s": total_cpu, "wall_s": wall,
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "schedule": {"budget_minutes": minutes, "max_steps": max_steps, "progress": progress_of(step, train_cpu)},
            "data_rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state(),
            "recipe": asdict(recipe), "preset": asdict(preset),
            **({"dense_heads": dense.state_dict()} if dense is not None else {}),
        }, work / STATE_FILE)

    def stamp() -> dict[str, Any]:
        return {"step": step, "cpu_min": round(train_cpu / 60, 3), "cpu_min_total": round(total_cpu / 60, 3),
                "wall_min": round(wall / 60, 3)}

    def run_eval() -> None:
        t0 = time.process_time()
        res = quick_eval(model, encoder, evalset)
        _append_jsonl(curve, {**stamp(), "eval": res["acc"], "examples": res["examples"],
                              "eval_cpu_s": round(time.process_time() - t0, 1)})
        bar.write(f"[eval step {step} @ {train_cpu / 60:.1f} cpu-min] {res['acc']}")

    next_eval = (math.floor(train_cpu / 60 / eval_every_min) + 1) * eval_every_min * 60
    window: dict[str, list[float]] = defaultdict(list)
    cpu0, wall0 = time.process_time(), time.monotonic()
    last_ckpt = wall0
    bar = tqdm(total=round(budget_s / 60, 1), initial=round(min(train_cpu, budget_s) / 60, 1), unit="cpu-min",
               disable=not progress, mininterval=1.0 if sys.stderr.isatty() else 60.0, dynamic_ncols=True)

    def done() -> bool:
        return train_cpu >= budget_s or (max_steps is not None and step >= max_steps)

    with _Stop() as stop:
        while not done() and not stop.requested:
            t0 = time.process_time()
            frac = progress_of(step, train_cpu)
            factor = lr_factor(recipe, step, frac)
            for g in optimizer.param_groups:
                g["lr"] = recipe.lr * g["lr_mult"] * factor
            for task, losses in train_step(model, optimizer, encoder, rng, recipe, frac, dense).items():
                window[task].extend(losses)
            step += 1
            dt = time.process_time() - t0
            train_cpu += dt
            bar.update(round(min(train_cpu, budget_s) / 60, 1) - bar.n)
            now_cpu, now_wall = time.process_time(), time.monotonic()
            total_cpu += now_cpu - cpu0
            wall += now_wall - wall0
            cpu0, wall0 = now_cpu, now_wall
            if step % log_every == 0 or done():
                by_task = {t: round(float(np.mean(v)), 4) for t, v in sorted(window.items())}
                loss = float(np.mean([v for t, v in by_task.items() if not t.startswith("dense_")]))
                _append_jsonl(curve, {**stamp(), "lr": recipe.lr * factor, "loss": round(loss, 4),
                                      "loss_by_task": by_task})
                bar.set_postfix(step=step, loss=f"{loss:.3f}", lr=f"{recipe.lr * factor:.2e}", refresh=False)
                window.clear()
            if evalset and (train_cpu >= next_eval or done()):
                run_eval()
                next_eval = (math.floor(train_cpu / 60 / eval_every_min) + 1) * eval_every_min * 60
            if time.monotonic() - last_ckpt >= checkpoint_every_min * 60 or done():
                save()
                last_ckpt = time.monotonic()
            total_cpu += time.process_time() - cpu0  # eval / checkpoint time
            wall += time.monotonic() - wall0
            cpu0, wall0 = time.process_time(), time.monotonic()
        if stop.requested:
            save()
            bar.write(f"stopped at step {step}; state saved, continue with --resume")
    bar.close()
    if export and done():
        export_model(model, preset, work / EXPORT_DIR, {"recipe": asdict(recipe), **stamp()})
    return work


def load_weights(model, checkpoint_dir: str | Path) -> None:
    """Load an exported checkpoint's weights (bf16 on disk) into the fp32 training model."""
    from safetensors.torch import load_file

    path = Path(checkpoint_dir) / "model.safetensors"
    if not path.exists():
        raise FileNotFoundError(f"no weights to start from: {path} does not exist")
    tensors = load_file(str(path))
    model.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=True)


def export_from_state(work_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Export the model of a (possibly running) run's last checkpoint, without training."""
    state = load_state(work_dir)
    preset = _preset_from_dict(state["preset"])
    model = build_model(preset, 0)
    model.load_state_dict(state["model"])
    info = {"recipe": state["recipe"], "step": state["step"], "cpu_min": round(state["train_cpu_s"] / 60, 3)}
    return export_model(model, preset, out_dir or Path(work_dir) / EXPORT_DIR, info)


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------


def _task_weight(text: str) -> tuple[str, float]:
    task, _, value = text.partition("=")
    if task not in shapes.TASKS or not value:
        raise argparse.ArgumentTypeError(f"expected TASK=WEIGHT with TASK in {shapes.TASKS}, got {text!r}")
    return task, float(value)


def _curriculum(text: str) -> list[tuple[float, int]]:
    try:
        stages = [(float(u), int(px)) for u, px in (part.split(":") for part in text.split(",") if part)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected UNTIL:PIXELS[,UNTIL:PIXELS...], got {text!r}") from None
    if [u for u, _ in stages] != sorted(u for u, _ in stages):
        raise argparse.ArgumentTypeError("curriculum stages must have increasing UNTIL")
    return stages


def _train_cmd(args: argparse.Namespace) -> int:
    if args.export_only:
        print(export_from_state(args.out))
        return 0
    recipe = Recipe(
        lr=args.lr, vision_lr_mult=args.vision_lr_mult, weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps, images_per_step=args.images_per_step, p_single=args.p_single,
        presence=args.presence, presence_pairs=args.presence_pairs, single_presence_pairs=args.single_presence_pairs,
        task_weights={**Recipe().task_weights, **dict(args.task_weight)},
        size_curriculum=args.size_curriculum, dense_weight=args.dense_weight,
        init_from=str(Path(args.init_from).resolve()) if args.init_from else None, p_video=args.p_video,
        seed=args.seed,
    )
    work = train(
        args.out, minutes=args.minutes, resume=args.resume, threads=args.threads, recipe=recipe,
        preset=PRESETS[args.preset], max_steps=args.max_steps, eval_every_min=args.eval_every,
        eval_per_task=args.eval_per_task, checkpoint_every_min=args.checkpoint_every,
    )
    print(work)
    return 0


def add_train_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``civic train --out DIR [--minutes M] [--resume] [--threads T] [--lr ...]``."""
    d = Recipe()
    p = subparsers.add_parser(
        "train", help="train the civic-shapes Qwen3-VL from scratch (resumable)",
        description="Work dir gets state.pt (resumable), curve.jsonl (learning curve) and model/ (HF + vLLM "
                    "checkpoint, bf16) at the end. Recipe flags are ignored with --resume (the saved recipe is used).",
    )
    p.add_argument("--out", required=True, help="working directory")
    p.add_argument("--minutes", type=float, default=150.0, help="training budget in CPU-minutes (default 150)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")
    p.add_argument("--resume", action="store_true", help="continue from OUT/state.pt")
    p.add_argument("--export-only", action="store_true", help="write OUT/model from OUT/state.pt and exit")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--preset", choices=sorted(PRESETS), default=SHAPES_PRESET.name)
    p.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate (default {d.lr})")
    p.add_argument("--vision-lr-mult", type=float, default=d.vision_lr_mult)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--images-per-step", type=int, default=d.images_per_step)
    p.add_argument("--p-single", type=float, default=d.p_single, help="fraction of single-object images")
    p.add_argument("--presence", choices=shapes.PRESENCE_MODES, default=d.presence,
                   help="presence questions: one independent has_color/has_shape per multi image, or "
                        "balanced yes/no pairs (leaky; the earlier recipe)")
    p.add_argument("--presence-pairs", type=int, default=d.presence_pairs,
                   help="yes/no pairs of has_color and of has_shape questions per multi-object image")
    p.add_argument("--single-presence-pairs", type=int, default=d.single_presence_pairs,
                   help="... and per single-object image")
    p.add_argument("--task-weight", type=_task_weight, action="append", default=[], metavar="TASK=W",
                   help=f"per-answer loss weight of a task (repeatable), on top of {d.task_weights}")
    p.add_argument("--size-curriculum", type=_curriculum, default=d.size_curriculum, metavar="UNTIL:PIXELS,...",
                   help="image-size curriculum, e.g. 0.15:65536,0.35:143360 (256x256 only for the first 15%% "
                        "of the budget, then <= 320x448 until 35%%, then all sizes; the default); '' disables it")
    p.add_argument("--dense-weight", type=float, default=d.dense_weight,
                   help="weight of the per-visual-token colour/shape/box losses (0: off)")
    p.add_argument("--init-from", default=None, metavar="CHECKPOINT",
                   help="start from this exported checkpoint's weights (fresh optimizer and schedule)")
    p.add_argument("--p-video", type=float, default=d.p_video,
                   help="fraction of chats that are civic-shapes-video chats (mp4 through vLLM's decoder, "
                        "HF processor videos=...); the rest are image chats (default 0: images only)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--eval-every", type=float, default=5.0, help="quick eval every this many CPU-minutes")
    p.add_argument("--eval-per-task", type=int, default=25, help="quick-eval samples per task (0: none)")
    p.add_argument("--checkpoint-every", type=float, default=5.0, help="save state every this many wall minutes")
    p.set_defaults(handler=_train_cmd)
    return p


def run_as_module(add_parser, command: str, module: str, argv: Sequence[str] | None) -> int:
    """``python -m MODULE ARGS`` = ``civic COMMAND ARGS`` (no console script needed, e.g. under nice/taskset)."""
    parser = argparse.ArgumentParser(prog=f"python -m {module}")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args([command, *(sys.argv[1:] if argv is None else argv)])
    return args.handler(args)


def main(argv: Sequence[str] | None = None) -> int:
    return run_as_module(add_train_parser, "train", "civic_vllm.training.train", argv)


if __name__ == "__main__":
    sys.exit(main())
