"""``civic eval``: civic-shapes accuracy through the real serving path (``vllm serve --model-impl civic``).

Any JSONL in the shared format is accepted (``id``, ``image`` relative to the JSONL file,
``question``, ``answer``, ``task``, optional ``box`` / ``size``), including sets this project
did not generate. Every sample is one OpenAI chat request (image, then question; greedy;
``max_tokens`` 24) whose per-request ``mm_processor_kwargs`` select the method:

* ``full``      every visual token (``civic_policy=full``);
* ``civic`` / ``pool`` / ``random``  the retention policy at ``civic_ratio=R``;
* ``downscale`` the image shrunk by the processor (per-request ``size.longest_edge``) to at
  most the K = round(R * N) tokens the retention policies keep, the closest such size;
* ``default``   no CIVIC setting at all: what the server serves by default (a checkpoint's CIVIC
  recipe, or the server's --mm-processor-kwargs); ``--ratio`` then only labels the result.

Video samples (a ``video`` field, an mp4 path relative to the JSONL, instead of ``image``; e.g.
``civic data synth --video``) are one chat of video, then question. Their methods: ``full``,
``civic`` (the temporal policy at ``civic_video_ratio=R``), ``subsample`` (the naive baseline:
the client keeps about R of the video's frame groups, evenly spread, and sends every token of
those) and ``default`` (e.g. a vanilla server with ``--video-pruning-rate``: EVS). Their token
count is the ``<|video_pad|>`` placeholders of the served prompt (``return_token_ids``), which
every server reports, civic or vanilla.

Visual tokens reaching the LLM are read from the plugin's counters on ``/metrics`` (so they are
what the server did, not what this file expects); KV blocks per request follow vLLM's allocation
``ceil((prompt + completion - 1) / block_size)`` (verified against a live server by the planner tests).
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import requests
from PIL import Image

from civic_vllm.budget import num_retained, validate_ratio
from civic_vllm.client import image_data_url, image_message
from civic_vllm.cost import kv_blocks, kv_tokens
from civic_vllm.data import shapes
from civic_vllm.prometheus import metric_labels, metric_value
from civic_vllm.serving import ServerError

METHODS = ("full", "civic", "downscale", "pool", "random", "default", "subsample")
VIDEO_METHODS = ("full", "civic", "subsample", "default")
FRAMES_PER_GROUP = 2  # Qwen3-VL's temporal patch: two frames make one frame group
MAX_TOKENS = 24  # the spec's decoding budget
REQUIRED_FIELDS = ("question", "answer", "task")  # and one of "image" / "video"
RETAINED_METRIC = "civic:visual_tokens_retained_total"
VISUAL_METRIC = "civic:visual_tokens_total"


class EvalDataError(ValueError):
    """A problem with the data file, naming the file and line."""


class EvalServerError(ServerError):
    """The server refused or failed a request: evaluation stops rather than counting it as wrong."""


@dataclass(frozen=True)
class Sample:
    line: int
    record: dict[str, Any]
    image_path: Path  # the media file: an image, or an mp4 for a video sample

    @property
    def is_video(self) -> bool:
        return "video" in self.record

    @property
    def size_split(self) -> str | None:
        size = self.record.get("size")
        if size is None:
            return None
        return "small" if size <= shapes.SMALL_MAX else "large"


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------


def _check_record(rec: Any, where: str) -> dict[str, Any]:
    if not isinstance(rec, dict):
        raise EvalDataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    missing = [k for k in REQUIRED_FIELDS if k not in rec]
    if ("image" in rec) == ("video" in rec):
        missing.insert(0, "image" if "image" not in rec else "exactly one of image / video")
    if missing:
        raise EvalDataError(f"{where}: missing field(s) {', '.join(missing)}")
    for key in ("image" if "image" in rec else "video", "question", "task"):
        if not isinstance(rec[key], str) or not rec[key].strip():
            raise EvalDataError(f"{where}: field {key!r} must be a non-empty string")
    if isinstance(rec["answer"], bool) or not isinstance(rec["answer"], str | int):
        raise EvalDataError(f"{where}: field 'answer' must be a string")
    rec = {**rec, "answer": str(rec["answer"])}
    if rec["task"] == "ground":
        box = rec.get("box", shapes.parse_box(rec["answer"]))
        if (not isinstance(box, list) or len(box) != 4
                or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in box)):
            raise EvalDataError(f"{where}: a ground sample needs 'box' (or an answer) of four numbers, got {box!r}")
        rec["box"] = [float(v) for v in box]
    size = rec.get("size")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int | float) or size < 0):
        raise EvalDataError(f"{where}: field 'size' must be a non-negative number, got {size!r}")
    return rec


def load_samples(path: str | Path) -> list[Sample]:
    """Every sample of a JSONL file, checked; a bad line raises :class:`EvalDataError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise EvalDataError(f"{path}: no such data file")
    samples = []
    with path.open(encoding="utf-8") as fh:
        for lineno, text in enumerate(fh, start=1):
            if not text.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                raw = json.loads(text)
            except json.JSONDecodeError as exc:
                raise EvalDataError(f"{where}: not valid JSON ({exc.msg}, column {exc.colno})") from None
            rec = _check_record(raw, where)
            rec.setdefault("id", f"line{lineno}")
            kind = "image" if "image" in rec else "video"
            image_path = (path.parent / rec[kind]).resolve()
            if not image_path.is_file():
                raise EvalDataError(f"{where}: {kind} {rec[kind]!r} not found (looked for {image_path})")
            if kind == "video":
                if not read_video(image_path).shape[0]:
                    raise EvalDataError(f"{where}: video {rec['video']!r} cannot be read (no frames)")
            else:
                try:
                    with Image.open(image_path) as img:
                        img.size  # noqa: B018 - the header parse is the check
                except OSError as exc:
                    raise EvalDataError(f"{where}: image {rec['image']!r} cannot be read: {exc}") from None
            samples.append(Sample(lineno, rec, image_path))
    if not samples:
        raise EvalDataError(f"{path}: no samples")
    return samples


def read_video(path: str | Path) -> np.ndarray:
    """Every frame of a video file as [F, H, W, 3] uint8 RGB (F = 0 when OpenCV cannot read it)."""
    import cv2

    cap = cv2.VideoCapture(str(path))
    frames = []
    try:
        while True:
            ok, frame = cap.read()
            if not ok:
                break
            frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
    finally:
        cap.release()
    return np.stack(frames) if frames else np.zeros((0, 1, 1, 3), dtype=np.uint8)


# --------------------------------------------------------------------------------------
# Methods
# --------------------------------------------------------------------------------------


def subsample_groups(num_frames: int, ratio: float) -> list[int]:
    """The frame groups uniform subsampling keeps: max(1, round(R * G)) of the G groups, evenly spread
    (the middle group of each of that many equal stretches)."""
    groups = -(-num_frames // FRAMES_PER_GROUP)
    keep = max(1, min(groups, round(ratio * groups)))
    return [int((i + 0.5) * groups / keep) for i in range(keep)]


def subsample_frames(frames: np.ndarray, ratio: float) -> np.ndarray:
    """The frames of :func:`subsample_groups` (both frames of every kept group), in order."""
    index = [g * FRAMES_PER_GROUP + k for g in subsample_groups(len(frames), ratio)
             for k in range(FRAMES_PER_GROUP) if g * FRAMES_PER_GROUP + k < len(frames)]
    return frames[index]


def video_content(sample: Sample, method: str, ratio: float) -> dict[str, Any]:
    """The video's chat content part: the file as it is, or (``subsample``) re-encoded from its kept frames."""
    from civic_vllm.client import video_data_url, video_file_url, video_part

    if method == "subsample" and ratio < 1:
        fps = float(sample.record.get("fps", 2.0))
        return video_part(video_data_url(subsample_frames(read_video(sample.image_path), ratio), fps))
    return video_part(video_file_url(sample.image_path))


def video_request_kwargs(method: str, ratio: float) -> dict[str, Any]:
    """``mm_processor_kwargs`` of a video request (subsampling happens in the client: every token kept)."""
    if method not in VIDEO_METHODS:
        raise ValueError(f"method {method!r} does not apply to videos; choose from {', '.join(VIDEO_METHODS)}")
    if method == "default":
        return {}
    if method in ("full", "subsample"):
        return {"civic_policy": "full"}
    return {"civic_policy": "civic", "civic_ratio": ratio, "civic_video_ratio": ratio}


@dataclass(frozen=True)
class ImageGeometry:
    """What the model's image processor does to sizes (from its preprocessor config)."""

    patch_size: int
    merge_size: int
    min_pixels: int
    max_pixels: int

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    def tokens(self, width: int, height: int, max_pixels: int | None = None, min_pixels: int | None = None) -> int:
        from civic_vllm.planner import resized_image

        w, h = resized_image(width, height, self.patch_size, self.merge_size,
                             self.min_pixels if min_pixels is None else min_pixels,
                             self.max_pixels if max_pixels is None else max_pixels)
        return (w // self.factor) * (h // self.factor)

    def downscale_max_pixels(self, width: int, height: int, ratio: float) -> tuple[int, int]:
        """(longest_edge, tokens): the processor size that gives the most tokens <= K = round(r * N).

        The budget is the retention policies' K for this image, so downscale is compared at
        the same visual-token count (never more).
        """
        full = self.tokens(width, height)
        budget = num_retained(full, ratio)
        f2 = self.factor ** 2
        best = (budget * f2, self.tokens(width, height, budget * f2, f2))
        for k in range(budget + 1, full + 1):  # smart_resize floors both sides: a larger cap may still fit
            tokens = self.tokens(width, height, k * f2, f2)
            if tokens > budget:
                break
            best = (k * f2, tokens)
        return best


def geometry_of(model: str) -> ImageGeometry:
    from civic_vllm.planner import load_model

    info = load_model(model, with_tokenizer=False)
    return ImageGeometry(info.dims.vision.patch_size, info.dims.vision.spatial_merge_size,
                         info.min_pixels, info.max_pixels)


def request_kwargs(method: str, ratio: float, exit_layer: int | None, image_size: tuple[int, int],
                   geometry: ImageGeometry | None) -> dict[str, Any]:
    """``mm_processor_kwargs`` of one request."""
    if method == "default":
        return {}
    if method in ("full", "downscale"):
        kwargs: dict[str, Any] = {"civic_policy": "full"}
        if method == "downscale" and ratio < 1:
            assert geometry is not None
            longest, _ = geometry.downscale_max_pixels(*image_size, ratio)
            kwargs["size"] = {"shortest_edge": geometry.factor ** 2, "longest_edge": longest}
        return kwargs
    kwargs = {"civic_policy": method, "civic_ratio": ratio}
    if exit_layer is not None:
        kwargs["civic_exit_layer"] = exit_layer
    return kwargs


# --------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------


def _mean(values: Sequence[bool]) -> float | None:
    return round(sum(values) / len(values), 4) if values else None


def majority_baseline(samples: Sequence[Sample]) -> dict[str, Any]:
    """Accuracy of always giving each task's most common answer (scored like the model)."""
    by_task: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        by_task[s.record["task"]].append(s)
    answers, per_task, hits = {}, {}, []
    for task, group in sorted(by_task.items()):
        answer = Counter(s.record["answer"].strip().lower() for s in group).most_common(1)[0][0]
        ok = [shapes.is_correct(s.record, answer) for s in group]
        answers[task], per_task[task] = answer, _mean(ok)
        hits += ok
    return {"accuracy": _mean(hits), "per_task": per_task, "answers": answers}


def score(samples: Sequence[Sample], outputs: Sequence[str]) -> dict[str, Any]:
    """Overall, per task, and small / large (single-object samples with ``size``)."""
    hits: dict[str, list[bool]] = defaultdict(list)
    for sample, output in zip(samples, outputs, strict=True):
        ok = shapes.is_correct(sample.record, output)
        task = sample.record["task"]
        hits["overall"].append(ok)
        hits[task].append(ok)
        if (split := sample.size_split) is not None:
            hits[split].append(ok)
            hits[f"{task}_{split}"].append(ok)
    tasks = sorted({s.record["task"] for s in samples})
    return {
        "accuracy": _mean(hits["overall"]),
        "per_task": {t: _mean(hits[t]) for t in tasks},
        "per_task_n": {t: len(hits[t]) for t in tasks},
        "splits": {k: _mean(hits[k]) for k in ("small", "large") if hits[k]},
        "splits_n": {k: len(hits[k]) for k in ("small", "large") if hits[k]},
        "per_task_split": {k: _mean(v) for k, v in sorted(hits.items()) if k.endswith(("_small", "_large"))},
    }


# --------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------


def _metrics(url: str) -> str:
    return requests.get(url + "/metrics", timeout=30).text


def block_size_of(metrics_text: str) -> int | None:
    """vLLM exports its cache config as labels of ``vllm:cache_config_info``."""
    value = metric_labels(metrics_text, "vllm:cache_config_info").get("block_size", "")
    return int(value) if value.isdigit() else None


def served_model(url: str) -> str:
    data = requests.get(url + "/v1/models", timeout=30).json()["data"]
    return data[0]["id"]


def evaluate(
    samples: Sequence[Sample],
    url: str,
    *,
    method: str,
    ratio: float = 1.0,
    exit_layer: int | None = None,
    geometry: ImageGeometry | None = None,
    concurrency: int = 8,
    api_key: str | None = None,
    progress: bool = True,
    desc: str | None = None,
) -> dict[str, Any]:
    """Send every sample to the server at ``url``; the scored result (see module doc).

    The server should serve nothing else meanwhile: visual-token means come from its counters.
    """

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    ratio = validate_ratio(ratio)
    if method == "full" and ratio != 1:
        raise ValueError("method 'full' keeps every visual token: use --ratio 1")
    if method == "downscale" and geometry is None:
        raise ValueError("method 'downscale' needs the model's image geometry")
    videos = sum(s.is_video for s in samples)
    if videos:
        video_request_kwargs(method, ratio)  # refuses image-only methods before any request
    if method == "subsample" and videos < len(samples):
        raise ValueError("method 'subsample' subsamples video frames: the data has image samples")
    model_id = served_model(url)
    before = _metrics(url)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    video_pad = video_pad_id(url, model_id, headers) if videos else None
    local = threading.local()

    def ask(index: int) -> tuple[int, str, dict[str, int]]:
        sample = samples[index]
        session = getattr(local, "session", None) or requests.Session()
        local.session = session
        body = chat_body(sample, model_id, method, ratio, exit_layer, geometry)
        resp = session.post(url + "/v1/chat/completions", json=body, headers=headers, timeout=600)
        if resp.status_code != 200:
            raise EvalServerError(f"line {sample.line} ({sample.record['id']}): HTTP {resp.status_code}: "
                                  f"{resp.text[:500]}")
        out = resp.json()
        usage = dict(out["usage"])
        if sample.is_video:
            usage["video_tokens"] = (out.get("prompt_token_ids") or []).count(video_pad)
        return index, out["choices"][0]["message"]["content"] or "", usage

    from tqdm import tqdm

    outputs: list[str] = [""] * len(samples)
    usages: list[dict[str, int]] = [{}] * len(samples)
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        futures = [pool.submit(ask, i) for i in range(len(samples))]
        try:
            for fut in tqdm(as_completed(futures), total=len(futures), disable=not progress,
                            desc=desc or f"{method} r={ratio:.3g}", unit="req"):
                index, text, usage = fut.result()
                outputs[index], usages[index] = text, usage
        except BaseException:
            for f in futures:
                f.cancel()
            raise
    wall = time.perf_counter() - start
    after = _metrics(url)
    block_size = block_size_of(after)
    if block_size is None:
        raise EvalServerError(f"{url}/metrics has no vllm:cache_config_info block_size: is it a vLLM server?")


    n = len(samples)
    visual = metric_value(after, RETAINED_METRIC) - metric_value(before, RETAINED_METRIC)
    visual_full = metric_value(after, VISUAL_METRIC) - metric_value(before, VISUAL_METRIC)
    video_tokens = [u["video_tokens"] for u in usages if "video_tokens" in u]
    blocks = [kv_blocks(kv_tokens(u["prompt_tokens"], u["completion_tokens"]), block_size) for u in usages]
    result = {
        "model": model_id, "method": method, "ratio": ratio, "exit_layer": exit_layer, "n": n,
        **score(samples, outputs),
        "baseline": majority_baseline(samples),
        "mean_visual_tokens": round(visual / n, 2),
        "mean_visual_tokens_before_retention": round(visual_full / n, 2),
        **({"videos": len(video_tokens), "mean_video_tokens": round(sum(video_tokens) / len(video_tokens), 2),
            "video_tokens": video_tokens} if video_tokens else {}),
        "mean_prompt_tokens": round(sum(u["prompt_tokens"] for u in usages) / n, 2),
        "mean_kv_blocks": round(sum(blocks) / n, 3),
        "block_size": block_size,
        "wall_s": round(wall, 2),
        "requests_per_s": round(n / wall, 3),
    }
    result["predictions"] = [
        {"id": s.record["id"], "line": s.line, "task": s.record["task"], "answer": s.record["answer"],
         "output": o, "correct": shapes.is_correct(s.record, o)}
        for s, o in zip(samples, outputs, strict=True)
    ]
    return result


def chat_body(sample: Sample, model_id: str, method: str, ratio: float, exit_layer: int | None = None,
              geometry: ImageGeometry | None = None) -> dict[str, Any]:
    """The chat request of one sample (greedy, ``MAX_TOKENS``); video requests ask for the prompt's token ids."""
    body: dict[str, Any] = {"model": model_id, "max_tokens": MAX_TOKENS, "temperature": 0.0}
    if sample.is_video:
        return {**body, "messages": image_message(sample.record["question"], [video_content(sample, method, ratio)]),
                "mm_processor_kwargs": video_request_kwargs(method, ratio), "return_token_ids": True}
    with Image.open(sample.image_path) as img:
        image = img.convert("RGB")
    return {**body, "messages": image_message(sample.record["question"], [image_data_url(image)]),
            "mm_processor_kwargs": request_kwargs(method, ratio, exit_layer, image.size, geometry)}


def video_pad_id(url: str, model_id: str, headers: dict[str, str] | None = None) -> int:
    """The server's ``<|video_pad|>`` token id, from its own /tokenize (works for any served model)."""
    resp = requests.post(url + "/tokenize", json={"model": model_id, "prompt": "<|video_pad|>",
                                                  "add_special_tokens": False}, headers=headers or {}, timeout=60)
    if resp.status_code != 200:
        raise EvalServerError(f"{url}/tokenize: HTTP {resp.status_code}: {resp.text[:300]}")
    tokens = resp.json()["tokens"]
    if len(tokens) != 1:
        raise EvalServerError(f"{url}: <|video_pad|> is not one token ({tokens}): not a Qwen3-VL tokenizer?")
    return int(tokens[0])


def summary(result: dict[str, Any]) -> str:
    base = result["baseline"]
    lines = [f"{result['method']} r={result['ratio']:.3g}  n={result['n']}  accuracy {result['accuracy']:.3f} "
             f"(most-common-answer baseline {base['accuracy']:.3f})  visual tokens {result['mean_visual_tokens']:.1f}"
             f"  KV blocks {result['mean_kv_blocks']:.2f}"
             + (f"  video tokens {result['mean_video_tokens']:.1f}" if "mean_video_tokens" in result else "")]
    for task, acc in result["per_task"].items():
        lines.append(f"  {task:<10} {acc:.3f}  (baseline {base['per_task'][task]:.3f}, n={result['per_task_n'][task]})")
    for key, acc in result["per_task_split"].items():
        lines.append(f"  {key:<16} {acc:.3f}")
    return "\n".join(lines)


def video_profile(samples: Sequence[Sample]) -> tuple[int, int, int] | None:
    """(width, height, frames) covering every video of the data (None: no video), for the encoder profile
    (vLLM's default profiles a maximum-size video, which takes minutes on a CPU)."""
    sizes = []
    for s in samples:
        if s.is_video:
            rec = s.record
            if all(isinstance(rec.get(k), int) for k in ("width", "height", "frames")):
                sizes.append((rec["width"], rec["height"], rec["frames"]))
            else:
                frames = read_video(s.image_path)
                sizes.append((frames.shape[2], frames.shape[1], frames.shape[0]))
    if not sizes:
        return None
    return tuple(max(v[i] for v in sizes) for i in range(3))  # type: ignore[return-value]


def server_config(model: str, samples: Sequence[Sample], *, dtype: str = "float32", civic: bool = True,
                  extra_args: Sequence[str] = (), **overrides: Any):
    """A server for these samples: one image or one video a prompt, the video profile sized to the data."""
    from civic_vllm.serving import ServerConfig

    profile = video_profile(samples)
    video = {"videos_per_prompt": 1, "profile_video_size": profile} if profile else {}
    return ServerConfig(model=model, dtype=dtype, images_per_prompt=1, civic=civic, trust_request_mm_kwargs=civic,
                        extra_args=tuple(extra_args), **video, **overrides)
