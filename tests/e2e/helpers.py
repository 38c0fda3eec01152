"""Chat calls shared by the end-to-end tests."""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass

import numpy as np
import openai
import torch
from PIL import Image

from civic_vllm.budget import num_retained
from civic_vllm.client import civic_body, image_message
from civic_vllm.hf_compact import build_compact_batch, compact_greedy
from civic_vllm.retention.plan import ImageRetention
from civic_vllm.serving import ServerConfig, VllmServer, metric_value

MAX_TOKENS = 8  # greedy tokens compared with the HF reference
# Small enough that a 3-image prompt is prefilled in several chunks.
CHUNK_TOKENS = 256

QUESTIONS = ["Describe this image.", "What is in the picture?", "What color is the shape?"]


@dataclass
class Reply:
    token_ids: list[int]
    logprobs: list[float]
    prompt_tokens: int
    text: str


def test_server(model: str, *, civic: bool, **overrides) -> VllmServer:
    """The e2e tests' server: fp32 (so batching and chunking cannot flip a greedy token through bf16
    rounding), chunked prefill at CHUNK_TOKENS, request settings trusted on civic servers."""
    settings = {"dtype": "float32", "max_num_batched_tokens": CHUNK_TOKENS, **overrides}
    return VllmServer(ServerConfig(model=model, civic=civic, trust_request_mm_kwargs=civic, **settings))


test_server.__test__ = False  # a helper, not a test, despite its name


def client_for(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def chat(
    server, images, question="Describe this image.", *, ratio=None, max_tokens=8, ignore_eos=False, **settings
) -> Reply:
    client = client_for(server)
    body = {"return_tokens_as_token_ids": True, "ignore_eos": ignore_eos, **civic_body(ratio, **settings)}
    response = client.chat.completions.create(
        model=server.config.model,
        messages=image_message(question, images),
        max_tokens=max_tokens,
        temperature=0,
        logprobs=True,
        extra_body=body,
    )
    choice = response.choices[0]
    content = choice.logprobs.content
    return Reply(
        token_ids=[int(t.token.split(":", 1)[1]) for t in content],
        logprobs=[t.logprob for t in content],
        prompt_tokens=response.usage.prompt_tokens,
        text=choice.message.content,
    )


def make_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A structured image (gradient + blocks) so retention has something to choose."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], -1)
    image = base.astype(np.uint8)
    for _ in range(4):
        cx, cy = rng.integers(0, width), rng.integers(0, height)
        size = int(rng.integers(16, 64))
        image[max(cy - size, 0) : cy + size, max(cx - size, 0) : cx + size] = rng.integers(0, 255, 3)
    return Image.fromarray(image)


def merged_tokens(width: int, height: int) -> int:
    """Tokens of an image whose sides are multiples of 32 and within the tiny preset's pixel bounds."""
    return (width // 32) * (height // 32)


def hf_reference(hf, images, question, ratio, policy, exit_layer=None, scorer=None, forced=None, best=None):
    """(prompt tokens, greedy tokens, logprobs) of the HF transformers reference of one retention.

    ``hf`` is (model, processor) of the served checkpoint; ``scorer`` the checkpoint's trained
    scorer for the learned policy; ``forced`` / ``best``: see ``compact_greedy``.
    """
    model, processor = hf
    messages = [{"role": "user", "content": [{"type": "image"}] * len(images) + [{"type": "text", "text": question}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text], images=images, return_tensors="pt")
    merge = model.config.vision_config.spatial_merge_size
    plans = []
    for _, h, w in inputs["image_grid_thw"].tolist():
        n = (h // merge) * (w // merge)
        plans.append(ImageRetention(grid_hw=(h // merge, w // merge), num_kept=num_retained(n, ratio), policy=policy,
                                    exit_layer=exit_layer))
    raw = processor.image_processor(images=images, do_rescale=False, do_normalize=False, return_tensors="pt")
    batch = build_compact_batch(
        model, inputs["input_ids"], inputs["pixel_values"], inputs["image_grid_thw"],
        inputs["mm_token_type_ids"], plans, seed_pixels=raw["pixel_values"].round().to(torch.uint8), scorer=scorer,
    )
    tokens, logprobs = compact_greedy(model, batch, MAX_TOKENS, forced=forced, best_logprobs=best)
    return batch.input_ids.shape[1], tokens, logprobs


def pool_blocks(server) -> int:
    """``num_gpu_blocks`` of the server's KV pool (the null block included)."""
    for line in server.metrics().splitlines():
        if line.startswith("vllm:cache_config_info{"):
            return int(re.search(r'num_gpu_blocks="(\d+)"', line).group(1))
    raise AssertionError("vllm:cache_config_info not in /metrics")


def blocks_while_decoding(server, images, question, ratio, max_tokens) -> list[tuple[int, int]]:
    """(output tokens so far, KV blocks in use) samples while one request decodes alone.

    Blocks in use = ``vllm:kv_cache_usage_perc`` x (num_gpu_blocks - 1): vLLM's BlockPool leaves
    the null block out of both sides. Both metrics come from one scrape, set in one engine step
    (see tests/e2e/test_planner_server.py for why that pairs them exactly).
    """
    usable = pool_blocks(server) - 1
    done: list[BaseException | None] = []

    def send():
        try:
            chat(server, images, question, ratio=ratio, max_tokens=max_tokens, ignore_eos=True)
            done.append(None)
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            done.append(exc)

    before = metric_value(server.metrics(), "vllm:generation_tokens_total")
    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    samples = []
    while thread.is_alive():
        text = server.metrics()
        generated = round(metric_value(text, "vllm:generation_tokens_total") - before)
        if generated >= 1 and metric_value(text, "vllm:num_requests_running") == 1:
            samples.append((generated, round(metric_value(text, "vllm:kv_cache_usage_perc") * usable)))
    thread.join()
    if done and done[0] is not None:
        raise done[0]
    return samples
