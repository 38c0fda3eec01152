"""Proportional attention on the HF compact path: the counts, and that the bias lands on the visual keys only."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from civic_vllm.budget import num_retained
from civic_vllm.data import shapes
from civic_vllm.hf_compact import (
    CompactBatch,
    build_compact_batch,
    compact_logits,
    nearest_kept_counts,
    proportional_key_bias,
)
from civic_vllm.model_factory.hf_config import build_config, hf_model_class
from civic_vllm.retention.selection import ImageRetention
from civic_vllm.training.chats import ChatEncoder
from civic_vllm.training.recipe import MICRO_PRESET


def test_each_kept_cell_stands_for_the_cells_nearest_to_it():
    # 2 x 4 grid, cells 0 and 3 kept: columns 0-1 are nearer cell 0, columns 2-3 nearer cell 3.
    assert nearest_kept_counts(torch.tensor([0, 3]), (2, 4)).tolist() == [4, 4]
    assert nearest_kept_counts(torch.arange(6), (2, 3)).tolist() == [1] * 6
    assert nearest_kept_counts(torch.tensor([5]), (3, 3)).tolist() == [9]
    kept = torch.tensor([1, 7, 12, 30, 44])
    assert int(nearest_kept_counts(kept, (7, 7)).sum()) == 49


def test_the_bias_is_the_log_count_per_image_in_prompt_order():
    bias = proportional_key_bias([torch.tensor([0, 3]), torch.tensor([2])], [(2, 4), (1, 3)])
    torch.testing.assert_close(bias, torch.tensor([4.0, 4.0, 3.0]).log())


@pytest.fixture(scope="module")
def micro():
    torch.manual_seed(0)
    model = hf_model_class(MICRO_PRESET)(build_config(MICRO_PRESET, "float32")).eval()
    encoder = ChatEncoder(MICRO_PRESET)
    scene = shapes.sample_scene(np.random.default_rng(5), "multi")
    enc = encoder.encode(scene.image, ["How many objects are there?"], None)
    merge = MICRO_PRESET.vision.spatial_merge_size
    grid = [(h // merge, w // merge) for _, h, w in enc.image_grid_thw.tolist()][0]
    plan = ImageRetention(grid_hw=grid, num_kept=num_retained(grid[0] * grid[1], 1 / 3), policy="civic")
    with torch.inference_mode():
        batch = build_compact_batch(model, enc.input_ids, enc.pixel_values, enc.image_grid_thw,
                                    enc.mm_token_type_ids, [plan])
    return model, batch, grid


@torch.inference_mode()
def test_a_zero_bias_is_the_plain_causal_forward(micro):
    model, batch, _ = micro
    zero = torch.zeros(int(batch.visual_pos_masks.sum()))
    torch.testing.assert_close(compact_logits(model, batch, zero), compact_logits(model, batch), atol=1e-5, rtol=1e-5)
    biased = compact_logits(model, batch, proportional_key_bias(batch.kept_indices, [micro[2]]))
    assert not torch.allclose(biased[0, -1], compact_logits(model, batch)[0, -1], atol=1e-4)


@torch.inference_mode()
def test_a_bias_of_minus_infinity_hides_the_image_from_the_text_and_nothing_else(micro):
    """Text tokens that can no longer see the visual keys answer as if the image were not in the prompt."""
    model, batch, _ = micro
    visual = batch.visual_pos_masks[0]
    hidden = compact_logits(model, batch, torch.full((int(visual.sum()),), -1e4))
    text = ~visual
    without_image = CompactBatch(input_ids=batch.input_ids[:, text], position_ids=batch.position_ids[:, :, text],
                                 inputs_embeds=batch.inputs_embeds[:, text],
                                 visual_pos_masks=batch.visual_pos_masks[:, text],
                                 deepstack_embeds=[], kept_indices=[], scores=[])
    torch.testing.assert_close(hidden[:, text], compact_logits(model, without_image), atol=1e-4, rtol=1e-4)
