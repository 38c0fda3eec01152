"""KV-cache benchmark: how many PagedAttention blocks a request takes, and how many requests
one fixed KV pool holds at once, vanilla Qwen3-VL vs CIVIC at several retention ratios.

CIVIC's claim is about memory, not speed: only K = ceil(r*N) of an image's N merged visual
tokens enter the prompt, so vLLM allocates KV blocks for K tokens, and the same pool holds
about 1/r times more image-dominated requests. Everything here is measured on real
``vllm serve`` processes (started one at a time through :mod:`civic_vllm.serving`) from their
Prometheus ``/metrics``, next to the analytic expectation, so a mismatch shows up:

* blocks per request: one streaming request is held in decode; around its ``PROBE_TOKENS``-th
  token, ``vllm:kv_cache_usage_perc`` x the pool's usable blocks is read.
* resident requests: several times more sequences than the pool can hold are queued at once
  (one chat request with ``n`` sequences, see :func:`measure_residency`); the peak
  ``vllm:num_requests_running`` while ``vllm:num_requests_waiting`` > 0 is kept.

Counts, not times: other work on the machine makes the run slower, not different.

    python -m benchmarks.kv_blocks [--preset tiny] [--quick] [--out benchmarks/results/kv_blocks.json]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import math
import os
import platform
import re
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from fractions import Fraction
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image, ImageDraw

from civic_vllm import planner
from civic_vllm.budget import num_merged_tokens, num_retained
from civic_vllm.client import civic_body, image_data_url, image_message
from civic_vllm.cost import kv_blocks
from civic_vllm.model_factory import TextDims, make_model, models_root
from civic_vllm.prometheus import metric_labels, metric_value
from civic_vllm.serving import ServerConfig, VllmServer

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "kv_blocks.json"

CPU_BLOCK_SIZE = 128  # vLLM's CPU default; the measured block size (from /metrics) is what is used
PROBE_TOKENS = 16  # decode tokens a request holds when its blocks are counted (the "output")
PROBE_ATTEMPTS = 6  # a /metrics call can span tens of tokens; each retry is a fresh draw
VANILLA_REQUESTS_IN_POOL = 4  # the pool is sized so vanilla holds this many image-dominated requests
FIRE_FACTOR = 3  # queue at least this many times the requests vanilla can hold
RATIOS_FULL = (Fraction(1), Fraction(1, 2), Fraction(1, 3), Fraction(1, 4))
RATIOS_QUICK = (Fraction(1), Fraction(1, 3))
# The issue's acceptance: at r = 1/3 on image-dominated prompts ...
ACCEPT_RATIO = Fraction(1, 3)
ACCEPT_WORKLOAD = "image-dominated"
ACCEPT_MAX_SHRINK = 0.36  # ... prompt tokens and blocks/request <= 0.36x vanilla
ACCEPT_MIN_GROWTH = 2.7  # ... and resident requests >= 2.7x vanilla

# Prometheus names in vLLM 0.32 (v1 engine).
M_RUNNING = "vllm:num_requests_running"
M_WAITING = "vllm:num_requests_waiting"
M_USAGE = "vllm:kv_cache_usage_perc"
M_PREEMPT = "vllm:num_preemptions_total"
M_CACHE_INFO = "vllm:cache_config_info"
M_CIVIC_SEEN = "civic:visual_tokens_total"
M_CIVIC_KEPT = "civic:visual_tokens_retained_total"


class BenchError(RuntimeError):
    """The benchmark could not measure something (as opposed to a FAIL of the acceptance)."""


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def ratio_label(r: Fraction | None) -> str:
    return "vanilla" if r is None else f"r={r}"


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bounds:
    """Every loop is bounded in count and time; --quick only shortens the bounds."""

    settle_s: float  # stop sampling once the resident peak has not grown for this long
    deadline_s: float  # hard limit of one residency run
    max_fire: int  # most sequences queued at once in one residency run
    hold_cap: int  # most decode tokens a residency request asks for
    poll_s: float = 0.05  # faster polling makes the API server spend its CPU on /metrics
    residency_runs: int = 2  # the peak is the max over runs: a short peak can fall between samples
    max_samples: int = 4000
    probe_timeout_s: float = 180.0
    idle_timeout_s: float = 60.0
    startup_timeout_s: float = 900.0


FULL = Bounds(settle_s=6.0, deadline_s=240.0, max_fire=48, hold_cap=512)
QUICK = Bounds(settle_s=2.0, deadline_s=120.0, max_fire=36, hold_cap=384, residency_runs=1)


@dataclass(frozen=True)
class Workload:
    """One image of ``side`` x ``side`` px and a question; ``text`` is the question/context."""

    name: str
    side: int
    text: str


@dataclass(frozen=True)
class Geometry:
    """What the KV pool and the prompt lengths depend on, read from the checkpoint's config."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype_bytes: int
    patch_size: int
    merge_size: int
    vision_depth: int
    dtype: str = "bfloat16"
    text: TextDims | None = None  # the family's layers (hybrid grouping), for civic plan's KV layout

    @classmethod
    def from_checkpoint(cls, model_dir: Path, dtype: str) -> Geometry:
        cfg = json.loads((model_dir / "config.json").read_text())
        text, vision = cfg["text_config"], cfg["vision_config"]
        head_dim = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
        return cls(
            num_layers=text["num_hidden_layers"],
            num_kv_heads=text["num_key_value_heads"],
            head_dim=head_dim,
            dtype_bytes={"float32": 4, "bfloat16": 2, "float16": 2}[dtype],
            patch_size=vision["patch_size"],
            merge_size=vision["spatial_merge_size"],
            vision_depth=vision["depth"],
            dtype=dtype,
            text=planner.load_model(str(model_dir), with_tokenizer=False).dims.text,
        )

    def kv_layout(self, block_size: int) -> planner.KvLayout:
        """How vLLM pages this model's cache (civic plan's rule; hybrids group layers by type)."""
        layout = planner.kv_layout(self.text, block_size, self.dtype)
        if layout.block_size != block_size:
            raise BenchError(f"vLLM would raise the block size to {layout.block_size} for this hybrid model")
        return layout

    def block_bytes(self, block_size: int) -> int:
        """vLLM's bytes per pool block: K and V of every layer (of one layer group for hybrids)."""
        return self.kv_layout(block_size).block_bytes

    def visual_tokens(self, side: int) -> int:
        """N for a square image whose side the processor keeps (a multiple of patch*merge)."""
        unit = self.patch_size * self.merge_size
        if side % unit:
            raise ValueError(f"image side {side} must be a multiple of {unit}")
        grid = side // self.patch_size
        return num_merged_tokens((1, grid, grid), self.merge_size)


