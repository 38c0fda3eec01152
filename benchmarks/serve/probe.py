"""Paired TTFT probe (drift-cancelling) and the vision-encoder share (HF vision tower on the same
pixels)."""

from __future__ import annotations

import base64
import io
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import requests

from benchmarks.harness import BenchError, wait_idle
from benchmarks.load import Record, StreamError, Workload, stream_chat
from benchmarks.serve.common import (
    C_KEPT,
    C_SEEN,
    M_PREFILL,
    M_QUEUE,
    M_TTFT,
    ROOT,
    Config,
    Run,
    WorkloadSpec,
    hist_delta,
    parse_metrics,
    scalar_delta,
)
from civic_vllm.budget import num_retained
from civic_vllm.serving import VllmServer


def wait_for_count(server: VllmServer, before: dict, name: str, timeout: float = 5.0) -> dict:
    """/metrics after the request's histograms (observed when it finished) were updated."""
    deadline = time.monotonic() + timeout
    while True:
        after = parse_metrics(server.metrics())
        if after["hists"][name]["count"] > before["hists"][name]["count"] or time.monotonic() > deadline:
            return after
        time.sleep(0.05)


def paired_probe(run: Run, spec: WorkloadSpec) -> list[dict]:
    rows = []
    configs = run.probe_configs
    workloads = {c.label: run.workload(spec, c, max_tokens=run.bounds.probe_max_tokens) for c in configs}
    sessions = {name: requests.Session() for name in run.servers}
    last_server = None

    def send(config: Config, rec: Record) -> None:
        try:
            body = workloads[config.label].body(run.served_model)
            stream_chat(sessions[config.server], run.servers[config.server].url, body, rec,
                        run.bounds.request_timeout_s)
        except (StreamError, requests.RequestException) as exc:
            raise BenchError(f"probe request to {config.label} failed: {exc}") from exc

    try:
        for rnd in range(run.bounds.probe_rounds):
            k = rnd % len(configs)
            for config in configs[k:] + configs[:k]:  # rotate the order every round
                server = run.servers[config.server]
                if config.server != last_server:
                    # The first request after the other server worked was measured up to 3x slower (tiny
                    # preset): vanilla, alone on its server, would pay that every time. An untimed request
                    # first makes every measured request follow one on the same server.
                    wait_idle(server, run.bounds)
                    send(config, Record())
                    last_server = config.server
                wait_idle(server, run.bounds)
                before = parse_metrics(server.metrics())
                rec = Record()
                send(config, rec)
                after = wait_for_count(server, before, M_PREFILL)
                rows.append({
                    "workload": spec.name, "config": config.label, "round": rnd,
                    "client_ttft_s": rec.ttft,
                    "server_ttft_s": hist_delta(after, before, M_TTFT)["sum"],
                    "server_queue_s": hist_delta(after, before, M_QUEUE)["sum"],
                    "server_prefill_s": hist_delta(after, before, M_PREFILL)["sum"],
                    "prompt_tokens": rec.prompt_tokens,
                    "visual_tokens": scalar_delta(after, before, C_SEEN),
                    "visual_tokens_retained": scalar_delta(after, before, C_KEPT),
                })
    finally:
        for s in sessions.values():
            s.close()
    return rows


def paired_load(run: Run, spec: WorkloadSpec, configs: Sequence[Config], users: int, rounds: int,
                waves: int = 3) -> list[dict]:
    """Throughput under load with an interval: each round sends ``waves`` x ``users`` requests, ``users``
    at a time, to each of ``configs`` in turn (order rotated every round, every request its own fresh
    input), and records the burst's output tokens over its wall time (first send to last completion)
    and its median TTFT. Pairing the contenders round by round cancels machine drift, as the TTFT
    probe does; ratio and bootstrap interval from :func:`bootstrap_ratio_ci` over the rounds."""
    workloads = {c.label: run.workload(spec, c, max_tokens=run.max_tokens) for c in configs}
    url = {c.label: run.servers[c.server].url for c in configs}

    def send(label: str, body: dict) -> Record:
        rec = Record()
        with requests.Session() as session:  # one per thread: a Session is not thread-safe
            try:
                stream_chat(session, url[label], body, rec, run.bounds.request_timeout_s)
            except (StreamError, requests.RequestException) as exc:
                raise BenchError(f"load request to {label} failed: {exc}") from exc
        return rec

    rows = []
    with ThreadPoolExecutor(users) as pool:
        for rnd in range(rounds):
            k = rnd % len(configs)
            for config in configs[k:] + configs[:k]:
                server = run.servers[config.server]
                wait_idle(server, run.bounds)
                send(config.label, workloads[config.label].body(run.served_model))  # untimed: see paired_probe
                wait_idle(server, run.bounds)
                bodies = [workloads[config.label].body(run.served_model)  # encoded untimed
                          for _ in range(waves * users)]
                start = time.perf_counter()
                records = list(pool.map(lambda body, label=config.label: send(label, body), bodies))
                wall = time.perf_counter() - start
                output = sum(r.completion_tokens for r in records)
                rows.append({"workload": spec.name, "config": config.label, "round": rnd, "users": users,
                             "requests": len(records),
                             "wall_s": wall, "output_tokens": output, "output_tok_per_s": output / wall,
                             "ttft_p50_s": statistics.median(r.ttft for r in records if r.ttft is not None)})
    return rows


