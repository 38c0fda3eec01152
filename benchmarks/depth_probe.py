"""Depth probe: one image's prefill time at Qwen3-VL's real depth, full vs CIVIC at several exit layers.

    python -m benchmarks.depth_probe [--preset qwen3-vl-2b] [--size 672] [--rounds 3] [--exit-layers 6,12]
                                     [--budget-s S] [--out benchmarks/results/depth_probe.json]
    make bench-depth

The serving benchmark's ``bench`` preset has a 6-block vision tower; the real Qwen3-VL-2B has 24, so
how much early retention saves there is a question of its own. This probe answers it in-process with
HF transformers on random weights of the real dimensions (``civic_vllm.model_factory`` preset,
about 2.1 B parameters for ``qwen3-vl-2b``):

* one prefill = vision tower + mergers + LLM forward over the whole prompt, through CIVIC's HF compact
  path (``civic_vllm.hf_compact.build_compact_batch`` + ``compact_logits``, via
  ``benchmarks.serve.hf_compact_prefill``) with the LM head on the last position only, as vLLM does;
  ``full`` runs the same path with retentions that keep every token, so every configuration runs the same
  code and only the token counts differ; the HF processor runs before the clock starts;
* configurations: ``full``, and civic r = RATIO with exit layer none (after the last block) and each of
  ``--exit-layers``, policy ``learned`` with a scorer as wide as the vision tower (seeded random,
  non-zero weights via ``civic_vllm.recipe.attach_recipe``: the cost of a trained one);
* one structured synthetic image of SIZE x SIZE per round (a fresh one each round, shared by the
  round's configurations) and a short question; one untimed warm-up round first; rounds run the
  configurations in rotating order, so machine drift cancels in the ratios;
* per configuration: the median time, the speed-up vs full (ratio of medians) with a paired bootstrap
  95% interval over rounds (``benchmarks.serve.bootstrap_ratio_ci``, from 3 rounds up), and next to it
  the limits from ``civic plan``'s analytic FLOPs (``civic_vllm.planner.make_plan``) for the same model,
  image, question and exit layer: total prefill FLOPs full / civic (the speed-up if time were FLOPs),
  the vision and LLM parts and the LLM-side limit (T+N)/(T+K).

torch runs with ``--threads`` threads (default 2) in ``--dtype`` (default float32: on this AVX512 CPU
without AMX an earlier probe ran fp32 6.5x faster than bf16 autocast). ``--budget-s`` stops cleanly after
the round in which the budget ran out; the JSON is written either way. Writes the JSON and a PNG bar
chart of the speed-ups with the FLOP limits marked beside it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from fractions import Fraction
from pathlib import Path

from benchmarks.serve import exit_layers_arg

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "depth_probe.json"
QUESTION = "What objects are in this picture, and where are they?"
POLICY = "learned"
SCORER_SEED = 0
DTYPE_NOTE = ("float32 by default: on this CPU (AVX512, no AMX) an earlier probe ran fp32 6.5x faster than bf16 "
              "autocast")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="qwen3-vl-2b", help="model_factory preset (default qwen3-vl-2b)")
    parser.add_argument("--model", type=Path, default=None, help="a Qwen3-VL checkpoint directory instead of a preset")
    parser.add_argument("--size", type=int, default=672, help="image side in pixels, a multiple of 32 (default 672)")
    parser.add_argument("--ratio", type=Fraction, default=Fraction(1, 3), help="CIVIC ratio (default 1/3)")
    parser.add_argument("--exit-layers", type=exit_layers_arg, default=(6, 12),
                        help="civic exit layers compared next to 'after the last block' (default 6,12; 'none')")
    parser.add_argument("--exit-context", action="store_true",
                        help="also measure each exit layer with civic_exit_context (later blocks read the "
                             "dropped groups)")
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds (default 3; CIs need 3 or more)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="stop after the round in which this many seconds (from the start) have passed")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="model dtype in memory (default float32, see the module docstring)")
    parser.add_argument("--seed", type=int, default=0, help="first image seed (round i uses seed + i)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON path; the PNG goes beside it")
    return parser


def configurations(ratio: Fraction, exit_layers: tuple[int, ...], depth: int, context: bool = False) -> list[dict]:
    """``full`` then civic at ``ratio`` after the last block and at each exit layer below the depth
    (with ``context``, each exit layer also with civic_exit_context)."""
    configs = [{"label": "full", "ratio": None, "exit_layer": None, "context": False}]
    configs.append({"label": f"civic r={ratio} exit none", "ratio": ratio, "exit_layer": None, "context": False})
    for layer in dict.fromkeys(exit_layers):
        if layer > depth:
            raise SystemExit(f"depth_probe: exit layer {layer} exceeds the vision depth {depth}")
        configs.append({"label": f"civic r={ratio} exit {layer}", "ratio": ratio, "exit_layer": layer,
                        "context": False})
        if context:
            configs.append({"label": f"civic r={ratio} exit {layer} + context", "ratio": ratio, "exit_layer": layer,
                            "context": True})
    return configs


def random_scorer(vision_hidden: int, seed: int):
    """A TokenScorer with seeded random, non-zero weights: civic_vllm.recipe.attach_recipe's, read back."""
    from civic_vllm.recipe import CivicRecipe, attach_recipe, load_scorer
    from civic_vllm.retention.learned import ScorerConfig

    recipe = CivicRecipe(ratio=1 / 3, policy=POLICY, exit_layer=1, scorer=ScorerConfig(in_dim=vision_hidden))
    with tempfile.TemporaryDirectory(prefix="civic-depth-scorer-") as tmp:
        (Path(tmp) / "config.json").write_text("{}\n")
        attach_recipe(tmp, recipe, seed=seed)
        return load_scorer(tmp, recipe), recipe.scorer.to_dict()