# --------------------------------------------------------------------------------------------
# Inputs: deterministic images and text
# --------------------------------------------------------------------------------------------


@functools.cache
def image_url(side: int, seed: int) -> str:
    """A structured synthetic image (gradient + shapes) as a PNG data URL; distinct per seed so
    concurrent requests share no encoder output or cached prefix."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:side, 0:side].astype(np.float32) / max(side - 1, 1)
    coef = rng.uniform(0.2, 1.0, size=(3, 3))
    base = np.stack([coef[c, 0] * x + coef[c, 1] * y + coef[c, 2] * (1 - x) * y for c in range(3)], -1)
    image = Image.fromarray((255 * base / base.max()).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(8):
        x0, y0 = (int(v) for v in rng.integers(0, side * 3 // 4, 2))
        w, h = (int(v) for v in rng.integers(side // 16, side // 4, 2))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape((x0, y0, x0 + w, y0 + h), fill=colour)
    return image_data_url(image)


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


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


@dataclass
class Snapshot:
    running: int
    waiting: int
    usage: float
    preemptions: float

    @classmethod
    def parse(cls, text: str) -> Snapshot:
        return cls(
            running=int(metric_value(text, M_RUNNING)),
            waiting=int(metric_value(text, M_WAITING)),
            usage=metric_value(text, M_USAGE),
            preemptions=metric_value(text, M_PREEMPT),
        )


def pool_geometry(server: VllmServer) -> dict[str, Any]:
    """Block size and block count as the running server reports them: the
    ``vllm:cache_config_info`` labels, else the engine's "KV cache size: N tokens" log line."""
    labels = metric_labels(server.metrics(), M_CACHE_INFO)
    block_size = int(labels["block_size"]) if labels.get("block_size", "None").isdigit() else None
    blocks = int(labels["num_gpu_blocks"]) if labels.get("num_gpu_blocks", "None").isdigit() else None
    source = "vllm:cache_config_info"
    if blocks is None or block_size is None:
        found = re.search(r"KV cache size: ([\d,]+) tokens", server.log_text())
        if not (found and block_size):
            raise BenchError(f"cannot find the KV pool size in /metrics or the log:\n{server.log_tail()}")
        blocks = int(found.group(1).replace(",", "")) // block_size
        source = "server log"
    # vLLM keeps one block aside (the null block); usage is relative to the others.
    return {"num_blocks": blocks, "usable_blocks": blocks - 1, "block_size": block_size, "source": source,
            "cache_config_info": labels}


def wait_idle(server: VllmServer, bounds: Bounds) -> float:
    """Block until no request runs or waits and the pool is empty, so runs do not overlap;
    return the seconds it took.

    vLLM publishes scheduler stats only when the engine steps, so after the client aborts every
    request the gauges can keep showing the last busy step. Every few seconds a one-token text
    completion makes the engine step once and publish fresh stats (it is done, and its block
    freed, before the stats are made).
    """
    start = time.monotonic()
    next_nudge = start + 3.0
    while True:
        snap = Snapshot.parse(server.metrics())
        if snap.running == 0 and snap.waiting == 0 and snap.usage < 1e-9:
            return time.monotonic() - start
        now = time.monotonic()
        if now - start > bounds.idle_timeout_s:
            raise BenchError(f"server not idle after {bounds.idle_timeout_s:.0f}s: {snap}")
        if now >= next_nudge:
            body = {"model": server.config.model, "prompt": "ping", "max_tokens": 1}
            httpx.post(server.url + "/v1/completions", json=body, timeout=60).raise_for_status()
            next_nudge = time.monotonic() + 3.0
        time.sleep(0.25)