def bootstrap_ratio_ci(num: Sequence[float], den: Sequence[float], n: int = 2000, seed: int = 0) -> list[float] | None:
    """95% CI of median(num)/median(den), resampling rounds in pairs (a rough guide to noise)."""
    if len(num) < 3 or len(num) != len(den):
        return None
    rng = np.random.default_rng(seed)
    a, b = np.asarray(num), np.asarray(den)
    idx = rng.integers(0, len(a), size=(n, len(a)))
    ratios = np.median(a[idx], axis=1) / np.median(b[idx], axis=1)
    return [float(np.percentile(ratios, 2.5)), float(np.percentile(ratios, 97.5))]


def bootstrap_geomean_ci(num: Sequence[float], den: Sequence[float], n: int = 2000,
                         seed: int = 0) -> tuple[float, list[float] | None]:
    """Geometric mean of the per-round ratios num[i]/den[i] and its 95% percentile-bootstrap CI over
    rounds. Where the two contenders of a round run back to back, each round's ratio cancels the
    machine's slow swings (a round's bursts can take twice as long as the next's), which a ratio of
    medians across rounds does not; this is the statistic for paired load rounds."""
    logs = np.log(np.asarray(num, dtype=float) / np.asarray(den, dtype=float))
    if len(logs) == 0:
        raise ValueError("no paired rounds")
    centre = float(np.exp(logs.mean()))
    if len(logs) < 3:
        return centre, None
    idx = np.random.default_rng(seed).integers(0, len(logs), size=(n, len(logs)))
    means = np.exp(logs[idx].mean(axis=1))
    return centre, [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def decode_data_url(url: str):
    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")


def hf_prompt_inputs(processor: Any, images: list, text: str) -> tuple[Any, Any]:
    """HF processor outputs of one user turn [images..., text] (batch size 1, generation prompt added)
    and the raw uint8 patch pixels vLLM ships (the random policy's seed)."""
    import torch

    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                           tokenize=False)
    inputs = processor(text=[prompt], images=images, return_tensors="pt")
    raw = processor.image_processor(images=images, do_rescale=False, do_normalize=False, return_tensors="pt")
    return inputs, raw["pixel_values"].round().to(torch.uint8)


