"""`vllm serve --model-impl civic` on the tiny Qwen3-VL, over HTTP."""

from __future__ import annotations

import json
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from helpers import QUESTIONS, chat, make_image, merged_tokens

from civic_vllm.budget import num_retained
from civic_vllm.prometheus import metric_value
from civic_vllm.serving import vllm_executable
from civic_vllm.vllm_adapter.model_impl import SUPPORTED_ARCHITECTURES

pytestmark = pytest.mark.e2e

SIZES = [(448, 448), (640, 320), (320, 512)]


def test_vllm_command_reports_version():
    result = subprocess.run([vllm_executable(), "--version"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "0.32.0" in result.stdout


def test_civic_class_serves_and_stock_class_without_flag(civic_server, vanilla_server):
    assert "CIVIC active: CivicQwen3VLForConditionalGeneration" in civic_server.log_text()
    assert "CIVIC active" not in vanilla_server.log_text()


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("question", QUESTIONS[:2])
def test_ratio_one_is_token_identical_to_vanilla(civic_server, vanilla_server, size, question):
    image = make_image(*size, seed=size[0])
    civic = chat(civic_server, [image], question, ratio=1.0)
    vanilla = chat(vanilla_server, [image], question)
    assert civic.prompt_tokens == vanilla.prompt_tokens
    assert civic.token_ids == vanilla.token_ids
    assert civic.logprobs == pytest.approx(vanilla.logprobs, abs=1e-4)


@pytest.mark.parametrize("exit_layer", [1, 2, 4])
def test_ratio_one_is_identical_to_vanilla_at_any_exit_layer(civic_server, vanilla_server, exit_layer):
    image = make_image(640, 320, seed=exit_layer)
    civic = chat(civic_server, [image], ratio=1.0, exit_layer=exit_layer)
    assert civic.token_ids == chat(vanilla_server, [image]).token_ids


@pytest.mark.parametrize("exit_layer", [0, 5, -1, 1.5, "2", True])
def test_invalid_exit_layer_is_a_clear_400(civic_server, exit_layer):
    with pytest.raises(Exception) as err:
        chat(civic_server, [make_image(64, 64)], max_tokens=2, ratio=0.5, exit_layer=exit_layer)
    assert "400" in str(err.value) and "civic_exit_layer" in str(err.value)


def test_batch_mixing_sizes_ratios_and_exit_layers_matches_serial(civic_server):
    jobs = [(SIZES[i % 3], ratio, exit_layer) for i, (ratio, exit_layer) in
            enumerate([(1 / 3, 1), (0.5, None), (0.25, 2), (1.0, 3), (1 / 3, 4), (0.1, 1)])]

    def run(job):
        (w, h), ratio, exit_layer = job
        return chat(civic_server, [make_image(w, h, seed=w + 2 * h)], ratio=ratio, exit_layer=exit_layer)

    serial = [run(job) for job in jobs]
    with ThreadPoolExecutor(len(jobs)) as pool:
        concurrent = list(pool.map(run, jobs))
    assert [c.token_ids for c in concurrent] == [s.token_ids for s in serial]


def test_server_default_ratio_is_one(civic_server, vanilla_server):
    image = make_image(448, 448, seed=3)
    assert chat(civic_server, [image]).token_ids == chat(vanilla_server, [image]).token_ids


@pytest.mark.parametrize("ratio", [0.5, 1 / 3, 0.25, 0.1])
def test_prompt_holds_exactly_k_image_tokens(civic_server, vanilla_server, ratio):
    images = [make_image(w, h, seed=i) for i, (w, h) in enumerate(SIZES)]
    full = chat(vanilla_server, images, max_tokens=1).prompt_tokens
    compact = chat(civic_server, images, ratio=ratio, max_tokens=1).prompt_tokens
    n = [merged_tokens(w, h) for w, h in SIZES]
    assert compact == full - sum(n) + sum(num_retained(x, ratio) for x in n)


@pytest.mark.parametrize(
    "ratio", [0, -0.5, 1.5, float("nan"), "0.5", "half", None, True, [0.3]], ids=repr
)
def test_invalid_ratio_is_a_clear_400_and_server_keeps_serving(civic_server, ratio):
    body = {
        "model": civic_server.config.model,
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": _data_url(make_image(64, 64))}},
            {"type": "text", "text": "hi"}]}],
        "max_tokens": 2,
        "mm_processor_kwargs": {"civic_ratio": ratio},
    }
    # json.dumps writes NaN as the bare token NaN, as a careless client would.
    response = requests.post(civic_server.url + "/v1/chat/completions", data=json.dumps(body),
                             headers={"Content-Type": "application/json"}, timeout=60)
    assert response.status_code == 400, response.text
    assert "civic_ratio" in response.text
    assert requests.get(civic_server.url + "/health", timeout=10).status_code == 200
    assert chat(civic_server, [make_image(64, 64)], ratio=0.5, max_tokens=2).token_ids


