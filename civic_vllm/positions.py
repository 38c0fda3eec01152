"""M-RoPE positions for a compacted visual sequence (pure: numpy and torch only).

Qwen3-VL gives an image token at merged-grid cell (h, w) the 3-D position
(base, base + h, base + w), and the text after the image continues at
base + max(H, W). CIVIC keeps K of the N = H*W tokens and must give each kept
token its *original* position, and the following text its *unpruned* position,
so the LLM sees the same geometry as without pruning.

vLLM computes positions per request before the encoder runs, i.e. before the
kept cells are known. So positions are built in two steps:

1. :func:`expand_image_spans` / :func:`contract_positions`: every image's K
   placeholders are expanded to N, the stock routine computes positions for the
   unpruned sequence, and the result is contracted back: each kept token
   provisionally gets the image's base position (t, h, w offsets zero) and text
   keeps its unpruned position.
2. The encoder appends the kept (h, w) to each output row as
   :data:`NUM_POSITION_CHANNELS` extra channels (:func:`encode_position_channels`);
   the model strips them (:func:`decode_position_channels`) and adds (0, h, w) to
   the provisional positions of exactly those tokens.

Channels are base-128 digits so they survive bf16 (integers up to 256 are exact).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

NUM_POSITION_CHANNELS = 4  # (h // 128, h % 128, w // 128, w % 128)
_DIGIT = 128
MAX_GRID_SIDE = _DIGIT * _DIGIT  # 16384 merged tokens per side, far beyond any real image


def encode_position_channels(rows: torch.Tensor, cols: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[K] row and column indices -> [K, 4] channels in ``dtype``."""
    if rows.numel() and int(max(rows.max(), cols.max())) >= MAX_GRID_SIDE:
        raise ValueError(f"grid side exceeds {MAX_GRID_SIDE} merged tokens")
    digits = torch.stack(
        [rows // _DIGIT, rows % _DIGIT, cols // _DIGIT, cols % _DIGIT], dim=1
    )
    return digits.to(dtype)


def decode_position_channels(channels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[K, 4] channels -> (rows, cols) as int64."""
    digits = channels.round().long()
    return digits[:, 0] * _DIGIT + digits[:, 1], digits[:, 2] * _DIGIT + digits[:, 3]


@dataclass(frozen=True)
class ImageSpan:
    """One image's (or one video frame group's) placeholder run in the compact prompt."""

    offset: int  # first placeholder index in the compact prompt
    num_kept: int  # K placeholders in the compact prompt
    num_full: int  # N tokens the unpruned prompt would hold


def expand_image_spans(
    tokens: Sequence[int], spans: Sequence[ImageSpan]
) -> tuple[list[int], list[int]]:
    """Expand every span's K placeholders to N.

    Returns the unpruned token list and, per span, its offset in that list.
    Spans must be sorted by offset and must not overlap.
    """
    expanded: list[int] = []
    full_offsets: list[int] = []
    src = 0
    for span in spans:
        if span.offset < src or span.offset + span.num_kept > len(tokens):
            raise ValueError(f"image spans overlap or run past the prompt: {span}")
        if not 1 <= span.num_kept <= span.num_full:
            raise ValueError(f"need 1 <= kept <= full tokens, got {span}")
        expanded.extend(tokens[src : span.offset])
        full_offsets.append(len(expanded))
        expanded.extend([tokens[span.offset]] * span.num_full)
        src = span.offset + span.num_kept
    expanded.extend(tokens[src:])
    return expanded, full_offsets


def frame_group_spans(
    tokens: Sequence[int], offset: int, length: int, video_token_id: int, num_full: int
) -> list[ImageSpan]:
    """One span per frame group of a video whose prompt range is ``tokens[offset:offset + length]``.

    Qwen3-VL writes a video as ``<timestamp> <|vision_start|> video tokens <|vision_end|>`` per
    frame group, so each maximal run of ``video_token_id`` in the range is one group; its
    unpruned length is ``num_full`` (the group's merged grid).
    """
    spans = []
    index, end = offset, offset + length
    while index < end:
        if tokens[index] != video_token_id:
            index += 1
            continue
        start = index
        while index < end and tokens[index] == video_token_id:
            index += 1
        spans.append(ImageSpan(offset=start, num_kept=index - start, num_full=num_full))
    return spans


def contract_positions(
    full_positions: np.ndarray, spans: Sequence[ImageSpan], full_offsets: Sequence[int]
) -> np.ndarray:
    """Positions [3, L_full] of the unpruned prompt -> [3, L_compact] of the compact one.

    Each image's K tokens get the image's base position (that of cell (0, 0));
    the per-token (h, w) offsets are added later from the position channels.
    """
    pieces = []
    src_full = 0
    for span, full_offset in zip(spans, full_offsets):
        pieces.append(full_positions[:, src_full:full_offset])
        base = full_positions[:, full_offset : full_offset + 1]
        pieces.append(np.repeat(base, span.num_kept, axis=1))
        src_full = full_offset + span.num_full
    pieces.append(full_positions[:, src_full:])
    return np.ascontiguousarray(np.concatenate(pieces, axis=1))


def kept_grid_cells(indices: torch.Tensor, grid_width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Raster indices of kept merged tokens -> their (row, col) in the merged grid."""
    return indices // grid_width, indices % grid_width
