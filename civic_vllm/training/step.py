"""One training step: the model, per-answer losses, dense supervision of the visual tokens,
parameter groups, the schedule and the data stream."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from civic_vllm import model_factory as mf
from civic_vllm.client import video_data_url
from civic_vllm.data import shapes, shapes_video
from civic_vllm.model_factory import ModelPreset
from civic_vllm.training.chats import ChatEncoder, Encoded
from civic_vllm.training.recipe import Recipe


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
