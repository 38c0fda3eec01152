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
    from prometheus_client import Counter, Gauge, Histogram

    return (
        Counter("civic:visual_tokens_total", "Merged visual tokens before retention (N), per image."),
        Counter("civic:visual_tokens_retained_total", "Visual tokens reaching the LLM after retention (K)."),
        Counter("civic:images_total", "Images processed by the CIVIC processor."),
        Histogram("civic:retention_ratio", "Applied K/N per image.", buckets=RATIO_BUCKETS),
        Counter("civic:vision_patches_total", "Vision patches the encoder runs on (after the per-image cap)."),
        Counter("civic:images_capped_total", "Images downscaled by the per-image encoder cap."),
        Gauge("civic:image_patch_cap", "Per-image encoder cap in vision patches.", multiprocess_mode="max"),
        Counter("civic:video_tokens_total", "Merged video tokens before retention (N), all frame groups."),
        Counter("civic:video_tokens_retained_total", "Video tokens reaching the LLM after retention (K)."),
        Counter("civic:videos_total", "Videos processed by the CIVIC processor."),
    )


def record_cap(max_patches: int) -> None:
    _metrics()[6].set(max_patches)


def record_images(num_tokens: Sequence[int], num_kept: Sequence[int], *, patches_per_token: int,
                  num_capped: int = 0) -> None:
    seen, retained, images, ratio, patches, capped, *_ = _metrics()
    for total, kept in zip(num_tokens, num_kept):
        seen.inc(total)
        retained.inc(kept)
        images.inc()
        ratio.observe(kept / total)
        patches.inc(total * patches_per_token)
    capped.inc(num_capped)


def record_videos(num_tokens: Sequence[int], num_kept: Sequence[int]) -> None:
    seen, retained, videos = _metrics()[7:]
    for total, kept in zip(num_tokens, num_kept):
        seen.inc(total)
        retained.inc(kept)
        videos.inc()