def image_retentions(grid_thw: Any, merge: int, ratio: float, exit_layer: int | None, policy: str,
                     min_tokens: int = 1, exit_context: bool = False) -> list:
    """One ImageRetention per image of ``grid_thw`` (patches): K = num_retained(N, ratio, min_tokens)."""
    from civic_vllm.retention.selection import ImageRetention

    retentions = []
    for _, h, w in grid_thw.tolist():
        n = (h // merge) * (w // merge)
        retentions.append(ImageRetention(grid_hw=(h // merge, w // merge), num_kept=num_retained(n, ratio, min_tokens),
                                         policy=policy, exit_layer=exit_layer, exit_context=exit_context))
    return retentions


def hf_compact_prefill(model: Any, inputs: Any, seed_pixels: Any, retentions: list, scorer: Any = None,
                       last_token_only: bool = False) -> Any:
    """One HF prefill through CIVIC's compact path (civic_vllm.hf_compact): vision tower with retention at
    each retention's exit layer, mergers, LLM over the compact prompt. ``last_token_only``: the LM head on the
    last position only, as vLLM's prefill does (compact_logits applies it to every position)."""
    from types import SimpleNamespace

    from civic_vllm.hf_compact import build_compact_batch, compact_logits

    batch = build_compact_batch(model, inputs["input_ids"], inputs["pixel_values"], inputs["image_grid_thw"],
                                inputs["mm_token_type_ids"], retentions, seed_pixels=seed_pixels, scorer=scorer)
    if last_token_only:
        head = model.lm_head
        model = SimpleNamespace(model=model.model, lm_head=lambda hidden: head(hidden[:, -1:]))
    return compact_logits(model, batch)


def timed(fn, reps: int) -> list[float]:
    """Seconds of ``reps`` calls of ``fn`` after one untimed warm-up call."""
    fn()
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def vision_probe_main(spec_json: str) -> int:
    """Subprocess entry (``--vision-probe``): prints one JSON line with in-process timings."""
    spec = json.loads(spec_json)
    if spec.get("cpus"):
        os.sched_setaffinity(0, spec["cpus"])
    import torch

    torch.set_num_threads(1)
    import transformers
    from transformers import AutoConfig, AutoProcessor

    from civic_vllm.recipe import read_recipe

    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[spec["dtype"]]
    settings = spec.get("civic_settings") or {}  # the civic requests' other settings (policy, min_tokens, ...)
    # The checkpoint's own family class (Qwen3-VL, -MoE, Qwen3.5, -MoE): their vision towers differ (DeepStack).
    architecture = AutoConfig.from_pretrained(spec["model"]).architectures[0].removeprefix("Civic")
    model = getattr(transformers, architecture).from_pretrained(spec["model"], dtype=dtype).eval()
    processor = AutoProcessor.from_pretrained(spec["model"])
    wl = Workload(**spec["workload"])
    images = [decode_data_url(u) for u in wl.image_urls(0)]
    inputs, seed_pixels = hf_prompt_inputs(processor, images, wl.text())
    merge = model.config.vision_config.spatial_merge_size
    grid = inputs["image_grid_thw"]

    result: dict[str, Any] = {"threads": torch.get_num_threads(), "cpus": sorted(os.sched_getaffinity(0)),
                              "prompt_tokens": int(inputs["input_ids"].shape[1]),
                              "grid_thw": grid.tolist(), "dtype": spec["dtype"]}
    with torch.inference_mode():
        pixels = inputs["pixel_values"].to(dtype)
        result["vision_s"] = timed(lambda: model.model.visual(pixels, grid_thw=grid), spec["reps"])
        result["full_prefill_s"] = timed(lambda: model(**inputs, logits_to_keep=1), spec["reps"])
        for variant in spec["variants"]:
            # [ratio, exit layer] sent per request, or [ratio, exit layer, policy] for the recipe default
            ratio, exit_layer, recipe_policy = (*variant, None)[:3]
            policy = recipe_policy or settings.get("policy", "civic")
            scorer = recipe_scorer(spec["model"]) if policy == "learned" else None
            min_tokens = 1 if recipe_policy else settings.get("min_tokens", 1)
            context = bool(recipe_policy) and read_recipe(spec["model"]).exit_context  # the default's context
            retentions = image_retentions(grid, merge, ratio, exit_layer, policy, min_tokens, context)
            result[compact_key(ratio, exit_layer, recipe_policy is not None)] = timed(
                lambda retentions=retentions, scorer=scorer: hf_compact_prefill(model, inputs, seed_pixels,
                                                                                retentions, scorer),
                spec["reps"])
    print("VISION_PROBE " + json.dumps(result), flush=True)
    return 0


def compact_key(ratio: float, exit_layer: int | None, default: bool = False) -> str:
    """The vision probe's key for the HF compact prefill of one civic configuration."""
    return (f"compact_prefill_s_at_r{ratio!r}" + (f"_exit{exit_layer}" if exit_layer else "")
            + ("_recipe_default" if default else ""))


def recipe_scorer(model: str | Path):
    """The token scorer of a checkpoint's CIVIC recipe (fp32, eval mode)."""
    from civic_vllm.recipe import load_scorer, read_recipe

    recipe = read_recipe(model)
    if recipe is None or recipe.scorer is None:
        raise BenchError(f"{model}: policy 'learned' needs a CIVIC recipe with a scorer")
    return load_scorer(model, recipe)


def measure_vision(run: Run, spec: WorkloadSpec, cpus: list[int]) -> dict:
    wl = run.workload(spec, Config("vanilla", None), seed=0xFFF0 + len(run.vision))
    payload = {
        "model": str(run.model), "dtype": run.dtype, "reps": run.bounds.vision_reps, "cpus": cpus,
        "civic_settings": getattr(run.args, "civic_settings", None) or {},
        "variants": [[float(c.ratio), c.exit_layer] + ([c.policy] if c.default else [])
                     for c in run.main_configs if c.ratio != 1],
        "workload": {"image_size": list(wl.image_size), "images_per_request": wl.images_per_request,
                     "context_words": wl.context_words, "question": wl.question, "image_source": wl.image_source,
                     "image_format": wl.image_format, "seed": wl.seed},
    }
    cmd = [sys.executable, "-m", "benchmarks.serve", "--vision-probe", json.dumps(payload)]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("VISION_PROBE ")), None)
    if proc.returncode != 0 or line is None:
        raise BenchError(f"vision timing failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    res = json.loads(line.split(" ", 1)[1])
    summary = {"method": "HF transformers Qwen3VLForConditionalGeneration of the served checkpoint, "
                         f"{run.dtype}, torch.set_num_threads(1), pinned to CPU(s) {cpus} (the vLLM worker's), "
                         "both servers idle; model.model.visual on the processor's pixel_values of the "
                         "workload's first request (the same JPEG pixels the server decodes); median of "
                         f"{run.bounds.vision_reps} after one untimed call",
               **{k: v for k, v in res.items() if not k.endswith("_s") and not k.startswith("compact_prefill_s")}}
    for key, values in res.items():
        if isinstance(values, list) and (key.endswith("_s") or key.startswith("compact_prefill_s_at_r")):
            summary[key] = statistics.median(values)
            summary[key + "_runs"] = values
    summary["vision_share_of_hf_prefill"] = summary["vision_s"] / summary["full_prefill_s"]
    return summary
