"""Deterministic inputs: images, context text, workloads and chat bodies."""

from __future__ import annotations

import functools
from fractions import Fraction
from typing import Any

import httpx
import numpy as np

from benchmarks.harness import (
    BenchError,
)
from benchmarks.kv_blocks.common import Workload
from benchmarks.load import synthetic_image
from civic_vllm.client import civic_body, image_data_url, image_message


@functools.cache
def image_url(side: int, seed: int) -> str:
    """A structured synthetic image (``benchmarks.load.synthetic_image``) as a PNG data URL; distinct
    per seed so concurrent requests share no encoder output or cached prefix."""
    return image_data_url(synthetic_image((side, side), seed))


_WORDS = {
    "colour": ["red", "green", "blue", "yellow", "orange", "purple", "white", "black"],
    "shape": ["circle", "square", "triangle", "rectangle", "ellipse", "star"],
    "place": ["top left corner", "bottom right corner", "center", "left edge", "right edge", "top"],
    "size": ["small", "large", "narrow", "wide", "tiny", "huge"],
}


def context_text(tokenizer: Any, target_tokens: int, seed: int = 0) -> str:
    """Plain-prose context of about ``target_tokens`` tokens (the mixed workload's text)."""
    rng = np.random.default_rng(seed)
    sentences: list[str] = []
    while len(tokenizer(" ".join(sentences), add_special_tokens=False)["input_ids"]) < target_tokens:
        pick = {k: v[int(rng.integers(len(v)))] for k, v in _WORDS.items()}
        sentences.append(
            f"A {pick['size']} {pick['colour']} {pick['shape']} was drawn near the {pick['place']} "
            f"of the picture."
        )
    return " ".join(sentences)


def template_tokens(tokenizer: Any, text: str) -> int:
    """Prompt tokens of one user turn [image, text] with the image placeholder counted as 0."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    image_pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return len(ids) - ids.count(image_pad)


def make_workloads(tokenizer: Any) -> list[Workload]:
    question = "What shapes and colours are in this picture, and where are they?"
    context = context_text(tokenizer, 280)
    return [
        Workload("image-dominated", 1344, question),
        Workload("mixed", 448, f"Context: {context}\nQuestion: {question}"),
    ]


def chat_body(model: str, workload: Workload, seed: int, ratio: Fraction | None, max_tokens: int,
              n: int = 1, stream: bool = True) -> dict:
    """A chat request whose ``n`` sequences each decode exactly ``max_tokens`` tokens (ignore_eos).
    Streamed, it reports usage on every chunk, so the client knows how far decode is."""
    body = {
        "model": model,
        "messages": image_message(workload.text, [image_url(workload.side, seed)]),
        "max_tokens": max_tokens,
        "n": n,
        # vLLM refuses greedy sampling with n > 1. No per-request "seed": with random sampling
        # it kills vLLM 0.32's CPU worker ("CPU Generator does not use offset").
        "temperature": 0 if n == 1 else 1.0,
        "ignore_eos": True,
        "stream": stream,
        **civic_body(None if ratio is None else float(ratio)),
    }
    if stream:
        body["stream_options"] = {"include_usage": True, "continuous_usage_stats": True}
    return body


async def post_chat(client: httpx.AsyncClient, url: str, body: dict) -> None:
    """POST one non-streaming chat request; cancelling the task disconnects, and vLLM aborts it."""
    response = await client.post(url + "/v1/chat/completions", json=body)
    if response.status_code != 200:
        raise BenchError(f"chat request failed with HTTP {response.status_code}: {response.text[:500]}")