# --------------------------------------------------------------------------------------------
# Streaming requests
# --------------------------------------------------------------------------------------------


@dataclass
class StreamState:
    prompt_tokens: int | None = None
    completion_tokens: int = 0
    finished: bool = False


async def stream_chat(client: httpx.AsyncClient, url: str, body: dict, state: StreamState,
                      on_token: Callable[[StreamState], None] | None = None) -> None:
    """POST one streaming chat request and keep ``state`` current. Cancelling the task closes the
    connection, which makes vLLM abort the request and free its blocks."""
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            detail = (await response.aread()).decode(errors="replace")
            raise BenchError(f"chat request failed with HTTP {response.status_code}: {detail[:500]}")
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                break
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise BenchError(f"chat stream returned an error: {json.dumps(chunk)[:500]}")
            usage = chunk.get("usage") or {}
            if usage:
                state.prompt_tokens = usage.get("prompt_tokens", state.prompt_tokens)
                state.completion_tokens = usage.get("completion_tokens", state.completion_tokens)
                if on_token:
                    on_token(state)
    state.finished = True


def _client(connections: int, read_timeout: float) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
        timeout=httpx.Timeout(read_timeout, connect=10.0),
    )


async def _cancel(tasks: list[asyncio.Task]) -> list[BaseException]:
    """Cancel and await ``tasks``; return the real errors (not cancellations)."""
    for task in tasks:
        task.cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    return [r for r in results if isinstance(r, BaseException) and not isinstance(r, asyncio.CancelledError)]


def _window(prompt: int, block_size: int) -> tuple[int, int]:
    """Completion-token counts a client may see while the request holds exactly as many blocks as
    at prompt + PROBE_TOKENS. Seeing c tokens, the engine holds slots for prompt + c - 1 (the
    last token is not cached yet) up to prompt + c + 1 (async scheduling runs a step ahead)."""
    target = kv_blocks(prompt + PROBE_TOKENS, block_size)
    first = max(1, (target - 1) * block_size - prompt + 2)  # prompt + c - 1 > (target - 1) * size
    last = target * block_size - prompt - 1  # prompt + c + 1 <= target * size
    return first, last


async def probe_blocks(server: VllmServer, body: dict, pool: dict, bounds: Bounds) -> dict:
    """Blocks of one request held in decode, as many as it holds at its PROBE_TOKENS-th token.

    The tiny model decodes hundreds of tokens a second and one /metrics call can span tens of
    them, so /metrics is polled back to back and each sample keeps the completion tokens streamed
    before and after it. A sample counts only if that whole span lies in the range of tokens over
    which the request holds the same number of blocks as at PROBE_TOKENS (:func:`_window`);
    stats and streamed tokens come from the same engine outputs, so the span brackets the step.
    """
    usable, block_size = pool["usable_blocks"], pool["block_size"]
    state = StreamState()
    samples: list[dict] = []
    async with _client(4, bounds.probe_timeout_s) as client:
        before = (await client.get(server.url + "/metrics")).text
        last = before
        task = asyncio.create_task(stream_chat(client, server.url, body, state))
        deadline = time.monotonic() + bounds.probe_timeout_s
        try:
            for _ in range(bounds.max_samples):
                lo = state.completion_tokens
                last = (await client.get(server.url + "/metrics")).text
                hi = state.completion_tokens
                snap = Snapshot.parse(last)
                window = _window(state.prompt_tokens, block_size) if state.prompt_tokens else (1, 0)
                if lo >= 1:  # decode has started: the prompt's blocks are all allocated
                    samples.append({"tokens": [lo, hi], "running": snap.running, "usage": snap.usage,
                                    "blocks": round(snap.usage * usable),
                                    "in_window": window[0] <= lo and hi <= window[1] and snap.running >= 1})
                if any(x["in_window"] for x in samples) and lo >= PROBE_TOKENS:
                    break
                if lo > max(window[1], 3 * PROBE_TOKENS) or task.done() or time.monotonic() > deadline:
                    break
        finally:
            errors = await _cancel([task])
    if errors:
        raise BenchError(f"probe request failed: {errors[0]!r}")
    if not samples or state.prompt_tokens is None:
        raise BenchError(f"probe request produced no decode sample in {bounds.probe_timeout_s:.0f}s")
    valid = [x for x in samples if x["in_window"]]
    best = min(valid or samples, key=lambda x: abs(sum(x["tokens"]) / 2 - PROBE_TOKENS))
    seen = metric_value(last, M_CIVIC_SEEN) - metric_value(before, M_CIVIC_SEEN)
    kept = metric_value(last, M_CIVIC_KEPT) - metric_value(before, M_CIVIC_KEPT)
    return {
        "prompt_tokens": state.prompt_tokens,
        "completion_tokens_at_sample": best["tokens"],
        "same_blocks_token_window": list(_window(state.prompt_tokens, block_size)),
        "kv_cache_usage_perc": best["usage"],
        "blocks_measured": best["blocks"] if valid else None,
        "sample_in_window": bool(valid),
        "running_at_sample": best["running"],
        "samples_lo_hi_blocks": [[*x["tokens"], x["blocks"]] for x in samples],
        "civic_visual_tokens": {"seen": seen, "kept": kept} if seen else None,
    }


