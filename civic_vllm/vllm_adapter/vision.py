"""The compact vision encoder pass: select on the encoder output, then merge only what is kept.

vLLM private API touched here: the submodules of ``Qwen3_VisionTransformer``
(input_norm, patch_embed, prepare_encoder_metadata, blocks, merger,
deepstack_merger_list, deepstack_visual_indexes; vLLM 0.33 qwen3_vl.py:561-905).
Why: the stock forward runs the merger and every DeepStack merger on all N
merged tokens inside the block loop. CIVIC keeps the raw DeepStack taps, picks K
groups once the blocks are done, gathers their 2x2 patch rows contiguously and runs
the mergers on K rows only. How: the block loop below is the stock one, verbatim
in effect; only what happens after it differs. Future: if vLLM grows a hook after
the vision blocks, this becomes a callback.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn

from civic_vllm.kernels import gather_merge_project, gather_rows
from civic_vllm.retention.plan import GROUP_ROWS, ImageRetention, select_kept_tokens


@dataclass
class CompactImageEmbeddings:
    embeddings: list[torch.Tensor]  # per image [K_i, D * (1 + deepstack levels)]
    kept_indices: list[torch.Tensor]  # per image [K_i] raster indices, ascending


def encode_images_compact(
    visual: nn.Module,
    pixel_values: torch.Tensor,
    grid_thw: Sequence[Sequence[int]],
    retention: Sequence[ImageRetention],
) -> CompactImageEmbeddings:
    """Run the whole vision tower, keep ``retention[i].num_kept`` tokens of image i."""
    metadata = visual.prepare_encoder_metadata(list(grid_thw))
    hidden = visual.input_norm(pixel_values.to(device=visual.device, non_blocking=True), visual.dtype)
    hidden = visual.patch_embed(hidden) + metadata["pos_embeds"]
    hidden = hidden.unsqueeze(1)
    taps: list[torch.Tensor] = []
    for layer, block in enumerate(visual.blocks):
        hidden = block(
            hidden,
            cu_seqlens=metadata["cu_seqlens"],
            rotary_pos_emb_cos=metadata["rotary_pos_emb_cos"],
            rotary_pos_emb_sin=metadata["rotary_pos_emb_sin"],
            max_seqlen=metadata["max_seqlen"],
            sequence_lengths=metadata.get("sequence_lengths"),
        )
        if layer in visual.deepstack_visual_indexes:
            taps.append(hidden.squeeze(1))  # merged later, only for kept groups
    hidden = hidden.squeeze(1)

    kept = select_kept_tokens(hidden, pixel_values, grid_thw, retention)
    sizes = [len(k) for k in kept]
    if all(r.keeps_all for r in retention):
        # Nothing dropped: run the stock mergers on the untouched rows (bit-identical to vanilla).
        merged = [visual.merger(hidden)] + [m(t) for m, t in zip(visual.deepstack_merger_list, taps)]
    else:
        starts = torch.tensor([0] + [r.num_tokens for r in retention[:-1]]).cumsum(0).tolist()
        group_index = torch.cat([k + start for k, start in zip(kept, starts)])
        merged = merge_kept_groups(visual, hidden, taps, group_index)
    embeddings = torch.cat(merged, dim=1).split(sizes)
    return CompactImageEmbeddings(embeddings=list(embeddings), kept_indices=kept)


def merge_kept_groups(
    visual: nn.Module,
    hidden: torch.Tensor,
    taps: Sequence[torch.Tensor],
    group_index: torch.Tensor,
) -> list[torch.Tensor]:
    """Main merger and DeepStack mergers on the kept 2x2 groups only.

    On CUDA with unquantized weights the gather, LayerNorm and first Linear are one
    Triton kernel per level (no [K, 4C] intermediate); elsewhere the kept rows of all
    levels are gathered in one call and the stock merger modules run on K rows, which
    keeps vLLM's own CPU GEMM path.
    """
    mergers = [visual.merger, *visual.deepstack_merger_list]
    sources = [hidden, *taps]
    if hidden.is_cuda and all(_is_unquantized(m.linear_fc1) for m in mergers):
        return [_fused_merger(m, s, group_index) for m, s in zip(mergers, sources)]
    gathered = gather_rows(sources, group_index, rows_per_index=GROUP_ROWS)
    return [merger(rows) for merger, rows in zip(mergers, gathered)]


def _fused_merger(merger: nn.Module, rows: torch.Tensor, group_index: torch.Tensor) -> torch.Tensor:
    norm_width = merger.hidden_size if merger.use_postshuffle_norm else rows.shape[-1]
    projected = gather_merge_project(
        rows,
        group_index,
        merger.norm.weight,
        merger.norm.bias,
        merger.linear_fc1.weight,
        merger.linear_fc1.bias,
        group_size=GROUP_ROWS,
        norm_width=norm_width,
        eps=merger.norm.eps,
    )
    out, _ = merger.linear_fc2(merger.act_fn(projected))
    return out


def _is_unquantized(layer: nn.Module) -> bool:
    return type(getattr(layer, "quant_method", None)).__name__ == "UnquantizedLinearMethod"
