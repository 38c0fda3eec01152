"""Per-image selection from the vision tower's patch rows: the one place that turns
encoder states into kept token indices, shared by the vLLM path and the HF path."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from civic_vllm.retention import content_seed, get_policy
from civic_vllm.retention.base import GROUP_ROWS
from civic_vllm.retention.learned import TokenScorer, learned_select
from civic_vllm.retention.video import TemporalCivicPolicy

LEARNED_POLICY = "learned"
_VIDEO_POLICY = TemporalCivicPolicy()


@dataclass(frozen=True)
class ImageRetention:
    """What to keep for one image: ``num_kept`` merged tokens chosen by ``policy``.

    ``exit_layer`` is the number of vision blocks that run on all patches before the
    selection (None: after the last block, i.e. retention on the encoder output);
    the remaining blocks and the mergers then run on the kept patch groups only. With
    ``exit_context`` those blocks' attention also reads the dropped groups, frozen at the
    exit layer, as keys and values (civic_vllm.exit_context).
    """

    grid_hw: tuple[int, int]  # merged grid (rows, cols)
    num_kept: int
    policy: str
    exit_layer: int | None = None
    exit_context: bool = False

    @property
    def num_tokens(self) -> int:
        return self.grid_hw[0] * self.grid_hw[1]

    @property
    def keeps_all(self) -> bool:
        return self.num_kept == self.num_tokens

    @property
    def num_sequences(self) -> int:
        """Attention sequences of this item in the vision tower: one per image."""
        return 1

    def selects_after(self, block: int, depth: int) -> bool:
        """Whether this image's selection happens right after 0-based ``block``."""
        return _selects_after(self.exit_layer, block, depth)


def _selects_after(exit_layer: int | None, block: int, depth: int) -> bool:
    return block == (depth if exit_layer is None else min(exit_layer, depth)) - 1