def test_unknown_civic_setting_is_a_400(civic_server):
    with pytest.raises(Exception) as err:
        chat(civic_server, [make_image(64, 64)], max_tokens=2, ratoi=0.5)
    assert "400" in str(err.value) and "civic_ratoi" in str(err.value)


def test_batched_requests_with_mixed_ratios_and_sizes_match_serial(civic_server):
    jobs = [(SIZES[i % 3], r) for i, r in enumerate([1.0, 0.5, 1 / 3, 0.25, 0.1, 0.5])]

    def run(job):
        (w, h), ratio = job
        return chat(civic_server, [make_image(w, h, seed=w + h)], ratio=ratio)

    serial = [run(job) for job in jobs]
    with ThreadPoolExecutor(len(jobs)) as pool:
        concurrent = list(pool.map(run, jobs))
    for alone, together in zip(serial, concurrent):
        assert together.prompt_tokens == alone.prompt_tokens
        assert together.token_ids == alone.token_ids


def test_chunked_prefill_matches_between_civic_and_vanilla_at_ratio_one(civic_server, vanilla_server):
    # Three 448x448 images: about 600 prompt tokens, prefilled in chunks of 256.
    images = [make_image(448, 448, seed=s) for s in (11, 12, 13)]
    civic = chat(civic_server, images, ratio=1.0)
    assert civic.prompt_tokens > 2 * civic_server.config.max_num_batched_tokens
    assert civic.token_ids == chat(vanilla_server, images).token_ids


def test_prefix_cache_hit_gives_same_output(civic_server):
    image = make_image(896, 896, seed=21)  # 784 tokens, 262 kept: two full 128-token KV blocks
    before = metric_value(civic_server.metrics(), "vllm:prefix_cache_hits_total")
    first = chat(civic_server, [image], "What shape is it?", ratio=1 / 3)
    second = chat(civic_server, [image], "What shape is it?", ratio=1 / 3)
    after = metric_value(civic_server.metrics(), "vllm:prefix_cache_hits_total")
    assert second.token_ids == first.token_ids
    assert after - before >= 256


def test_civic_metrics_count_visual_tokens_on_cache_hits_too(civic_server):
    names = ["civic:visual_tokens_total", "civic:visual_tokens_retained_total", "civic:images_total"]
    before = [metric_value(civic_server.metrics(), name) for name in names]
    image = make_image(448, 448, seed=31)
    for _ in range(2):  # the second request is served from vLLM's processor cache
        chat(civic_server, [image], ratio=0.25, max_tokens=1)
    after = [metric_value(civic_server.metrics(), name) for name in names]
    assert [a - b for a, b in zip(after, before)] == [2 * 196, 2 * 49, 2]


def _data_url(image):
    from civic_vllm.client import image_data_url

    return image_data_url(image)


def test_model_impl_civic_refuses_other_architectures(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                vocab_size=256, architectures=["LlamaForCausalLM"]).save_pretrained(tmp_path)
    result = subprocess.run(
        [vllm_executable(), "serve", str(tmp_path), "--model-impl", "civic", "--port", "1"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode != 0
    supported = ", ".join(SUPPORTED_ARCHITECTURES)  # all four Qwen3-VL-family classes
    assert f"--model-impl civic supports {supported} only" in result.stdout + result.stderr
    assert "Qwen3_5MoeForConditionalGeneration" in supported
    assert "LlamaForCausalLM" in result.stdout + result.stderr
