"""Video through a real `vllm serve --model-impl civic` on the tiny Qwen3-VL (fp32), against vanilla
vLLM and the HF transformers reference.

The servers accept one video and a few images per prompt; vLLM profiles the encoder with an
8-frame 256x256 dummy video (a max-size one takes minutes on CPU). Videos are mp4 data URLs
at 2 frames a second (every frame reaches the model): 8 frames of 256x256 are 4 frame groups
of 8x8 = 64 merged tokens.
"""

from __future__ import annotations

import pytest
import requests
from helpers import (
    MAX_TOKENS,
    assert_still_serving,
    blocks_during_decode,
    cache_config,
    chat,
    error_message,
    hf_media_reference,
    make_image,
    make_video,
    planner_argv,
    pool_blocks,
    post_chat,
    run_planner,
    test_server,
    video_span_text,
)
from transformers import AutoConfig

from civic_vllm.budget import num_retained_per_group
from civic_vllm.client import civic_body, video_data_url, video_part
from civic_vllm.planner import kv_blocks, kv_tokens
from civic_vllm.prometheus import metric_value

pytestmark = pytest.mark.e2e

GROUPS, GROUP_TOKENS = 4, 64  # make_video() defaults: 8 frames of 256x256
VIDEO_TOKENS = GROUPS * GROUP_TOKENS
QUESTION = "What moves in the video?"
VIDEO_EXIT_LAYER = 1  # of the tiny model's vision blocks
VIDEO_SERVER = dict(videos_per_prompt=1, images_per_prompt=2, profile_video_size=(256, 256, 8),
                    profile_image_size=(448, 448))


@pytest.fixture(scope="module")
def video_civic(tiny_model):
    with test_server(tiny_model, civic=True, **VIDEO_SERVER) as server:
        yield server


@pytest.fixture(scope="module")
def video_vanilla(tiny_model):
    with test_server(tiny_model, civic=False, **VIDEO_SERVER) as server:
        yield server


@pytest.fixture(scope="module")
def video():
    return video_data_url(make_video(seed=3))


@pytest.fixture(scope="module")
def span_text(tiny_model) -> int:
    """T of make_video(): each group's timestamp and vision markers, kept at every ratio."""
    return video_span_text(tiny_model, 2 * GROUPS)


def kept_video_tokens(ratio: float, span_text: int) -> int:
    """Video tokens civic keeps of make_video(): r counts the whole span, timestamps and markers too."""
    return GROUPS * num_retained_per_group((GROUPS, 16, 16), 2, ratio, text_tokens=span_text)


def video_tokens(server, parts, ratio=None, **settings) -> int:
    """Video placeholders of the served prompt: <|video_pad|> tokens among its prompt token ids."""
    body = {"model": server.config.model, "max_tokens": 1, "return_token_ids": True,
            "messages": [{"role": "user", "content": [*parts, {"type": "text", "text": QUESTION}]}],
            **civic_body(ratio, **settings)}
    response = requests.post(server.url + "/v1/chat/completions", json=body, timeout=300)
    response.raise_for_status()
    video_token_id = AutoConfig.from_pretrained(server.config.model).video_token_id
    return response.json()["prompt_token_ids"].count(video_token_id)


# -- ratio 1 is vanilla ---------------------------------------------------------------------


