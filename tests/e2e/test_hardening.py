"""Hardening against a real `vllm serve --model-impl civic` (issue 21).

* The per-image encoder cap: a 10000x10000 image at ratio 0.05 reaches the vision tower with at
  most the cap's patches (the default, derived from --max-model-len, is exported on /metrics and
  logged at start-up); a request raising max_pixels past the cap gets a 400 naming it, and the
  server keeps serving.
* Shutdown: two SIGTERMs in a row to a program stopping its server (the second while vLLM drains
  an in-flight request) leave no process of the server's group behind.

Route access control (civic_vllm.access) is tested in test_security.py.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import requests
from PIL import Image, ImageDraw

from civic_vllm.prometheus import metric_value
from civic_vllm.serving import ServerConfig, VllmServer, group_members

pytestmark = pytest.mark.e2e

MAX_MODEL_LEN = 1024  # the default cap is max_model_len merged tokens: small, so the test is quick


def _vision_config(model: str) -> dict:
    return json.loads((Path(model) / "config.json").read_text())["vision_config"]


@pytest.fixture(scope="module")
def capped_server(tiny_model):
    config = ServerConfig(model=tiny_model, dtype="float32", max_model_len=MAX_MODEL_LEN, max_num_batched_tokens=256)
    with VllmServer(config) as server:
        yield server


def _huge_png(side: int) -> str:
    image = Image.new("RGB", (side, side), (30, 90, 160))
    draw = ImageDraw.Draw(image)
    for i in range(6):
        draw.rectangle([i * side // 7, i * side // 9, i * side // 7 + side // 5, i * side // 9 + side // 6],
                       fill=(40 * i, 255 - 30 * i, 90))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _post(server, image_url: str, mm_kwargs: dict) -> requests.Response:
    body = {
        "model": server.config.model, "max_tokens": 2, "mm_processor_kwargs": mm_kwargs,
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": image_url}}, {"type": "text", "text": "What is it?"}]}],
    }
    return requests.post(server.url + "/v1/chat/completions", json=body, timeout=300)


COUNTERS = ("civic:vision_patches_total", "civic:images_capped_total", "civic:visual_tokens_total",
            "civic:visual_tokens_retained_total", "civic:images_total")


def _counters(server) -> dict[str, float]:
    text = server.metrics()
    return {name: metric_value(text, name) for name in (*COUNTERS, "civic:image_patch_cap")}


def test_a_huge_image_at_a_tiny_ratio_is_capped_before_the_encoder(capped_server):
    vision = _vision_config(capped_server.config.model)
    merge = vision["spatial_merge_size"]
    before = _counters(capped_server)
    response = _post(capped_server, _huge_png(10000), {"civic_ratio": 0.05})
    assert response.status_code == 200, response.text[:500]
    after = _counters(capped_server)
    delta = {name: after[name] - before[name] for name in COUNTERS}
    cap = after["civic:image_patch_cap"]
    # The default cap: N <= max_model_len, whatever the ratio (a vanilla server's largest image).
    assert cap == MAX_MODEL_LEN * merge**2
    assert f"per-image encoder cap: {int(cap)} vision patches" in capped_server.log_text()
    assert delta["civic:images_total"] == 1 and delta["civic:images_capped_total"] == 1
    patches = delta["civic:vision_patches_total"]
    assert cap / 2 < patches <= cap  # downscaled to fit, not far below the cap
    num_tokens = delta["civic:visual_tokens_total"]
    assert num_tokens == patches / merge**2
    assert delta["civic:visual_tokens_retained_total"] == math.ceil(0.05 * num_tokens)


def test_raising_max_pixels_past_the_cap_is_refused_and_the_server_keeps_serving(capped_server):
    vision = _vision_config(capped_server.config.model)
    cap = MAX_MODEL_LEN * vision["spatial_merge_size"] ** 2
    cap_pixels = cap * vision["patch_size"] ** 2
    small = _huge_png(256)
    for mm_kwargs in ({"civic_ratio": 0.05, "max_pixels": cap_pixels + 1},
                      {"civic_ratio": 0.05, "images_kwargs": {"size": {"longest_edge": 4 * cap_pixels,
                                                                       "shortest_edge": 65536}}}):
        response = _post(capped_server, small, mm_kwargs)
        assert response.status_code == 400, response.text[:500]
        assert f"per-image encoder cap of {cap} vision patches" in response.text
    response = _post(capped_server, small, {"civic_max_image_patches": 10 * cap})
    assert response.status_code == 400 and "can only be set by the operator" in response.text
    # Within the cap, and a request lowering it: served.
    assert _post(capped_server, small, {"civic_ratio": 0.05, "max_pixels": cap_pixels}).status_code == 200
    assert _post(capped_server, small, {"max_pixels": 128 * 128}).status_code == 200
    assert requests.get(capped_server.url + "/health", timeout=10).status_code == 200


# ---- shutdown under repeated signals ---------------------------------------------------------------

# A program that serves the tiny model (argv: model, log path) as deploy/ does (drain on SIGTERM)
# and idles until signalled.
CALLER = textwrap.dedent("""
    import sys, time
    from civic_vllm.serving import ServerConfig, VllmServer
    config = ServerConfig(model=sys.argv[1], dtype="float32", extra_args=["--shutdown-timeout", "30"])
    with VllmServer(config, log_path=sys.argv[2]) as server:
        print(server.process.pid, flush=True)
        time.sleep(600)
""")


def _sigkill_pending(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True  # gone
    pending = {line.split(":")[0]: int(line.split()[1], 16) for line in status.splitlines()
               if line.startswith(("SigPnd:", "ShdPnd:"))}
    return any(mask & (1 << (signal.SIGKILL - 1)) for mask in pending.values())


def _wait_for(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.2)
    return condition()


def test_two_sigterms_in_a_row_leave_no_process_behind(tiny_model, tmp_path):
    log = tmp_path / "server.log"
    caller = subprocess.Popen([sys.executable, "-c", CALLER, tiny_model, str(log)],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    server_pid = None
    try:
        server_pid = int(caller.stdout.readline())
        assert len(group_members(server_pid)) >= 3  # API server, engine core, worker
        caller.send_signal(signal.SIGTERM)  # the caller's stop() sends SIGTERM to the server's group
        assert _wait_for(lambda: "[shutdown]" in log.read_text(errors="replace"), 60), log.read_text()[-3000:]
        # vLLM's own shutdown takes seconds: the second signal comes while stop() waits for it.
        assert group_members(server_pid), "the server was gone before the second signal: nothing tested"
        caller.send_signal(signal.SIGTERM)
        assert caller.wait(timeout=60) == 128 + signal.SIGTERM
        # The caller is gone: so must its server be, at once, not seconds later when vLLM's own
        # shutdown ends (or never, if it hangs). A process still listed must already have a
        # SIGKILL pending; a second covers one caught between taking SIGKILL and becoming a zombie.
        left = [pid for pid in group_members(server_pid) if not _sigkill_pending(pid)]
        assert not left or _wait_for(lambda: not group_members(server_pid), 1.0), \
            f"processes of the server's group outlived the caller: {group_members(server_pid)}"
    finally:
        caller.kill()
        caller.wait()
        if server_pid is not None and group_members(server_pid):  # the failure case must not leak it
            os.killpg(server_pid, signal.SIGKILL)
