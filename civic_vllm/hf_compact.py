"""CIVIC's compact path written directly against HF transformers' Qwen3-VL.

Two users: the end-to-end reference test (vLLM's civic path must give the same
greedy tokens and logits) and training/distillation (the student runs this path).
It shares only the selection stage with the vLLM adapter; compaction, positions
and DeepStack rows are built here independently and explicitly:

* the vision tower runs on every patch (``last_hidden_state`` feeds selection),
* kept rows of the merged output and of every DeepStack level are indexed out,
* position ids are HF's own ``get_rope_index`` of the *unpruned* prompt,
  restricted to the kept columns,
* the language model runs on the compact sequence with those positions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from civic_vllm.retention.plan import ImageRetention, select_kept_tokens


@dataclass
class CompactBatch:
    """One compact prompt (batch size 1) ready for the HF language model."""

    input_ids: torch.Tensor  # [1, L]
    position_ids: torch.Tensor  # [3, 1, L]
    inputs_embeds: torch.Tensor  # [1, L, H]
    visual_pos_masks: torch.Tensor  # [1, L] bool
    deepstack_embeds: list[torch.Tensor]  # per level [sum K, H]
    kept_indices: list[torch.Tensor]  # per image, raster indices

    @property
    def next_position(self) -> int:
        return int(self.position_ids.max()) + 1


def build_compact_batch(
    model,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor,
    image_grid_thw: torch.Tensor,
    mm_token_type_ids: torch.Tensor,
    plans: Sequence[ImageRetention],
    seed_pixels: torch.Tensor | None = None,
) -> CompactBatch:
    """HF processor outputs of an unpruned prompt (batch size 1) -> the compact prompt.

    ``seed_pixels``: raw uint8 patch pixels (the processor run with do_rescale and
    do_normalize off), as vLLM ships them; only the random policy reads them, and
    passing them makes its draw identical to the served one.
    """
    core = model.model
    image_token_id = model.config.image_token_id
    vision = core.visual(pixel_values.type(core.visual.dtype), grid_thw=image_grid_thw, return_dict=True)
    seed_pixels = pixel_values if seed_pixels is None else seed_pixels
    kept = select_kept_tokens(vision.last_hidden_state, seed_pixels, image_grid_thw.tolist(), plans)

    starts = torch.tensor([0] + [p.num_tokens for p in plans[:-1]]).cumsum(0).tolist()
    kept_global = torch.cat([k + s for k, s in zip(kept, starts)])

    full_positions, _ = core.get_rope_index(
        input_ids, mm_token_type_ids=mm_token_type_ids, image_grid_thw=image_grid_thw
    )
    # Keep every text column and, inside each image's placeholder run, the kept ones.
    ids = input_ids[0]
    is_image = ids == image_token_id
    image_columns = torch.nonzero(is_image).flatten()
    keep = ~is_image
    keep[image_columns[kept_global]] = True

    compact_ids = input_ids[:, keep]
    embeds = core.get_input_embeddings()(compact_ids)
    mask = compact_ids == image_token_id
    embeds = embeds.masked_scatter(mask[..., None], vision.pooler_output[kept_global].to(embeds.dtype))
    return CompactBatch(
        input_ids=compact_ids,
        position_ids=full_positions[:, :, keep],
        inputs_embeds=embeds,
        visual_pos_masks=mask,
        deepstack_embeds=[level[kept_global].to(embeds.dtype) for level in vision.deepstack_features],
        kept_indices=kept,
    )


def compact_logits(model, batch: CompactBatch) -> torch.Tensor:
    """Logits [1, L, V] of the compact prompt (one full forward, no cache)."""
    hidden = model.model.language_model(
        input_ids=None,
        inputs_embeds=batch.inputs_embeds,
        position_ids=batch.position_ids,
        visual_pos_masks=batch.visual_pos_masks,
        deepstack_visual_embeds=batch.deepstack_embeds,
    ).last_hidden_state
    return model.lm_head(hidden)


@torch.inference_mode()
def compact_greedy(model, batch: CompactBatch, max_new_tokens: int) -> tuple[list[int], list[float]]:
    """Greedy decoding of the compact prompt for exactly ``max_new_tokens`` (EOS ignored).

    Returns token ids and their logprobs. Recomputes the whole sequence each step (no
    KV cache): slow but obviously right, which is what a reference is for. Generated
    text continues after the highest prompt position, one position per token.
    """
    tokens: list[int] = []
    logprobs: list[float] = []
    embed = model.model.get_input_embeddings()
    for _ in range(max_new_tokens):
        log_probs = torch.log_softmax(compact_logits(model, batch)[0, -1].float(), dim=-1)
        token = int(log_probs.argmax())
        tokens.append(token)
        logprobs.append(float(log_probs[token]))
        next_id = torch.tensor([[token]])
        position = torch.full((3, 1, 1), batch.next_position, dtype=batch.position_ids.dtype)
        batch = CompactBatch(
            input_ids=torch.cat([batch.input_ids, next_id], dim=1),
            position_ids=torch.cat([batch.position_ids, position], dim=2),
            inputs_embeds=torch.cat([batch.inputs_embeds, embed(next_id).to(batch.inputs_embeds.dtype)], dim=1),
            visual_pos_masks=torch.cat([batch.visual_pos_masks, torch.zeros(1, 1, dtype=torch.bool)], dim=1),
            deepstack_embeds=batch.deepstack_embeds,
            kept_indices=batch.kept_indices,
        )
    return tokens, logprobs
