"""Dropped groups as context: the vision blocks after an exit layer let the kept rows attend to
the groups retention dropped, frozen at the exit layer.

Why: with plain early exit the blocks after layer L see only the kept groups, so a kept token
loses the context its neighbours gave it (object extent, edges): the known cause of early
selection's grounding loss (IPCV, Perkzi/IPCV: dropped tokens come back as keys/values for the
next blocks). Here the dropped groups' rows are frozen at layer L and feed every later block's
keys and values; queries, the output projection and the MLP run on the kept rows only, so the
compact sequence stays compact and the cost of a later block grows only by the dropped rows'
QKV projection (their queries are computed in the same GEMM and unused) and the wider attention
(``civic_vllm.cost``).

Framework-free: the HF path (``hf_compact``) and the vLLM adapter (``vllm_adapter.vision``)
each map their block's modules onto :func:`block_with_context`. No vLLM import.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


def dropped_groups(kept: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Ascending indices of the groups of an image that ``kept`` (ascending) leaves out."""
    mask = torch.ones(num_groups, dtype=torch.bool, device=kept.device)
    mask[kept] = False
    return mask.nonzero().flatten()


@dataclass
class DroppedContext:
    """Per image, the dropped rows frozen at its exit layer and their rotary embeddings."""

    rows: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def add(self, image: int, rows: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
        self.rows[image] = (rows, cos, sin)

    def __bool__(self) -> bool:
        return bool(self.rows)

    def lengths(self, num_images: int) -> list[int]:
        return [len(self.rows[i][0]) if i in self.rows else 0 for i in range(num_images)]

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rows, cos, sin) of all images' dropped rows, in image order."""
        parts = [self.rows[i] for i in sorted(self.rows)]
        return tuple(torch.cat(column) for column in zip(*parts))  # type: ignore[return-value]


def attend_with_context(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    context_k: torch.Tensor,
    context_v: torch.Tensor,
    query_lens: Sequence[int],
    context_lens: Sequence[int],
    scale: float,
) -> torch.Tensor:
    """Bidirectional attention per image: image i's queries over its own rows plus its context rows.

    q, k, v: [sum query_lens, H, D]; context_k/v: [sum context_lens, H, D]. Returns [sum query_lens, H, D].
    Key order does not matter (no mask, positions are already in the rotated q and k).
    """
    outputs = []
    pieces = zip(q.split(list(query_lens)), k.split(list(query_lens)), v.split(list(query_lens)),
                 context_k.split(list(context_lens)), context_v.split(list(context_lens)))
    for qi, ki, vi, cki, cvi in pieces:
        keys, values = torch.cat([ki, cki]), torch.cat([vi, cvi])
        # [1, H, S, D]: CPU SDPA takes its flash kernel only for 4-D inputs (3-D falls back to the
        # unfused math path, ~3x slower here: softmax over a materialised score matrix).
        out = F.scaled_dot_product_attention(*(t.transpose(0, 1).unsqueeze(0) for t in (qi, keys, values)),
                                             scale=scale)
        outputs.append(out.squeeze(0).transpose(0, 1))
    return torch.cat(outputs)


@dataclass(frozen=True)
class BlockParts:
    """A pre-norm vision block as functions, whatever framework holds its weights.

    ``qkv(x)`` -> [S, 3, H, D] (H: this rank's heads); ``rotate(t, cos, sin)`` rotates [S, H, D];
    ``project(x)`` maps [S, H * D] back to the hidden size (all-reduced under tensor parallelism).
    """

    norm1: Callable[[torch.Tensor], torch.Tensor]
    qkv: Callable[[torch.Tensor], torch.Tensor]
    rotate: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    project: Callable[[torch.Tensor], torch.Tensor]
    norm2: Callable[[torch.Tensor], torch.Tensor]
    mlp: Callable[[torch.Tensor], torch.Tensor]
    scale: float


def block_with_context(
    parts: BlockParts,
    hidden: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    query_lens: Sequence[int],
    context: DroppedContext,
) -> torch.Tensor:
    """One vision block on the kept rows ``hidden`` [S, C] (image i owns query_lens[i] consecutive
    rows), its attention also reading each image's frozen dropped rows. Images without context
    attend to their own rows only: the stock block's maths, not its kernels, so not bit for bit."""
    context_rows, context_cos, context_sin = context.stacked()
    num_rows = len(hidden)
    # One norm + QKV GEMM over kept and dropped rows; the dropped rows' queries go unused.
    qkv = parts.qkv(parts.norm1(torch.cat([hidden, context_rows])))
    q, k, v = qkv.unbind(1)
    q = parts.rotate(q[:num_rows], cos, sin)
    k = parts.rotate(k, torch.cat([cos, context_cos]), torch.cat([sin, context_sin]))
    attended = attend_with_context(q, k[:num_rows], v[:num_rows], k[num_rows:], v[num_rows:],
                                   query_lens, context.lengths(len(query_lens)), parts.scale)
    hidden = hidden + parts.project(attended.flatten(1))
    return hidden + parts.mlp(parts.norm2(hidden))
