"""``civic viz``: draw which merged visual tokens CIVIC keeps for one image.

    civic viz --image photo.jpg --ratio 0.33 [--policy civic] [--model DIR] --out map.png

The image goes through the checkpoint's own HF image processor (the resize vLLM applies too),
the checkpoint's vision tower runs in-process on every patch (only its weights are loaded, with
HF transformers), and the kept tokens are chosen by :func:`civic_vllm.hf_compact.compact_vision`
with K from :func:`civic_vllm.budget.num_retained`: the same selection and budget code the server
runs. The picture is the resized image with one cell per merged token (patch x merge pixels
square): kept cells as they are, outlined; dropped cells dimmed; a title with policy, ratio and K/N.

The selection depends on the tower's numerics: use ``--dtype`` to match the server's ``--dtype``
(bfloat16 by default, like ``civic_vllm.serving``); near-ties can differ across dtypes.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from PIL import Image

DIM = 0.3  # dropped cells keep this fraction of their brightness
OUTLINE = (255, 215, 0)  # kept cells' outline
BANNER_BG = (255, 255, 255)
BANNER_FG = (0, 0, 0)


@dataclass
class Retention:
    """What the server would keep for one image."""

    image: Image.Image  # the image as the processor resized it (RGB)
    kept: torch.Tensor  # ascending raster indices of kept merged tokens
    grid_hw: tuple[int, int]  # merged grid (rows, cols)
    cell_px: int  # pixels per merged token side (patch_size * merge_size)
    num_kept: int  # K
    policy: str
    ratio: float

    @property
    def num_tokens(self) -> int:  # N
        return self.grid_hw[0] * self.grid_hw[1]

    def mask(self) -> torch.Tensor:
        from civic_vllm.retention import retention_map

        return retention_map(self.kept, self.grid_hw)

    def title(self) -> str:
        return f"policy {self.policy}, ratio {self.ratio:g}: kept K={self.num_kept} of N={self.num_tokens} tokens"


def _torch_dtype(name: str):
    import torch

    try:
        return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]
    except KeyError:
        raise ValueError(f"dtype must be bfloat16, float16 or float32, got {name!r}") from None


def load_vision_tower(model_dir: str | Path, dtype: str = "bfloat16"):
    """The checkpoint's vision tower alone (``model.visual.*`` weights), in eval mode.

    Reads only the vision tensors from the safetensors files, so a large checkpoint's language
    model is never loaded.
    """
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModel

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} is not a checkpoint directory (no config.json)")
    config = AutoConfig.from_pretrained(str(model_dir))
    if getattr(config, "model_type", None) != "qwen3_vl":
        raise ValueError(f"civic viz needs a Qwen3-VL (dense) checkpoint, got model_type {config.model_type!r}")
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted({f for k, f in json.loads(index.read_text())["weight_map"].items() if ".visual." in k})
    else:
        files = ["model.safetensors"]
    prefixes = ("model.visual.", "visual.")
    state: dict[str, Any] = {}
    for name in files:
        with safe_open(str(model_dir / name), framework="pt") as fh:
            for key in fh.keys():
                for prefix in prefixes:
                    if key.startswith(prefix):
                        state[key[len(prefix):]] = fh.get_tensor(key)
    if not state:
        raise ValueError(f"no vision-tower weights (model.visual.*) in {model_dir}")
    # Built on the CPU (not the meta device): non-persistent buffers such as the rotary
    # frequencies are computed at construction and are not in the checkpoint.
    tower = AutoModel.from_config(config.vision_config)
    tower.load_state_dict(state, strict=True)
    return tower.to(_torch_dtype(dtype)).eval()


def compute_retention(
    model_dir: str | Path,
    image: Image.Image,
    ratio: float,
    policy: str = "civic",
    min_tokens: int = 1,
    dtype: str = "bfloat16",
    exit_layer: int | None = None,
) -> Retention:
    """Run the image processor and the vision tower, then the server's selection code."""
    import torch
    from PIL import Image as PILImage

    from civic_vllm.budget import merged_grid, num_merged_tokens, num_retained
    from civic_vllm.retention.selection import ImageRetention
    from civic_vllm.settings import CivicSettings

    kwargs: dict[str, Any] = {"civic_ratio": ratio, "civic_policy": policy, "civic_min_tokens": min_tokens}
    if exit_layer is not None:
        kwargs["civic_exit_layer"] = exit_layer
    settings = CivicSettings.from_mm_kwargs(kwargs)  # the server's validation and messages
    image = image.convert("RGB")
    processor, tower = _load(str(model_dir), dtype)
    inputs = processor(images=[image], return_tensors="pt")
    # Raw uint8 patch pixels, as vLLM ships them: only the random policy reads them (its seed).
    raw = processor(images=[image], do_rescale=False, do_normalize=False, return_tensors="pt")
    seed_pixels = raw["pixel_values"].round().to(torch.uint8)
    grid = inputs["image_grid_thw"]
    merge = tower.config.spatial_merge_size
    patch = tower.config.patch_size
    grid_thw = [int(v) for v in grid[0].tolist()]
    grid_hw = merged_grid(grid_thw, merge)
    n = num_merged_tokens(grid_thw, merge)
    k = num_retained(n, settings.ratio, settings.min_tokens)
    scorer = _scorer(str(model_dir)) if settings.policy == "learned" else None
    settings.check_model(len(tower.blocks), has_scorer=scorer is not None)
    plan = ImageRetention(grid_hw=grid_hw, num_kept=k, policy=settings.policy, exit_layer=settings.exit_layer)
    pixels = inputs["pixel_values"].to(_torch_dtype(dtype))
    with torch.inference_mode():
        kept = _select(tower, pixels, grid, seed_pixels, plan, scorer)
    resized = image.resize((grid_thw[2] * patch, grid_thw[1] * patch), PILImage.Resampling.BICUBIC)
    return Retention(image=resized, kept=kept.cpu(), grid_hw=grid_hw, cell_px=patch * merge, num_kept=k,
                     policy=settings.policy, ratio=settings.ratio)


