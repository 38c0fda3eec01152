"""Does the language model read position from how many visual tokens precede a kept one? A probe.

    python -m benchmarks.proportional_attention --model DIR [--model DIR ...] --data val.jsonl
                                                [--task ground] [--n 200] [--ratio 1/3]
                                                [--exit-layer 1] [--exit-context]

Civic's boxes for objects low in the image come out too high (docs/accuracy.md, "Where the boxes go
wrong"), although every kept token has its exact M-RoPE position. The remaining difference between
the compact and the full sequence is how many visual tokens each softmax spreads its weight over.
ToMe's proportional attention gives that back without the tokens: each kept key's attention logit
gets + log(tokens it stands for) (civic_vllm.hf_compact.proportional_key_bias: the grid cells whose
nearest kept cell it is), so the visual block weighs as the whole image's would.

For every model the same compact prompts (HF compact path, fp32, greedy, 24 tokens cut at the
first <|im_end|>) are answered twice, plain and with the bias, and scored; a student is retained
as it was distilled (``civic_distill.json``, e.g. one trained with ``civic distill
--proportional-attention``), a checkpoint with a CIVIC recipe by its recipe, others by the flags.
Reports accuracy with bootstrap 95% intervals, the paired difference, and for grounding the mean
centre-y error by third of the image height (benchmarks.box_errors). No vLLM: the bias is not in
the served path (vLLM's attention backends take no per-key bias), so this measures the idea, not a
serving feature.

Writes ``benchmarks/results/proportional_attention.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.accuracy import RESULTS, ROOT, ratio_label
from benchmarks.bootstrap import Scored, bootstrap_indices, figure, paired
from benchmarks.box_errors import ROW_THIRDS, box_errors, row_thirds

VARIANTS = ("plain", "proportional")
METRICS = ("overall", "small", "ground")
MAX_TOKENS = 24


def retention_of(model_dir: str, args: argparse.Namespace) -> dict[str, Any]:
    """The retention a student was distilled for (its ``civic_distill.json``, when it trained on
    compact prompts), else the checkpoint's CIVIC recipe, else the flags."""
    from civic_vllm.recipe import read_recipe
    from civic_vllm.training.distill import DISTILL_MARKER

    marker = Path(model_dir, DISTILL_MARKER)
    distilled = json.loads(marker.read_text()) if marker.is_file() else None
    if distilled is not None and min(distilled["ratios"]) < 1 and distilled["policy"] != "downscale":
        return {"ratio": distilled["serve_ratio"], "policy": distilled["policy"], "exit_layer": distilled["exit_layer"],
                "exit_context": distilled["exit_context"],
                "trained_with_proportional_attention": distilled.get("proportional_attention", False),
                "from": "distill recipe"}
    recipe = read_recipe(model_dir)
    if recipe is not None:
        return {"ratio": recipe.ratio, "policy": recipe.policy, "exit_layer": recipe.exit_layer,
                "exit_context": recipe.exit_context, "from": "checkpoint recipe"}
    return {"ratio": args.ratio, "policy": args.policy, "exit_layer": args.exit_layer,
            "exit_context": args.exit_context, "from": "flags"}


@torch.inference_mode()
def answers_of(model, encoder, image, question: str, retention: dict[str, Any],
               variants: tuple[str, ...] = VARIANTS) -> dict[str, str]:
    """The plain and/or the proportional-attention answer of one compact prompt."""
    from civic_vllm.hf_compact import build_compact_batch, compact_greedy, proportional_key_bias
    from civic_vllm.training.distill import DistillRecipe, student_retentions

    enc = encoder.encode(image, [question], None)
    plans = student_retentions(enc, model.config.vision_config.spatial_merge_size, retention["ratio"],
                               DistillRecipe(policy=retention["policy"], exit_layer=retention["exit_layer"],
                                             exit_context=retention["exit_context"]))
    grids = [plan.grid_hw for plan in plans]
    batch = build_compact_batch(model, enc.input_ids, enc.pixel_values, enc.image_grid_thw, enc.mm_token_type_ids,
                                plans)
    answers = {}
    for variant in variants:
        bias = proportional_key_bias(batch.kept_indices, grids) if variant == "proportional" else None
        tokens, _ = compact_greedy(model, batch, MAX_TOKENS, key_bias=bias)
        if encoder.im_end in tokens:
            tokens = tokens[: tokens.index(encoder.im_end)]
        answers[variant] = encoder.tokenizer.decode(tokens, skip_special_tokens=True).strip()
    return answers


def probe_model(model_dir: str, samples, args: argparse.Namespace) -> dict[str, Any]:
    from PIL import Image
    from tqdm import tqdm

    from civic_vllm.data import shapes
    from civic_vllm.training.chats import ChatEncoder
    from civic_vllm.training.distill import load_hf_model

    model, preset = load_hf_model(model_dir)
    model.eval()
    encoder = ChatEncoder(preset)
    retention = retention_of(model_dir, args)
    variants = args.variants
    predictions: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    for sample in tqdm(samples, desc=Path(model_dir).name, unit="question"):
        with Image.open(sample.image_path) as image:
            answers = answers_of(model, encoder, image.convert("RGB"), sample.record["question"], retention,
                                 variants)
        for variant, output in answers.items():
            predictions[variant].append({"id": sample.record["id"], "output": output,
                                         "correct": shapes.is_correct(sample.record, output)})
    idx = bootstrap_indices(len(samples))
    scored = {v: Scored.from_predictions(samples, predictions[v]) for v in variants}
    metrics = [m for m in METRICS if scored[variants[0]].masks[m].any()]
    records = {s.record["id"]: s.record for s in samples}
    thirds = row_thirds(records)
    out: dict[str, Any] = {"model": _relative(model_dir), "retention": retention, "n": len(samples),
                           "accuracy": {v: {m: figure(scored[v], m, idx) for m in metrics} for v in variants}}
    if set(variants) == set(VARIANTS):
        out["proportional_minus_plain"] = {m: paired(scored["proportional"], scored["plain"], m, idx)
                                           for m in metrics}
    if thirds:
        out["by_row_third"] = {v: [{k: _rounded(b[k]) for k in ("group", "n", "dcy", "abs_dcy", "acc")}
                                   for b in box_errors(records, predictions[v], thirds)] for v in variants}
    out["predictions"] = predictions
    return out


