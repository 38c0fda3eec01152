"""The compact vision-encoder pass: select on encoder states, then run on kept rows only.

vLLM private API touched here: the submodules of ``Qwen3_VisionTransformer``
(input_norm, patch_embed, prepare_encoder_metadata, attn_backend, blocks, merger,
deepstack_merger_list, deepstack_visual_indexes; vLLM 0.33 qwen3_vl.py:561-905) and
``MMEncoderAttention``'s cu_seqlens helpers.
Why: the stock forward runs every block on all patches and the merger and every
DeepStack merger on all N merged tokens inside the block loop. CIVIC selects K
groups per image (K_t per frame group of a video) after its exit layer (by default
after the last block), gathers their 2x2 patch rows contiguously together with their
rotary embeddings and any DeepStack taps already taken, runs the remaining blocks on
those rows only (sequence boundaries recomputed: one per image, one per frame group
of a video), and the mergers on K rows. With an image's ``exit_context`` the later
blocks run as ``civic_vllm.exit_context.block_with_context`` on the stock block's own
submodules (norm1, attn.qkv, attn.apply_rotary_emb, attn.proj, norm2, mlp): the kept
rows also attend to the dropped rows frozen at the exit layer.
How: the block loop is the stock one; compaction happens between blocks.
Future: if vLLM grows a hook between vision blocks, this becomes a callback.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
from vllm.model_executor.layers.attention.mm_encoder_attention import MMEncoderAttention

from civic_vllm.exit_context import BlockParts, DroppedContext, block_with_context, dropped_groups
from civic_vllm.kernels import gather_merge_project, gather_rows
from civic_vllm.retention.learned import TokenScorer
from civic_vllm.retention.selection import (
    GROUP_ROWS,
    ImageRetention,
    VideoRetention,
    patch_counts,
    select_after_block,
    sequence_rows,
)

SEQUENCE_KEYS = ("cu_seqlens", "max_seqlen", "sequence_lengths")


@dataclass
class CompactEmbeddings:
    embeddings: list[torch.Tensor]  # per item [K_i, D * (1 + deepstack levels)]
    kept_indices: list[torch.Tensor]  # per item [K_i] raster indices (group-major for a video), ascending


def encode_compact(
    visual: nn.Module,
    pixel_values: torch.Tensor,
    grid_thw: Sequence[Sequence[int]],
    retentions: Sequence[ImageRetention | VideoRetention],
    scorer: TokenScorer | None = None,
) -> CompactEmbeddings:
    """Run the vision tower, keeping ``retentions[i].num_kept`` tokens of item i (``scorer``: the
    checkpoint's trained scorer, read by the learned policy). The items of one call are all
    images or all videos (vLLM's pixel tensors are per modality)."""
    depth = len(visual.blocks)
    metadata = visual.prepare_encoder_metadata(list(grid_thw))
    hidden = visual.input_norm(pixel_values.to(device=visual.device, non_blocking=True), visual.dtype)
    hidden = visual.patch_embed(hidden) + metadata["pos_embeds"]
    rotary = [metadata["rotary_pos_emb_cos"], metadata["rotary_pos_emb_sin"]]
    sequences = {key: metadata.get(key) for key in SEQUENCE_KEYS}
    seed_pixels = pixel_values.split(patch_counts(grid_thw))
    groups = [plan.num_tokens for plan in retentions]  # merged tokens per item in the current rows
    kept: list[torch.Tensor | None] = [None] * len(retentions)
    taps: list[torch.Tensor] = []
    context = DroppedContext()  # images whose later blocks still read their dropped rows

    for block_index, block in enumerate(visual.blocks):
        if context:
            rows = [GROUP_ROWS * g for g in groups]
            hidden = block_with_context(_block_parts(block), hidden, rotary[0], rotary[1], rows, context)
        else:
            hidden = block(
                hidden.unsqueeze(1),
                cu_seqlens=sequences["cu_seqlens"],
                rotary_pos_emb_cos=rotary[0],
                rotary_pos_emb_sin=rotary[1],
                max_seqlen=sequences["max_seqlen"],
                sequence_lengths=sequences["sequence_lengths"],
            ).squeeze(1)
        if block_index in visual.deepstack_visual_indexes:
            taps.append(hidden)
        selecting = select_after_block(block_index, depth, hidden, groups, seed_pixels, retentions, kept, scorer)
        compacting = {i: kept[i] for i in selecting if not retentions[i].keeps_all}
        if block_index == depth - 1 or not compacting:
            continue  # after the last block the mergers do the gathering
        keep_context = {i: dropped_groups(k, groups[i]) for i, k in compacting.items() if retentions[i].exit_context}
        if keep_context:
            dropped = gather_rows([hidden, *rotary], layout_index(groups, keep_context, only=True),
                                  rows_per_index=GROUP_ROWS)
            for i, part in zip(keep_context, zip(*(t.split([GROUP_ROWS * len(d) for d in keep_context.values()])
                                                  for t in dropped))):
                context.add(i, *part)
        index = layout_index(groups, compacting)
        hidden, cos, sin, *taps = gather_rows([hidden, *rotary, *taps], index, rows_per_index=GROUP_ROWS)
        rotary = [cos, sin]
        for i, indices in compacting.items():
            groups[i] = len(indices)
        sequences = sequence_metadata(visual, sequence_rows(groups, retentions))

    final = {i: kept[i] for i, retention in enumerate(retentions)
             if retention.selects_after(depth - 1, depth) and not retention.keeps_all}
    if final:
        merged = merge_kept_groups(visual, hidden, taps, layout_index(groups, final))
    else:  # every row left is a kept row: the stock mergers, bit-identical to vanilla at ratio 1
        merged = [visual.merger(hidden)] + [m(t) for m, t in zip(visual.deepstack_merger_list, taps)]
    embeddings = torch.cat(merged, dim=1).split([len(k) for k in kept])
    return CompactEmbeddings(embeddings=list(embeddings), kept_indices=list(kept))


def layout_index(groups: Sequence[int], replace: Mapping[int, torch.Tensor], only: bool = False) -> torch.Tensor:
    """Group indices into the current rows: ``replace[i]`` for those images, all groups for the
    rest (none with ``only``)."""
    starts = np.concatenate([[0], np.cumsum(groups)[:-1]]).tolist()
    device = next(iter(replace.values())).device
    parts = [
        (replace[i] if i in replace else torch.arange(count, device=device)) + start
        for i, (count, start) in enumerate(zip(groups, starts))
        if i in replace or not only
    ]
    return torch.cat(parts)


def _block_parts(block: nn.Module) -> BlockParts:
    """vLLM's Qwen3 vision block as :class:`BlockParts` (this rank's heads; proj all-reduces)."""
    attn = block.attn
    heads, head_size = attn.num_attention_heads_per_partition, attn.hidden_size_per_attention_head

    def qkv(x: torch.Tensor) -> torch.Tensor:
        out, _ = attn.qkv(x)
        return out.view(len(x), 3, heads, head_size)

    def project(x: torch.Tensor) -> torch.Tensor:
        out, _ = attn.proj(x)
        return out

    def rotate(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return attn.apply_rotary_emb(t.contiguous(), cos, sin)

    return BlockParts(norm1=block.norm1, qkv=qkv, rotate=rotate, project=project, norm2=block.norm2, mlp=block.mlp,
                      scale=head_size**-0.5)


def sequence_metadata(visual: nn.Module, rows_per_sequence: Sequence[int]) -> dict[str, torch.Tensor | None]:
    """cu_seqlens / max_seqlen / sequence_lengths for the compacted rows.

    The same backend-specific helpers vLLM's ``prepare_encoder_metadata`` uses.
    """
    cu_seqlens = np.concatenate([[0], np.cumsum(rows_per_sequence)]).astype(np.int32)
    backend, device = visual.attn_backend, visual.device
    return {
        "cu_seqlens": MMEncoderAttention.maybe_recompute_cu_seqlens(
            backend, cu_seqlens, visual.hidden_size, visual.tp_size, device,
            fp8_padded_hidden_size=visual.fp8_padded_hidden_size,
        ),
        "max_seqlen": torch.tensor(MMEncoderAttention.compute_max_seqlen(backend, cu_seqlens), dtype=torch.int32),
        "sequence_lengths": MMEncoderAttention.maybe_compute_seq_lens(backend, cu_seqlens, device),
    }


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
