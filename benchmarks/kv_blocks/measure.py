"""Measuring one server: blocks per request in decode, requests resident at once, per configuration."""

from __future__ import annotations

import asyncio
import json
import math
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import httpx

from benchmarks.harness import (
    BenchError,
    Geometry,
    Snapshot,
    log,
    pool_geometry,
    wait_idle,
)
from benchmarks.kv_blocks.common import (
    FIRE_FACTOR,
    M_CIVIC_KEPT,
    M_CIVIC_SEEN,
    PROBE_ATTEMPTS,
    PROBE_TOKENS,
    Bounds,
    Workload,
    ratio_label,
)
from benchmarks.kv_blocks.inputs import chat_body, post_chat
from civic_vllm.budget import num_retained
from civic_vllm.cost import kv_blocks
from civic_vllm.prometheus import metric_value
from civic_vllm.serving import ServerConfig, VllmServer


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
        before = (await client.get(server.metrics_url)).text
        last = before
        task = asyncio.create_task(stream_chat(client, server.url, body, state))
        deadline = time.monotonic() + bounds.probe_timeout_s
        try:
            for _ in range(bounds.max_samples):
                lo = state.completion_tokens
                last = (await client.get(server.metrics_url)).text
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
        first = Snapshot.parse((await client.get(server.metrics_url)).text)
        task = asyncio.create_task(post_chat(client, server.url, body))
        start = time.monotonic()
        peak, peak_at, first_wait = 0, None, None
        running_while_waiting: Counter[int] = Counter()
        usage_at_peak, max_running, last = 0.0, 0, first
        try:
            for _ in range(bounds.max_samples):
                now = time.monotonic() - start
                snap = last = Snapshot.parse((await client.get(server.metrics_url)).text)
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
class Setup:
    """The setup: everything fixed before any server starts, so vanilla and civic see the same one."""

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


def run_server(setup: Setup, civic: bool, step: Iterator[str]) -> None:
    """Start one server, measure all its configurations, stop it."""
    kind = "civic" if civic else "vanilla"
    config = setup.server_config(civic)
    log(f"{next(step)} starting {kind} server: {' '.join(config.command()[1:])}")
    t0 = time.monotonic()
    with VllmServer(config, startup_timeout=setup.bounds.startup_timeout_s) as server:
        try:
            pool = pool_geometry(server)
            setup.servers[kind] = {
                "command": config.command(), "startup_s": round(time.monotonic() - t0, 1),
                "log": str(server.log_path), "pool": pool,
                "omp_log": [line.strip() for line in server.log_text().splitlines() if "OMP" in line][:8],
            }
            log(f"{kind} server up in {time.monotonic() - t0:.0f}s: {pool['num_blocks']} blocks of "
                f"{pool['block_size']} tokens ({pool['source']})")
            ratios: tuple[Fraction | None, ...] = setup.ratios if civic else (None,)
            for ratio in ratios:
                for workload in setup.workloads:
                    setup.results.append(measure_config(setup, server, pool, workload, ratio, step))
        except Exception:
            print(f"--- {kind} server log tail ---\n{server.log_tail()}", file=sys.stderr)
            raise


def measure_config(setup: Setup, server: VllmServer, pool: dict, workload: Workload,
                   ratio: Fraction | None, step: Iterator[str]) -> dict:
    label = f"{workload.name} {ratio_label(ratio)}"
    block_size, usable = pool["block_size"], pool["usable_blocks"]
    model = server.config.model
    hold = setup.hold_tokens[workload.name]

    log(f"{next(step)} {label}: blocks of one request held in decode")
    for attempt in range(1, PROBE_ATTEMPTS + 1):
        # A retry reuses the image, which vLLM has processed and cached by then: its first
        # tokens then come sooner after the request and the first samples land near them.
        wait_idle(server, setup.bounds)
        probe = asyncio.run(probe_blocks(server, chat_body(model, workload, 0, ratio, hold), pool, setup.bounds))
        probe["attempt"] = attempt
        if probe["sample_in_window"]:
            break
        window, closest = probe["same_blocks_token_window"], probe["completion_tokens_at_sample"]
        log(f"    no /metrics sample within tokens {window} (closest: {closest}), retrying")
    prompt = probe["prompt_tokens"]
    if prompt is None:
        raise BenchError(f"{label}: the stream reported no usage (continuous_usage_stats unsupported?)")
    blocks_expected, resident_expected = analytic(prompt, block_size, usable)
    _, vanilla_resident = analytic(setup.expected_prompt(workload, None), block_size, usable)

    wait_idle(server, setup.bounds)
    fire = min(setup.bounds.max_fire, max(FIRE_FACTOR * vanilla_resident, math.ceil(1.5 * resident_expected) + 2))
    log(f"{next(step)} {label}: {fire} sequences queued at once (expect {resident_expected} resident)")
    body = chat_body(model, workload, 1, ratio, hold, n=fire, stream=False)
    runs = []
    for _ in range(setup.bounds.residency_runs):
        wait_idle(server, setup.bounds)
        runs.append(asyncio.run(measure_residency(server, body, fire, setup.bounds)))
        runs[-1]["drain_s"] = round(wait_idle(server, setup.bounds), 2)
    peaks = [r["resident_measured"] for r in runs if r["resident_measured"] is not None]
    residency = {"resident_measured": max(peaks) if peaks else None,
                 "peaks_per_run": [r["resident_measured"] for r in runs], "runs": runs}

    n_visual = setup.geometry.visual_tokens(workload.side)
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
        "prompt_tokens_expected": setup.expected_prompt(workload, ratio),
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
