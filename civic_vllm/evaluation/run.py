"""Running ``civic eval``: every sample to a server, visual tokens and KV blocks from its ``/metrics``."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any

import requests

from civic_vllm.budget import validate_ratio
from civic_vllm.cost import kv_blocks, kv_tokens
from civic_vllm.data import shapes
from civic_vllm.evaluation.methods import METHODS, ImageGeometry, chat_body, video_request_kwargs
from civic_vllm.evaluation.samples import Sample, read_video
from civic_vllm.evaluation.scoring import majority_baseline, score
from civic_vllm.prometheus import metric_labels, metric_value
from civic_vllm.serving import ServerError

RETAINED_METRIC = "civic:visual_tokens_retained_total"
VISUAL_METRIC = "civic:visual_tokens_total"


class EvalServerError(ServerError):
    """The server refused or failed a request: evaluation stops rather than counting it as wrong."""


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
    sample_ratios: Sequence[float] | None = None,
    exit_layer: int | None = None,
    geometry: ImageGeometry | None = None,
    concurrency: int = 8,
    api_key: str | None = None,
    progress: bool = True,
    desc: str | None = None,
) -> dict[str, Any]:
    """Send every sample to the server at ``url``; the scored result (see module doc).

    ``sample_ratios``: one ratio per sample, in place of ``ratio`` (e.g. civic at another method's
    measured token count, video by video). The server should serve nothing else meanwhile:
    visual-token means come from its counters.
    """

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    ratio = validate_ratio(ratio)
    if sample_ratios is not None and len(sample_ratios) != len(samples):
        raise ValueError(f"sample_ratios has {len(sample_ratios)} ratios for {len(samples)} samples")
    ratios = [validate_ratio(r) for r in sample_ratios] if sample_ratios is not None else [ratio] * len(samples)
    if method == "full" and ratio != 1:
        raise ValueError("method 'full' keeps every visual token: use --ratio 1")
    if method == "downscale" and geometry is None:
        raise ValueError("method 'downscale' needs the model's image geometry")
    videos = sum(s.is_video for s in samples)
    if videos:
        video_request_kwargs(method, ratio, exit_layer)  # refuses image-only methods before any request
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
        body = chat_body(sample, model_id, method, ratios[index], exit_layer, geometry)
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
        **({"sample_ratios": ratios} if sample_ratios is not None else {}),
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
