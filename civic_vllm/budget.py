"""Token budget: how many merged visual tokens an image has (N) and how many CIVIC keeps (K).

K must be known before the vision encoder runs: vLLM sizes the placeholder span of
the prompt (and so the KV-cache allocation) from it at preprocessing time. So the
budget depends only on the image grid and the ratio, never on pixel content; the
retention policy only decides *which* K tokens survive. Pure Python on purpose: the
processor calls it per request, with no tensors around.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from typing import Any

_RATIO_SLACK = 1e-9  # absorbs float noise so an integral r*N (0.1 * 30 = 3.0000000000000004) stays exact


def _as_int(name: str, value: Any) -> int:
    """Exact integer conversion: accepts int, numpy ints and integer tensors, refuses 2.5."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


def _min_tokens(value: Any) -> int:
    floor = _as_int("min_tokens", value)
    if floor < 1:
        raise ValueError(f"min_tokens must be >= 1, got {floor}")
    return floor


def _grid(grid_thw: Sequence[Any], merge_size: int) -> tuple[int, int, int, int]:
    """Validated (t, h, w, merge_size) of a patch grid; h and w must be multiples of merge_size."""
    try:
        t, h, w = grid_thw
    except (TypeError, ValueError):
        raise ValueError(f"grid_thw must be (t, h, w), got {grid_thw!r}") from None
    t, h, w = _as_int("grid t", t), _as_int("grid h", h), _as_int("grid w", w)
    merge_size = _as_int("merge_size", merge_size)
    if merge_size < 1:
        raise ValueError(f"merge_size must be >= 1, got {merge_size}")
    if min(t, h, w) < 1:
        raise ValueError(f"grid_thw entries must be >= 1, got {(t, h, w)}")
    if h % merge_size or w % merge_size:
        # The HF processor resizes to multiples of patch*merge; anything else is a caller bug.
        raise ValueError(f"grid h and w must be multiples of merge_size={merge_size}, got {(h, w)}")
    return t, h, w, merge_size


def num_merged_tokens(grid_thw: Sequence[Any], merge_size: int) -> int:
    """Merged visual tokens the LLM sees for one image/video: t*h*w // merge_size**2.

    grid_thw counts vision patches; the merger fuses merge_size x merge_size patches
    into one token, so this is N, the size of the unpruned placeholder span.
    """
    t, h, w, m = _grid(grid_thw, merge_size)
    return t * h * w // (m * m)


def merged_grid(grid_thw: Sequence[Any], merge_size: int) -> tuple[int, int]:
    """(rows, cols) of the merged-token grid of one image, the layout retention works on.

    Images only (t == 1): a video has t frame groups of this grid (see :func:`frame_groups`).
    """
    t, h, w, m = _grid(grid_thw, merge_size)
    if t != 1:
        raise ValueError(f"merged_grid expects an image grid (t == 1), got t={t}; use frame_groups for a video")
    return h // m, w // m


def validate_ratio(ratio: Any, name: str = "retention ratio") -> float:
    """The retention ratio as a float in (0, 1]; anything else is a ValueError.

    Strings and bools are refused even if float() would accept them: a config that
    passes "0.5" or True has a bug worth hearing about. ``name`` starts the message
    ("" when the caller names the setting itself).
    """
    message = f"{name} must be a number in (0, 1], got {ratio!r}".lstrip()
    if isinstance(ratio, (str, bytes, bool)):
        raise ValueError(message)
    try:
        value = float(ratio)
    except (TypeError, ValueError):
        raise ValueError(message) from None
    if not math.isfinite(value) or not 0.0 < value <= 1.0:
        raise ValueError(message)
    return value


def num_retained(num_tokens: int, ratio: float, min_tokens: int = 1) -> int:
    """K = clamp(ceil(ratio * N), min(min_tokens, N), N).

    Rounds up so any ratio > 0 keeps at least one token and K/N never falls below
    the ratio asked for; min_tokens lets tiny images keep something useful at small
    ratios, but never more than they have.
    """
    n = _as_int("num_tokens", num_tokens)
    if n < 1:
        raise ValueError(f"num_tokens must be >= 1, got {n}")
    floor = _min_tokens(min_tokens)
    r = validate_ratio(ratio)
    k = math.ceil(r * n - _RATIO_SLACK)
    return max(min(floor, n), min(k, n))


def frame_groups(grid_thw: Sequence[Any], merge_size: int) -> tuple[int, int, int]:
    """(t, rows, cols) of a video: t frame groups, each a rows x cols merged-token grid.

    Qwen3-VL encodes a video in groups of ``temporal_patch_size`` frames (grid t counts the
    groups); every group has its own timestamp and ``<|vision_start|>...<|vision_end|>`` run
    in the prompt and its own M-RoPE grid, so retention budgets each group on its own.
    """
    t, h, w, m = _grid(grid_thw, merge_size)
    return t, h // m, w // m


def video_span_text_tokens(timestamps: Sequence[Any], count_tokens: Callable[[str], int]) -> int:
    """T: the text tokens inside a video's placeholder span, which retention never drops.

    Qwen3-VL writes each frame group as ``<{seconds:.1f} seconds>`` (tokenized on its own),
    ``<|vision_start|>``, the group's video tokens, ``<|vision_end|>``; ``count_tokens``
    gives the token count of one timestamp string.
    """
    return sum(count_tokens(f"<{float(seconds):.1f} seconds>") + 2 for seconds in timestamps)


def num_retained_per_group(grid_thw: Sequence[Any], merge_size: int, ratio: float, min_tokens: int = 1,
                           text_tokens: int = 0) -> int:
    """K_t of every frame group of a video, so that its whole placeholder span keeps ``ratio``.

    The span is t groups of N_t video tokens plus ``text_tokens`` T (timestamps and markers,
    :func:`video_span_text_tokens`), all kept, so K_t = ceil((r (t N_t + T) - T) / t): the
    span, and the KV blocks it takes, fall to r of vanilla's, not to r + (1 - r) T / span as
    they would if r counted the video tokens alone. Clamped to [min(min_tokens, N_t), N_t]:
    at small frames the floor can hold the span above r. All groups share one K_t; it is
    fixed before the encoder runs (placeholders are sized from it), and the policy decides
    which tokens.
    """
    groups, rows, cols = frame_groups(grid_thw, merge_size)
    per_group = rows * cols
    overhead = _as_int("text_tokens", text_tokens)
    if overhead < 0:
        raise ValueError(f"text_tokens must be >= 0, got {overhead}")
    floor = _min_tokens(min_tokens)
    r = validate_ratio(ratio)
    k = math.ceil((r * (groups * per_group + overhead) - overhead) / groups - _RATIO_SLACK)
    return max(min(floor, per_group), min(k, per_group))