def planner_limits(model_dir: Path, size: int, ratio: Fraction, exit_layer: int | None, context: bool = False) -> dict:
    """``civic plan``'s analytic prefill FLOPs for this model, image, question, exit layer and context."""
    from civic_vllm.planner import PlanRequest, load_model, make_plan

    plan = make_plan(load_model(str(model_dir)),
                     PlanRequest(images=[(size, size)], ratios=[(str(ratio), float(ratio))], question=QUESTION,
                                 exit_layer=exit_layer, exit_context=context, max_tokens=1, device="cpu"))
    full, civic = plan.vanilla, plan.civic[0]
    return {
        "full": {"vision_flops": full.vision_flops, "llm_flops": full.llm_flops, "prefill_flops": full.prefill_flops,
                 "prompt_tokens": full.prompt_tokens, "visual_tokens": full.visual_tokens},
        "civic": {"vision_flops": civic.vision_flops, "llm_flops": civic.llm_flops,
                  "prefill_flops": civic.prefill_flops, "prompt_tokens": civic.prompt_tokens,
                  "visual_tokens": civic.visual_tokens},
        "prefill_speedup_limit": civic.vs_vanilla["prefill_speedup_limit"],
        "vision_flops_ratio": full.vision_flops / civic.vision_flops,
        "llm_flops_speedup": civic.vs_vanilla["llm_flops_speedup"],
        "llm_token_speedup_limit": civic.vs_vanilla["llm_token_speedup_limit"],
        "vision_share_full": full.vision_flops / full.prefill_flops,
        "exact_template_tokens": plan.text["exact"],
    }


def machine_info() -> dict:
    import platform

    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "machine": {"platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
                    "affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
                    "python": sys.version.split()[0], "load_average_at_start": list(os.getloadavg())},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }


