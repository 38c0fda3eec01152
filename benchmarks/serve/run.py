"""A run: build the checkpoint (and its recipe copy), size the pool, start both servers, measure every
point, save resumable state."""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from dataclasses import asdict
from fractions import Fraction
from pathlib import Path
from typing import Any

import requests

from benchmarks.harness import BenchError, Geometry, log, pool_geometry
from benchmarks.load import Record, model_id
from benchmarks.serve.common import (
    ACCEPT_WORKLOAD,
    C_IMAGES,
    C_KEPT,
    C_SEEN,
    CPU_BLOCK_SIZE,
    FULL,
    MAX_NUM_BATCHED_TOKENS,
    PROBE_FIT_RATIOS,
    QUICK,
    RESULTS,
    ROOT,
    VANILLA_RESIDENT,
    WORKLOADS,
    Bounds,
    Config,
    Run,
    WorkloadSpec,
)
from benchmarks.serve.point import client_stats, run_point, warm_up
from benchmarks.serve.probe import measure_vision, paired_probe
from benchmarks.serve.servers import client_cpus, omp_binding, worker_cpus
from civic_vllm.budget import num_merged_tokens
from civic_vllm.model_factory import make_model, models_root
from civic_vllm.prometheus import metric_value
from civic_vllm.serving import ServerConfig, VllmServer, stop_all


def text_tokens(tokenizer: Any, text: str, images: int) -> int:
    """Prompt tokens of one user turn [images..., text], image placeholders counted as 0."""
    content = [{"type": "image"} for _ in range(images)] + [{"type": "text", "text": text}]
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                           tokenize=False)
    pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return len(ids) - ids.count(pad)


