"""CIVIC's compact path written directly against HF transformers' Qwen3-VL family.

Works for every family model_factory builds (Qwen3-VL, -MoE, Qwen3.5, -MoE): they share the
vision tower's structure, ``get_rope_index`` and the language model's inputs; DeepStack
is used where the vision tower has taps.

Two users: the end-to-end reference test (vLLM's civic path must give the same
greedy tokens and logits) and training/distillation (the student runs this path).
It shares only the selection stage with the vLLM adapter; compaction, positions
and DeepStack rows are built here independently and explicitly:

* the vision blocks up to each image's exit layer run on every patch; at the exit
  layer the kept 2x2 groups' rows (and their rotary embeddings) are indexed out
  and the later blocks run on them; DeepStack levels are merged when tapped, as HF
  does, and their merged rows are indexed with the same groups,
* position ids are HF's own ``get_rope_index`` of the *unpruned* prompt,
  restricted to the kept columns,
* the language model runs on the compact sequence with those positions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from civic_vllm.exit_context import BlockParts, DroppedContext, block_with_context, dropped_groups
from civic_vllm.retention.learned import TokenScorer, keep_logits
from civic_vllm.retention.selection import (
    GROUP_ROWS,
    ImageRetention,
    VideoRetention,
    patch_counts,
    select_after_block,
    select_video_tokens,
    sequence_rows,
)


@dataclass
class CompactBatch:
    """One compact prompt (batch size 1) ready for the HF language model."""

    input_ids: torch.Tensor  # [1, L]
    position_ids: torch.Tensor  # [3, 1, L]
    inputs_embeds: torch.Tensor  # [1, L, H]
    visual_pos_masks: torch.Tensor  # [1, L] bool
    deepstack_embeds: list[torch.Tensor]  # per level [sum K, H]
    kept_indices: list[torch.Tensor]  # per image, raster indices
    scores: list[torch.Tensor | None]  # per image, the learned policy's scores (else None)

    @property
    def next_position(self) -> int:
        return int(self.position_ids.max()) + 1


@dataclass
class VideoInputs:
    """The HF processor's video outputs of a prompt and what to keep of each video."""

    pixel_values_videos: torch.Tensor
    video_grid_thw: torch.Tensor
    retentions: Sequence[VideoRetention]


def build_compact_batch(
    model,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor | None,
    image_grid_thw: torch.Tensor | None,
    mm_token_type_ids: torch.Tensor,
    retentions: Sequence[ImageRetention],
    seed_pixels: torch.Tensor | None = None,
    scorer: TokenScorer | None = None,
    straight_through: bool = False,
    videos: VideoInputs | None = None,
) -> CompactBatch:
    """HF processor outputs of an unpruned prompt (batch size 1) -> the compact prompt.

    ``seed_pixels``: raw uint8 patch pixels (the processor run with do_rescale and
    do_normalize off), as vLLM ships them; only the random policy reads them, and
    passing them makes its draw identical to the served one. ``scorer``: the
    checkpoint's trained scorer, read by the learned policy; ``straight_through``: gate the
    kept rows with it while training (see :func:`compact_vision`). ``videos``: the prompt's
    videos, run through HF's own vision tower and retained per frame group on its output
    (:func:`compact_videos`); ``pixel_values`` may then be None (no images).
    """
    core = model.model
    ids = input_ids[0]
    keep = torch.ones_like(ids, dtype=torch.bool)
    merged_by_token, deepstack_by_token, kept = {}, {}, []
    scores: list[torch.Tensor | None] = []
    if retentions:
        seed_pixels = pixel_values if seed_pixels is None else seed_pixels
        merged, deepstack, kept, scores = compact_vision(
            core.visual, pixel_values, image_grid_thw, retentions, seed_pixels, scorer, straight_through
        )
        token = model.config.image_token_id
        _keep_columns(keep, ids == token, kept, [p.num_tokens for p in retentions])
        merged_by_token[token], deepstack_by_token[token] = merged, deepstack
    if videos is not None:
        merged, deepstack, kept_videos = compact_videos(core, videos)
        token = model.config.video_token_id
        _keep_columns(keep, ids == token, kept_videos, [p.num_tokens for p in videos.retentions])
        merged_by_token[token], deepstack_by_token[token] = merged, deepstack

    full_positions, _ = core.get_rope_index(
        input_ids, mm_token_type_ids=mm_token_type_ids, image_grid_thw=image_grid_thw,
        video_grid_thw=None if videos is None else videos.video_grid_thw,
    )
    compact_ids = input_ids[:, keep]
    embeds = core.get_input_embeddings()(compact_ids)
    visual = torch.zeros_like(compact_ids, dtype=torch.bool)
    for token_id, merged in merged_by_token.items():
        mask = compact_ids == token_id
        embeds = embeds.masked_scatter(mask[..., None], merged.to(embeds.dtype))
        visual |= mask
    # DeepStack rows in prompt order over all visual tokens (images and videos interleaved).
    levels = len(next(iter(deepstack_by_token.values()), []))
    deepstack_embeds = []
    for level in range(levels):
        joint = embeds.new_zeros(int(visual.sum()), embeds.shape[-1])
        for token_id, rows in deepstack_by_token.items():
            joint[(compact_ids == token_id)[visual]] = rows[level].to(embeds.dtype)
        deepstack_embeds.append(joint)
    return CompactBatch(
        input_ids=compact_ids,
        position_ids=full_positions[:, :, keep],
        inputs_embeds=embeds,
        visual_pos_masks=visual,
        deepstack_embeds=deepstack_embeds,
        kept_indices=kept,
        scores=scores,
    )