async def measure_residency(server: VllmServer, body: dict, fired: int, bounds: Bounds) -> dict:
    """Put ``fired`` sequences in the queue at once and sample the scheduler.

    One chat request with n = ``fired`` puts all its sequences in vLLM's waiting queue in the
    same instant; without prefix caching each allocates its own blocks, exactly like separate
    requests. (Separate HTTP requests reach the engine one image-preprocessing apart, while the
    tiny model decodes hundreds of tokens a second: early requests would grow or even finish
    before the pool fills, and the peak would measure the API server, not the pool.) A sequence
    waits only when the pool cannot take its prompt, so the peak running count while something
    waits is what the pool holds. The request is not streamed, so the API server has no
    per-token work and answers /metrics quickly: the peak can last only until the first
    residents decode across a block edge (tokens_to_next_block steps). Sampling stops once the
    peak has not grown for ``settle_s``.
    """
    trace: list[list[float]] = []
    async with _client(8, bounds.deadline_s + 60) as client:
        first = Snapshot.parse((await client.get(server.url + "/metrics")).text)
        task = asyncio.create_task(post_chat(client, server.url, body))
        start = time.monotonic()
        peak, peak_at, first_wait = 0, None, None
        running_while_waiting: Counter[int] = Counter()
        usage_at_peak, max_running, last = 0.0, 0, first
        try:
            for _ in range(bounds.max_samples):
                now = time.monotonic() - start
                snap = last = Snapshot.parse((await client.get(server.url + "/metrics")).text)
                if not trace or trace[-1][1:] != [snap.running, snap.waiting, snap.usage]:
                    trace.append([round(now, 3), snap.running, snap.waiting, snap.usage])
                max_running = max(max_running, snap.running)
                if snap.waiting > 0:
                    first_wait = now if first_wait is None else first_wait
                    running_while_waiting[snap.running] += 1
                    if snap.running > peak:
                        peak, peak_at, usage_at_peak = snap.running, now, snap.usage
                if peak_at is not None and now - peak_at >= bounds.settle_s:
                    break
                if now > bounds.deadline_s or task.done():
                    break
                await asyncio.sleep(bounds.poll_s)
        finally:
            errors = await _cancel([task])
    if errors:
        raise BenchError(f"residency request failed: {errors[0]!r}")
    return {
        "fired": fired,
        "resident_measured": peak if first_wait is not None else None,
        "waiting_observed": first_wait is not None,
        "peak_reached_after_s": None if peak_at is None else round(peak_at, 3),
        "kv_usage_at_peak": usage_at_peak,
        "running_while_waiting_histogram": {str(k): v for k, v in sorted(running_while_waiting.items())},
        "max_running": max_running,
        # A lower bound: vLLM counts a preemption only when that request next emits output.
        "preemptions_reported": last.preemptions - first.preemptions,
        "finished_before_stop": task.done() and not task.cancelled(),
        "trace_t_running_waiting_usage": trace,
    }


# --------------------------------------------------------------------------------------------
# One server, its configurations
# --------------------------------------------------------------------------------------------


@dataclass
class Plan:
    """Everything fixed before any server starts, so vanilla and civic see the same setup."""

    model: Path
    dtype: str
    geometry: Geometry
    workloads: list[Workload]
    ratios: tuple[Fraction, ...]
    text_tokens: dict[str, int]  # per workload: prompt tokens besides the image's
    max_model_len: int
    max_num_batched_tokens: int
    pool_bytes: int
    hold_tokens: dict[str, int]  # per workload: max_tokens of residency requests
    bounds: Bounds
    results: list[dict] = field(default_factory=list)
    servers: dict[str, dict] = field(default_factory=dict)

    def expected_prompt(self, workload: Workload, ratio: Fraction | None) -> int:
        n = self.geometry.visual_tokens(workload.side)
        return self.text_tokens[workload.name] + (n if ratio is None else num_retained(n, float(ratio)))

    def server_config(self, civic: bool) -> ServerConfig:
        return ServerConfig(
            model=str(self.model),
            civic=civic,
            trust_request_mm_kwargs=civic,
            dtype=self.dtype,
            max_model_len=self.max_model_len,
            max_num_batched_tokens=self.max_num_batched_tokens,
            max_num_seqs=256,
            images_per_prompt=1,
            kv_cache_gib=None,
            kv_cache_bytes=self.pool_bytes,
            prefix_caching=False,  # distinct images already share nothing; this makes it certain
        )


