"""Video retention's pure parts: per-group budget, the civic_video_ratio setting, the
temporal-novelty policy and the frame-group spans positions are built from."""

from __future__ import annotations

import pytest
import torch

from civic_vllm.budget import frame_groups, num_retained, num_retained_per_group, video_span_text_tokens
from civic_vllm.positions import ImageSpan, frame_group_spans
from civic_vllm.retention import CivicPolicy
from civic_vllm.retention.selection import (
    GROUP_ROWS,
    ImageRetention,
    VideoRetention,
    select_after_block,
    select_video_tokens,
    sequence_rows,
)
from civic_vllm.retention.video import TemporalCivicPolicy
from civic_vllm.settings import CivicSettings, CivicSettingsError

# -- budget and settings -----------------------------------------------------------------


def test_frame_groups_and_per_group_budget():
    assert frame_groups((4, 16, 20), 2) == (4, 8, 10)
    assert num_retained_per_group((4, 16, 20), 2, 1 / 3) == num_retained(80, 1 / 3) == 27
    assert num_retained_per_group((4, 16, 20), 2, 0.001, min_tokens=5) == 5  # the floor, per group
    assert num_retained_per_group((4, 16, 20), 2, 1.0) == 80
    with pytest.raises(ValueError, match="multiples"):
        frame_groups((2, 15, 16), 2)


@pytest.mark.parametrize("groups,rows,cols,stamp_tokens", [(8, 14, 14, 6), (3, 8, 8, 5), (4, 8, 10, 7), (16, 28, 28, 7),
                                                            (1, 2, 2, 6), (5, 7, 9, 4)])
@pytest.mark.parametrize("ratio", [1 / 3, 0.5, 0.25, 0.9, 0.05])
def test_the_ratio_counts_the_whole_span_timestamps_and_markers_included(groups, rows, cols, stamp_tokens, ratio):
    stamps = [0.5 + 2 * g for g in range(groups)]
    text = video_span_text_tokens(stamps, lambda s: stamp_tokens)
    assert text == groups * (stamp_tokens + 2)
    per_group = rows * cols
    k = num_retained_per_group((groups, 2 * rows, 2 * cols), 2, ratio, text_tokens=text)
    vanilla, kept = groups * per_group + text, groups * k + text
    if text < ratio * vanilla:  # the span is r of vanilla's, rounded up by under one token a group
        assert ratio * vanilla <= kept < ratio * vanilla + groups
    else:  # timestamps and markers alone exceed r of the span: the floor of one token a group
        assert k == 1
    assert num_retained_per_group((groups, 2 * rows, 2 * cols), 2, 1.0, text_tokens=text) == per_group
    # never more than counting video tokens alone would keep
    assert k <= num_retained(per_group, ratio)


def test_span_ratio_at_448_px_keeps_a_third_of_the_span():
    """16 frames of 448 x 448: 8 groups of 196 tokens, timestamps of 6 tokens: 1640 tokens of span."""
    text = video_span_text_tokens([0.5 + g for g in range(8)], lambda s: 6)
    k = num_retained_per_group((8, 28, 28), 2, 1 / 3, text_tokens=text)
    assert (text, k) == (64, 60)  # (1632 / 3 - 64) / 8 = 60; counting video tokens alone: 66
    assert (8 * k + text) / (8 * 196 + text) < 0.36
    with pytest.raises(ValueError, match="text_tokens"):
        num_retained_per_group((8, 28, 28), 2, 1 / 3, text_tokens=-1)


def test_video_ratio_defaults_to_the_image_ratio():
    assert CivicSettings.from_mm_kwargs({}).effective_video_ratio == 1.0
    assert CivicSettings.from_mm_kwargs({"civic_ratio": 0.5}).effective_video_ratio == 0.5
    settings = CivicSettings.from_mm_kwargs({"civic_ratio": 0.5, "civic_video_ratio": 0.25})
    assert (settings.ratio, settings.effective_video_ratio) == (0.5, 0.25)
    assert CivicSettings.from_mm_kwargs({"civic_video_ratio": None}).video_ratio is None


