"""vLLM's own EVS (``--video-pruning-rate``) serving video on the CPU backend, with ``benchmarks/evs_cpu`` on the
server's PYTHONPATH exactly as the video benchmarks run their EVS server (``benchmarks.harness.evs_cpu_env``).

Without the shim the first video request kills the engine: the CPU runner never enables the pruning path, and
EVS's M-RoPE recomputation misreads the outer ``<|vision_start|>`` of transformers >= 5.10 (see the shim).
This checks that the import hooks reach the server's worker; tests/unit/test_evs_cpu_shim.py checks the positions.
"""

from __future__ import annotations

import pytest
import requests
from helpers import make_image, make_video, test_server
from transformers import AutoConfig

from benchmarks.harness import evs_cpu_env
from benchmarks.video_serve import evs_kept
from civic_vllm.client import image_data_url, video_data_url, video_part

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

RATE = 2 / 3
GROUPS, GROUP_TOKENS = 4, 64  # make_video() defaults: 8 frames of 256x256


@pytest.fixture(scope="module")
def evs_server(tiny_model):
    with test_server(tiny_model, civic=False, videos_per_prompt=1, images_per_prompt=1,
                     profile_video_size=(256, 256, 8), profile_image_size=(64, 64),
                     extra_args=["--video-pruning-rate", repr(RATE)], extra_env=evs_cpu_env()) as server:
        yield server


def test_evs_serves_video_alone_and_with_an_image_in_either_order(evs_server):
    video_id = AutoConfig.from_pretrained(evs_server.config.model).video_token_id
    video = video_part(video_data_url(make_video()))
    image = {"type": "image_url", "image_url": {"url": image_data_url(make_image(64, 64, seed=3))}}
    question = {"type": "text", "text": "What moves in the video?"}
    for content in ([video, question], [video, image, question], [image, video, question]):
        body = {"model": evs_server.config.model, "messages": [{"role": "user", "content": content}],
                "max_tokens": 4, "temperature": 0, "return_token_ids": True}
        response = requests.post(evs_server.url + "/v1/chat/completions", json=body, timeout=300)
        assert response.status_code == 200, f"{response.text[:300]}\n{evs_server.log_tail()}"
        reply = response.json()
        assert reply["prompt_token_ids"].count(video_id) == evs_kept(GROUP_TOKENS, GROUPS, RATE)
        assert reply["usage"]["completion_tokens"] >= 1
    assert requests.get(evs_server.url + "/health", timeout=10).status_code == 200