def size_pool(run: Run) -> dict:
    """max_model_len and the KV pool (bytes) from the workloads' vanilla prompt lengths."""
    from transformers import AutoTokenizer

    geometry = Geometry.from_checkpoint(run.model, run.dtype)
    tokenizer = AutoTokenizer.from_pretrained(str(run.model))
    expected = {}
    for spec in run.specs:
        for size in (spec.width, spec.height):
            if size % (geometry.patch_size * geometry.merge_size):
                raise BenchError(f"{spec.name}: image side {size} is not a multiple of "
                                 f"{geometry.patch_size * geometry.merge_size}")
        n = num_merged_tokens((1, spec.height // geometry.patch_size, spec.width // geometry.patch_size),
                              geometry.merge_size)
        expected[spec.name] = text_tokens(tokenizer, spec.workload().text(), spec.images) + n * spec.images
    longest = max(expected.values())
    pool = plan_pool(geometry, longest, expected.get(ACCEPT_WORKLOAD, longest), run.max_tokens)
    run.max_model_len, run.pool_bytes = pool["max_model_len"], pool["pool_bytes"]
    return {"expected_vanilla_prompt_tokens": expected, "vanilla_blocks_per_image_request": pool["blocks_per_request"],
            "usable_blocks_planned": pool["usable_blocks"], "geometry": asdict(geometry)}


def plan_pool(geometry: Geometry, longest: int, anchor: int, max_tokens: int) -> dict[str, int]:
    """max_model_len (room for the ``longest`` prompt) and a KV pool in bytes that holds VANILLA_RESIDENT
    requests of ``anchor`` prompt tokens (prompt + output), at least one max_model_len request."""
    max_model_len = 256 * math.ceil((longest + max_tokens + 64) / 256)
    blocks_per_request = geometry.kv_layout(CPU_BLOCK_SIZE).blocks(anchor + max_tokens)
    usable = max(VANILLA_RESIDENT * blocks_per_request, math.ceil(max_model_len / CPU_BLOCK_SIZE))
    return {"max_model_len": max_model_len, "blocks_per_request": blocks_per_request, "usable_blocks": usable,
            "pool_bytes": (usable + 1) * geometry.block_bytes(CPU_BLOCK_SIZE)}  # +1: vLLM's null block


def start_servers(run: Run) -> None:
    images = max(s.images for s in run.specs)
    configs = {
        name: ServerConfig(
            model=str(run.model), civic=civic, max_model_len=run.max_model_len,
            max_num_batched_tokens=MAX_NUM_BATCHED_TOKENS, images_per_prompt=max(images, 1), dtype=run.dtype,
            kv_cache_gib=None, kv_cache_bytes=run.pool_bytes, trust_request_mm_kwargs=True, prefix_caching=False,
        )
        for name, civic in (("vanilla", False), ("civic", True)) if any(c.server == name for c in run.configs)
    }
    start_server_set(run, configs)
    run.server_info["pool"] = next(iter(run.server_info.values()))["pool"]


def start_server_set(run: Run, configs: dict[str, ServerConfig]) -> None:
    """Start each named server in turn (log, pool, OMP binding into ``run.server_info``); all must get one pool."""
    for name, cfg in configs.items():
        server = VllmServer(cfg, startup_timeout=run.bounds.startup_timeout_s, log_path=run.raw_dir / f"{name}.log")
        log(f"starting {name}: {' '.join(cfg.command()[1:])}")
        run.servers[name] = server
        server.start()
        pool = pool_geometry(server)
        run.server_info[name] = {"url": server.url, "command": cfg.command()[1:], "pool": pool,
                                 "binding": omp_binding(server.log_text())}
        log(f"  {name} up at {server.url}: {pool['num_blocks']} blocks x {pool['block_size']} tokens, "
            f"binding {run.server_info[name]['binding']}")
    pools = {n: (i["pool"]["num_blocks"], i["pool"]["block_size"]) for n, i in run.server_info.items()}
    if len(set(pools.values())) != 1:
        raise BenchError(f"the servers got different KV pools: {pools}")


def measure_points(run: Run, spec) -> None:
    """Every configuration of ``run`` on ``spec``: warm-up, a locust point at each concurrency; then the paired
    TTFT probe over ``run.probe_configs`` (also the video benchmark's loop)."""
    for config in run.configs:
        server = run.servers[config.server]
        warm = warm_up(run, server, spec, config)
        log(f"{spec.name} / {config.label}: warm-up TTFT {[round(t, 3) for t in warm]} s")
        for users in run.bounds.concurrency:
            run.points.append(run_point(run, server, spec, config, users))
    log(f"{spec.name}: paired TTFT probe, {run.bounds.probe_rounds} rounds x {[c.label for c in run.probe_configs]}")
    run.probe.extend(paired_probe(run, spec))


def stop_servers(run: Run) -> None:
    stop_all(run.servers.values())


def build_run(args: argparse.Namespace, build_model: bool = True, recipe: dict | None = None) -> Run:
    """The run's configurations and bounds. ``build_model``: build the preset and attach the recipe
    (see :func:`serve_recipe`); otherwise (``--from-state``) ``recipe`` is the recorded one."""
    quick = args.quick or os.environ.get("QUICK", "").strip().lower() in ("1", "true", "yes", "on")
    args.quick = quick
    bounds = QUICK if quick else FULL
    overrides = {k: v for k, v in {"concurrency": args.concurrency, "duration_s": args.duration,
                                   "warmup_s": args.warmup, "warmup_max_s": args.warmup_max,
                                   "probe_rounds": args.probe_rounds}.items() if v is not None}
    if overrides:
        bounds = Bounds(**{**asdict(bounds), **overrides})
    if args.model:
        model = Path(args.model).resolve()
        if build_model:
            args.preset = None
    else:
        model = make_model(args.preset, models_root() / args.preset)
    if build_model:
        model, recipe = serve_recipe(model, args)
    stem = "serve" + ("_quick" if quick else "") + (f"_{args.preset}" if args.preset not in (None, "bench") else "")
    out_json = (args.out or RESULTS / f"{stem}.json").resolve()
    out_dir = out_json.with_suffix("")
    raw_dir = RESULTS / "tmp" / f"{out_json.stem}-raw-{time.strftime('%Y%m%d-%H%M%S')}"
    if "exit_layer" in (args.civic_settings or {}):
        raise BenchError("pass exit layers with --exit-layers (each becomes a configuration next to the default "
                         "one), not in --civic-settings")
    # The sweep: vanilla, civic at --ratio, and the same with each early exit layer. civic r=1 (vanilla's
    # twin) and the fit ratios run in the paired probe only: a 4-point sweep of each would double the run.
    configs = [Config("vanilla", None), Config("civic", args.ratio)]
    configs += [Config("civic", args.ratio, layer) for layer in args.exit_layers if args.ratio != 1]
    # The recipe default: what a user of the recipe checkpoint gets with no civic_* setting at all.
    configs += [default_config(recipe)] if recipe else []
    probe_only = [Config("civic", r) for r in (Fraction(1), *PROBE_FIT_RATIOS) if r != args.ratio]
    return Run(args=args, bounds=bounds, model=model, dtype=args.dtype, specs=args.workload or
               [WORKLOADS["image-dominated"]], configs=configs,
               probe_configs=configs + sorted(probe_only, key=lambda c: -c.ratio), out_json=out_json,
               out_dir=out_dir, raw_dir=raw_dir, max_tokens=args.max_tokens, recipe=recipe)


RECIPE_COPY_SUFFIX = "-civic-recipe"
RECIPE_COPY_MARKER = "civic_bench_recipe.json"


def _recipe_flags(args: argparse.Namespace) -> dict[str, Any]:
    keys = ("recipe_ratio", "recipe_policy", "recipe_exit_layer", "recipe_exit_context", "recipe_seed")
    return {k: getattr(args, k, None) for k in keys if getattr(args, k, None) is not None}


def bench_recipe(model: Path, args: argparse.Namespace):
    """The recipe ``--recipe-*`` describe for ``model``: ratio 1/3, policy learned, exit layer
    max(1, depth // 4), a scorer as wide as the vision tower (seeded random weights), no exit context."""
    from civic_vllm.recipe import CivicRecipe
    from civic_vllm.retention.learned import ScorerConfig

    vision = json.loads((model / "config.json").read_text())["vision_config"]
    depth = vision["depth"]
    exit_layer = getattr(args, "recipe_exit_layer", None)
    exit_layer = max(1, depth // 4) if exit_layer is None else (None if exit_layer == 0 else exit_layer)
    if exit_layer is not None and exit_layer > depth:
        raise BenchError(f"--recipe-exit-layer {exit_layer} exceeds the vision depth {depth}")
    policy = getattr(args, "recipe_policy", None) or "learned"
    ratio = getattr(args, "recipe_ratio", None) or Fraction(1, 3)
    scorer = ScorerConfig(in_dim=vision["hidden_size"]) if policy == "learned" else None
    context = bool(getattr(args, "recipe_exit_context", None))
    return CivicRecipe(ratio=float(ratio), policy=policy, exit_layer=exit_layer, scorer=scorer, exit_context=context)


def recipe_checkpoint(model: Path, recipe, seed: int) -> Path:
    """A copy of ``model`` carrying ``recipe`` (via civic_vllm.recipe.attach_recipe), rebuilt every run.

    Weight shards are hard links (same bytes, no disk; a copy across file systems), config.json is a
    real copy, so the source checkpoint is never modified. Both servers serve the copy: vanilla vLLM
    ignores the ``civic`` key and the ``civic/`` folder, so they serve the same weights."""
    from civic_vllm.recipe import SCORER_FILE, attach_recipe

    out = models_root() / f"{model.name}{RECIPE_COPY_SUFFIX}"
    if out.resolve() == model.resolve():
        raise BenchError(f"{model} is itself a recipe copy; pass its source checkpoint")
    if out.exists():
        if not (out / RECIPE_COPY_MARKER).is_file():
            raise BenchError(f"{out} exists and was not written by benchmarks.serve; not touching it")
        shutil.rmtree(out)

    def link_or_copy(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(model, out, copy_function=link_or_copy,
                    ignore=shutil.ignore_patterns(Path(SCORER_FILE).parent.name, RECIPE_COPY_MARKER))
    (out / "config.json").unlink()  # attach_recipe rewrites it: never through a link to the source
    shutil.copy2(model / "config.json", out / "config.json")
    attach_recipe(out, recipe, seed=seed)
    (out / RECIPE_COPY_MARKER).write_text(json.dumps({"source": str(model), "seed": seed,
                                                       "recipe": recipe.to_dict()}, indent=2) + "\n")
    return out


def serve_recipe(model: Path, args: argparse.Namespace) -> tuple[Path, dict | None]:
    """The checkpoint both servers serve and its recipe record (None with --no-recipe).

    A checkpoint that already carries a recipe is served as it is unless a --recipe-* flag is given;
    otherwise the recipe of :func:`bench_recipe` goes onto a copy (:func:`recipe_checkpoint`)."""
    from civic_vllm.recipe import SCORER_FILE, read_recipe

    if getattr(args, "no_recipe", False):
        if _recipe_flags(args):
            raise BenchError("--no-recipe and --recipe-* flags exclude each other")
        return model, None
    own = read_recipe(model)
    if own is not None and not _recipe_flags(args):
        return model, {**own.to_dict(), "source": "checkpoint", "checkpoint": str(model), "seed": None,
                       "scorer_file": SCORER_FILE if own.scorer else None}
    recipe = bench_recipe(model, args)
    seed = getattr(args, "recipe_seed", None) or 0
    out = recipe_checkpoint(model, recipe, seed)
    return out, {**recipe.to_dict(), "source": "attached (seeded random-weight scorer)", "checkpoint": str(out),
                 "from_checkpoint": str(model), "seed": seed, "scorer_file": SCORER_FILE if recipe.scorer else None}


def default_config(recipe: dict) -> Config:
    """The recipe default: requests carry no civic_* key; ratio / exit layer / policy say what it applies."""
    return Config("civic", Fraction(recipe["ratio"]).limit_denominator(1000), recipe["exit_layer"], default=True,
                  policy=recipe["policy"])


STATE_FIELDS = ("points", "timeseries", "probe", "vision", "notes", "server_info", "client_cpus", "pool_bytes",
                "max_model_len", "served_model")


def save_state(run: Run, extra: dict) -> Path:
    """Everything measured, written before any analysis: ``--from-state`` rebuilds the report from it."""
    state = {
        "version": 1, "quick": run.args.quick, "preset": run.args.preset, "model": str(run.model), "dtype": run.dtype,
        "ratio": str(run.args.ratio), "exit_layers": list(run.args.exit_layers),
        "workloads": [asdict(s) for s in run.specs], "bounds": asdict(run.bounds),
        "max_tokens": run.max_tokens, "out": str(run.out_json), "raw_dir": str(run.raw_dir),
        "civic_settings": getattr(run.args, "civic_settings", None), "recipe": run.recipe,
        **{f: getattr(run, f) for f in STATE_FIELDS}, **extra,
    }
    path = run.raw_dir / "state.json"
    path.write_text(json.dumps(state, default=str) + "\n")
    return path


def load_state(path: Path, args: argparse.Namespace) -> tuple[Run, dict]:
    state = json.loads(path.read_text())
    args.quick, args.preset, args.ratio = state["quick"], state["preset"], Fraction(state["ratio"])
    args.model, args.dtype, args.max_tokens = state["model"], state["dtype"], state["max_tokens"]
    args.workload = [WorkloadSpec(**w) for w in state["workloads"]]
    args.out = args.out or Path(state["out"])
    args.civic_settings = state.get("civic_settings")
    args.exit_layers = tuple(state.get("exit_layers", ()))
    run = build_run(args, build_model=False, recipe=state.get("recipe"))  # states before recipes: None
    run.args.preset = state["preset"]
    base = asdict(QUICK if state["quick"] else FULL)
    run.bounds = Bounds(**{**base, **state["bounds"], "concurrency": tuple(state["bounds"]["concurrency"])})
    run.raw_dir = Path(state["raw_dir"])
    for f in STATE_FIELDS:
        setattr(run, f, state[f])
    for point in run.points:  # client statistics are recomputed from the per-request records when kept
        records = ROOT / point["files"]["records"]
        if records.is_file():
            recs = [Record(**d) for d in map(json.loads, records.read_text().splitlines())
                    if "event" not in d and d.get("start")]
            point["client"] = client_stats(recs, point["window"]["start"], point["window"]["end"])
    return run, state


def measure(run: Run) -> dict:
    """Start the servers, time the vision tower, run every point and the probe; stop the servers."""
    final: dict[str, float] = {}
    try:
        start_servers(run)
        binding = run.server_info["vanilla"]["binding"]
        run.client_cpus = client_cpus(binding, getattr(run.args, "client_cpus", None) or "reserved")
        run.served_model = model_id(requests, run.servers["vanilla"].url)
        for spec in run.specs:
            log(f"{spec.name}: vision tower timing in-process (pinned to {worker_cpus(binding)}, one thread)")
            run.vision[spec.name] = measure_vision(run, spec, worker_cpus(binding))
            v = run.vision[spec.name]
            log(f"  vision {v['vision_s']:.3f} s, HF full prefill {v['full_prefill_s']:.3f} s "
                f"({v['vision_share_of_hf_prefill']:.0%} vision)")
        for spec in run.specs:
            measure_points(run, spec)
        if "civic" in run.servers:
            text = run.servers["civic"].metrics()
            final = {k: metric_value(text, k) for k in (C_SEEN, C_KEPT, C_IMAGES)}
    finally:
        stop_servers(run)
    return final