def analytic(prompt: int, block_size: int, usable_blocks: int) -> tuple[int, int]:
    """(blocks per request, requests resident at once) if every request holds prompt+output."""
    blocks = kv_blocks(prompt + PROBE_TOKENS, block_size)
    return blocks, usable_blocks // blocks


def resident_at_admission(prompt: int, block_size: int, usable_blocks: int) -> int:
    """Requests the scheduler admits when each needs only its prompt's blocks: the measured
    peak can reach this (for a few steps) when prompt+output crosses a block edge."""
    return usable_blocks // kv_blocks(prompt, block_size)


def run_server(plan: Plan, civic: bool, step: Iterator[str]) -> None:
    """Start one server, measure all its configurations, stop it."""
    kind = "civic" if civic else "vanilla"
    config = plan.server_config(civic)
    log(f"{next(step)} starting {kind} server: {' '.join(config.command()[1:])}")
    t0 = time.monotonic()
    with VllmServer(config, startup_timeout=plan.bounds.startup_timeout_s) as server:
        try:
            pool = pool_geometry(server)
            plan.servers[kind] = {
                "command": config.command(), "startup_s": round(time.monotonic() - t0, 1),
                "log": str(server.log_path), "pool": pool,
                "omp_log": [line.strip() for line in server.log_text().splitlines() if "OMP" in line][:8],
            }
            log(f"{kind} server up in {time.monotonic() - t0:.0f}s: {pool['num_blocks']} blocks of "
                f"{pool['block_size']} tokens ({pool['source']})")
            ratios: tuple[Fraction | None, ...] = plan.ratios if civic else (None,)
            for ratio in ratios:
                for workload in plan.workloads:
                    plan.results.append(measure_config(plan, server, pool, workload, ratio, step))
        except Exception:
            print(f"--- {kind} server log tail ---\n{server.log_tail()}", file=sys.stderr)
            raise


def measure_config(plan: Plan, server: VllmServer, pool: dict, workload: Workload,
                   ratio: Fraction | None, step: Iterator[str]) -> dict:
    label = f"{workload.name} {ratio_label(ratio)}"
    block_size, usable = pool["block_size"], pool["usable_blocks"]
    model = server.config.model
    hold = plan.hold_tokens[workload.name]

    log(f"{next(step)} {label}: blocks of one request held in decode")
    for attempt in range(1, PROBE_ATTEMPTS + 1):
        # A retry reuses the image, which vLLM has processed and cached by then: its first
        # tokens then come sooner after the request and the first samples land near them.
        wait_idle(server, plan.bounds)
        probe = asyncio.run(probe_blocks(server, chat_body(model, workload, 0, ratio, hold), pool, plan.bounds))
        probe["attempt"] = attempt
        if probe["sample_in_window"]:
            break
        window, closest = probe["same_blocks_token_window"], probe["completion_tokens_at_sample"]
        log(f"    no /metrics sample within tokens {window} (closest: {closest}), retrying")
    prompt = probe["prompt_tokens"]
    if prompt is None:
        raise BenchError(f"{label}: the stream reported no usage (continuous_usage_stats unsupported?)")
    blocks_expected, resident_expected = analytic(prompt, block_size, usable)
    _, vanilla_resident = analytic(plan.expected_prompt(workload, None), block_size, usable)

    wait_idle(server, plan.bounds)
    fire = min(plan.bounds.max_fire, max(FIRE_FACTOR * vanilla_resident, math.ceil(1.5 * resident_expected) + 2))
    log(f"{next(step)} {label}: {fire} sequences queued at once (expect {resident_expected} resident)")
    body = chat_body(model, workload, 1, ratio, hold, n=fire, stream=False)
    runs = []
    for _ in range(plan.bounds.residency_runs):
        wait_idle(server, plan.bounds)
        runs.append(asyncio.run(measure_residency(server, body, fire, plan.bounds)))
        runs[-1]["drain_s"] = round(wait_idle(server, plan.bounds), 2)
    peaks = [r["resident_measured"] for r in runs if r["resident_measured"] is not None]
    residency = {"resident_measured": max(peaks) if peaks else None,
                 "peaks_per_run": [r["resident_measured"] for r in runs], "runs": runs}

    n_visual = plan.geometry.visual_tokens(workload.side)
    row = {
        "workload": workload.name,
        "config": ratio_label(ratio),
        "civic": ratio is not None,
        "ratio": None if ratio is None else float(ratio),
        "ratio_label": None if ratio is None else str(ratio),
        "image_side": workload.side,
        "visual_tokens_N": n_visual,
        "visual_tokens_K": None if ratio is None else num_retained(n_visual, float(ratio)),
        "prompt_tokens": prompt,
        "prompt_tokens_expected": plan.expected_prompt(workload, ratio),
        "output_tokens": PROBE_TOKENS,
        "blocks_per_request": probe["blocks_measured"],
        "blocks_per_request_expected": blocks_expected,
        # Decode tokens until the request needs one more block: how far from a block edge it is.
        "tokens_to_next_block": blocks_expected * block_size - prompt,
        "resident_requests": residency["resident_measured"],
        "resident_requests_expected": resident_expected,
        "resident_requests_expected_at_admission": resident_at_admission(prompt, block_size, usable),
        "hold_max_tokens": hold,
        "probe": probe,
        "residency": residency,
    }
    log(f"    {label}: prompt {prompt} tok, {row['blocks_per_request']} blocks/request "
        f"(expected {blocks_expected}), {row['resident_requests']} resident (expected {resident_expected}), "
        f"peaks per run {residency['peaks_per_run']}")
    return row


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def add_ratios(rows: list[dict]) -> list[dict]:
    """civic / vanilla of prompt tokens, blocks per request and resident requests, per workload."""
    vanilla = {r["workload"]: r for r in rows if not r["civic"]}
    out = []
    for row in rows:
        base = vanilla.get(row["workload"])
        if base is None:
            continue
        entry = {"workload": row["workload"], "config": row["config"]}
        for key in ("prompt_tokens", "blocks_per_request", "resident_requests"):
            entry[key] = _ratio(row[key], base[key])
            expected = key + "_expected"
            entry[expected] = _ratio(row.get(expected, row[key]), base.get(expected, base[key]))
        row["vs_vanilla"] = entry
        out.append(entry)
    return out


