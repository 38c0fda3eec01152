"""Compact-prompt M-RoPE positions against an explicit Qwen3-VL reference."""

import numpy as np
import pytest
import torch

from civic_vllm.positions import (
    ImageSpan,
    contract_positions,
    decode_position_channels,
    encode_position_channels,
    expand_image_spans,
    kept_grid_cells,
)

IMG = -1  # placeholder token id in these tests


def reference_positions(segments):
    """Qwen3-VL rule, written out: text +1 per token; image cell (h, w) -> (s, s+h, s+w); after it s+max(H, W)."""
    columns, next_pos = [], 0
    for kind, value in segments:
        if kind == "text":
            for _ in range(value):
                columns.append((next_pos,) * 3)
                next_pos += 1
        else:
            rows, cols = value
            for h in range(rows):
                for w in range(cols):
                    columns.append((next_pos, next_pos + h, next_pos + w))
            next_pos += max(rows, cols)
    return np.array(columns, dtype=np.int64).T


def stock_like_positions(tokens, spans_full):
    """What the stock routine returns for an unpruned prompt (same rule, from token ids)."""
    segments, src = [], 0
    for offset, (rows, cols) in spans_full:
        segments.append(("text", offset - src))
        segments.append(("image", (rows, cols)))
        src = offset + rows * cols
    segments.append(("text", len(tokens) - src))
    return reference_positions(segments)


@pytest.mark.parametrize("seed", range(6))
def test_contract_plus_patch_equals_reference(seed):
    rng = np.random.default_rng(seed)
    grids = [tuple(int(x) for x in rng.integers(1, 9, size=2)) for _ in range(rng.integers(1, 4))]
    tokens, spans, kept_all, segments = [], [], [], []
    for rows, cols in grids:
        text = int(rng.integers(0, 5))
        tokens += list(range(100, 100 + text))
        segments.append(("text", text))
        n = rows * cols
        k = int(rng.integers(1, n + 1))
        kept = np.sort(rng.choice(n, size=k, replace=False))
        spans.append(ImageSpan(offset=len(tokens), num_kept=k, num_full=n))
        tokens += [IMG] * k
        segments.append(("image", (rows, cols)))
        kept_all.append((kept, cols))
    tail = int(rng.integers(0, 6))
    tokens += list(range(200, 200 + tail))
    segments.append(("text", tail))

    expanded, full_offsets = expand_image_spans(tokens, spans)
    assert len(expanded) == len(tokens) + sum(s.num_full - s.num_kept for s in spans)
    full = stock_like_positions(expanded, [(o, g) for o, g in zip(full_offsets, grids)])
    got = contract_positions(full, spans, full_offsets)
    assert got.shape == (3, len(tokens))

    # Add the per-token (h, w) patch the model applies from the position channels.
    for span, (kept, cols) in zip(spans, kept_all):
        rows_idx, cols_idx = kept_grid_cells(torch.from_numpy(kept), cols)
        got[1, span.offset : span.offset + span.num_kept] += rows_idx.numpy()
        got[2, span.offset : span.offset + span.num_kept] += cols_idx.numpy()

    # Expected: the unpruned reference positions of exactly the kept tokens.
    reference = reference_positions(segments)
    keep_columns, src = [], 0
    for span, full_offset, (kept, _) in zip(spans, full_offsets, kept_all):
        keep_columns += list(range(src, full_offset)) + list(full_offset + kept)
        src = full_offset + span.num_full
    keep_columns += list(range(src, reference.shape[1]))
    np.testing.assert_array_equal(got, reference[:, keep_columns])


def test_text_after_image_starts_where_unpruned_would():
    tokens = [1, 2] + [IMG] * 3 + [3]
    spans = [ImageSpan(offset=2, num_kept=3, num_full=12)]  # a 3x4 grid, 3 kept
    expanded, offsets = expand_image_spans(tokens, spans)
    full = stock_like_positions(expanded, [(offsets[0], (3, 4))])
    got = contract_positions(full, spans, offsets)
    assert got[:, -1].tolist() == [2 + 4] * 3  # base 2 + max(3, 4)
    assert got[:, 2:5].tolist() == [[2, 2, 2]] * 3  # provisional: image base


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_position_channels_exact_in_low_precision(dtype):
    rows = torch.arange(0, 16384, 37)
    cols = torch.flip(rows, [0])
    channels = encode_position_channels(rows, cols, dtype)
    assert channels.dtype == dtype
    got_rows, got_cols = decode_position_channels(channels)
    assert torch.equal(got_rows, rows) and torch.equal(got_cols, cols)


def test_position_channels_reject_huge_grid():
    with pytest.raises(ValueError, match="grid side"):
        encode_position_channels(torch.tensor([16384]), torch.tensor([0]), torch.float32)


def test_bad_spans_rejected():
    with pytest.raises(ValueError):
        expand_image_spans([IMG] * 3, [ImageSpan(offset=0, num_kept=3, num_full=2)])
    with pytest.raises(ValueError):
        overlapping = [ImageSpan(offset=0, num_kept=2, num_full=4), ImageSpan(offset=1, num_kept=1, num_full=4)]
        expand_image_spans([IMG] * 3, overlapping)