@pytest.mark.parametrize("value", [0, -0.5, 1.5, "0.5", True, float("nan"), [0.5]])
def test_bad_video_ratio_names_the_key_and_range(value):
    with pytest.raises(CivicSettingsError) as err:
        CivicSettings.from_mm_kwargs({"civic_video_ratio": value})
    assert "civic_video_ratio" in str(err.value) and "(0, 1]" in str(err.value)


# -- the temporal-novelty policy -----------------------------------------------------------


def _moving_scene(groups=4, h=8, w=8, d=32, seed=0):
    """A static background, a static distinctive logo at (0, 0)-(1, 1), and a dimmer object
    that moves one cell right per group: features [groups * h * w, d]."""
    g = torch.Generator().manual_seed(seed)
    background, logo, mover = (torch.randn(d, generator=g) for _ in range(3))
    base = background + 0.05 * torch.randn(h * w, d, generator=g)
    logo_cells = [0, 1, w, w + 1]
    base[logo_cells] = logo + 0.05 * torch.randn(4, d, generator=g)
    frames, moving = [], []
    for t in range(groups):
        frame = base.clone()
        cell = 4 * w + 2 + t
        frame[cell] = 0.6 * mover + 0.4 * background
        frames.append(frame)
        moving.append(cell)
    return torch.cat(frames), logo_cells, moving