def select_image_tokens(
    patch_rows: torch.Tensor,
    seed_pixels: torch.Tensor,
    plan: ImageRetention,
    scorer: TokenScorer | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Ascending raster indices of one image's kept merged tokens, and the learned scores.

    ``patch_rows`` are the image's vision hidden states [4N, C], each merged token's
    2x2 patches on consecutive rows. The ``learned`` policy scores them with the
    checkpoint's ``scorer`` and also returns the scores [N] (differentiable when the
    scorer trains); the other policies score a token from the mean of its patches,
    i.e. the rows the merger would fuse, and return None. ``seed_pixels`` are the
    image's patch pixels, read only by the random policy so every tensor-parallel rank
    draws the same subset; vLLM ships them as raw uint8 (it normalises inside the
    model), which also keeps the seed independent of the serving dtype, and other
    callers pass that form.
    """
    if plan.keeps_all:
        return torch.arange(plan.num_tokens, device=patch_rows.device), None
    if plan.policy == LEARNED_POLICY:
        if scorer is None:
            raise ValueError("policy 'learned' needs a checkpoint with a trained CIVIC scorer")
        scores = scorer(patch_rows, plan.grid_hw)
        return learned_select(scores, plan.grid_hw, plan.num_kept).to(patch_rows.device), scores
    features = patch_rows.reshape(-1, GROUP_ROWS, patch_rows.shape[-1]).mean(dim=1)
    seed = content_seed(seed_pixels) if plan.policy == "random" else None
    return get_policy(plan.policy).select(features, plan.grid_hw, plan.num_kept, seed=seed), None


def select_after_block(
    block_index: int,
    depth: int,
    hidden: torch.Tensor,
    groups: Sequence[int],
    seed_pixels: Sequence[torch.Tensor],
    retentions: Sequence[ImageRetention],
    kept: list[torch.Tensor | None],
    scorer: TokenScorer | None = None,
    scores: list[torch.Tensor | None] | None = None,
) -> list[int]:
    """Select for every item whose exit layer ends at ``block_index``; fills ``kept``.

    ``hidden`` holds all items' current patch rows, item i owning 4 * groups[i]
    consecutive rows. An item is an image (:class:`ImageRetention`) or a video
    (:class:`VideoRetention`, selected on the mean of each merged token's patch rows).
    Returns the indices of the items that selected. When ``scores`` is given, the
    learned policy's scores of image i go to ``scores[i]``.
    """
    selecting = [i for i, plan in enumerate(retentions) if plan.selects_after(block_index, depth)]
    if selecting:
        item_rows = hidden.split([GROUP_ROWS * g for g in groups])
        for i in selecting:
            if isinstance(retentions[i], VideoRetention):
                features = item_rows[i].reshape(-1, GROUP_ROWS, item_rows[i].shape[-1]).mean(dim=1)
                kept[i], item_scores = select_video_tokens(features, retentions[i]), None
            else:
                kept[i], item_scores = select_image_tokens(item_rows[i], seed_pixels[i], retentions[i], scorer)
            if scores is not None:
                scores[i] = item_scores
    return selecting


def sequence_rows(groups: Sequence[int], retentions: Sequence[ImageRetention | VideoRetention]) -> list[int]:
    """Patch rows of each attention sequence of the current rows (item i holds groups[i] merged
    tokens, split evenly over its ``num_sequences``: a video's frame groups attend apart)."""
    return [GROUP_ROWS * g // plan.num_sequences for g, plan in zip(groups, retentions)
            for _ in range(plan.num_sequences)]


def patch_counts(grid_thw: Sequence[Sequence[int]]) -> list[int]:
    return [t * h * w for t, h, w in grid_thw]


@dataclass(frozen=True)
class VideoRetention:
    """What to keep for one video: ``num_kept_per_group`` of each frame group's merged tokens.

    ``exit_layer`` as for images (None: on the encoder output). Every frame group selects
    at the same layer, so the temporal policy still compares whole groups; no exit context.
    """

    num_groups: int  # frame groups (grid t)
    grid_hw: tuple[int, int]  # merged grid (rows, cols) of every group
    num_kept_per_group: int
    exit_layer: int | None = None
    exit_context = False  # not a field: the dropped rows of a video are never attended to

    @property
    def num_sequences(self) -> int:
        """Each frame group is its own attention sequence in the vision tower."""
        return self.num_groups

    def selects_after(self, block: int, depth: int) -> bool:
        return _selects_after(self.exit_layer, block, depth)

    def selects_in_tower(self, depth: int) -> bool:
        """Whether selection happens before the last of ``depth`` vision blocks (else on the output)."""
        return not self.keeps_all and self.exit_layer is not None and self.exit_layer < depth

    @property
    def tokens_per_group(self) -> int:
        return self.grid_hw[0] * self.grid_hw[1]

    @property
    def num_tokens(self) -> int:
        return self.num_groups * self.tokens_per_group

    @property
    def num_kept(self) -> int:
        return self.num_groups * self.num_kept_per_group

    @property
    def keeps_all(self) -> bool:
        return self.num_kept_per_group == self.tokens_per_group

    def kept_cells(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(row, col) in its group's grid of each kept token (``indices`` into the whole video)."""
        cell = indices % self.tokens_per_group
        return cell // self.grid_hw[1], cell % self.grid_hw[1]


def select_video_tokens(features: torch.Tensor, plan: VideoRetention) -> torch.Tensor:
    """Ascending indices of one video's kept merged tokens, ``plan.num_kept_per_group`` per group.

    ``features`` are the video's merged embeddings [num_groups * h * w, D] (the vision
    tower's main output, DeepStack levels excluded); the same indices then pick the
    DeepStack rows; at an exit layer they are the mean patch rows of each merged token.
    The temporal-novelty policy (civic_vllm.retention.video) compares whole frame groups.
    """
    if plan.keeps_all:
        return torch.arange(plan.num_tokens, device=features.device)
    return _VIDEO_POLICY.select(features, plan.num_groups, plan.grid_hw, plan.num_kept_per_group)