def concatenated_indices(kept: Sequence[torch.Tensor], num_tokens: Sequence[int]) -> torch.Tensor:
    """Each item's kept indices (item i has ``num_tokens[i]`` tokens) as indices into the items' concatenation."""
    starts = torch.tensor([0, *num_tokens[:-1]]).cumsum(0).tolist()
    return torch.cat([k + s for k, s in zip(kept, starts)])


def _keep_columns(keep: torch.Tensor, is_item_token: torch.Tensor, kept: Sequence[torch.Tensor],
                  num_tokens: Sequence[int]) -> None:
    """Inside the placeholder runs of one modality keep only the kept tokens' columns."""
    kept_global = concatenated_indices(kept, num_tokens)
    keep[is_item_token] = False
    keep[torch.nonzero(is_item_token).flatten()[kept_global]] = True


def compact_videos(core, videos: VideoInputs) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Each video's kept rows (main and every DeepStack level, the same indices) and kept indices.

    A video whose exit layer is inside the tower runs :func:`compact_vision` (selection on that
    layer's rows, the later blocks on kept rows only); the others run HF's own vision tower on
    every frame group and select on its output. One video at a time: frame groups attend apart,
    so batching changes nothing but speed here.
    """
    depth = len(core.visual.blocks)
    grids = videos.video_grid_thw
    pixels = videos.pixel_values_videos.split(patch_counts(grids.tolist()))
    merged, deepstack, kept = [], [], []
    for video_pixels, grid, plan in zip(pixels, grids, videos.retentions):
        grid = grid[None]
        if plan.selects_in_tower(depth):
            rows, taps, (indices,), _ = compact_vision(core.visual, video_pixels, grid, [plan], video_pixels)
        else:
            output = core.get_video_features(video_pixels, grid, return_dict=True)
            main = output.pooler_output[0]
            indices = select_video_tokens(main, plan)
            rows, taps = main[indices], [level[0][indices] for level in output.deepstack_features or []]
        merged.append(rows)
        deepstack.append(taps)
        kept.append(indices)
    return torch.cat(merged), [torch.cat(level) for level in zip(*deepstack)], kept


def compact_vision(
    visual,
    pixel_values: torch.Tensor,
    grid_thw: torch.Tensor,
    retentions: Sequence[ImageRetention | VideoRetention],
    seed_pixels,
    scorer: TokenScorer | None = None,
    straight_through: bool = False,
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor], list[torch.Tensor | None]]:
    """HF's vision tower with CIVIC retention at each item's exit layer (images, or videos:
    :class:`VideoRetention`, each frame group its own attention sequence).

    Returns the merged rows of the kept tokens [sum K, D], the same for every DeepStack
    level, each image's kept raster indices and its learned scores (None for other
    policies). With ``straight_through``, each kept group's rows are multiplied by a
    straight-through gate 1 + g - stop_grad(g), g = sigmoid(keep logit): the value is
    exactly 1 (the forward pass is the served one) and the loss reaches the scores.
    """
    from transformers.vision_utils import (
        get_vision_attention_seqlens,
        get_vision_interpolation_indices_and_weights,
        get_vision_position_ids,
    )

    indices, weights = get_vision_interpolation_indices_and_weights(
        grid_thw,
        num_grid_per_side=visual.num_grid_per_side,
        mode=visual.interpolation_mode,
        align_corners=visual.interpolation_align_corners,
        spatial_merge_size=visual.config.spatial_merge_size,
    )
    cu_seqlens, _ = get_vision_attention_seqlens(grid_thw, visual.config)
    hidden = visual.patch_embed(pixel_values.type(visual.dtype))
    hidden = hidden + (visual.pos_embed(indices) * weights[:, :, None]).sum(1).to(hidden.dtype)
    cos, sin = visual.rotary_pos_emb(hidden, get_vision_position_ids(grid_thw, visual.spatial_merge_size))
    depth = len(visual.blocks)
    deepstack_indexes = list(getattr(visual, "deepstack_visual_indexes", None) or [])  # none on Qwen3.5
    groups = [plan.num_tokens for plan in retentions]
    kept: list[torch.Tensor | None] = [None] * len(retentions)
    scores: list[torch.Tensor | None] = [None] * len(retentions)
    image_pixels = seed_pixels.split(patch_counts(grid_thw.tolist()))
    taps: list[torch.Tensor] = []  # merged rows, one per current group
    context = DroppedContext()
    for block_index, block in enumerate(visual.blocks):
        if context:
            rows = [GROUP_ROWS * g for g in groups]
            hidden = block_with_context(_hf_block_parts(block), hidden, cos, sin, rows, context)
        else:
            hidden = block(hidden, cu_seqlens=cu_seqlens, position_embeddings=(cos, sin))
        if block_index in deepstack_indexes:
            merger = visual.deepstack_merger_list[deepstack_indexes.index(block_index)]
            taps.append(merger(hidden))
        selecting = select_after_block(block_index, depth, hidden, groups, image_pixels, retentions, kept, scorer,
                                       scores)
        if not selecting:
            continue
        surviving = [kept[i] if i in selecting else torch.arange(g, device=hidden.device) for i, g in enumerate(groups)]
        starts = torch.tensor([0] + groups[:-1]).cumsum(0).tolist()
        for i in selecting:
            if retentions[i].exit_context and not retentions[i].keeps_all:
                dropped = _group_rows(dropped_groups(kept[i], groups[i]) + starts[i])
                context.add(i, hidden[dropped], cos[dropped], sin[dropped])
        group_index = torch.cat([s + start for s, start in zip(surviving, starts)])
        row_index = _group_rows(group_index)
        hidden, cos, sin = hidden[row_index], cos[row_index], sin[row_index]
        if straight_through:
            hidden = hidden * _straight_through_gate(surviving, selecting, scores, retentions).to(hidden.dtype)[:, None]
        taps = [tap[group_index] for tap in taps]
        groups = [len(s) for s in surviving]
        rows = torch.tensor(sequence_rows(groups, retentions), device=hidden.device)
        cu_seqlens = F.pad(rows.cumsum(0, dtype=torch.int32), (1, 0))
    return visual.merger(hidden), taps, kept, scores


def _group_rows(group_index: torch.Tensor) -> torch.Tensor:
    """Patch-row indices of 2x2 groups (each group's rows are consecutive)."""
    return (group_index[:, None] * GROUP_ROWS + torch.arange(GROUP_ROWS, device=group_index.device)).flatten()


def _hf_block_parts(block) -> BlockParts:
    """HF's Qwen3-VL vision block as :class:`BlockParts` (Qwen3.5's tower has the same modules)."""
    from transformers.models.qwen3_vl.modeling_qwen3_vl import apply_rotary_pos_emb_vision

    attn = block.attn
    return BlockParts(
        norm1=block.norm1,
        qkv=lambda x: attn.qkv(x).reshape(len(x), 3, attn.num_heads, -1),
        rotate=lambda t, cos, sin: apply_rotary_pos_emb_vision(t, t, cos, sin)[0],
        project=attn.proj,
        norm2=block.norm2,
        mlp=block.mlp,
        scale=attn.scaling,
    )


def _straight_through_gate(surviving, selecting, scores, retentions) -> torch.Tensor:
    """[rows] gate of the surviving patch rows: 1 + g - stop_grad(g) on freshly scored groups, else 1."""
    gates = []
    for i, groups in enumerate(surviving):
        if i in selecting and scores[i] is not None:
            g = torch.sigmoid(keep_logits(scores[i], retentions[i].num_kept)[groups])
            gates.append(1.0 + g - g.detach())
        else:
            gates.append(torch.ones(len(groups), device=groups.device))
    return torch.cat(gates).repeat_interleave(GROUP_ROWS)


def nearest_kept_counts(kept: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
    """[K] how many of the grid's cells have kept cell j as their nearest kept cell (Euclidean on
    (row, col), ties to the earlier raster index; a kept cell counts itself): the tokens each kept
    token stands for. Sums to h * w."""
    h, w = grid_hw
    cells = torch.arange(h * w, device=kept.device)
    rows, cols = (cells // w).float(), (cells % w).float()
    distance = (rows[:, None] - rows[kept][None]) ** 2 + (cols[:, None] - cols[kept][None]) ** 2
    return torch.bincount(distance.argmin(dim=1), minlength=kept.numel())


def proportional_key_bias(kept_indices: Sequence[torch.Tensor], grid_hws: Sequence[tuple[int, int]]) -> torch.Tensor:
    """[sum K] log of the tokens each kept visual token stands for, in prompt order: ToMe's
    proportional attention. Added to the attention logits of those keys, it makes every softmax
    weigh a kept token as if the dropped tokens nearest to it were still there, so the visual
    block holds the full image's share of attention."""
    return torch.cat([nearest_kept_counts(kept, hw).float().log() for kept, hw in zip(kept_indices, grid_hws)])


def causal_mask_with_key_bias(batch: CompactBatch, key_bias: torch.Tensor) -> torch.Tensor:
    """[1, 1, L, L] additive mask: causal, plus ``key_bias`` on the visual columns (HF uses a 4-D mask as given)."""
    length, device, dtype = batch.inputs_embeds.shape[1], batch.inputs_embeds.device, batch.inputs_embeds.dtype
    visual = int(batch.visual_pos_masks.sum())
    if key_bias.numel() != visual:
        raise ValueError(f"a key bias of {key_bias.numel()} entries for {visual} visual tokens (images only)")
    mask = torch.full((length, length), float("-inf"), dtype=dtype, device=device).triu(1)
    mask[:, batch.visual_pos_masks[0]] += key_bias.to(device=device, dtype=dtype)
    return mask[None, None]


def proportional_attention_mask(batch: CompactBatch, grid_hws: Sequence[tuple[int, int]]) -> torch.Tensor:
    """The attention mask of proportional attention for a compact batch of images (merged grids ``grid_hws``)."""
    return causal_mask_with_key_bias(batch, proportional_key_bias(batch.kept_indices, grid_hws))


def compact_logits(model, batch: CompactBatch, key_bias: torch.Tensor | None = None) -> torch.Tensor:
    """Logits [1, L, V] of the compact prompt (one full forward, no cache).

    ``key_bias`` [sum K]: added to every query's attention logit of each visual key
    (:func:`proportional_key_bias`); needs an attention implementation that takes a float mask
    (eager, sdpa) and full attention in every layer (Qwen3-VL and Qwen3-VL-MoE).
    """
    # Qwen3.5's text model has no DeepStack inputs (its vision tower has no taps).
    deepstack = dict(visual_pos_masks=batch.visual_pos_masks, deepstack_visual_embeds=batch.deepstack_embeds)
    mask = None if key_bias is None else causal_mask_with_key_bias(batch, key_bias)
    hidden = model.model.language_model(
        input_ids=None,
        inputs_embeds=batch.inputs_embeds,
        position_ids=batch.position_ids,
        attention_mask=mask,
        **(deepstack if batch.deepstack_embeds else {}),
    ).last_hidden_state
    return model.lm_head(hidden)


@torch.inference_mode()
def compact_greedy(
    model, batch: CompactBatch, max_new_tokens: int, forced: list[int] | None = None,
    best_logprobs: list[float] | None = None, key_bias: torch.Tensor | None = None,
) -> tuple[list[int], list[float]]:
    """Greedy decoding of the compact prompt for exactly ``max_new_tokens`` (EOS ignored).

    Returns token ids and their logprobs. Recomputes the whole sequence each step (no
    KV cache): slow but obviously right, which is what a reference is for. Generated
    text continues after the highest prompt position, one position per token.
    ``forced``: feed these tokens instead of the argmax (teacher forcing, to score another
    decoder's tokens); ``best_logprobs``, if given, receives each step's argmax logprob;
    ``key_bias``: see :func:`compact_logits`.
    """
    tokens: list[int] = []
    logprobs: list[float] = []
    embed = model.model.get_input_embeddings()
    for step in range(max_new_tokens):
        log_probs = torch.log_softmax(compact_logits(model, batch, key_bias)[0, -1].float(), dim=-1)
        token = int(log_probs.argmax()) if forced is None else forced[step]
        if best_logprobs is not None:
            best_logprobs.append(float(log_probs.max()))
        tokens.append(token)
        logprobs.append(float(log_probs[token]))
        device = batch.input_ids.device
        next_id = torch.tensor([[token]], device=device)
        position = torch.full((3, 1, 1), batch.next_position, dtype=batch.position_ids.dtype, device=device)
        batch = CompactBatch(
            input_ids=torch.cat([batch.input_ids, next_id], dim=1),
            position_ids=torch.cat([batch.position_ids, position], dim=2),
            inputs_embeds=torch.cat([batch.inputs_embeds, embed(next_id).to(batch.inputs_embeds.dtype)], dim=1),
            visual_pos_masks=torch.cat([batch.visual_pos_masks, torch.zeros(1, 1, dtype=torch.bool, device=device)],
                                       dim=1),
            deepstack_embeds=batch.deepstack_embeds,
            kept_indices=batch.kept_indices,
            scores=batch.scores,
        )
    return tokens, logprobs
