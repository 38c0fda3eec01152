"""The serving benchmarks' load: images, text, request bodies and one streamed request.

Shared by the locustfiles (``benchmarks/locust/``, run by locust under gevent), the driver
(``benchmarks.serve``: warm-up and the paired TTFT probe) and the KV benchmark's images, so all
send exactly the same kind of requests. Nothing here imports locust or gevent.

Every request carries images that were never sent before: a per-request code (run seed, request
counter, image index) is stamped into the pixels as a strip of black/white 8x8 cells in the top
rows. vLLM's prefix cache, encoder cache and multimodal processor cache therefore never hit, and
each request pays the full image preprocessing, vision encoder and prefill: the cost CIVIC changes.

Images are real photographs that ship with scikit-image (and matplotlib's grace_hopper.jpg),
centre-cropped to the requested aspect ratio and resized, and synthetic pictures (gradients and
filled shapes), alternated by default. Sizes should be multiples of 32 (patch 16 x merge 2) so the
processor does not resize them again and N = (H/32)(W/32) exactly.
"""

from __future__ import annotations

import functools
import itertools
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from civic_vllm.client import civic_body, image_data_url, image_message

# Colour photographs bundled in scikit-image (read from the installed package, no download).
SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry",
                  "retina", "camera")
STAMP_CELL = 8  # px: one JPEG block, so the stamp survives compression as a pixel change
STAMP_BITS = 48
SYNTHETIC_COUNT = 8

DEFAULT_QUESTION = "Describe this picture: what is in it, what colours dominate, and where are things?"

_PROSE = (
    "The photograph was taken on a clear afternoon near the harbour, where small boats were tied to "
    "the wooden pier and a few people walked along the stone wall. Behind them the old warehouses had "
    "been turned into shops and cafes, and a red crane stood at the far end of the quay. The light came "
    "from the left, so every mast threw a long shadow across the water, and the hills in the background "
    "looked blue and flat. Someone had left a bicycle against a lamp post next to a stack of crates, and "
    "a dog was sleeping in the shade of a bench."
).split()


def parse_size(text: str | int) -> tuple[int, int]:
    """'896' -> (896, 896); '896x672' -> (896, 672) as (width, height)."""
    text = str(text).lower().strip()
    w, _, h = text.partition("x")
    width, height = int(w), int(h or w)
    if width < 32 or height < 32:
        raise ValueError(f"image size must be at least 32x32, got {text!r}")
    return width, height


def context_text(words: int) -> str:
    """Plain English prose of exactly ``words`` words (the text-length knob; 0 = none)."""
    if words <= 0:
        return ""
    return " ".join(itertools.islice(itertools.cycle(_PROSE), words))


def prompt_text(context_words: int, question: str = DEFAULT_QUESTION) -> str:
    context = context_text(context_words)
    return f"Context: {context}\nQuestion: {question}" if context else question


