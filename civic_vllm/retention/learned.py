"""Learned early retention: a small trained scorer that picks the K merged tokens at vision block L.

Why: selecting inside the encoder (after block L of D) lets blocks L+1..D run on kept tokens
only, which is where CIVIC's encoder speed comes from, but early features are low-level: the
training-free ``civic`` saliency computed there loses object extent (grounding). A scorer
trained to reproduce what keeps accuracy fixes that for the price of a few thousand weights.

Scorer (per image, on the patch rows at block L, each merged token's 2x2 patches on 4 rows):
  * per token: mean and max of its 4 patch rows (max: a small object may fill one patch),
    layer-normed;
  * a two-layer MLP over those, plus the 3x3 grid average of its hidden features
    (neighbourhood: box edges sit next to the object's interior);
  * a global-context term q_i . mean_j(k_j) (VisionSelector's O(N d) context);
  * a prior: the training-free ``civic`` saliency of the mean features, standardised per image.
  score = prior + MLP residual + context; the residual's and the context's output layers start
  at zero, so an untrained scorer ranks exactly like the prior.
Selection (:func:`learned_select`): a coverage floor (the best token of each coarse cell, as the
``civic`` policy does), then the top-scoring rest; indices sorted ascending, so raster order and
M-RoPE positions survive. Pure torch, deterministic, no vLLM import.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import GROUP_ROWS, cell_ids, lattice_shape, validate_selection
from .civic import CivicPolicy

FLOOR_FRACTION = 0.25  # share of K spent on the coverage floor, as in the civic policy
_PRIOR = CivicPolicy()


@dataclass(frozen=True)
class ScorerConfig:
    """Shape of a :class:`TokenScorer`; stored in a checkpoint's ``civic`` recipe."""

    in_dim: int  # vision hidden size at the exit layer
    hidden: int = 64
    context: int = 32

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


class TokenScorer(nn.Module):
    """Scores each merged token of one image from its patch rows (see the module docstring)."""

    def __init__(self, config: ScorerConfig) -> None:
        super().__init__()
        self.config = config
        d, h = 2 * config.in_dim, config.hidden
        self.norm = nn.LayerNorm(d)
        self.hidden = nn.Linear(d, h)
        self.out = nn.Linear(2 * h, 1)
        self.query = nn.Linear(d, config.context)
        self.key = nn.Linear(d, config.context)
        for layer in (self.out, self.query):  # start as the prior
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, patch_rows: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
        """[h*w] scores (float32, differentiable) for one image's patch rows [4*h*w, C]."""
        h, w = grid_hw
        rows = patch_rows.float().reshape(h * w, GROUP_ROWS, -1)
        mean = rows.mean(dim=1)
        features = self.norm(torch.cat([mean, rows.amax(dim=1)], dim=1))
        local = F.gelu(self.hidden(features))
        grid = local.T.reshape(1, -1, h, w)
        around = F.avg_pool2d(grid, 3, stride=1, padding=1, count_include_pad=False).reshape(-1, h * w).T
        residual = self.out(torch.cat([local, around], dim=1)).squeeze(1)
        context = self.query(features) @ self.key(features).mean(dim=0) / self.config.context ** 0.5
        return prior_score(mean.detach(), grid_hw) + residual + context


@torch.no_grad()
def prior_score(features: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
    """The training-free civic saliency of [N, C] features, standardised per image (fp32)."""
    s = _PRIOR.saliency(features, grid_hw)
    return (s - s.mean()) / s.std(unbiased=False).clamp_min(1e-6)


@torch.no_grad()
def learned_select(scores: torch.Tensor, grid_hw: tuple[int, int], k: int) -> torch.Tensor:
    """K kept raster indices, ascending: the best token of each coverage cell, then the best rest."""
    h, w, k = validate_selection(scores[:, None], grid_hw, k)
    n = h * w
    if k == n:
        return torch.arange(n, device=scores.device)
    # Integer ranks make every comparison strict and deterministic (ties by raster order).
    rank = torch.empty(n, dtype=torch.long, device=scores.device)
    rank[torch.argsort(scores.float(), stable=True)] = torch.arange(n, device=scores.device)
    rows, cols = lattice_shape(h, w, min(k, max(1, round(FLOOR_FRACTION * k))))
    cells = cell_ids(h, w, rows, cols, scores.device)
    best = torch.full((rows * cols,), -1, dtype=torch.long, device=scores.device)
    best.scatter_reduce_(0, cells, rank, "amax")
    floor = rank == best[cells]
    rest = torch.topk(rank.masked_fill(floor, -1), k - int(floor.sum())).indices
    kept = torch.cat([floor.nonzero().squeeze(1), rest])
    return torch.sort(kept).values



def keep_logits(scores: torch.Tensor, k: int) -> torch.Tensor:
    """``scores`` minus the k-th largest score (detached): > 0 roughly where top-k keeps.

    The logits of the training losses: a straight-through gate and BCE towards a target set.
    """
    return scores - torch.topk(scores.detach(), k).values[-1]


def saliency_loss(scores: torch.Tensor, target_saliency: torch.Tensor, sharpness: float) -> torch.Tensor:
    """KL(p || softmax(scores)), p = softmax(sharpness * target_saliency): the scorer learns to rank
    like a target saliency (standardised per image), most of all at its head.

    Threshold-free and independent of K. Two alternatives diverged or stalled in probes: a BCE
    on ``keep_logits`` towards a target selection (its detached top-k threshold moves with the
    scores, so the loss grew without bound) and a listwise CE towards the civic selection's
    members (its spread-out background picks are arbitrary, so they cannot be learnt).
    """
    p = torch.softmax(sharpness * target_saliency, dim=0)
    return (p * (torch.log(p.clamp_min(1e-30)) - torch.log_softmax(scores, dim=0))).sum()