def acceptance(rows: list[dict]) -> dict:
    """The issue's check, computed from measurements only; a missing measurement is a FAIL."""
    target = next((r for r in rows if r["workload"] == ACCEPT_WORKLOAD and r["ratio_label"] == str(ACCEPT_RATIO)), None)
    vs = (target or {}).get("vs_vanilla", {})
    checks = {
        "prompt_tokens": (vs.get("prompt_tokens"), "<=", ACCEPT_MAX_SHRINK),
        "blocks_per_request": (vs.get("blocks_per_request"), "<=", ACCEPT_MAX_SHRINK),
        "resident_requests": (vs.get("resident_requests"), ">=", ACCEPT_MIN_GROWTH),
    }
    result = {}
    for name, (value, op, bound) in checks.items():
        ok = value is not None and (value <= bound if op == "<=" else value >= bound)
        result[name] = {"civic_over_vanilla": value, "requirement": f"{op} {bound}", "pass": ok}
    return {"workload": ACCEPT_WORKLOAD, "ratio": str(ACCEPT_RATIO), "checks": result,
            "pass": all(c["pass"] for c in result.values())}


def _fmt(value: float | None, spec: str = "d") -> str:
    return "n/a" if value is None else format(value, spec)


def _expected_resident(row: dict) -> str:
    """'15', or '15-20' when admission (prompt blocks only) lets more in for a few steps."""
    low, high = row["resident_requests_expected"], row["resident_requests_expected_at_admission"]
    return str(low) if low == high else f"{low}-{high}"


def print_table(rows: list[dict]) -> None:
    head = (f"{'workload':<16} {'config':<8} {'prompt':>6} {'blocks/req':>10} {'(exp)':>5} "
            f"{'resident':>8} {'(exp)':>5} {'prompt x':>8} {'blocks x':>8} {'resid. x':>8}")
    print(head)
    print("-" * len(head))
    for r in rows:
        vs = r.get("vs_vanilla", {})
        print(f"{r['workload']:<16} {r['config']:<8} {r['prompt_tokens']:>6} {_fmt(r['blocks_per_request']):>10} "
              f"{r['blocks_per_request_expected']:>5} {_fmt(r['resident_requests']):>8} "
              f"{_expected_resident(r):>5} {_fmt(vs.get('prompt_tokens'), '.3f'):>8} "
              f"{_fmt(vs.get('blocks_per_request'), '.3f'):>8} {_fmt(vs.get('resident_requests'), '.2f'):>8}")


def print_acceptance(acc: dict) -> None:
    print(f"\nAcceptance ({acc['workload']}, r = {acc['ratio']}, civic / vanilla, measured):")
    for name, c in acc["checks"].items():
        print(f"  {'PASS' if c['pass'] else 'FAIL'}  {name:<19} {_fmt(c['civic_over_vanilla'], '.3f'):>6} "
              f"(needs {c['requirement']})")
    print(f"  overall: {'PASS' if acc['pass'] else 'FAIL'}")


