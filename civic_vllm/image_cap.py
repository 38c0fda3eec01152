"""The per-image encoder cap: the most vision patches one image may cost the tower.

Why: CIVIC sizes an image's prompt span by K = ceil(r·N), but the vision tower still runs on all of
its patches (before retention). At a tiny ratio a 10000×10000 image (Qwen3-VL's processor resizes
it to 16.7 M pixels, 65,536 patches) looks like a small prompt while one step of the engine spends
most of its time in the tower. Vanilla vLLM bounds this indirectly: an image's N placeholders must
fit in ``--max-model-len``. CIVIC keeps that bound explicitly.

The cap, in vision patches per image (``pixels = patches · patch_size²``), is
``civic_max_image_patches`` from ``--mm-processor-kwargs``, or by default
``max_model_len · merge_size²``: N ≤ max_model_len, so no image costs the tower more than the
largest image a vanilla server with the same ``--max-model-len`` accepts, whatever the ratio.
The processor lowers its pixel limit to the cap before it resizes, so a larger image is
downscaled (like a smaller ``max_pixels``), never refused; the scheduler's encoder budget then
counts the capped grid. A request that raises ``max_pixels`` / ``min_pixels`` / ``size`` past the
cap is refused with a 400 naming the cap, unless the operator sets
``civic_allow_request_pixels: true``.

Pure module: no vLLM import (the adapter in civic_vllm/vllm_adapter/processor.py applies it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from civic_vllm.settings import KEY_PREFIX, ServerSettings

EDGES = (("shortest_edge", "min_pixels"), ("longest_edge", "max_pixels"))
MAX_PATCHES_KEY = KEY_PREFIX + "max_image_patches"
ALLOW_KEY = KEY_PREFIX + "allow_request_pixels"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def requested_image_size(mm_kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    """The image pixel limits a kwargs mapping names, as size edges.

    Flat ``size`` / ``min_pixels`` / ``max_pixels``, then the same keys under ``images_kwargs``
    (the scoped value wins, as in vLLM); ``max_pixels`` beats ``size.longest_edge`` within a scope.
    Values are returned as given (the HF processor refuses the ones that are not numbers).
    """
    edges: dict[str, Any] = {}
    scopes = (mm_kwargs or {}, (mm_kwargs or {}).get("images_kwargs"))
    for scope in scopes:
        if not isinstance(scope, Mapping):
            continue
        size = scope.get("size")
        if isinstance(size, Mapping):
            edges.update({edge: size[edge] for edge, _ in EDGES if size.get(edge) is not None})
        edges.update({edge: scope[key] for edge, key in EDGES if scope.get(key) is not None})
    return edges


@dataclass(frozen=True)
class ImageCap:
    max_patches: int
    patch_size: int
    merge_size: int
    source: str  # where the number comes from, for messages
    allow_request_pixels: bool = False

    @classmethod
    def for_model(cls, server_mm_kwargs: Mapping[str, Any] | None, *, max_model_len: int,
                  vision_config: Any) -> ImageCap:
        """The cap of a server: its ``--mm-processor-kwargs``, ``--max-model-len`` and the checkpoint's
        vision config (patch_size, spatial_merge_size)."""
        return cls.for_server(ServerSettings.from_mm_kwargs(server_mm_kwargs), max_model_len=max_model_len,
                              patch_size=vision_config.patch_size, merge_size=vision_config.spatial_merge_size)

    @classmethod
    def for_server(cls, server: ServerSettings, *, max_model_len: int, patch_size: int, merge_size: int) -> ImageCap:
        """The operator's cap, or the default N ≤ max_model_len; at least one merged token."""
        minimum = merge_size * merge_size
        if server.max_image_patches is None:
            patches = max_model_len * minimum
            source = f"default: max_model_len {max_model_len} x merge_size {merge_size}^2; set {MAX_PATCHES_KEY}"
        else:
            patches = server.max_image_patches
            source = MAX_PATCHES_KEY
            if patches < minimum:
                raise ValueError(f"Invalid CIVIC server setting: {MAX_PATCHES_KEY} must be >= {minimum} "
                                 f"(one merged token of {merge_size}x{merge_size} patches), got {patches}")
        return cls(patches, patch_size, merge_size, source, server.allow_request_pixels)

    @property
    def max_pixels(self) -> int:
        return self.max_patches * self.patch_size**2

    @property
    def max_tokens(self) -> int:
        """Merged tokens (N) of the largest image the cap lets through."""
        return self.max_patches // self.merge_size**2

    def describe(self) -> str:
        return (f"{self.max_patches} vision patches per image ({self.max_pixels} pixels, "
                f"{self.max_tokens} merged tokens; {self.source})")

    def check_request(self, mm_kwargs: Mapping[str, Any] | None) -> None:
        """ValueError (HTTP 400) naming the cap when a request raises a pixel limit past it."""
        if self.allow_request_pixels:
            return
        requested = requested_image_size(mm_kwargs)
        for edge, key in EDGES:
            value = requested.get(edge)
            if _is_number(value) and value > self.max_pixels:
                raise ValueError(
                    f"Request refused: {key} (size.{edge})={value} is above this server's per-image encoder cap of "
                    f"{self.describe()}. Send {key} <= {self.max_pixels}; the operator may raise "
                    f"{MAX_PATCHES_KEY} or set {ALLOW_KEY}."
                )

    def image_size(self, server_size: Mapping[str, Any], mm_kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
        """Size edges for one request: the server's own limits lowered to the cap, under the
        request's limits (which :meth:`check_request` has bounded unless the operator allows more)."""
        size = dict(server_size)
        for edge, _ in EDGES:
            if _is_number(size.get(edge)) and size[edge] > self.max_pixels:
                size[edge] = self.max_pixels
        return {**size, **requested_image_size(mm_kwargs)}

    def patch_limit(self, mm_kwargs: Mapping[str, Any] | None) -> int | None:
        """Most patches an image of this request may have; None when the operator lets the request
        set its own limits and it did."""
        if self.allow_request_pixels and requested_image_size(mm_kwargs):
            return None
        return self.max_patches

    def check_grids(self, grids_thw: Sequence[Sequence[int]], mm_kwargs: Mapping[str, Any] | None) -> None:
        """The guarantee, after resizing and before the encoder: no image above the limit."""
        limit = self.patch_limit(mm_kwargs)
        for index, (t, h, w) in enumerate(grids_thw):
            if limit is not None and t * h * w > limit:
                raise ValueError(f"Request refused: image {index} has {t * h * w} vision patches after "
                                 f"resizing, above this server's per-image encoder cap of {self.describe()}")
