"""Part 4: HF compact prefill on the qwen3-vl-2b preset, full vs civic, next to civic plan's FLOP limit."""

from __future__ import annotations

import tempfile
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.gpu_check.common import IMAGE_SIDE, Budget, Steps, import_module, log
from benchmarks.gpu_check.kernels import dtype_of


def event_timer(device) -> Callable[[Callable[[], object]], float]:
    """Seconds of one call: CUDA events on CUDA, perf_counter elsewhere."""
    import torch

    def run(fn: Callable[[], object]) -> float:
        if device.type != "cuda":
            t = time.perf_counter()
            fn()
            return time.perf_counter() - t
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3

    return run


def scorer_for(depth_probe: types.ModuleType, vision_hidden: int) -> tuple[Any, str, str | None]:
    """depth_probe's seeded random scorer (policy learned), or the civic policy when the recipe cannot load."""
    try:
        scorer, _ = depth_probe.random_scorer(vision_hidden, depth_probe.SCORER_SEED)
        return scorer, depth_probe.POLICY, None
    except ImportError as exc:  # civic_vllm.recipe needs pydantic
        return None, "civic", f"policy civic instead of learned: {exc}"


def part_prefill(device, budget: Budget, args) -> dict:
    import torch

    depth_probe = import_module("benchmarks.depth_probe")
    serve = import_module("benchmarks.serve")
    from transformers import AutoConfig, AutoProcessor, Qwen3VLForConditionalGeneration

    from benchmarks.load import synthetic_image
    from civic_vllm.model_factory import make_model

    cuda = device.type == "cuda"
    preset, side = args.prefill_preset or ("qwen3-vl-2b" if cuda else "tiny"), args.prefill_size or (
        IMAGE_SIDE if cuda else 128)
    dtype = args.prefill_dtype or ("bfloat16" if cuda else "float32")
    rounds = args.rounds or (5 if cuda else 1)
    time_one = event_timer(device)
    with tempfile.TemporaryDirectory(prefix="civic-gpu-check-") as tmp:
        model_dir = make_model(preset, Path(tmp) / preset, weights=False)  # config, tokenizer, processor
        config = AutoConfig.from_pretrained(model_dir)
        depth = config.vision_config.depth
        exit_layers = tuple(min(layer, depth - 1) for layer in args.exit_layers)
        configs = depth_probe.configurations(args.ratio, exit_layers, depth)
        limits = {c["label"]: depth_probe.planner_limits(model_dir, side, args.ratio, c["exit_layer"])
                  for c in configs if c["ratio"] is not None}
        processor = AutoProcessor.from_pretrained(model_dir)
    t = time.monotonic()
    with torch.device(device):  # random weights made on the device, no checkpoint written or read
        model = Qwen3VLForConditionalGeneration._from_config(config, dtype=dtype_of(dtype)).eval()
    build_s = time.monotonic() - t
    scorer, policy, policy_note = scorer_for(depth_probe, config.vision_config.hidden_size)
    if scorer is not None:
        scorer = scorer.to(device)
    merge = config.vision_config.spatial_merge_size

    def inputs_for(seed: int):
        inputs, seed_pixels = serve.hf_prompt_inputs(processor, [synthetic_image((side, side), seed)],
                                                     depth_probe.QUESTION)
        return inputs.to(device), seed_pixels

    def retentions_for(config_: dict, grid) -> list:
        ratio = 1.0 if config_["ratio"] is None else float(config_["ratio"])
        return serve.image_retentions(grid, merge, ratio, config_["exit_layer"], policy)

    def prefill(config_: dict, inputs, seed_pixels) -> float:
        retentions = retentions_for(config_, inputs["image_grid_thw"].cpu())

        def once():
            # factory calls inside hf_compact (torch.arange, torch.tensor) land on the model's device
            with torch.inference_mode(), torch.device(device):
                serve.hf_compact_prefill(model, inputs, seed_pixels, retentions, scorer=scorer, last_token_only=True)

        return time_one(once)

    inputs, seed_pixels = inputs_for(args.seed + rounds)  # warm-up image: a seed no round uses
    grid = inputs["image_grid_thw"].cpu()
    kept = {c["label"]: sum(p.num_kept for p in retentions_for(c, grid)) for c in configs}
    t = time.monotonic()
    warmup = {c["label"]: prefill(c, inputs, seed_pixels) for c in configs}
    round_estimate = time.monotonic() - t
    measured, steps = [], Steps(budget, last_s=round_estimate)
    for rnd in range(rounds):
        def one_round(rnd=rnd):
            inputs, seed_pixels = inputs_for(args.seed + rnd)
            order = configs[rnd % len(configs):] + configs[: rnd % len(configs)]
            times = {c["label"]: prefill(c, inputs, seed_pixels) for c in order}
            return {"round": rnd, "image_seed": args.seed + rnd, "order": [c["label"] for c in order],
                    "times_s": times}

        result = steps.run(f"round {rnd}", one_round)
        if result is not None:
            measured.append(result)
            log("prefill round " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in result["times_s"].items()))
    results = depth_probe.summarise(configs, measured)
    for label, entry in results.items():
        entry["kept_tokens"] = kept[label]
        if label in limits:
            entry["flop_limit"] = limits[label]["prefill_speedup_limit"]
            entry["fraction_of_flop_limit"] = (entry["speedup_vs_full"] / entry["flop_limit"]
                                               if entry["speedup_vs_full"] else None)
    memory = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
    ok = bool(measured) and all(e["median_s"] and e["median_s"] > 0 for e in results.values())
    return {"status": ("pass" if ok else "fail") if measured else "skipped",
            "what": "GPU figures (CUDA events)" if cuda else "CPU harness check on a small preset: not GPU figures",
            "preset": preset, "image_side": side, "dtype": dtype, "policy": policy, "policy_note": policy_note,
            "vision_depth": depth, "visual_tokens": kept["full"],
            "prompt_tokens_full": int(inputs["input_ids"].shape[1]),
            "attn_implementation": getattr(model.config, "_attn_implementation", None),
            "model_build_s": build_s, "max_memory_gib": memory, "timer": "cuda events" if cuda else "perf_counter",
            "configs": [{**c, "ratio": None if c["ratio"] is None else str(c["ratio"])} for c in configs],
            "warmup_s": warmup, "rounds": measured, "rounds_done": len(measured), "results": results,
            "planner_limits": limits, "skipped": steps.skipped}