@functools.lru_cache(maxsize=2)
def _load(model_dir: str, dtype: str):
    """(image processor, vision tower) of a checkpoint, kept for repeated calls."""
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(model_dir).image_processor, load_vision_tower(model_dir, dtype)


@functools.lru_cache(maxsize=2)
def _scorer(model_dir: str):
    """The checkpoint's trained CIVIC scorer, or None when its recipe has none."""
    from civic_vllm.recipe import load_scorer, read_recipe

    recipe = read_recipe(model_dir) if Path(model_dir, "config.json").is_file() else None
    return load_scorer(model_dir, recipe) if recipe is not None and recipe.scorer is not None else None


def _select(tower, pixels, grid, seed_pixels, plan, scorer=None) -> torch.Tensor:
    """One image's kept raster indices: the HF reference of the served tower pass (retention
    at the plan's exit layer, through the selection code the server shares)."""
    from civic_vllm.hf_compact import compact_vision

    _, _, kept, _ = compact_vision(tower, pixels, grid, [plan], seed_pixels, scorer)
    return kept[0]


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed-size bitmap font
        return ImageFont.load_default()


def draw_retention(result: Retention) -> tuple[Image.Image, int]:
    """(picture, y offset of the image inside it): a title banner above the resized image, with
    dropped cells dimmed and kept cells outlined."""
    import numpy as np
    from PIL import Image as PILImage
    from PIL import ImageDraw

    mask = result.mask().numpy()
    cell = result.cell_px
    pixels = np.asarray(result.image, dtype=np.float32)
    keep = np.kron(mask, np.ones((cell, cell), dtype=bool))[: pixels.shape[0], : pixels.shape[1]]
    out = np.where(keep[..., None], pixels, pixels * DIM).round().clip(0, 255).astype(np.uint8)
    body = PILImage.fromarray(out)
    draw = ImageDraw.Draw(body)
    for idx in result.kept.tolist():
        r, c = divmod(idx, result.grid_hw[1])
        draw.rectangle((c * cell, r * cell, (c + 1) * cell - 1, (r + 1) * cell - 1), outline=OUTLINE, width=1)

    width = body.size[0]
    font_size = max(10, min(18, width // 40))
    font = _font(font_size)
    lines = _wrap(result.title(), font, width - 12)
    banner = (font_size + 6) * len(lines) + 8
    canvas = PILImage.new("RGB", (width, banner + body.size[1]), BANNER_BG)
    canvas.paste(body, (0, banner))
    text = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        text.text((6, 4 + i * (font_size + 6)), line, fill=BANNER_FG, font=font)
    return canvas, banner


def _wrap(text: str, font, width: int) -> list[str]:
    words, lines, line = text.split(), [], ""
    for word in words:
        trial = f"{line} {word}".strip()
        if line and font.getlength(trial) > width:
            lines.append(line)
            line = word
        else:
            line = trial
    return lines + [line] if line else lines
