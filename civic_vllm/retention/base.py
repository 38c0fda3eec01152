"""The retention policy interface and the grid helpers the policies share.

A policy sees one image: its merged-token features in raster order and the merged
grid (h, w). It returns the K kept raster indices sorted ascending, so compaction
preserves raster order. Policies must be deterministic: every tensor-parallel rank
runs the selection on its own and all ranks must agree.
"""

from __future__ import annotations

import abc
from typing import ClassVar

import torch

from civic_vllm.budget import _as_int

GROUP_ROWS = 4  # patch rows per merged token (the 2x2 spatial merge)

# 8-neighbourhood offsets (drow, dcol). OFFSETS[7 - d] is the opposite of OFFSETS[d];
# OFFSETS[4:] are the "forward" half (right, down-left, down, down-right).
OFFSETS: tuple[tuple[int, int], ...] = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


class RetentionPolicy(abc.ABC):
    """Chooses which K of the N merged tokens of one image survive."""

    name: ClassVar[str]
    requires_seed: ClassVar[bool] = False

    @torch.no_grad()
    def select(
        self,
        features: torch.Tensor,
        grid_hw: tuple[int, int],
        k: int,
        *,
        seed: int | None = None,
    ) -> torch.Tensor:
        """K unique raster indices in [0, h*w), sorted ascending, int64, on features.device.

        features: [N, D] float, one row per merged token in raster order (any float
        dtype; policies that read it compute in fp32). seed: required by policies that
        draw at random (requires_seed), ignored by the rest. Bad inputs raise ValueError.
        """
        h, w, k = validate_selection(features, grid_hw, k)
        if seed is not None:
            seed = _as_int("seed", seed)
        elif self.requires_seed:
            raise ValueError(f"policy {self.name!r} needs a seed (e.g. content_seed(pixel_values))")
        n = h * w
        if k == n:
            return torch.arange(n, dtype=torch.long, device=features.device)
        indices = self._select(features, h, w, k, seed)
        return torch.sort(indices.to(device=features.device, dtype=torch.long)).values

    @abc.abstractmethod
    def _select(self, features: torch.Tensor, h: int, w: int, k: int, seed: int | None) -> torch.Tensor:
        """K unique indices in any order; inputs are validated and 1 <= k < h*w."""


def validate_selection(features: torch.Tensor, grid_hw: tuple[int, int], k: int) -> tuple[int, int, int]:
    """(h, w, k) after checking that features, grid and budget fit together."""
    try:
        h, w = grid_hw
    except (TypeError, ValueError):
        raise ValueError(f"grid_hw must be (rows, cols), got {grid_hw!r}") from None
    h, w, k = _as_int("grid rows", h), _as_int("grid cols", w), _as_int("k", k)
    if h < 1 or w < 1:
        raise ValueError(f"grid_hw entries must be >= 1, got {(h, w)}")
    if not isinstance(features, torch.Tensor) or features.dim() != 2 or not features.is_floating_point():
        shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise ValueError(f"features must be a float tensor [N, D], got {shape}")
    n = h * w
    if features.shape[0] != n:
        raise ValueError(f"features have {features.shape[0]} rows but grid {h}x{w} has {n} tokens")
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}] for a {h}x{w} grid, got {k}")
    return h, w, k


def evenly_spaced(n: int, m: int, device: torch.device | str | None = None) -> torch.Tensor:
    """m distinct indices of range(n) at the centres of m equal slices (requires 1 <= m <= n)."""
    i = torch.arange(m, dtype=torch.long, device=device)
    return ((2 * i + 1) * n) // (2 * m)


def lattice_shape(h: int, w: int, n: int) -> tuple[int, int]:
    """(rows, cols) of a lattice with rows*cols <= n points whose aspect ratio matches h x w.

    Matching the aspect ratio makes lattice cells as square as the grid allows, so
    spatial coverage is the same along both axes.
    """
    rows = min(h, n, max(1, round((n * h / w) ** 0.5)))
    cols = min(w, max(1, n // rows))
    return rows, cols


def lattice_indices(
    h: int, w: int, rows: int, cols: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """Raster indices (ascending) of the centres of a rows x cols partition of the grid."""
    r = evenly_spaced(h, rows, device)
    c = evenly_spaced(w, cols, device)
    return (r[:, None] * w + c[None, :]).reshape(-1)


def cell_ids(h: int, w: int, rows: int, cols: int, device: torch.device | str | None = None) -> torch.Tensor:
    """[h*w] id of the cell of a rows x cols partition (near-equal bands) each token falls in."""
    r = torch.arange(h, device=device) * rows // h
    c = torch.arange(w, device=device) * cols // w
    return (r[:, None] * cols + c[None, :]).reshape(-1)


def neighbour_table(h: int, w: int, device: torch.device | str | None = None) -> torch.Tensor:
    """[h*w, 8] raster index of each token's neighbour at OFFSETS[d], or h*w (a sentinel) off-grid."""
    n = h * w
    padded = torch.nn.functional.pad(torch.arange(n, device=device).view(1, h, w), (1, 1, 1, 1), value=n)[0]
    cols = [padded[1 + dr : 1 + dr + h, 1 + dc : 1 + dc + w].reshape(-1) for dr, dc in OFFSETS]
    return torch.stack(cols, dim=1)


def retention_map(indices: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
    """[h, w] bool mask of kept tokens, for visualising a selection."""
    h, w = grid_hw
    mask = torch.zeros(h * w, dtype=torch.bool, device=indices.device)
    mask[indices.long()] = True
    return mask.view(h, w)