def _fit(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Centre-crop to the aspect ratio of ``size`` and resize to it."""
    image = image.convert("RGB")
    w, h = image.size
    tw, th = size
    scale = min(w / tw, h / th)
    cw, ch = round(tw * scale), round(th * scale)
    left, top = (w - cw) // 2, (h - ch) // 2
    return image.crop((left, top, left + cw, top + ch)).resize(size, Image.Resampling.BICUBIC)


@functools.cache
def photographs() -> tuple[tuple[str, Image.Image], ...]:
    """(name, image) of every bundled photograph that loads here."""
    out = []
    try:
        from skimage import data
    except ImportError:  # scikit-image is a bench/test dependency; synthetic images still work
        data = None
    for name in SKIMAGE_PHOTOS if data is not None else ():
        try:
            array = getattr(data, name)()
        except Exception:  # a fetcher that would need the network, or a missing file
            continue
        out.append((f"skimage.{name}", Image.fromarray(np.asarray(array)).convert("RGB")))
    try:
        import matplotlib.cbook

        with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as fh:
            out.append(("matplotlib.grace_hopper", Image.open(fh).convert("RGB")))
    except Exception:
        pass
    return tuple(out)


def synthetic_image(size: tuple[int, int], seed: int) -> Image.Image:
    """A structured synthetic picture: a colour gradient with filled ellipses and rectangles."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    x /= max(w - 1, 1)
    y /= max(h - 1, 1)
    coef = rng.uniform(0.2, 1.0, size=(3, 3))
    base = np.stack([coef[c, 0] * x + coef[c, 1] * y + coef[c, 2] * (1 - x) * y for c in range(3)], -1)
    image = Image.fromarray((255 * base / base.max()).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(10):
        x0, y0 = int(rng.integers(0, w * 3 // 4)), int(rng.integers(0, h * 3 // 4))
        bw, bh = int(rng.integers(max(w // 16, 2), max(w // 4, 3))), int(rng.integers(max(h // 16, 2), max(h // 4, 3)))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x0 + bw, y0 + bh), fill=colour)
    return image


@functools.cache
def base_images(size: tuple[int, int], source: str) -> tuple[tuple[str, Image.Image], ...]:
    """The images requests cycle through: ``photo``, ``synthetic`` or ``mix`` (alternating)."""
    if source not in ("photo", "synthetic", "mix"):
        raise ValueError(f"image source must be photo, synthetic or mix, got {source!r}")
    photos = [(name, _fit(img, size)) for name, img in photographs()] if source != "synthetic" else []
    synthetic = [(f"synthetic.{i}", synthetic_image(size, 1000 + i)) for i in range(SYNTHETIC_COUNT)]
    if source == "photo":
        if not photos:
            raise RuntimeError("no bundled photograph could be loaded (scikit-image missing?)")
        return tuple(photos)
    if source == "synthetic" or not photos:
        return tuple(synthetic)
    mixed = [item for pair in itertools.zip_longest(photos, synthetic) for item in pair if item is not None]
    return tuple(mixed)


def stamp(image: Image.Image, code: int) -> Image.Image:
    """A copy of ``image`` with ``code`` written as STAMP_BITS black/white cells from the top left."""
    out = image.copy()
    draw = ImageDraw.Draw(out)
    per_row = max(1, out.size[0] // STAMP_CELL)
    for bit in range(STAMP_BITS):
        row, col = divmod(bit, per_row)
        x0, y0 = col * STAMP_CELL, row * STAMP_CELL
        colour = (255, 255, 255) if (code >> bit) & 1 else (0, 0, 0)
        draw.rectangle((x0, y0, x0 + STAMP_CELL - 1, y0 + STAMP_CELL - 1), fill=colour)
    return out


@dataclass
class Workload:
    """What one request looks like; every knob of the issue's locustfile."""

    image_size: tuple[int, int] = (896, 896)
    images_per_request: int = 1
    context_words: int = 0
    question: str = DEFAULT_QUESTION
    max_tokens: int = 64
    ratio: float | None = None  # None: send no civic kwargs (vanilla server)
    policy: str | None = None
    image_source: str = "mix"
    image_format: str = "JPEG"
    ignore_eos: bool = True
    seed: int = 0  # distinguishes runs: no image is ever sent twice to one server
    settings: dict[str, Any] = field(default_factory=dict)  # other civic_* settings, e.g. {"min_tokens": 4}

    def __post_init__(self) -> None:
        if isinstance(self.image_size, (list, tuple)):
            self.image_size = (int(self.image_size[0]), int(self.image_size[1]))
        else:
            self.image_size = parse_size(self.image_size)
        self.image_format = self.image_format.upper().replace("JPG", "JPEG")
        if self.image_format not in ("JPEG", "PNG"):
            raise ValueError(f"image format must be JPEG or PNG, got {self.image_format!r}")
        if self.images_per_request < 0:
            raise ValueError("images_per_request must be >= 0")
        self._counter = itertools.count()

    def text(self) -> str:
        return prompt_text(self.context_words, self.question)

    def image_urls(self, index: int) -> list[str]:
        pool = base_images(self.image_size, self.image_source)
        urls = []
        for i in range(self.images_per_request):
            _, base = pool[(index * self.images_per_request + i) % len(pool)]
            code = ((self.seed & 0xFFFF) << 32) | ((index & 0xFFFFFF) << 8) | (i & 0xFF)
            urls.append(image_data_url(stamp(base, code), fmt=self.image_format))
        return urls

    def body(self, model: str, index: int | None = None) -> dict[str, Any]:
        """One streaming chat-completions body; ``index`` defaults to the next request number."""
        index = next(self._counter) if index is None else index
        body: dict[str, Any] = {
            "model": model,
            "messages": image_message(self.text(), self.image_urls(index)),
            "max_tokens": self.max_tokens,
            "temperature": 0,
            "stream": True,
            # usage on every chunk: the client counts tokens exactly even when a token's text is empty
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
        }
        if self.ignore_eos:
            body["ignore_eos"] = True  # fixed output length: random-weight models stop anywhere
        if self.ratio is not None:  # a vanilla server gets no civic_* keys at all
            extra = {**self.settings, **({"policy": self.policy} if self.policy else {})}
            body.update(civic_body(self.ratio, **extra))
        return body


@dataclass
class Record:
    """One request as the client saw it. ``tok`` holds [seconds since send, completion tokens so far]
    for every chunk that advanced the count; times are from ``time.perf_counter``, ``start`` is wall."""

    start: float = 0.0
    status: int | None = None
    ok: bool = False
    error: str | None = None
    aborted: bool = False  # still streaming when the run stopped
    tok: list[list[float]] = field(default_factory=list)
    prompt_tokens: int | None = None
    completion_tokens: int = 0
    e2e: float | None = None
    bytes_sent: int = 0

    @property
    def ttft(self) -> float | None:
        return self.tok[0][0] if self.tok else None

    def itl(self) -> list[float]:
        """Inter-token gaps; a chunk carrying d > 1 tokens contributes d equal gaps."""
        gaps: list[float] = []
        for (t0, n0), (t1, n1) in zip(self.tok, self.tok[1:]):
            d = int(n1 - n0)
            if d > 0:
                gaps.extend([(t1 - t0) / d] * d)
        return gaps

    def tpot(self) -> float | None:
        if len(self.tok) < 2 or self.tok[-1][1] <= self.tok[0][1]:
            return None
        return (self.tok[-1][0] - self.tok[0][0]) / (self.tok[-1][1] - self.tok[0][1])

    def as_json(self) -> str:
        d = {k: getattr(self, k) for k in ("start", "status", "ok", "error", "aborted", "prompt_tokens",
                                             "completion_tokens", "e2e", "bytes_sent")}
        d["tok"] = [[round(t, 5), int(n)] for t, n in self.tok]
        return json.dumps(d)

    @classmethod
    def from_json(cls, line: str) -> Record:
        d = json.loads(line)
        return cls(**d)


class StreamError(RuntimeError):
    pass


def stream_chat(session: Any, base_url: str, body: dict, record: Record, timeout: float = 600.0) -> Record:
    """POST one streaming chat request with ``requests``; fill ``record`` as chunks arrive (so a
    caller that is interrupted still has the partial record). Raises StreamError on HTTP or stream
    errors (the record says which)."""
    payload = json.dumps(body).encode()
    record.bytes_sent = len(payload)
    record.start = time.time()
    sent = time.perf_counter()
    with session.post(base_url + "/v1/chat/completions", data=payload, stream=True, timeout=(10, timeout),
                      headers={"Content-Type": "application/json"}) as response:
        record.status = response.status_code
        if response.status_code != 200:
            record.error = f"HTTP {response.status_code}: {response.text[:300]}"
            raise StreamError(record.error)
        content_chunks = 0
        for line in response.iter_lines(chunk_size=None):
            if not line.startswith(b"data: "):
                continue
            if line == b"data: [DONE]":
                break
            now = time.perf_counter() - sent
            chunk = json.loads(line[6:])
            if "error" in chunk:
                record.error = f"stream error: {json.dumps(chunk)[:300]}"
                raise StreamError(record.error)
            usage = chunk.get("usage") or {}
            if usage.get("prompt_tokens") is not None:
                record.prompt_tokens = usage["prompt_tokens"]
            if usage.get("completion_tokens") is not None:
                count = int(usage["completion_tokens"])
            else:  # a server without continuous usage stats: count chunks with content
                choices = chunk.get("choices") or []
                content_chunks += sum(1 for c in choices if (c.get("delta") or {}).get("content"))
                count = content_chunks
            if count > record.completion_tokens:
                record.completion_tokens = count
                record.tok.append([now, count])
    record.e2e = time.perf_counter() - sent
    if not record.tok:
        record.error = "the stream ended without a token"
        raise StreamError(record.error)
    record.ok = True
    return record


def model_id(session: Any, base_url: str) -> str:
    """The first model the server lists (vLLM serves exactly one)."""
    response = session.get(base_url + "/v1/models", timeout=30)
    response.raise_for_status()
    return response.json()["data"][0]["id"]


def summarize_sizes(workload: Workload) -> dict[str, Any]:
    """What the report says about the inputs."""
    pool = base_images(workload.image_size, workload.image_source)
    return {"image_size": list(workload.image_size), "images": [name for name, _ in pool],
            "image_format": workload.image_format, "context_words": workload.context_words}


def percentile(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(np.asarray(values, dtype=float), q)) if len(values) else None
