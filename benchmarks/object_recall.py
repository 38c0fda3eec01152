"""Which tokens does a selection keep around the object? Object-token and ring recall per policy.

    python -m benchmarks.object_recall --model DIR [--model DIR ...] --data split.jsonl [--n 60]
                                       [--setting learned:1 --setting civic:1 ...]

For the single-object grounding questions of a civic-shapes JSONL (they carry the object's box),
each model's selections (``policy:exit_layer``, exit ``none`` = after the last block; ratio
--ratio; ``learned`` only for checkpoints whose recipe has a scorer) are computed by the server's
own selection code through ``civic viz``'s HF path, and scored on the merged-token grid:

* object recall: kept share of the tokens the box overlaps;
* ring recall: kept share of the tokens that touch the box's tokens (8-neighbourhood) but not the box.

A box needs its object and where it stops; this says which of the two a selection keeps.
Writes JSON (``--out``; default benchmarks/results/object_recall.json).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]


def box_tokens(box: list[int], grid_hw: tuple[int, int]) -> torch.Tensor:
    """[h, w] bool: merged tokens a 0-1000 box overlaps."""
    h, w = grid_hw
    x1, y1, x2, y2 = (v / 1000 for v in box)
    r0, c0 = min(math.floor(y1 * h), h - 1), min(math.floor(x1 * w), w - 1)
    mask = torch.zeros(h, w, dtype=torch.bool)
    mask[r0: max(r0 + 1, math.ceil(y2 * h)), c0: max(c0 + 1, math.ceil(x2 * w))] = True
    return mask


def ring_of(mask: torch.Tensor) -> torch.Tensor:
    """[h, w] bool: tokens 8-adjacent to ``mask`` and not in it."""
    grown = F.max_pool2d(mask[None, None].float(), 3, stride=1, padding=1)[0, 0].bool()
    return grown & ~mask


def recall(model: str, samples: list[dict], root: Path, policy: str, exit_layer: int | None,
           ratio: float) -> dict[str, float]:
    from PIL import Image

    from civic_vllm.viz import compute_retention

    kept_obj = n_obj = kept_ring = n_ring = 0
    for sample in samples:
        with Image.open(root / sample["image"]) as image:
            res = compute_retention(model, image, ratio, policy=policy, dtype="float32", exit_layer=exit_layer)
        kept = res.mask().reshape(res.grid_hw).bool()
        obj = box_tokens(sample["box"], res.grid_hw)
        ring = ring_of(obj)
        kept_obj += int((kept & obj).sum())
        n_obj += int(obj.sum())
        kept_ring += int((kept & ring).sum())
        n_ring += int(ring.sum())
    return {"object_recall": round(kept_obj / max(n_obj, 1), 4), "ring_recall": round(kept_ring / max(n_ring, 1), 4),
            "object_tokens": n_obj, "ring_tokens": n_ring}


def main(argv: list[str] | None = None) -> int:
    from civic_vllm.budget import validate_ratio
    from civic_vllm.planner import parse_ratios
    from civic_vllm.recipe import read_recipe

    p = argparse.ArgumentParser(prog="python -m benchmarks.object_recall", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, action="append", help="checkpoint directory (repeatable)")
    p.add_argument("--data", required=True, help="civic-shapes JSONL; its grounding questions are used")
    p.add_argument("--n", type=int, default=60, help="grounding questions to score")
    p.add_argument("--ratio", default="1/3")
    p.add_argument("--setting", action="append", default=None, metavar="POLICY:EXIT",
                   help="selection to score, e.g. civic:1 or civic:none (repeatable)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "object_recall.json"))
    args = p.parse_args(argv)
    ratio = validate_ratio(parse_ratios([args.ratio])[0][1])
    data = Path(args.data)
    samples = [s for s in map(json.loads, data.read_text().splitlines()) if s.get("task") == "ground" and "box" in s]
    if not samples:
        p.error(f"{data} has no grounding questions with a box")
    samples = samples[: args.n]
    rows = []
    for model in args.model:
        recipe = read_recipe(model)
        for setting in args.setting or ["civic:1", "learned:1", "civic:none", "pool:1"]:
            policy, _, exit_text = setting.partition(":")
            if policy == "learned" and (recipe is None or recipe.scorer is None):
                continue  # no trained scorer in this checkpoint
            exit_layer = None if exit_text in ("", "none") else int(exit_text)
            row = {"model": Path(model).name, "policy": policy, "exit_layer": exit_layer,
                   **recall(model, samples, data.parent, policy, exit_layer, ratio)}
            print(json.dumps(row), file=sys.stderr)
            rows.append(row)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"models": args.model, "data": str(data), "n": len(samples), "ratio": ratio,
                               "rows": rows}, indent=2) + "\n")
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
