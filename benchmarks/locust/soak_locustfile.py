"""Soak traffic for a civic server (run by benchmarks/soak.py; usable alone with locust).

Mixed retention ratios and policies, image sizes (real photographs from scikit-image) and
image counts (0-3 per prompt), short answers, some of them streamed. The distinct images are
a fixed pool built once per process, so vLLM's processor and prefix caches fill during the
warm-up and memory growth afterwards would be a leak, not a cache filling up.

    SOAK_MODEL=/path/to/model locust -f benchmarks/locust/soak_locustfile.py --headless \
        -u 4 -r 4 -t 120s --host http://127.0.0.1:PORT
"""

from __future__ import annotations

import base64
import io
import json
import os
import random

from locust import HttpUser, between, task
from PIL import Image

MODEL = os.environ.get("SOAK_MODEL", "")
RATIOS = (1.0, 0.5, 1 / 3, 0.25, 0.1)
POLICIES = ("civic", "civic", "civic", "pool", "random")
SIZES = ((256, 256), (448, 448), (640, 320), (320, 512))
IMAGE_COUNTS = (0, 1, 1, 1, 2, 3)
QUESTIONS = ("Describe this image.", "What is in the picture?", "How many objects are there?")


def _photo_pool() -> list[str]:
    from skimage import data

    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    urls = []
    for index, array in enumerate(photos):
        image = Image.fromarray(array).convert("RGB")
        for size in SIZES[index % 2 :: 2]:  # two sizes per photo: 8 distinct images
            buffer = io.BytesIO()
            image.resize(size).save(buffer, format="JPEG", quality=90)
            urls.append("data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode())
    return urls


IMAGES = _photo_pool()


class CivicSoakUser(HttpUser):
    wait_time = between(0.2, 1.0)

    def on_start(self):
        self.rng = random.Random(id(self))

    def _body(self) -> tuple[dict, str]:
        rng = self.rng
        count = rng.choice(IMAGE_COUNTS)
        parts = [{"type": "image_url", "image_url": {"url": url}} for url in rng.sample(IMAGES, count)]
        parts.append({"type": "text", "text": rng.choice(QUESTIONS)})
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": parts}],
            "max_tokens": rng.randint(4, 24),
            "temperature": 0.7,
        }
        if count:
            body["mm_processor_kwargs"] = {"civic_ratio": rng.choice(RATIOS), "civic_policy": rng.choice(POLICIES)}
        return body, f"chat images={count}"

    @task(3)
    def chat(self):
        body, name = self._body()
        with self.client.post("/v1/chat/completions", json=body, name=name, catch_response=True, timeout=180) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {resp.text[:200]}")
                return
            payload = resp.json()
            if not payload.get("choices") or payload.get("usage", {}).get("completion_tokens", 0) < 1:
                resp.failure(f"empty answer: {resp.text[:200]}")
            else:
                resp.success()

    @task(1)
    def chat_streamed(self):
        body, name = self._body()
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
        with self.client.post("/v1/chat/completions", json=body, name=name + " stream", stream=True,
                              catch_response=True, timeout=180) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {resp.text[:200]}")
                return
            done, usage = False, None
            for line in resp.iter_lines():
                if not line.startswith(b"data: "):
                    continue
                data = line[len(b"data: "):]
                if data == b"[DONE]":
                    done = True
                    break
                event = json.loads(data)
                if "error" in event:
                    resp.failure(f"stream error: {event['error']}")
                    return
                usage = event.get("usage") or usage
            if done and usage and usage.get("completion_tokens", 0) >= 1:
                resp.success()
            else:
                resp.failure(f"stream ended early (done={done}, usage={usage})")
