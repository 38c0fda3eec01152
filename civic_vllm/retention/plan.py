"""Per-image selection from the vision tower's patch rows: the one place that turns
encoder output into kept token indices, shared by the vLLM path and the HF path."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from civic_vllm.retention import content_seed, get_policy

GROUP_ROWS = 4  # patch rows per merged token (2x2 spatial merge)


@dataclass(frozen=True)
class ImageRetention:
    """What to keep for one image: ``num_kept`` merged tokens chosen by ``policy``."""

    grid_hw: tuple[int, int]  # merged grid (rows, cols)
    num_kept: int
    policy: str

    @property
    def num_tokens(self) -> int:
        return self.grid_hw[0] * self.grid_hw[1]

    @property
    def keeps_all(self) -> bool:
        return self.num_kept == self.num_tokens


def select_kept_tokens(
    patch_hidden: torch.Tensor,
    seed_pixels: torch.Tensor,
    grid_thw: Sequence[Sequence[int]],
    plans: Sequence[ImageRetention],
) -> list[torch.Tensor]:
    """Per image, the ascending raster indices of the kept merged tokens.

    ``patch_hidden`` is the vision tower's final hidden states [4 * sum(N), C], each
    merged token's 2x2 patches on consecutive rows. A token is scored from the mean
    of its patches, i.e. the rows the merger would fuse.

    ``seed_pixels`` are the patch pixels [sum(t*h*w), ...] the random policy is seeded
    from, so every tensor-parallel rank draws the same subset. vLLM ships them as raw
    uint8 values (it normalises inside the model), which also makes the seed
    independent of the serving dtype; other callers pass the same raw form.
    """
    group_features = patch_hidden.reshape(-1, GROUP_ROWS, patch_hidden.shape[-1]).mean(dim=1)
    per_image_features = group_features.split([plan.num_tokens for plan in plans])
    per_image_pixels = seed_pixels.split([t * h * w for t, h, w in grid_thw])
    kept = []
    for features, pixels, plan in zip(per_image_features, per_image_pixels, plans):
        if plan.keeps_all:
            kept.append(torch.arange(plan.num_tokens, device=patch_hidden.device))
            continue
        seed = content_seed(pixels) if plan.policy == "random" else None
        kept.append(get_policy(plan.policy).select(features, plan.grid_hw, plan.num_kept, seed=seed))
    return kept
