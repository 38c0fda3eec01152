"""Gather the kept rows of several tensors in one kernel launch.

CIVIC keeps K of N merged visual tokens and must slice every per-token tensor
(patch rows, positions, deepstack features, ...) the same way. One
``index_select`` per tensor costs one launch each; the Triton kernel reads a
table of source/destination pointers and copies all of them in one launch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._dispatch import HAS_TRITON, check_index, resolve_backend, tl, triton

__all__ = ["gather_rows", "gather_rows_reference"]

_OP = "gather_rows"

if HAS_TRITON:

    @triton.jit
    def _gather_rows_kernel(
        src_table,  # int64 [S]: data_ptr of each source
        dst_table,  # int64 [S]: data_ptr of each (contiguous) output
        meta,  # int64 [S, 3]: width, row stride, column stride of each source
        index_ptr,  # int32/int64 [K]
        dst0,  # first output; only its pointer type (element dtype) is used
        n_out_rows,  # K * ROWS_PER_INDEX
        ROWS_PER_INDEX: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_s = tl.program_id(2)

        width = tl.load(meta + pid_s * 3)
        stride_r = tl.load(meta + pid_s * 3 + 1)
        stride_c = tl.load(meta + pid_s * 3 + 2)
        # The tables hold raw addresses; reinterpret them with the outputs' type.
        src = tl.load(src_table + pid_s).to(dst0.dtype, bitcast=True)
        dst = tl.load(dst_table + pid_s).to(dst0.dtype, bitcast=True)

        offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = offs_m < n_out_rows
        col_mask = offs_n < width

        idx = tl.load(index_ptr + offs_m // ROWS_PER_INDEX, mask=row_mask, other=0)
        src_rows = idx.to(tl.int64) * ROWS_PER_INDEX + offs_m % ROWS_PER_INDEX

        mask = row_mask[:, None] & col_mask[None, :]
        vals = tl.load(
            src + src_rows[:, None] * stride_r + offs_n[None, :] * stride_c, mask=mask
        )
        tl.store(dst + offs_m[:, None] * width + offs_n[None, :], vals, mask=mask)

else:  # pragma: no cover
    _gather_rows_kernel = None


def _check_inputs(sources: Sequence[torch.Tensor], index: torch.Tensor, rows_per_index: int) -> None:
    if not isinstance(rows_per_index, int) or rows_per_index < 1:
        raise ValueError(f"{_OP}: rows_per_index must be a positive int, got {rows_per_index!r}")
    first = sources[0] if sources else None
    for i, src in enumerate(sources):
        if not isinstance(src, torch.Tensor):
            raise ValueError(f"{_OP}: sources[{i}] is a {type(src).__name__}, not a tensor")
        if src.dim() != 2:
            raise ValueError(f"{_OP}: sources[{i}] must be 2-D, got shape {tuple(src.shape)}")
        if src.dtype != first.dtype:
            raise ValueError(f"{_OP}: sources[{i}] dtype {src.dtype} != sources[0] dtype {first.dtype}")
        if src.device != first.device:
            raise ValueError(f"{_OP}: sources[{i}] is on {src.device}, sources[0] on {first.device}")
        if src.shape[0] % rows_per_index:
            raise ValueError(
                f"{_OP}: sources[{i}] has {src.shape[0]} rows, not divisible by "
                f"rows_per_index={rows_per_index}"
            )
    if first is not None and isinstance(index, torch.Tensor) and index.device != first.device:
        raise ValueError(f"{_OP}: index is on {index.device}, sources on {first.device}")
    # Sources may differ in row count; the index must fit the shortest.
    n_rows = min((s.shape[0] for s in sources), default=None)
    check_index(index, None if n_rows is None else n_rows // rows_per_index, _OP)


def gather_rows_reference(
    sources: Sequence[torch.Tensor], index: torch.Tensor, *, rows_per_index: int = 1
) -> list[torch.Tensor]:
    """Torch reference: expand the index to row numbers, then ``index_select``."""
    index = index.to(torch.long)
    if rows_per_index != 1:
        offsets = torch.arange(rows_per_index, device=index.device)
        index = (index[:, None] * rows_per_index + offsets).reshape(-1)
    return [src.index_select(0, index) for src in sources]


def _gather_rows_triton(
    sources: Sequence[torch.Tensor], index: torch.Tensor, rows_per_index: int
) -> list[torch.Tensor]:
    n_out = index.numel() * rows_per_index
    outs = [torch.empty((n_out, s.shape[1]), dtype=s.dtype, device=s.device) for s in sources]
    max_width = max(s.shape[1] for s in sources)
    if n_out == 0 or max_width == 0:
        return outs
    if index.dtype not in (torch.int32, torch.int64):
        index = index.to(torch.int64)
    index = index.contiguous()
    device = sources[0].device
    # One small host->device copy carries every pointer, width and stride.
    src_table = torch.tensor([s.data_ptr() for s in sources], dtype=torch.int64, device=device)
    dst_table = torch.tensor([o.data_ptr() for o in outs], dtype=torch.int64, device=device)
    meta = torch.tensor(
        [[s.shape[1], s.stride(0), s.stride(1)] for s in sources], dtype=torch.int64, device=device
    )
    block_n = min(256, max(16, triton.next_power_of_2(max_width)))
    block_m = 32
    grid = (triton.cdiv(n_out, block_m), triton.cdiv(max_width, block_n), len(sources))
    _gather_rows_kernel[grid](
        src_table,
        dst_table,
        meta,
        index,
        outs[0],
        n_out,
        ROWS_PER_INDEX=rows_per_index,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
    )
    return outs


def gather_rows(
    sources: Sequence[torch.Tensor],
    index: torch.Tensor,
    *,
    rows_per_index: int = 1,
    backend: str = "auto",
) -> list[torch.Tensor]:
    """Return, for each 2-D source, a new contiguous tensor of the indexed row blocks.

    Block ``i`` of each output is rows ``index[i]*rows_per_index`` to
    ``index[i]*rows_per_index + rows_per_index - 1`` of that source (e.g.
    ``rows_per_index=4`` keeps whole 2x2 patch groups). Sources may differ in
    width but share dtype and device. backend: "auto" (Triton on CUDA when
    available, else torch), "triton" or "torch".
    """
    sources = list(sources)
    _check_inputs(sources, index, rows_per_index)
    chosen = resolve_backend(backend, [*sources, index], _gather_rows_kernel, _OP)
    if not sources:
        return []
    if chosen == "torch":
        return gather_rows_reference(sources, index, rows_per_index=rows_per_index)
    return _gather_rows_triton(sources, index, rows_per_index)
