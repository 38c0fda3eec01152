"""Per-question scores and paired bootstrap intervals, shared by the accuracy benchmarks.

A model's answers on one split become a :class:`Scored` (correct per question, plus which questions
each metric counts); figures and paired differences / shares resample the same questions for every
model (``bootstrap_indices``), so their intervals are paired.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

BOOTSTRAP = 2000  # resamples


@dataclass
class Scored:
    """Per-question correctness of one model on one split, with what each metric counts."""

    correct: np.ndarray  # [n] bool
    masks: dict[str, np.ndarray] = field(default_factory=dict)  # metric -> [n] bool (which questions count)

    @classmethod
    def from_predictions(cls, samples, predictions) -> Scored:
        correct = np.array([p["correct"] for p in predictions], dtype=bool)
        masks = {"overall": np.ones(len(samples), dtype=bool),
                 "small": np.array([s.size_split == "small" for s in samples]),
                 "ground": np.array([s.record["task"] == "ground" for s in samples])}
        return cls(correct, masks)

    def value(self, metric: str) -> float:
        return float(self.correct[self.masks[metric]].mean())


def bootstrap_indices(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(BOOTSTRAP, n))


def _resampled(scored: Scored, metric: str, idx: np.ndarray) -> np.ndarray:
    mask = scored.masks[metric][idx]
    return (scored.correct[idx] & mask).sum(1) / np.maximum(mask.sum(1), 1)


def interval(values: np.ndarray) -> list[float]:
    return [round(float(v), 4) for v in np.percentile(values, [2.5, 97.5])]


def figure(scored: Scored, metric: str, idx: np.ndarray) -> dict[str, Any]:
    return {"value": round(scored.value(metric), 4), "ci95": interval(_resampled(scored, metric, idx)),
            "n": int(scored.masks[metric].sum())}


def paired(a: Scored, b: Scored, metric: str, idx: np.ndarray) -> dict[str, Any]:
    """a / b and a - b with paired 95% intervals (the same resampled questions for both)."""
    ra, rb = _resampled(a, metric, idx), _resampled(b, metric, idx)
    va, vb = a.value(metric), b.value(metric)
    return {"share": round(va / vb, 4) if vb else None, "share_ci95": interval(ra / np.maximum(rb, 1e-9)),
            "difference": round(va - vb, 4), "difference_ci95": interval(ra - rb)}
