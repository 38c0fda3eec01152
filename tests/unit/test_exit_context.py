"""Exit context: after the exit layer the kept rows attend to the dropped rows frozen there.

The reference is exact: in the first block after the exit layer the dropped rows still hold the
very states the stock block would read, so the kept rows' outputs must equal the stock block's
on all rows. Runs on HF transformers' Qwen3-VL vision block (no vLLM).
"""

from __future__ import annotations

import pytest
import torch
from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLVisionConfig
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionBlock

from civic_vllm.cost import image_encoder_cost
from civic_vllm.exit_context import DroppedContext, block_with_context, dropped_groups
from civic_vllm.hf_compact import _group_rows, _hf_block_parts

WIDTH, HEADS = 32, 4


@pytest.fixture(scope="module")
def block():
    torch.manual_seed(0)
    config = Qwen3VLVisionConfig(hidden_size=WIDTH, num_heads=HEADS, intermediate_size=64, depth=1)
    config._attn_implementation = "sdpa"
    return Qwen3VLVisionBlock(config).eval()


def rotary(rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of ``rows`` patch rows at distinct angles, in the tower's [rows, head_dim] layout."""
    angles = torch.linspace(0, 20, rows)[:, None] * torch.logspace(0, -2, WIDTH // HEADS // 2)[None]
    emb = torch.cat([angles, angles], dim=-1)
    return emb.cos(), emb.sin()


def stock(block, hidden, cos, sin, lengths):
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return block(hidden, cu_seqlens=cu, position_embeddings=(cos, sin))


def test_dropped_groups_is_the_complement():
    assert dropped_groups(torch.tensor([0, 3, 4]), 6).tolist() == [1, 2, 5]
    assert dropped_groups(torch.arange(4), 4).tolist() == []


@torch.no_grad()
def test_kept_rows_see_exactly_what_the_stock_block_shows_them(block):
    groups = [9, 6]  # two images; the first keeps context, the second keeps all its groups
    hidden = torch.randn(4 * sum(groups), WIDTH)
    cos, sin = rotary(len(hidden))
    full = stock(block, hidden, cos, sin, [4 * g for g in groups])

    kept = torch.tensor([1, 4, 8])
    first = _group_rows(kept)
    dropped = _group_rows(dropped_groups(kept, groups[0]))
    second = torch.arange(4 * groups[0], len(hidden))
    rows = torch.cat([first, second])
    context = DroppedContext()
    context.add(0, hidden[dropped], cos[dropped], sin[dropped])
    out = block_with_context(_hf_block_parts(block), hidden[rows], cos[rows], sin[rows],
                             [len(first), len(second)], context)
    torch.testing.assert_close(out, full[rows], atol=1e-5, rtol=1e-5)

    # without the context the kept rows of image 0 read something else: the test can fail
    plain = stock(block, hidden[rows], cos[rows], sin[rows], [len(first), len(second)])
    assert (plain[: len(first)] - full[first]).abs().max() > 1e-2
    torch.testing.assert_close(plain[len(first):], full[second], atol=1e-5, rtol=1e-5)


def test_encoder_cost_counts_the_context_rows():
    # 196 tokens, K = 66, exit 1 of 4: 196 + 3 * (66 + 130 / 4) = 491.5 -> /4 = 122.9 -> 123
    assert image_encoder_cost(196, 66, exit_layer=1, depth=4, context=True) == 123
    assert image_encoder_cost(196, 66, exit_layer=1, depth=4) == 99
    assert image_encoder_cost(196, 196, exit_layer=1, depth=4, context=True) == 196  # nothing dropped


def test_vision_flops_with_context_lie_between_plain_exit_and_the_full_tower():
    from civic_vllm.cost import vision_flops
    from civic_vllm.model_factory import PRESETS

    v = PRESETS["qwen3-vl-2b"].vision
    patches, kept = 4 * 441, 147
    full = vision_flops(v, patches, 441)
    plain = vision_flops(v, patches, kept, exit_layer=6)
    context = vision_flops(v, patches, kept, exit_layer=6, context=True)
    assert plain < context < full
    assert vision_flops(v, patches, 441, exit_layer=6, context=True) == vision_flops(v, patches, 441, exit_layer=6)
