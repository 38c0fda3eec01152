"""Chat calls shared by the end-to-end tests."""

from __future__ import annotations

import contextlib
import io
import json
import re
import threading
import time
from dataclasses import dataclass

import numpy as np
import openai
import requests
import torch
from PIL import Image

from civic_vllm.budget import num_retained, num_retained_per_group, video_span_text_tokens
from civic_vllm.cli import plan as plan_cli
from civic_vllm.client import civic_body, decode_video, image_message
from civic_vllm.hf_compact import VideoInputs, build_compact_batch, compact_greedy
from civic_vllm.planner import video_timestamps
from civic_vllm.prometheus import metric_labels, metric_value
from civic_vllm.retention.selection import ImageRetention, VideoRetention
from civic_vllm.serving import ServerConfig, VllmServer

MAX_TOKENS = 8  # greedy tokens compared with the HF reference
# Small enough that a 3-image prompt is prefilled in several chunks.
CHUNK_TOKENS = 256

# Small enough that a 3-image prompt is prefilled in several chunks.
CHUNK_TOKENS = 256

QUESTIONS = ["Describe this image.", "What is in the picture?", "What color is the shape?"]


@dataclass
class Reply:
    token_ids: list[int]
    logprobs: list[float]
    prompt_tokens: int
    text: str


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


