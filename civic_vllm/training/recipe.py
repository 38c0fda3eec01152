"""The training recipe: the civic-shapes model presets, the run's files and seeds, and
``Recipe`` (every knob of ``civic train``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from civic_vllm.model_factory import ModelPreset, TextDims, VisionDims

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
