"""CIVIC's Prometheus metrics, exported on vLLM's own ``/metrics``.

They are recorded where requests are processed (the API-server process, which is
also the process that serves ``/metrics``), so no cross-process plumbing is
needed. Metric objects are created lazily so that vLLM has already chosen
between single-process and multiprocess (PROMETHEUS_MULTIPROC_DIR) collection.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache

RATIO_BUCKETS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 1 / 3, 0.4, 0.5, 0.6, 0.75, 0.9, 1.0)


@cache
def _metrics():
    from prometheus_client import Counter, Histogram

    return (
        Counter("civic:visual_tokens_total", "Merged visual tokens before retention (N), per image."),
        Counter("civic:visual_tokens_retained_total", "Visual tokens reaching the LLM after retention (K)."),
        Counter("civic:images_total", "Images processed by the CIVIC processor."),
        Histogram("civic:retention_ratio", "Applied K/N per image.", buckets=RATIO_BUCKETS),
    )


def record_images(num_tokens: Sequence[int], num_kept: Sequence[int]) -> None:
    seen, retained, images, ratio = _metrics()
    for total, kept in zip(num_tokens, num_kept):
        seen.inc(total)
        retained.inc(kept)
        images.inc()
        ratio.observe(kept / total)