@pytest.mark.parametrize("order", ["video", "video-image", "image-video"])
def test_ratio_one_is_token_identical_to_vanilla(video_civic, video_vanilla, video, order):
    image = make_image(320, 256, seed=4)
    parts = {"video": [video_part(video)], "video-image": [video_part(video), image],
             "image-video": [image, video_part(video)]}[order]
    civic = chat(video_civic, parts, QUESTION, ratio=1.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    vanilla = chat(video_vanilla, parts, QUESTION, max_tokens=MAX_TOKENS, ignore_eos=True)
    assert civic.prompt_tokens == vanilla.prompt_tokens
    assert civic.token_ids == vanilla.token_ids
    assert civic.logprobs == pytest.approx(vanilla.logprobs, abs=1e-4)


# -- fewer placeholders, fewer KV blocks ----------------------------------------------------


def test_video_placeholders_at_a_third(video_civic, video_vanilla, video, span_text):
    parts = [video_part(video)]
    vanilla = video_tokens(video_vanilla, parts)
    civic = video_tokens(video_civic, parts, ratio=1 / 3)
    assert vanilla == VIDEO_TOKENS
    assert civic == kept_video_tokens(1 / 3, span_text)
    # The whole placeholder span (small 256 px frames: 64 tokens a group, a timestamp and markers).
    assert 1 / 3 <= (civic + span_text) / (vanilla + span_text) <= 0.36
    # civic_video_ratio alone sets the video's retention; civic_ratio then applies to images only.
    assert video_tokens(video_civic, parts, ratio=1.0, video_ratio=0.25) == kept_video_tokens(0.25, span_text)


def test_kv_blocks_follow_the_kept_tokens(video_civic, video_vanilla, video, span_text):
    """Blocks in use while each request decodes == ceil((prompt + g - 1) / block size), so the
    civic request holds the blocks of its shorter prompt only."""
    block_size = int(cache_config(video_civic)["block_size"])
    parts = [video_part(video)]
    held = {}
    for name, server, ratio in (("civic", video_civic, 1 / 3), ("vanilla", video_vanilla, None)):
        samples, usage = blocks_during_decode(server, parts, QUESTION, ratio, max_tokens=1500,
                                              usable_blocks=pool_blocks(server) - 1)
        assert samples, "no decode step sampled"
        wrong = [(g, blocks) for g, blocks in samples
                 if blocks != kv_blocks(kv_tokens(usage["prompt_tokens"], g), block_size)]
        assert not wrong, (name, usage, wrong)
        held[name] = usage["prompt_tokens"]
    text_tokens = held["vanilla"] - VIDEO_TOKENS
    assert held["civic"] - text_tokens == kept_video_tokens(1 / 3, span_text)
    assert kv_blocks(held["civic"], block_size) < kv_blocks(held["vanilla"], block_size)


@pytest.mark.parametrize("with_image", [False, True], ids=["video", "video+image"])
def test_planner_counts_the_served_prompt(video_civic, video_vanilla, video, with_image):
    """``civic plan --video 256x256x8`` gives the prompt tokens both servers really use."""
    image = make_image(320, 256, seed=4)
    argv = planner_argv(video_civic.config.model, [(320, 256)] if with_image else [], 1 / 3, QUESTION)
    plan = run_planner([*argv, "--video", "256x256x8"])["scenarios"]
    parts = [video_part(video), *([image] if with_image else [])]
    assert chat(video_vanilla, parts, QUESTION, max_tokens=1).prompt_tokens == plan[0]["prompt_tokens"]
    assert chat(video_civic, parts, QUESTION, ratio=1 / 3, max_tokens=1).prompt_tokens == plan[1]["prompt_tokens"]


def test_video_metrics_count_tokens_before_and_after_retention(video_civic, video, span_text):
    names = ["civic:video_tokens_total", "civic:video_tokens_retained_total", "civic:videos_total"]
    before = [metric_value(video_civic.metrics(), name) for name in names]
    for _ in range(2):  # the second request is served from vLLM's processor cache
        chat(video_civic, [video_part(video)], QUESTION, ratio=1 / 3, max_tokens=1)
    after = [metric_value(video_civic.metrics(), name) for name in names]
    kept = kept_video_tokens(1 / 3, span_text)
    assert [a - b for a, b in zip(after, before)] == [2 * VIDEO_TOKENS, 2 * kept, 2]


# -- the HF transformers reference ------------------------------------------------------------


@pytest.mark.parametrize("ratio", [0.5, 1 / 3], ids=["r0.5", "r0.33"])
@pytest.mark.parametrize("order", ["video", "video-image", "image-video"])
def test_video_matches_hf_reference(video_civic, hf, video, ratio, order):
    image = make_image(320, 256, seed=4)
    items = {"video": [video], "video-image": [video, image], "image-video": [image, video]}[order]
    prompt_len, tokens, logprobs = hf_media_reference(hf, items, QUESTION, ratio)
    parts = [video_part(item) if isinstance(item, str) else item for item in items]
    served = chat(video_civic, parts, QUESTION, ratio=ratio, max_tokens=MAX_TOKENS, ignore_eos=True)
    assert served.prompt_tokens == prompt_len
    assert served.token_ids == tokens
    assert served.logprobs == pytest.approx(logprobs, abs=2e-3)


@pytest.mark.parametrize("order", ["video", "image-video"])
def test_video_exit_layer_matches_hf_reference(video_civic, hf, video, order):
    """With civic_video_exit_layer the temporal policy selects after that block and the later
    blocks run on the kept rows only; the HF reference does the same in transformers' tower."""
    image = make_image(320, 256, seed=4)
    items = {"video": [video], "image-video": [image, video]}[order]
    prompt_len, tokens, logprobs = hf_media_reference(hf, items, QUESTION, 1 / 3, video_exit_layer=VIDEO_EXIT_LAYER)
    parts = [video_part(item) if isinstance(item, str) else item for item in items]
    served = chat(video_civic, parts, QUESTION, ratio=1 / 3, max_tokens=MAX_TOKENS, ignore_eos=True,
                  video_exit_layer=VIDEO_EXIT_LAYER)
    assert served.prompt_tokens == prompt_len
    assert served.token_ids == tokens
    assert served.logprobs == pytest.approx(logprobs, abs=2e-3)
    # Guards against an exit layer that is silently ignored: selecting on the encoder output differs.
    on_output = chat(video_civic, parts, QUESTION, ratio=1 / 3, max_tokens=MAX_TOKENS, ignore_eos=True)
    assert on_output.prompt_tokens == served.prompt_tokens
    assert on_output.logprobs != pytest.approx(served.logprobs, abs=1e-4)


def test_retention_changes_what_the_model_sees(video_civic, video, span_text):
    """Guards the reference test against a ratio that is silently ignored for video."""
    full = chat(video_civic, [video_part(video)], QUESTION, ratio=1.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    third = chat(video_civic, [video_part(video)], QUESTION, ratio=1 / 3, max_tokens=MAX_TOKENS, ignore_eos=True)
    assert full.prompt_tokens - third.prompt_tokens == VIDEO_TOKENS - kept_video_tokens(1 / 3, span_text)
    assert third.logprobs != pytest.approx(full.logprobs, abs=1e-4)


# -- bad input --------------------------------------------------------------------------------


def _bad_videos():
    yield "zero-frames", video_part("data:video/mp4;base64,"), None
    yield "corrupt-bytes", video_part("data:video/mp4;base64," + "AAAAGGZ0eXBtcDQy" + "QUJD" * 64), None
    # 64 frames of 640x640 at ratio 1: 16 sampled groups of 400 tokens, past max_model_len.
    yield "absurd-frame-count", video_part(video_data_url(make_video(frames=64, width=640, height=640))), \
        {"civic_ratio": 1.0}


BAD = list(_bad_videos())


@pytest.mark.parametrize(("part", "mm_kwargs"), [case[1:] for case in BAD], ids=[case[0] for case in BAD])
def test_bad_video_is_a_4xx_and_the_server_keeps_serving(video_civic, part, mm_kwargs):
    response = post_chat(video_civic, [part, {"type": "text", "text": QUESTION}], mm_kwargs=mm_kwargs)
    assert 400 <= response.status_code < 500, response.text[:500]
    assert error_message(response)
    assert_still_serving(video_civic)


@pytest.mark.parametrize("value", [0, 99, "1", True])
def test_bad_video_exit_layer_names_the_setting(video_civic, value):
    part = video_part(video_data_url(make_video(frames=4)))
    response = post_chat(video_civic, [part, {"type": "text", "text": QUESTION}],
                         mm_kwargs={"civic_video_exit_layer": value, "civic_ratio": 0.5})
    assert response.status_code == 400, response.text[:500]
    assert "civic_video_exit_layer" in error_message(response)
    assert_still_serving(video_civic)


def test_bad_video_ratio_names_the_setting(video_civic):
    part = video_part(video_data_url(make_video(frames=4)))
    response = post_chat(video_civic, [part, {"type": "text", "text": QUESTION}],
                         mm_kwargs={"civic_video_ratio": 0})
    assert response.status_code == 400
    assert "civic_video_ratio" in error_message(response) and "(0, 1]" in error_message(response)