def plot(rows: list[dict], path: Path, pool: dict) -> None:
    """Bars of blocks/request and resident requests (measured), analytic as black ticks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    fig, axes = plt.subplots(2, len(workloads), figsize=(5.5 * len(workloads), 7.5), squeeze=False)
    metrics = [("blocks_per_request", "KV blocks per request"), ("resident_requests", "requests resident at once")]
    for col, name in enumerate(workloads):
        sub = [r for r in rows if r["workload"] == name]
        xs = np.arange(len(sub))
        for row_i, (key, title) in enumerate(metrics):
            ax = axes[row_i][col]
            values = [r[key] if r[key] is not None else 0 for r in sub]
            colours = ["#888888" if not r["civic"] else "#1f77b4" for r in sub]
            bars = ax.bar(xs, values, color=colours)
            labels = []
            for v, r in zip(values, sub):
                factor = (r.get("vs_vanilla") or {}).get(key)
                extra = f"\n{factor:.2f}x" if r["civic"] and factor is not None else ""
                labels.append(f"{v}\n{r['config']}{extra}" if r[key] is not None else f"n/a\n{r['config']}")
            ax.bar_label(bars, labels=labels, fontsize=8, padding=2)
            ax.scatter(xs, [r[key + "_expected"] for r in sub], marker="_", s=400, color="black",
                       zorder=3, label="analytic (prompt + output)")
            admission = [(x, r["resident_requests_expected_at_admission"]) for x, r in zip(xs, sub)
                         if key == "resident_requests"
                         and r["resident_requests_expected_at_admission"] != r["resident_requests_expected"]]
            if admission:
                ax.scatter(*zip(*admission), marker="_", s=400, color="darkorange", zorder=3,
                           label="analytic at admission (prompt only)")
            ax.set_xticks(xs, ["vanilla" if not r["civic"] else f"civic\n{r['config']}" for r in sub], fontsize=8)
            ax.set_title(f"{name}: {title}", fontsize=10)
            ax.set_ylim(0, max(values + [r[key + "_expected"] for r in sub]) * 1.4 + 1)
            ax.legend(fontsize=8, loc="upper left")
    fig.suptitle(f"One KV pool of {pool['num_blocks']} blocks x {pool['block_size']} tokens "
                 f"(measured bars, analytic ticks)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def environment_info(plan: Plan) -> dict:
    import torch
    import transformers
    import vllm

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "machine": {
            "platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
            "affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "python": sys.version.split()[0],
            "load_average_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
        },
        "versions": {"vllm": vllm.__version__, "torch": torch.__version__, "transformers": transformers.__version__},
        "omp_binding": {
            "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto (vLLM default, unset)"),
            "VLLM_CPU_NUM_OF_RESERVED_CPU": os.environ.get("VLLM_CPU_NUM_OF_RESERVED_CPU"),
        },
    }


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def build_plan(args: argparse.Namespace) -> Plan:
    from transformers import AutoTokenizer

    model = Path(args.model).resolve() if args.model else make_model(args.preset, models_root() / args.preset)
    geometry = Geometry.from_checkpoint(model, args.dtype)
    tokenizer = AutoTokenizer.from_pretrained(str(model))
    workloads = make_workloads(tokenizer)
    text_tokens = {w.name: template_tokens(tokenizer, w.text) for w in workloads}
    plan = Plan(
        model=model, dtype=args.dtype, geometry=geometry, workloads=workloads,
        ratios=RATIOS_QUICK if args.quick else RATIOS_FULL, text_tokens=text_tokens,
        max_model_len=0, max_num_batched_tokens=0, pool_bytes=0, hold_tokens={},
        bounds=QUICK if args.quick else FULL,
    )
    longest = max(plan.expected_prompt(w, None) for w in workloads)
    # Just above the longest prompt + output (a multiple of 256), so the pool (which must hold one
    # max_model_len request) can be small enough that vanilla holds only a few requests.
    plan.max_model_len = 256 * math.ceil((longest + PROBE_TOKENS + 64) / 256)
    plan.max_num_batched_tokens = plan.max_model_len  # whole prompts per step: admission = all blocks
    image = next(w for w in workloads if w.name == "image-dominated")
    vanilla_blocks = kv_blocks(plan.expected_prompt(image, None) + PROBE_TOKENS, CPU_BLOCK_SIZE)
    usable = max(VANILLA_REQUESTS_IN_POOL * vanilla_blocks, math.ceil(plan.max_model_len / CPU_BLOCK_SIZE))
    plan.pool_bytes = (usable + 1) * geometry.block_bytes(CPU_BLOCK_SIZE)  # +1: vLLM's null block
    # Residency requests decode long enough to overlap, within max_model_len for every config.
    plan.hold_tokens = {
        w.name: min(plan.bounds.hold_cap, plan.max_model_len - plan.expected_prompt(w, None) - 8) for w in workloads
    }
    return plan


def add_served_model_args(parser: argparse.ArgumentParser, preset: str, quick_help: str) -> None:
    """--preset / --model / --dtype / --quick, shared by the serving benchmarks."""
    parser.add_argument("--preset", default=preset, help=f"model_factory preset to build and serve (default {preset})")
    parser.add_argument("--model", help="serve this checkpoint directory instead of a preset")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--quick", action="store_true", help=quick_help)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_served_model_args(parser, "tiny", "ratios 1 and 1/3, shorter bounds")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON path; the PNG goes beside it")
    args = parser.parse_args(argv)

    started = time.monotonic()
    plan = build_plan(args)
    log(f"model {plan.model} ({args.preset if not args.model else 'custom'}), {args.dtype}; pool "
        f"{plan.pool_bytes} bytes, max_model_len {plan.max_model_len}, text tokens {plan.text_tokens}")
    total = 2 + 2 * len(plan.workloads) * (1 + len(plan.ratios))
    step = (f"[{i}/{total}]" for i in range(1, total + 1))
    run_server(plan, civic=False, step=step)  # one server at a time: vanilla, then civic
    run_server(plan, civic=True, step=step)

    ratios = add_ratios(plan.results)
    acc = acceptance(plan.results)
    pool = plan.servers["civic"]["pool"]
    if pool["num_blocks"] != plan.servers["vanilla"]["pool"]["num_blocks"]:
        raise BenchError("vanilla and civic servers got different KV pools")
    report = {
        "benchmark": "kv_blocks",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "quick": args.quick,
        "duration_s": None,
        **environment_info(plan),
        "model": {
            "preset": None if args.model else args.preset, "path": str(plan.model), "dtype": plan.dtype,
            "geometry": asdict(plan.geometry),
            "kv_bytes_per_block": plan.geometry.block_bytes(pool["block_size"]),
        },
        "pool": {"bytes": plan.pool_bytes, **{k: v for k, v in pool.items() if k != "cache_config_info"},
                 "sized_for_vanilla_image_requests": VANILLA_REQUESTS_IN_POOL},
        "server": {
            "max_model_len": plan.max_model_len, "max_num_batched_tokens": plan.max_num_batched_tokens,
            "prefix_caching": False, "watermark": "vLLM default (0)",
            "cache_config_info": pool["cache_config_info"], "runs": plan.servers,
        },
        "method": {
            "blocks_per_request": f"one streaming request (ignore_eos) held in decode; {M_USAGE} x usable "
                                  f"blocks from a /metrics sample taken while the streamed completion tokens "
                                  f"stayed within the range where the request holds as many blocks as at "
                                  f"{PROBE_TOKENS} tokens (same_blocks_token_window)",
            "resident_requests": f"one non-streaming chat request with n sequences (ignore_eos, prefix caching "
                                 f"off, so no block is shared) queues them all at once; peak {M_RUNNING} "
                                 f"while {M_WAITING} > 0, sampled every {plan.bounds.poll_s}s until it has "
                                 f"not grown for {plan.bounds.settle_s}s; the max over "
                                 f"{plan.bounds.residency_runs} run(s)",
            "analytic": "blocks = ceil((prompt + output) / block_size) with output = "
                        f"{PROBE_TOKENS}; resident = floor(usable_blocks / blocks); "
                        "resident_at_admission = floor(usable_blocks / ceil(prompt / block_size)), "
                        "what the scheduler admits before decode grows the requests",
        },
        "notes": [
            "kv_cache_usage_perc is relative to num_gpu_blocks - 1 (vLLM keeps one null block).",
            "Residency queues all sequences with one n-sequence request: separate HTTP requests reach "
            "the engine one image-preprocessing apart while the tiny model decodes hundreds of tokens/s, "
            "so the pool never filled with the same prompts (measured 3 of 4 vanilla residents "
            "limited by arrival/encoder, not by KV).",
            "After the peak, running drops as residents decode past a block edge and get preempted; "
            "vllm:num_preemptions_total only counts a preemption when that request emits its next "
            "output, so it lags (preemptions_reported is a lower bound).",
            "Blocks are 128 tokens: a request's block count jumps at block edges, so ratios depend on "
            "how far prompt+output is from an edge (tokens_to_next_block). The measured peak of "
            "residents is taken at admission, so when prompt and prompt+output fall in different "
            "block counts it can reach resident_requests_expected_at_admission for a few steps.",
        ],
        "bounds": asdict(plan.bounds),
        "workloads": [{**asdict(w), "text_tokens_in_prompt": plan.text_tokens[w.name],
                       "visual_tokens_N": plan.geometry.visual_tokens(w.side),
                       "hold_max_tokens": plan.hold_tokens[w.name]} for w in plan.workloads],
        "measurements": plan.results,
        "ratios_vs_vanilla": ratios,
        "acceptance": acc,
    }
    report["duration_s"] = round(time.monotonic() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    png = args.out.with_suffix(".png")
    plot(plan.results, png, pool)
    print()
    print_table(plan.results)
    print_acceptance(acc)
    log(f"wrote {args.out} and {png} in {report['duration_s']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