def test_video_selection_contract_and_determinism():
    features, _, _ = _moving_scene()
    policy = TemporalCivicPolicy()
    kept = policy.select(features, 4, (8, 8), 10)
    assert kept.dtype == torch.long and kept.numel() == 40
    assert bool((kept[1:] > kept[:-1]).all())
    assert (kept // 64).bincount().tolist() == [10, 10, 10, 10]
    assert torch.equal(kept, policy.select(features.clone(), 4, (8, 8), 10))
    assert torch.equal(policy.select(features, 4, (8, 8), 64), torch.arange(256))


def test_first_group_is_the_image_policy():
    features, _, _ = _moving_scene()
    kept = TemporalCivicPolicy().select(features, 4, (8, 8), 6)
    assert torch.equal(kept[:6], CivicPolicy().select(features[:64], (8, 8), 6))


def test_later_groups_drop_repeats_and_keep_what_moved():
    """With a tight budget the image policy spends it on the static logo in every group; the
    video policy keeps the logo once and then the cells whose content changed."""
    features, logo, moving = _moving_scene()
    k = 3
    video = TemporalCivicPolicy(spatial=CivicPolicy(floor_fraction=0.0)).select(features, 4, (8, 8), k)
    for t in range(1, 4):
        kept = set((video[t * k : (t + 1) * k] - t * 64).tolist())
        spatial = set(CivicPolicy(floor_fraction=0.0).select(features[t * 64 : (t + 1) * 64], (8, 8), k).tolist())
        assert moving[t] in kept and moving[t - 1] in kept  # appeared here, vacated here
        assert len(spatial & set(logo)) > len(kept & set(logo))


def test_repetition_is_a_clipped_cosine():
    policy = TemporalCivicPolicy(tau=0.5)
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    b = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # cos 1, 0, 0.707
    assert policy.repetition(a, b).tolist() == pytest.approx([1.0, 0.0, (2 ** -0.5 - 0.5) / 0.5])


@pytest.mark.parametrize("kwargs", [{"temporal_weight": 1.5}, {"temporal_weight": -0.1}, {"tau": 1.0}])
def test_policy_parameters_are_checked(kwargs):
    with pytest.raises(ValueError):
        TemporalCivicPolicy(**kwargs)


@pytest.mark.parametrize(("groups", "grid", "k", "rows"), [(0, (8, 8), 4, 0), (3, (8, 8), 4, 128), (2, (8, 8), 65, 128),
                                                            (2, (8, 8), 0, 128)])
def test_bad_selection_inputs_raise(groups, grid, k, rows):
    with pytest.raises(ValueError):
        TemporalCivicPolicy().select(torch.randn(rows, 8), groups, grid, k)


def test_video_plan():
    plan = VideoRetention(num_groups=3, grid_hw=(4, 5), num_kept_per_group=7)
    assert (plan.tokens_per_group, plan.num_tokens, plan.num_kept, plan.keeps_all) == (20, 60, 21, False)
    rows, cols = plan.kept_cells(torch.tensor([0, 6, 27, 59]))
    assert rows.tolist() == [0, 1, 1, 3] and cols.tolist() == [0, 1, 2, 4]
    full = VideoRetention(num_groups=3, grid_hw=(4, 5), num_kept_per_group=20)
    assert torch.equal(select_video_tokens(torch.randn(60, 8), full), torch.arange(60))
    assert select_video_tokens(torch.randn(60, 8), plan).numel() == 21


def test_a_video_selects_at_its_exit_layer_on_mean_patch_rows():
    """At an exit layer a video's rows are 2x2 patch rows per merged token; the temporal policy
    reads their mean, exactly as on merged features, K_t per group."""
    plan = VideoRetention(num_groups=3, grid_hw=(4, 5), num_kept_per_group=7, exit_layer=2)
    assert [plan.selects_after(block, 6) for block in range(6)] == [False, True, False, False, False, False]
    assert VideoRetention(3, (4, 5), 7).selects_after(5, 6)  # no exit layer: after the last block
    assert plan.selects_in_tower(6) and not VideoRetention(3, (4, 5), 7).selects_in_tower(6)
    assert not VideoRetention(3, (4, 5), 20, exit_layer=2).selects_in_tower(6)  # keeps all: the stock pass
    assert not VideoRetention(3, (4, 5), 7, exit_layer=6).selects_in_tower(6)  # at the last block: on the output
    image = ImageRetention(grid_hw=(2, 2), num_kept=2, policy="civic", exit_layer=4)
    features = torch.randn(plan.num_tokens, 16)
    rows = features.repeat_interleave(GROUP_ROWS, dim=0) + 0.01 * torch.randn(GROUP_ROWS * plan.num_tokens, 16)
    hidden = torch.cat([torch.randn(GROUP_ROWS * 4, 16), rows])  # an image first: rows of both items
    kept = [None, None]
    assert select_after_block(1, 6, hidden, [4, plan.num_tokens], [None, None], [image, plan], kept) == [1]
    mean = rows.reshape(-1, GROUP_ROWS, 16).mean(dim=1)
    assert kept[0] is None and torch.equal(kept[1], select_video_tokens(mean, plan))
    per_group = (kept[1] // plan.tokens_per_group).bincount(minlength=3)
    assert per_group.tolist() == [7, 7, 7]


def test_sequence_rows_split_a_video_into_its_frame_groups():
    video = VideoRetention(num_groups=3, grid_hw=(4, 5), num_kept_per_group=7)
    image = ImageRetention(grid_hw=(2, 2), num_kept=2, policy="civic")
    assert sequence_rows([4, 60], [image, video]) == [16, 80, 80, 80]
    assert sequence_rows([2, 21], [image, video]) == [8, 28, 28, 28]  # after compaction


# -- positions ------------------------------------------------------------------------------


def test_frame_group_spans_find_each_groups_run():
    V, S, E = 9, 1, 2  # video token, vision start, vision end
    tokens = [5, 5, 7, 3, S, V, V, E, 4, S, V, V, E, 6, 6]
    spans = frame_group_spans(tokens, offset=3, length=10, video_token_id=V, num_full=4)
    assert spans == [ImageSpan(offset=5, num_kept=2, num_full=4), ImageSpan(offset=10, num_kept=2, num_full=4)]
    assert frame_group_spans(tokens, offset=0, length=3, video_token_id=V, num_full=4) == []


# -- civic plan --video ---------------------------------------------------------------------


def test_planner_video_tokens_and_timestamps():
    from civic_vllm import planner

    assert planner.parse_video_size("448x256x16") == (448, 256, 16)
    for bad in ("448x256", "0x2x2", "axbxc"):
        with pytest.raises(planner.PlanError, match="video size"):
            planner.parse_video_size(bad)
    assert planner.video_timestamps(8, 2) == [0.25, 1.25, 2.25, 3.25]
    assert planner.video_timestamps(3, 2) == [0.25, 1.0]  # the last frame fills the last group
    model = planner.load_model("tiny")
    plan = planner.make_plan(model, planner.PlanRequest(images=[], videos=[(256, 256, 8)], max_tokens=1))
    (video,) = plan.videos
    assert (video.grid_thw, video.tokens_per_group, video.merged_tokens) == ([4, 16, 16], 64, 256)
    assert plan.vanilla.retained_per_video == [256]
    kept = 4 * num_retained_per_group((4, 16, 16), 2, 1 / 3, text_tokens=video.span_text_tokens)
    assert video.span_text_tokens >= 4 * 2 + 4  # a timestamp of >= 1 token and 2 markers a group
    assert plan.civic[0].retained_per_video == [kept]
    assert plan.vanilla.prompt_tokens - plan.civic[0].prompt_tokens == 256 - kept
    assert 1 / 3 <= (kept + video.span_text_tokens) / (256 + video.span_text_tokens) < 1 / 3 + 4 / 256
    assert "request: video 256x256x8->4 groups of 256x256 (N=256);" in planner.render_table(plan)
    lower = planner.make_plan(model, planner.PlanRequest(images=[(448, 448)], videos=[(256, 256, 8)],
                                                         video_ratio=0.25, max_tokens=1))
    quarter = num_retained_per_group((4, 16, 16), 2, 0.25, text_tokens=video.span_text_tokens)
    assert lower.civic[0].retained_per_video == [4 * quarter]
    assert lower.civic[0].retained_per_image == [num_retained(196, 1 / 3)]
    with pytest.raises(planner.PlanError, match="at least one --image or --video"):
        planner.make_plan(model, planner.PlanRequest(images=[]))


def test_planner_video_exit_layer_counts_later_blocks_on_kept_tokens():
    from civic_vllm import planner
    from civic_vllm.cost import vision_flops

    model = planner.load_model("tiny")
    v = model.dims.vision
    on_output = planner.make_plan(model, planner.PlanRequest(images=[], videos=[(256, 256, 8)], max_tokens=1))
    at_exit = planner.make_plan(model, planner.PlanRequest(images=[], videos=[(256, 256, 8)], max_tokens=1,
                                                           video_exit_layer=1))
    k = num_retained_per_group((4, 16, 16), 2, 1 / 3, text_tokens=at_exit.videos[0].span_text_tokens)
    assert at_exit.civic[0].retained_per_video == on_output.civic[0].retained_per_video == [4 * k]
    assert at_exit.vanilla.vision_flops == on_output.vanilla.vision_flops  # vanilla has no exit layer
    assert on_output.civic[0].vision_flops == on_output.vanilla.vision_flops  # the whole tower, every token merged
    assert at_exit.civic[0].vision_flops == 4 * vision_flops(v, 4 * 64, k, 1)  # 4 groups of 256 patches each
    assert at_exit.civic[0].vision_flops < on_output.civic[0].vision_flops
    assert any("video exit layer 1" in note for note in at_exit.notes)
    with pytest.raises(planner.PlanError, match="--video-exit-layer must be in 1..4"):
        planner.make_plan(model, planner.PlanRequest(images=[], videos=[(256, 256, 8)], video_exit_layer=5))