def chat_text(processor, media: list[dict], question: str) -> str:
    """The chat-template prompt of one user turn: ``media`` parts, then the question."""
    messages = [{"role": "user", "content": [*media, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def image_retention_list(model, image_grid_thw, ratio, policy, exit_layer=None,
                         exit_context=False) -> list[ImageRetention]:
    """One ``ImageRetention`` per image of an HF batch: K = num_retained(N, ratio) of its merged grid."""
    merge = model.config.vision_config.spatial_merge_size
    retentions = []
    for _, h, w in image_grid_thw.tolist():
        grid = (h // merge, w // merge)
        retentions.append(ImageRetention(grid_hw=grid, num_kept=num_retained(grid[0] * grid[1], ratio),
                                         policy=policy, exit_layer=exit_layer, exit_context=exit_context))
    return retentions


def hf_reference(hf, images, question, ratio, policy, exit_layer=None, scorer=None, forced=None, best=None,
                 exit_context=False):
    """(prompt tokens, greedy tokens, logprobs) of the HF transformers reference of one retention.

    ``hf`` is (model, processor) of the served checkpoint; ``scorer`` the checkpoint's trained
    scorer for the learned policy; ``forced`` / ``best``: see ``compact_greedy``.
    """
    model, processor = hf
    text = chat_text(processor, [{"type": "image"}] * len(images), question)
    inputs = processor(text=[text], images=images, return_tensors="pt")
    retentions = image_retention_list(model, inputs["image_grid_thw"], ratio, policy, exit_layer, exit_context)
    raw = processor.image_processor(images=images, do_rescale=False, do_normalize=False, return_tensors="pt")
    batch = build_compact_batch(
        model, inputs["input_ids"], inputs["pixel_values"], inputs["image_grid_thw"],
        inputs["mm_token_type_ids"], retentions, seed_pixels=raw["pixel_values"].round().to(torch.uint8), scorer=scorer,
    )
    tokens, logprobs = compact_greedy(model, batch, MAX_TOKENS, forced=forced, best_logprobs=best)
    return batch.input_ids.shape[1], tokens, logprobs


def make_video(frames: int = 8, width: int = 256, height: int = 256, seed: int = 0) -> np.ndarray:
    """[frames, H, W, 3] uint8: a static structured background (``make_image``) with a square
    that moves a step right every frame, so frame groups repeat each other except where it moved."""
    background = np.asarray(make_image(width, height, seed=seed))
    rng = np.random.default_rng(seed + 1)
    color, size = rng.integers(0, 255, 3), max(width, height) // 8
    video = np.repeat(background[None], frames, axis=0).copy()
    for t in range(frames):
        x, y = (t * width) // (frames + 1), height // 2
        video[t, y : y + size, x : x + size] = color
    return video


def video_span_text(model: str, frames: int, fps: float = 2.0) -> int:
    """T of a ``frames``-frame video at ``fps``: each frame group's timestamp and vision markers."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    return video_span_text_tokens(video_timestamps(frames, 2, fps),
                                  lambda text: len(tokenizer.encode(text, add_special_tokens=False)))


def hf_media_reference(hf, items, question, ratio, video_exit_layer=None):
    """(prompt tokens, greedy tokens, logprobs) of the HF reference for images and videos (video
    data URLs) in prompt order, retained at ``ratio`` with the civic policy (temporal for videos,
    selecting after ``video_exit_layer`` vision blocks; None: on the encoder output)."""
    from transformers.video_utils import VideoMetadata

    model, processor = hf
    text = chat_text(processor, [{"type": "video"} if isinstance(item, str) else {"type": "image"} for item in items],
                     question)
    images = [item for item in items if not isinstance(item, str)]
    decoded = [decode_video(item) for item in items if isinstance(item, str)]
    kwargs = {}
    if decoded:
        (frames, metadata), *others = decoded
        assert not others, "one video per reference prompt"
        kwargs = dict(videos=[frames], do_sample_frames=metadata["do_sample_frames"],
                      video_metadata=[VideoMetadata(**{k: v for k, v in metadata.items() if k != "do_sample_frames"})])
    inputs = processor(text=[text], images=images or None, return_tensors="pt", **kwargs)
    merge = model.config.vision_config.spatial_merge_size
    retentions = image_retention_list(model, inputs["image_grid_thw"], ratio, "civic") if images else []
    videos = None
    if decoded:
        # The ratio counts the video's whole span: its timestamps, as HF wrote them, and markers too.
        tokenizer = processor.tokenizer
        stamps = re.findall(r"<([0-9.]+) seconds>", tokenizer.decode(inputs["input_ids"][0]))
        text_tokens = video_span_text_tokens(stamps, lambda text: len(tokenizer.encode(text, add_special_tokens=False)))
        video_retentions = [VideoRetention(num_groups=t, grid_hw=(h // merge, w // merge),
                                           num_kept_per_group=num_retained_per_group((t, h, w), merge, ratio,
                                                                                     text_tokens=text_tokens),
                                           exit_layer=video_exit_layer)
                            for t, h, w in inputs["video_grid_thw"].tolist()]
        videos = VideoInputs(inputs["pixel_values_videos"], inputs["video_grid_thw"], video_retentions)
    batch = build_compact_batch(model, inputs["input_ids"], inputs.get("pixel_values"), inputs.get("image_grid_thw"),
                                inputs["mm_token_type_ids"], retentions, videos=videos)
    tokens, logprobs = compact_greedy(model, batch, MAX_TOKENS)
    return batch.input_ids.shape[1], tokens, logprobs


def post_chat(server, content, *, mm_kwargs=None, max_tokens=2, timeout=120) -> requests.Response:
    """A raw chat request (json.dumps writes NaN/Infinity as bare tokens, as a careless client would)."""
    body = {
        "model": server.config.model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
    }
    if mm_kwargs is not None:
        body["mm_processor_kwargs"] = mm_kwargs
    return requests.post(server.url + "/v1/chat/completions", data=json.dumps(body),
                         headers={"Content-Type": "application/json"}, timeout=timeout)


def assert_still_serving(server) -> None:
    """Healthy, answers a normal request, and back to an idle KV cache (no leaked blocks)."""
    assert requests.get(server.url + "/health", timeout=10).status_code == 200
    assert chat(server, [make_image(64, 64, seed=5)], ratio=0.5, max_tokens=2).token_ids
    idle = server.wait_until_idle()
    assert all(v == 0 for v in idle.values()), idle


def error_message(response: requests.Response) -> str:
    payload = response.json()
    error = payload.get("error", payload)
    return error.get("message", str(error)) if isinstance(error, dict) else str(error)


def test_server(model: str, *, civic: bool, startup_timeout: float = 300.0, log_path=None, **overrides) -> VllmServer:
    """A test server: fp32 unless overridden (greedy tokens compare exactly), chunked prefill at CHUNK_TOKENS,
    request kwargs trusted for civic."""
    settings = {"dtype": "float32", "max_num_batched_tokens": CHUNK_TOKENS, **overrides}
    config = ServerConfig(model=model, civic=civic, trust_request_mm_kwargs=civic, **settings)
    return VllmServer(config, startup_timeout=startup_timeout, log_path=log_path)


test_server.__test__ = False  # a factory, not a test


def ratio_arg(ratio: float) -> str:
    return "1/3" if ratio == 1 / 3 else repr(ratio)


def planner_argv(model: str, sizes, ratio: float, question: str, max_tokens: int = 1,
                 kv_cache: str = "1GiB") -> list[str]:
    """``civic plan`` flags for a CPU test server (fp32, ``kv_cache`` pool) and one request."""
    argv = ["--model", model, "--question", question, "--ratio", ratio_arg(ratio),
            "--max-tokens", str(max_tokens), "--device", "cpu", "--dtype", "float32",
            "--kv-cache-memory", kv_cache]
    for width, height in sizes:
        argv += ["--image", f"{width}x{height}"]
    return argv


def run_planner(argv: list[str]) -> dict:
    """``civic plan ARGV --json`` in-process, as an operator would run it for this server."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = plan_cli.main([*argv, "--json"])
    assert code == 0, err.getvalue()
    return json.loads(out.getvalue())


def cache_config(server) -> dict[str, str]:
    """The labels of ``vllm:cache_config_info`` (num_gpu_blocks, block_size, ...)."""
    labels = metric_labels(server.metrics(), "vllm:cache_config_info")
    assert labels, "vllm:cache_config_info not in /metrics"
    return labels


class HeldRequest:
    """One chat held in decode for max_tokens (ignore_eos), sent from a thread.

    Not streamed: the output tokens come from the server's own counter, and without a stream
    the API server (which also answers /metrics) has far less to do on a 2-core machine.
    """

    def __init__(self, server, images, question: str, ratio: float, max_tokens: int):
        self.usage: dict | None = None
        self.error: BaseException | None = None
        body = {
            "model": server.config.model, "messages": image_message(question, images),
            "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, **civic_body(ratio),
        }
        self.thread = threading.Thread(target=self._send, args=(server.url, body), daemon=True)
        self.thread.start()

    def _send(self, url: str, body: dict) -> None:
        try:
            response = requests.post(url + "/v1/chat/completions", json=body, timeout=300)
            response.raise_for_status()
            self.usage = response.json()["usage"]
        except Exception as exc:  # noqa: BLE001 - re-raised by the caller through self.error
            self.error = exc


def wait_idle(server, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = server.metrics()
        if (metric_value(text, "vllm:num_requests_running") == 0
                and metric_value(text, "vllm:kv_cache_usage_perc") == 0):
            return
        time.sleep(0.1)
    raise AssertionError("server did not become idle")


def blocks_during_decode(server, images, question: str, ratio: float, max_tokens: int,
                         usable_blocks: int, attempts: int = 3) -> tuple[list[tuple[int, int]], dict]:
    """(output tokens g, KV blocks in use) read from /metrics while one request decodes, and its usage.

    g is the server's own count, ``vllm:generation_tokens_total`` since the server was idle, read
    in the same scrape as ``vllm:kv_cache_usage_perc``: vLLM sets both in one ``record()`` per
    engine step, and ``server.metrics()`` scrapes on the event loop that runs it (not /metrics's
    worker thread, see ``VllmServer.METRICS_SNAPSHOT_PATH``), so every sample pairs a step's
    blocks with that step's g exactly. Blocks in use = usage x (pool blocks - 1): the null
    block is in neither side of vLLM's usage fraction.

    On a busy 2-core machine one scrape can outlast the whole decode, so a request may yield no
    sample; it is then sent again, up to ``attempts`` times (the caller asserts samples exist).
    """
    for _attempt in range(attempts):
        samples, usage = _decode_samples(server, images, question, ratio, max_tokens, usable_blocks)
        if samples:
            break
    return samples, usage


def _decode_samples(server, images, question: str, ratio: float, max_tokens: int,
                    usable_blocks: int) -> tuple[list[tuple[int, int]], dict]:
    wait_idle(server)
    generated_before = metric_value(server.metrics(), "vllm:generation_tokens_total")
    request = HeldRequest(server, images, question, ratio, max_tokens)
    samples = []
    while request.thread.is_alive():
        text = server.metrics()
        generated = round(metric_value(text, "vllm:generation_tokens_total") - generated_before)
        if generated < 1 or metric_value(text, "vllm:num_requests_running") != 1:
            continue  # still in (chunked) prefill, or already finished
        blocks = metric_value(text, "vllm:kv_cache_usage_perc") * usable_blocks
        assert abs(blocks - round(blocks)) < 1e-6, (blocks, usable_blocks)
        samples.append((generated, round(blocks)))
    request.thread.join()
    assert request.error is None, request.error
    return samples, request.usage


def blocks_across_a_boundary(server, images, question: str, ratio: float, max_tokens: int,
                             usable_blocks: int, budget_s: float = 300.0) -> tuple[list[tuple[int, int]], list[dict]]:
    """``blocks_during_decode`` samples of repeated requests, until they span a block boundary.

    A scrape can take longer than many decode steps (the engine holds both cores, or a small
    model decodes fast), so one request's samples may all fall inside one block; the request
    is sent again until the samples hold two block counts. On a quiet machine one request is
    enough; under load (a fresh-clone CI once got one sample from three requests) it is sent
    again for up to ``budget_s`` seconds, at least three times. Returns the samples and each
    request's usage; fails when no request crossed a boundary.
    """
    samples: list[tuple[int, int]] = []
    usages: list[dict] = []
    deadline = time.monotonic() + budget_s
    while len(usages) < 3 or time.monotonic() < deadline:
        decode, usage = _decode_samples(server, images, question, ratio, max_tokens, usable_blocks)
        samples += decode
        usages.append(usage)
        if len({blocks for _, blocks in samples}) >= 2:
            return samples, usages
    raise AssertionError(f"no block boundary crossed in {len(usages)} requests: {sorted(set(samples))}")


def pool_blocks(server) -> int:
    """``num_gpu_blocks`` of the server's KV pool (the null block included)."""
    return int(cache_config(server)["num_gpu_blocks"])