def summarise(configs: list[dict], rounds: list[dict]) -> dict[str, dict]:
    """Median per configuration, speed-up vs full (ratio of medians) and its paired bootstrap 95% CI."""
    from benchmarks.serve import bootstrap_ratio_ci

    full = [r["times_s"]["full"] for r in rounds]
    out = {}
    for config in configs:
        times = [r["times_s"][config["label"]] for r in rounds]
        median = statistics.median(times) if times else None
        speedup = statistics.median(full) / median if times and median else None
        out[config["label"]] = {
            "ratio": None if config["ratio"] is None else str(config["ratio"]), "exit_layer": config["exit_layer"],
            "exit_context": config["context"], "n": len(times), "median_s": median,
            "min_s": min(times, default=None), "max_s": max(times, default=None),
            "speedup_vs_full": speedup,
            "speedup_ci95": None if config["label"] == "full" else bootstrap_ratio_ci(full, times),
        }
    return out


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    civic = [(label, e) for label, e in report["results"].items() if label != "full"]
    labels = [label.replace("civic ", "") for label, _ in civic]
    x = np.arange(len(civic))
    speed = [e["speedup_vs_full"] or np.nan for _, e in civic]
    err = np.array([[s - e["speedup_ci95"][0], e["speedup_ci95"][1] - s] if e["speedup_ci95"] else [0, 0]
                    for s, (_, e) in zip(speed, civic)]).T
    limit = [report["planner_limits"][label]["prefill_speedup_limit"] for label, _ in civic]
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(civic), 4.2))
    has_ci = any(e["speedup_ci95"] for _, e in civic)
    ax.bar(x, speed, 0.55, yerr=err if has_ci else None, capsize=4, color="#1f77b4",
           label="measured (median" + ("; 95% CI)" if has_ci else ")"))
    for xi, lim in zip(x, limit):
        ax.plot([xi - 0.35, xi + 0.35], [lim, lim], color="#d62728", lw=2.2)
        ax.annotate(f"{lim:.2f}", (xi + 0.36, lim), fontsize=8, va="center", color="#d62728")
    ax.plot([], [], color="#d62728", lw=2.2, label="FLOP limit (civic plan)")
    for xi, s in zip(x, speed):
        if not math.isnan(s):
            ax.annotate(f"{s:.2f}x", (xi, s / 2), ha="center", color="white", fontsize=9, weight="bold")
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xticks(x, labels)
    ax.set_ylabel("prefill speed-up vs full tokens")
    m, info = report["model"], report["image"]
    ax.set_title(f"{m['preset'] or m['path']}: vision depth {m['vision_depth']}, {info['size']}x{info['size']} image "
                 f"(N={info['visual_tokens']}), {report['settings']['dtype']}, {report['settings']['threads']} "
                 f"threads, {report['rounds_done']} rounds", fontsize=9)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.size % 32:
        raise SystemExit(f"depth_probe: --size must be a multiple of 32, got {args.size}")
    if args.rounds < 1:
        raise SystemExit("depth_probe: --rounds must be >= 1")
    import torch

    torch.set_num_threads(args.threads)
    from transformers import AutoProcessor, Qwen3VLForConditionalGeneration

    from benchmarks.load import synthetic_image
    from benchmarks.serve import hf_compact_prefill, hf_prompt_inputs, image_retentions
    from civic_vllm.model_factory import make_model, models_root

    started = time.monotonic()
    info = machine_info()
    model_dir = args.model.resolve() if args.model else make_model(args.preset, models_root() / args.preset)
    dtype = getattr(torch, args.dtype)
    log(f"loading {model_dir} in {args.dtype}, {torch.get_num_threads()} threads")
    model = Qwen3VLForConditionalGeneration.from_pretrained(str(model_dir), dtype=dtype).eval()
    processor = AutoProcessor.from_pretrained(str(model_dir))
    vision = model.config.vision_config
    depth, merge = vision.depth, vision.spatial_merge_size
    configs = configurations(args.ratio, args.exit_layers, depth, args.exit_context)
    scorer, scorer_shape = random_scorer(vision.hidden_size, SCORER_SEED)
    limits = {c["label"]: planner_limits(model_dir, args.size, args.ratio, c["exit_layer"], c["context"])
              for c in configs if c["ratio"] is not None}
    params = sum(p.numel() for p in model.parameters())
    log(f"{params / 1e9:.2f} B parameters, vision depth {depth}; configurations {[c['label'] for c in configs]}")

    def inputs_for(seed: int):
        image = synthetic_image((args.size, args.size), seed)
        return hf_prompt_inputs(processor, [image], QUESTION)

    def retentions_for(config: dict, grid) -> list:
        if config["ratio"] is None:  # every token kept: the same code path, nothing dropped
            return image_retentions(grid, merge, 1.0, None, POLICY)
        return image_retentions(grid, merge, float(config["ratio"]), config["exit_layer"], POLICY,
                                exit_context=config["context"])

    def prefill(config: dict, inputs, seed_pixels) -> float:
        retentions = retentions_for(config, inputs["image_grid_thw"])
        t = time.perf_counter()
        with torch.inference_mode():
            hf_compact_prefill(model, inputs, seed_pixels, retentions, scorer=scorer, last_token_only=True)
        return time.perf_counter() - t

    # Warm-up: every configuration once, untimed (first-call allocations, lazy initialisation).
    inputs, seed_pixels = inputs_for(args.seed + args.rounds)  # a seed no measured round uses
    prompt_tokens = int(inputs["input_ids"].shape[1])
    grid_thw = inputs["image_grid_thw"][0].tolist()
    kept = {c["label"]: sum(p.num_kept for p in retentions_for(c, inputs["image_grid_thw"])) for c in configs}
    warmup = {c["label"]: prefill(c, inputs, seed_pixels) for c in configs}
    log(f"warm-up {', '.join(f'{k} {v:.2f} s' for k, v in warmup.items())}")

    rounds: list[dict] = []
    stopped = None
    for rnd in range(args.rounds):
        inputs, seed_pixels = inputs_for(args.seed + rnd)
        k = rnd % len(configs)
        order = configs[k:] + configs[:k]  # rotate the order every round
        times = {c["label"]: prefill(c, inputs, seed_pixels) for c in order}
        rounds.append({"round": rnd, "image_seed": args.seed + rnd, "order": [c["label"] for c in order],
                       "times_s": times})
        log(f"round {rnd + 1}/{args.rounds}: " + ", ".join(f"{c['label']} {times[c['label']]:.2f} s" for c in configs))
        elapsed = time.monotonic() - started
        if args.budget_s is not None and elapsed > args.budget_s and rnd + 1 < args.rounds:
            stopped = f"budget of {args.budget_s:g} s spent after round {rnd + 1} ({elapsed:.0f} s)"
            log(f"stopping: {stopped}")
            break

    results = summarise(configs, rounds)
    n_merged = (grid_thw[1] // merge) * (grid_thw[2] // merge)
    for label, entry in results.items():
        entry["kept_tokens"] = kept[label]
        entry["prompt_tokens_hf"] = prompt_tokens - n_merged + kept[label]  # the compact prompt's length
        if label in limits:
            lim = limits[label]
            entry["flop_limit"] = lim["prefill_speedup_limit"]
            entry["fraction_of_flop_limit"] = (entry["speedup_vs_full"] / lim["prefill_speedup_limit"]
                                               if entry["speedup_vs_full"] else None)
            entry["prompt_tokens_planner"] = lim["civic"]["prompt_tokens"]
    report = {
        "benchmark": "depth_probe",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m benchmarks.depth_probe " + " ".join(sys.argv[1:] if argv is None else argv),
        "duration_s": round(time.monotonic() - started, 1),
        **info,
        "load_average_at_end": list(os.getloadavg()),
        "settings": {"threads": torch.get_num_threads(), "dtype": args.dtype, "dtype_note": DTYPE_NOTE,
                     "rounds_requested": args.rounds, "budget_s": args.budget_s, "ratio": str(args.ratio),
                     "policy": POLICY, "scorer": scorer_shape, "scorer_seed": SCORER_SEED,
                     "exit_layers": list(args.exit_layers)},
        "model": {"preset": None if args.model else args.preset, "path": str(model_dir), "parameters": params,
                  "vision_depth": depth, "vision_hidden": vision.hidden_size,
                  "text_layers": model.config.text_config.num_hidden_layers},
        "image": {"size": args.size, "kind": "benchmarks.load.synthetic_image, a fresh seed per round",
                  "grid_thw": grid_thw, "visual_tokens": n_merged, "question": QUESTION,
                  "prompt_tokens_full": prompt_tokens,
                  "planner_prompt_tokens_full": (next(iter(limits.values()))["full"]["prompt_tokens"]
                                                 if limits else None)},
        "method": ("one prefill = build_compact_batch (vision tower with retention at the exit layer, mergers, "
                   "embedding, M-RoPE positions) + compact_logits with the LM head on the last position; full = "
                   "the same path with plans keeping every token; HF processor outside the clock; one untimed "
                   "warm-up round; rounds rotate the configuration order; speed-up = median(full) / median(config), "
                   "95% CI by paired bootstrap over rounds (3+ rounds); FLOP limit = civic plan's prefill FLOPs "
                   "full / civic (civic_vllm.planner.make_plan, the scorer's own FLOPs not counted)"),
        "configs": [{**c, "ratio": None if c["ratio"] is None else str(c["ratio"])} for c in configs],
        "warmup_s": warmup,
        "rounds": rounds,
        "rounds_done": len(rounds),
        "stopped_early": stopped,
        "results": results,
        "planner_limits": limits,
    }
    out = args.out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    png = out.with_suffix(".png")
    try:
        plot(report, png)
        report["plot"] = str(png)
    except Exception as exc:  # a plotting bug must not lose the numbers
        report["plot"] = None
        report["plot_error"] = f"{type(exc).__name__}: {exc}"
    out.write_text(json.dumps(report, indent=1) + "\n")
    for label, e in results.items():
        ci = e["speedup_ci95"]
        log(f"{label:<24} median {e['median_s']:.3f} s, speed-up {e['speedup_vs_full']:.2f}x"
            + (f" (95% CI {ci[0]:.2f}..{ci[1]:.2f})" if ci else "")
            + (f", FLOP limit {e['flop_limit']:.2f}x" if "flop_limit" in e else ""))
    log(f"wrote {out} and {png.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
