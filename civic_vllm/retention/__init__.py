"""Retention policies: which K of an image's N merged visual tokens reach the LLM.

``get_policy(name).select(features, (h, w), k, seed=...)`` returns the kept raster
indices, sorted. K itself comes from civic_vllm.budget; policies only choose.
"""

from __future__ import annotations

from .base import RetentionPolicy, retention_map
from .baselines import FullPolicy, PoolPolicy, RandomPolicy, content_seed
from .civic import CivicPolicy

# Policies are stateless (CivicPolicy is a frozen dataclass), so one shared instance each.
_POLICIES: dict[str, RetentionPolicy] = {
    policy.name: policy for policy in (CivicPolicy(), PoolPolicy(), RandomPolicy(), FullPolicy())
}
POLICY_NAMES: tuple[str, ...] = tuple(_POLICIES)


def get_policy(name: str) -> RetentionPolicy:
    """The registered policy called name; ValueError naming the valid ones otherwise."""
    try:
        return _POLICIES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown retention policy {name!r}; valid: {', '.join(POLICY_NAMES)}") from None


__all__ = [
    "POLICY_NAMES",
    "CivicPolicy",
    "FullPolicy",
    "PoolPolicy",
    "RandomPolicy",
    "RetentionPolicy",
    "content_seed",
    "get_policy",
    "retention_map",
]
