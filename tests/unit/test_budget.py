"""Budget maths: N from the patch grid, K from N and the ratio."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from civic_vllm.budget import merged_grid, num_merged_tokens, num_retained, validate_ratio


@pytest.mark.parametrize(
    ("grid_thw", "merge", "expected"),
    [
        ((1, 28, 42), 2, 294),
        ((1, 84, 84), 2, 1764),
        ((1, 256, 256), 2, 16384),
        ((2, 4, 6), 2, 12),  # video: t frames of the merged grid
        ((1, 6, 9), 3, 6),
        ((1, 5, 7), 1, 35),
        ([1, 28, 42], 2, 294),
        (torch.tensor([1, 28, 42]), 2, 294),
        (np.array([1, 28, 42]), 2, 294),
    ],
)
def test_num_merged_tokens(grid_thw, merge, expected) -> None:
    assert num_merged_tokens(grid_thw, merge) == expected


@pytest.mark.parametrize(
    ("grid_thw", "merge"),
    [
        ((1, 27, 42), 2),
        ((1, 28, 43), 2),
        ((0, 28, 42), 2),
        ((1, 0, 4), 2),
        ((1, 4, 4), 0),
        ((1, 4), 2),
        ((1, 4.0, 4), 2),
    ],
)
def test_num_merged_tokens_rejects_bad_grids(grid_thw, merge) -> None:
    with pytest.raises(ValueError):
        num_merged_tokens(grid_thw, merge)


def test_merged_grid() -> None:
    assert merged_grid((1, 28, 42), 2) == (14, 21)
    assert merged_grid(torch.tensor([1, 2, 14]), 2) == (1, 7)
    h, w = merged_grid((1, 84, 84), 2)
    assert h * w == num_merged_tokens((1, 84, 84), 2)
    with pytest.raises(ValueError, match="t == 1"):
        merged_grid((2, 28, 42), 2)


@pytest.mark.parametrize(
    ("n", "ratio", "expected"),
    [
        (1764, 1 / 3, 588),
        (16384, 1 / 3, 5462),
        (100, 0.25, 25),  # r*n integral: no spurious +1
        (30, 0.1, 3),  # 0.1 * 30 == 3.0000000000000004 in floats
        (10, 0.7, 7),  # 0.7 * 10 == 7.000000000000001
        (10, 0.25, 3),  # 2.5 rounds up
        (10, 0.21, 3),
        (7, 1.0, 7),
        (1, 0.5, 1),
        (1000, 1e-6, 1),  # tiny ratio still keeps one token
        (1000, 5e-324, 1),
        (1, 1.0, 1),
    ],
)
def test_num_retained_exact(n: int, ratio: float, expected: int) -> None:
    assert num_retained(n, ratio) == expected


@pytest.mark.parametrize(
    ("ratio", "exact"),
    [
        (0.1, Fraction("0.1")),
        (0.25, Fraction(1, 4)),
        (0.3, Fraction("0.3")),
        (1 / 3, Fraction(1, 3)),
        (0.5, Fraction(1, 2)),
        (2 / 3, Fraction(2, 3)),
        (0.7, Fraction("0.7")),
        (0.9, Fraction("0.9")),
    ],
)
def test_num_retained_matches_exact_ceiling(ratio: float, exact: Fraction) -> None:
    for n in range(1, 500):
        assert num_retained(n, ratio) == max(1, math.ceil(exact * n)), n


def test_num_retained_min_tokens() -> None:
    assert num_retained(100, 0.01, min_tokens=5) == 5
    assert num_retained(100, 0.5, min_tokens=5) == 50
    assert num_retained(3, 0.1, min_tokens=64) == 3  # never more than the image has
    assert num_retained(100, 1.0, min_tokens=500) == 100


def test_num_retained_accepts_numpy_scalars() -> None:
    assert num_retained(np.int64(10), np.float64(0.3)) == 3
    assert num_retained(10, np.float32(0.5)) == 5


@pytest.mark.parametrize(
    "ratio",
    [0, 0.0, -0.1, 1.01, 1.0000001, math.nan, math.inf, -math.inf, "0.5", "1", None, True, [0.5], b"0.5"],
)
def test_invalid_ratio(ratio) -> None:
    with pytest.raises(ValueError, match=r"retention ratio must be a number in \(0, 1\]"):
        num_retained(100, ratio)
    with pytest.raises(ValueError):
        validate_ratio(ratio)


@pytest.mark.parametrize(("n", "min_tokens"), [(0, 1), (-5, 1), (10, 0), (10, -1), (2.0, 1), (10, 1.5)])
def test_invalid_counts(n, min_tokens) -> None:
    with pytest.raises(ValueError):
        num_retained(n, 0.5, min_tokens)
