"""Video retention: temporal novelty on top of CIVIC's spatial saliency, one frame group at a time.

Qwen3-VL encodes a video in frame groups (``temporal_patch_size`` frames each); every group
is an h x w grid of merged tokens with its own timestamp and its own run of placeholders in
the prompt, so every group keeps its own K_t tokens (civic_vllm.budget.num_retained_per_group).
Which K_t, per group g (features in cosine geometry, fp32):

1. Spatial saliency s_i and the neighbour structure of the group's grid, exactly as the image
   policy computes them (:class:`~civic_vllm.retention.civic.CivicPolicy`).
2. Temporal repetition rep_i = clip((cos(f_g,i, f_{g-1,i}) - tau) / (1 - tau), 0, 1): how
   much token i repeats the *same cell* of the previous frame group (all of its tokens, kept
   or not: the LLM saw that content there, or a kept neighbour of it). The first group has
   no predecessor: rep = 0.
3. s_i <- s_i * (1 - temporal_weight * rep_i): a static background cell that the previous
   group already showed is cheap to drop, while a cell whose content changed (motion, a new
   object, a cut) keeps its full spatial saliency.
4. The image policy's coverage floor and redundancy-aware fill on that saliency, so every
   area of the frame keeps a thin sample and a static video degrades to an even spatial
   sample per group rather than an empty region.

Deterministic (no randomness; ties broken by the image policy's spatial rank), pure torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .base import validate_selection
from .civic import CivicPolicy


@dataclass(frozen=True)
class TemporalCivicPolicy:
    """CIVIC for video: spatial saliency discounted by repetition of the previous frame group."""

    spatial: CivicPolicy = field(default_factory=CivicPolicy)
    """The image policy that scores and fills each frame group."""
    temporal_weight: float = 0.9
    """Share of a token's saliency lost when it fully repeats the previous group's cell."""
    tau: float = 0.85
    """Cosine to the previous group's cell above which a token counts as a (partial) repeat;
    the same threshold the image policy uses for neighbour duplicates. Untuned guess."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.temporal_weight <= 1.0:
            raise ValueError(f"temporal_weight must be in [0, 1], got {self.temporal_weight!r}")
        if not -1.0 <= self.tau < 1.0:
            raise ValueError(f"tau must be in [-1, 1), got {self.tau!r}")

    def repetition(self, previous: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
        """[n] rep in [0, 1] of each token of ``current`` against the same cell of ``previous``."""
        cos = torch.nn.functional.cosine_similarity(current.float(), previous.float(), dim=1, eps=1e-12)
        return ((cos - self.tau) / (1.0 - self.tau)).clamp_(0.0, 1.0).nan_to_num_(0.0)

    @torch.no_grad()
    def select(self, features: torch.Tensor, num_groups: int, grid_hw: tuple[int, int], k: int) -> torch.Tensor:
        """Kept indices into the video's [num_groups * h * w] tokens (group-major raster order),
        sorted ascending: exactly ``k`` per frame group.

        ``features``: [num_groups * h * w, D] float, one row per merged token, group by group.
        """
        if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
            raise ValueError(f"num_groups must be an integer >= 1, got {num_groups!r}")
        if not isinstance(features, torch.Tensor) or features.dim() != 2 or features.shape[0] % num_groups:
            shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
            raise ValueError(f"features must be [num_groups * h * w, D] with {num_groups} groups, got {shape}")
        groups = features.split(features.shape[0] // num_groups)
        h, w, k = validate_selection(groups[0], grid_hw, k)
        n = h * w
        kept = []
        for g, group in enumerate(groups):
            if k == n:
                indices = torch.arange(n, device=features.device)
            else:
                s, cos8, nbr = self.spatial.analyse(group, (h, w))
                if g > 0:
                    s = s * (1.0 - self.temporal_weight * self.repetition(groups[g - 1], group))
                indices = torch.sort(self.spatial.select_scored(s, cos8, nbr, h, w, k)).values
            kept.append(indices.to(dtype=torch.long, device=features.device) + g * n)
        return torch.cat(kept)
