"""Faults against a dedicated `vllm serve --model-impl civic`: client aborts, an error inside
retention, input that used to reach the engine and kill it, SIGTERM. The server runs with
CIVIC_FAULT_INJECTION=1 (test-only, see civic_vllm/vllm_adapter/model.py), --enable-mm-embeds
and --shutdown-timeout 30 (drain on SIGTERM; vLLM's default 0 aborts in-flight requests).
The SIGTERM test stops the server, so it is the module's last test.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import torch
from helpers import chat, make_image
from PIL import Image

from civic_vllm.client import civic_body, image_message
from civic_vllm.prometheus import metric_value
from civic_vllm.serving import ServerConfig, VllmServer, group_members

pytestmark = pytest.mark.e2e

DRAIN_SECONDS = 90
MAGENTA = (255, 0, 255)  # with CIVIC_FAULT_INJECTION=1, retention raises for an all-magenta image


@pytest.fixture(scope="module")
def fault_server(tiny_model):
    config = ServerConfig(
        model=tiny_model,
        dtype="float32",
        max_num_batched_tokens=256,
        extra_env={"CIVIC_FAULT_INJECTION": "1"},
        extra_args=["--shutdown-timeout", str(DRAIN_SECONDS), "--enable-mm-embeds"],
    )
    with VllmServer(config) as server:
        yield server


def _stream_body(server, images, *, ratio, max_tokens) -> dict:
    return {
        "model": server.config.model,
        "messages": image_message("Tell me a long story.", images),
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        **civic_body(ratio),
    }


def _content_events(lines):
    """Parsed SSE data events of a chat stream, [DONE] as the string "[DONE]"."""
    for line in lines:
        if line.startswith(b"data: "):
            data = line[len(b"data: "):]
            yield "[DONE]" if data == b"[DONE]" else json.loads(data)


def test_100_client_aborts_mid_stream_leak_no_kv_blocks(fault_server):
    ratios = [1.0, 0.5, 1 / 3, 0.1]
    before = fault_server.metrics()
    max_tokens = 200

    def abort_after_first_chunk(i: int) -> int:
        body = _stream_body(fault_server, [make_image(64 + 32 * (i % 3), 64, seed=i)], ratio=ratios[i % 4],
                            max_tokens=max_tokens)
        with requests.post(fault_server.url + "/v1/chat/completions", json=body, stream=True, timeout=120) as response:
            assert response.status_code == 200, response.text[:300]
            for event in _content_events(response.iter_lines()):
                if event != "[DONE]" and event["choices"] and event["choices"][0]["delta"].get("content"):
                    return 1  # leaving the with-block closes the connection: vLLM aborts the request
        return 0

    started = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        got_content = sum(pool.map(abort_after_first_chunk, range(100)))
    assert got_content == 100
    assert time.monotonic() - started < 240

    idle = fault_server.wait_until_idle()
    assert all(v == 0 for v in idle.values()), idle
    after = fault_server.metrics()
    # The requests were really cut short: far fewer tokens than 100 full answers.
    name = "vllm:generation_tokens_total"
    generated = metric_value(after, name) - metric_value(before, name)
    assert generated < 100 * max_tokens / 4, generated
    assert chat(fault_server, [make_image(64, 64)], ratio=0.5, max_tokens=2).token_ids


def test_error_inside_retention_is_confined_to_its_image(fault_server):
    """vLLM kills the engine when embed_multimodal raises; the plugin must contain it.

    Without the containment in CivicQwen3VLForConditionalGeneration._encode_compact both
    requests below fail with 500 ("EngineCore encountered an issue") and the server exits.
    """
    bystander_image = make_image(320, 256, seed=41)
    reference = chat(fault_server, [bystander_image], ratio=0.5, max_tokens=24, ignore_eos=True)
    # The same prompt shape with a healthy solid image gives the expected prompt size.
    green = chat(fault_server, [make_image(256, 256, seed=42), Image.new("RGB", (256, 256), (0, 255, 0))],
                 ratio=0.5, max_tokens=4)
    log_before = len(fault_server.log_text())

    results = {}

    def bystander():
        results["bystander"] = chat(fault_server, [bystander_image], ratio=0.5, max_tokens=24, ignore_eos=True)

    thread = threading.Thread(target=bystander)
    thread.start()
    faulty = chat(fault_server, [make_image(256, 256, seed=42), Image.new("RGB", (256, 256), MAGENTA)],
                  ratio=0.5, max_tokens=4)
    thread.join(120)

    log = fault_server.log_text()[log_before:]
    # The fault really fired inside retention, for the magenta image only.
    assert "unknown retention policy 'fault-injection'" in log
    assert log.count("CIVIC retention failed for image") == 1
    assert re.search(r"CIVIC retention failed for image \d+ \(grid \(8, 8\), policy 'fault-injection', K=32\)", log)
    assert "EngineCore encountered a fatal error" not in log
    # The faulty request is answered with the same number of visual tokens (K evenly spaced ones).
    assert faulty.prompt_tokens == green.prompt_tokens
    assert len(faulty.token_ids) == 4
    # A request in flight at the same time is untouched.
    assert results["bystander"].token_ids == reference.token_ids
    assert requests.get(fault_server.url + "/health", timeout=10).status_code == 200
    idle = fault_server.wait_until_idle()
    assert all(v == 0 for v in idle.values()), idle


def _tensor_b64(tensor: torch.Tensor) -> str:
    buffer = io.BytesIO()
    torch.save(tensor, buffer)
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.mark.parametrize(("ratio", "status"), [(1.0, 200), (0.5, 400)])
def test_precomputed_embeddings_below_ratio_one_are_a_400_not_an_engine_crash(fault_server, ratio, status):
    # image_embeds cannot be retained. The model refuses them inside the engine, where any
    # exception is fatal (before the processor check, ratio 0.5 here killed the server).
    grid = torch.tensor([1, 16, 16])  # 64 merged tokens
    width = 256 * 4  # out_hidden_size x (1 + 3 DeepStack levels) of the tiny preset
    part = {"type": "image_embeds", "image_embeds": {"image_embeds": _tensor_b64(torch.randn(64, width)),
                                                     "image_grid_thw": _tensor_b64(grid)}}
    body = {"model": fault_server.config.model, "max_tokens": 2, **civic_body(ratio),
            "messages": [{"role": "user", "content": [part, {"type": "text", "text": "hi"}]}]}
    response = requests.post(fault_server.url + "/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == status, response.text[:300]
    if status == 400:
        assert "precomputed image embeddings are kept whole" in response.text
    assert requests.get(fault_server.url + "/health", timeout=10).status_code == 200
    assert chat(fault_server, [make_image(64, 64)], ratio=0.5, max_tokens=2).token_ids


def test_sigterm_drains_the_in_flight_stream_and_exits_cleanly(fault_server):
    """Runs last: it stops the module's server. SIGTERM goes to the API server only, as
    Kubernetes and Docker send it; the engine core and worker must follow."""
    pid = fault_server.process.pid
    assert len(group_members(pid)) >= 3  # API server, engine core, worker
    # On a busy machine the client reads chunks seconds after the server made them: a 400-token
    # stream was already finished server-side by its 5th chunk (no drain to see). So the stream is
    # long and the signal goes at its first chunk.
    max_tokens = 1500
    body = _stream_body(fault_server, [make_image(128, 128, seed=7)], ratio=0.5, max_tokens=max_tokens)
    chunks, finish_reason, usage, done, signalled_at = 0, None, None, False, None
    with requests.post(fault_server.url + "/v1/chat/completions", json=body, stream=True, timeout=120) as response:
        assert response.status_code == 200
        for event in _content_events(response.iter_lines()):
            if event == "[DONE]":
                done = True
                break
            usage = event.get("usage") or usage
            if not event["choices"]:
                continue
            chunks += 1
            finish_reason = event["choices"][0].get("finish_reason") or finish_reason
            if signalled_at is None:
                os.kill(pid, signal.SIGTERM)
                signalled_at = time.monotonic()
    assert signalled_at is not None
    # The request in flight was drained to its end, not cut.
    assert done and finish_reason == "length"
    assert usage["completion_tokens"] == max_tokens
    assert fault_server.process.wait(timeout=DRAIN_SECONDS + 60) == 0
    assert time.monotonic() - signalled_at < DRAIN_SECONDS + 60
    deadline = time.monotonic() + 30
    while group_members(pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert group_members(pid) == [], "processes of the server's group outlived it"
    log = fault_server.log_text()
    assert "[shutdown] EngineCore: draining in-flight requests count=1" in log
    assert "EngineCore encountered a fatal error" not in log