def _rounded(value: Any) -> Any:
    return round(float(value), 4) if isinstance(value, (float, np.floating)) else value


def _relative(path: str) -> str:
    resolved = Path(path).resolve()
    return str(resolved.relative_to(ROOT)) if resolved.is_relative_to(ROOT) else path


def _figure(f: dict[str, Any] | None) -> str:
    return "–" if f is None else f"{f['value']:.3f} ({f['ci95'][0]:.3f}–{f['ci95'][1]:.3f})"


def _difference(d: dict[str, Any] | None) -> str:
    if d is None:
        return "–"
    low, high = d["difference_ci95"]
    return f"{100 * d['difference']:+.1f} ({100 * low:+.1f} to {100 * high:+.1f})"


def report(result: dict[str, Any]) -> str:
    lines = [f"# Proportional attention probe ({result['data']}, task {result['task']})", "",
             "| model | retention | answered | n | " + " | ".join(METRICS) + " |", "|---|---|---|---|---|---|---|"]
    for m in result["models"]:
        r = m["retention"]
        where = f"r = {ratio_label(r['ratio'])}, {r['policy']}, exit {r['exit_layer']}" + (
            " + context" if r["exit_context"] else "") + (
            ", trained with proportional attention" if r.get("trained_with_proportional_attention") else "") + (
            f" ({r['from']})")
        for variant, figures in m["accuracy"].items():
            lines.append(f"| {m['model']} | {where} | {variant} | {m['n']} | "
                         + " | ".join(_figure(figures.get(k)) for k in METRICS) + " |")
        if "proportional_minus_plain" in m:
            diff = m["proportional_minus_plain"]
            lines.append(f"| {m['model']} | | proportional − plain (points) | {m['n']} | "
                         + " | ".join(_difference(diff.get(k)) for k in METRICS) + " |")
    thirds = [m for m in result["models"] if "by_row_third" in m]
    if thirds:
        lines += ["", "Grounding by the third of the image height the object's centre is in: Acc@0.5 and the mean "
                  "centre-y error (+ is down, 0-1000 units).", "",
                  "| model | answered | top | middle | bottom |", "|---|---|---|---|---|"]
        for m in thirds:
            for v, bands in m["by_row_third"].items():
                by_third = {b["group"]: b for b in bands}
                cells = [f"{by_third[t]['acc']:.3f}, {by_third[t]['dcy']:+.0f}" if t in by_third else "–"
                         for t in ROW_THIRDS]
                lines.append(f"| {m['model']} | {v} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + f"\n\nWritten by `{result['command']}`.\n"


def main(argv: list[str] | None = None) -> int:
    from civic_vllm.cli.common import one_ratio
    from civic_vllm.evaluation import load_samples

    parser = argparse.ArgumentParser(prog="python -m benchmarks.proportional_attention",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--model", action="append", required=True, help="checkpoint written by civic train/distill")
    parser.add_argument("--data", required=True, help="civic-shapes JSONL (image paths relative to it)")
    parser.add_argument("--task", default="ground", help="only this task's questions ('all': every question)")
    parser.add_argument("--n", type=int, default=0, help="the first N questions of the task (0: all)")
    parser.add_argument("--ratio", type=one_ratio, default=1 / 3, help="without a checkpoint recipe")
    parser.add_argument("--policy", default="civic", choices=("civic", "pool", "random"),
                        help="without a checkpoint recipe")
    parser.add_argument("--exit-layer", type=int, default=1, help="without a checkpoint recipe")
    parser.add_argument("--exit-context", action="store_true", help="without a checkpoint recipe")
    parser.add_argument("--variants", type=_variants, default=VARIANTS,
                        help="which answers: plain, proportional or both (default plain,proportional)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(RESULTS / "proportional_attention.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    samples = [s for s in load_samples(args.data) if args.task in ("all", s.record["task"])]
    if args.n:
        samples = samples[: args.n]
    if not samples or any(s.is_video for s in samples):
        parser.error(f"--data holds no image question of task {args.task!r}" if not samples
                     else "image questions only (the bias is built per image grid)")
    command = "python -m benchmarks.proportional_attention " + " ".join(sys.argv[1:] if argv is None else argv)
    result = {"data": _relative(args.data), "task": args.task, "command": command,
              "models": [probe_model(m, samples, args) for m in args.model]}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    md = report(result)
    out.with_suffix(".md").write_text(md)
    print(md)
    return 0


def _variants(text: str) -> tuple[str, ...]:
    chosen = tuple(v for v in VARIANTS if v in text.split(","))
    if not chosen or set(text.split(",")) - set(VARIANTS):
        raise argparse.ArgumentTypeError(f"variants are {', '.join(VARIANTS)}, got {text!r}")
    return chosen


if __name__ == "__main__":
    sys.exit(main())
