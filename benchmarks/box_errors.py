"""Where do a model's boxes go wrong? Centre and size errors of grounding answers, by object size or image aspect.

    python -m benchmarks.box_errors --data split.jsonl --eval EVAL.json [--eval EVAL.json ...] [--by aspect|row]

``--data``: a civic-shapes JSONL (grounding samples carry ``box`` and ``size``); each ``--eval``: a
``civic eval`` result, or an evaluation cached beside a fair-protocol student (``eval-*.json``,
whose ``result`` is one), with per-question ``predictions``. For every size band (``--by aspect``:
square, wide and tall images, read from the PNGs; ``--by row``: the third of the image height the
object's centre is in) it prints the mean |centre error| in x and y, the signed mean centre error
(a bias: + is right or down), the mean width and height error (predicted minus true, 0-1000 units),
the mean IoU and Acc@0.5. Unparseable answers are counted apart.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from civic_vllm.data import shapes

SIZE_BANDS = ((shapes.SIZE_MIN, shapes.SMALL_MAX), (shapes.SMALL_MAX + 1, 80), (81, shapes.SIZE_MAX))


def box_errors(samples: dict[str, dict], predictions: list[dict],
               groups: dict[str, str] | None = None) -> list[dict]:
    """Per size band (or per label of ``groups``, sample id -> label, sorted): n, unparseable, mean |dcx|,
    |dcy|, signed dcx and dcy (predicted minus true centre), dw, dh, IoU and Acc@0.5 of the grounding answers."""
    rows: list[tuple[float, ...]] = []
    labels: list[str] = []
    unparseable: list[str] = []
    bands = {f"{lo}-{hi}": (lo, hi) for lo, hi in SIZE_BANDS}

    def label(sample_id: str, sample: dict) -> str:
        if groups is not None:
            return groups[sample_id]
        return next(name for name, (lo, hi) in bands.items() if lo <= sample["size"] <= hi)

    for p in predictions:
        sample = samples.get(p["id"])
        if sample is None or sample["task"] != "ground":
            continue
        box, true = shapes.parse_box(p["output"]), sample["box"]
        if box is None:
            unparseable.append(label(p["id"], sample))
            continue
        labels.append(label(p["id"], sample))
        dcx, dcy = (box[0] + box[2] - true[0] - true[2]) / 2, (box[1] + box[3] - true[1] - true[3]) / 2
        dw, dh = (box[2] - box[0]) - (true[2] - true[0]), (box[3] - box[1]) - (true[3] - true[1])
        rows.append((abs(dcx), abs(dcy), dw, dh, shapes.box_iou(box, true), dcx, dcy))
    table, of = np.array(rows, dtype=float).reshape(-1, 7), np.array(labels, dtype=object)
    names = list(bands) if groups is None else sorted({*labels, *unparseable})
    out = []
    for name in names:
        band = table[of == name]
        mean = band.mean(axis=0) if len(band) else np.full(7, np.nan)
        out.append({"group": name, **({"size": list(bands[name])} if groups is None else {}),
                    "n": len(band), "unparseable": unparseable.count(name),
                    "abs_dcx": mean[0], "abs_dcy": mean[1], "dw": mean[2], "dh": mean[3], "iou": mean[4],
                    "dcx": mean[5], "dcy": mean[6],
                    "acc": float((band[:, 4] >= 0.5).mean()) if len(band) else float("nan")})
    return out


ROW_THIRDS = ("1 top", "2 middle", "3 bottom")


def row_thirds(samples: dict[str, dict]) -> dict[str, str]:
    """Grounding sample id -> the third of the image height its true box centre lies in."""
    return {i: ROW_THIRDS[min(2, int(3 * (s["box"][1] + s["box"][3]) / 2000))]
            for i, s in samples.items() if s["task"] == "ground"}


def aspects(samples: dict[str, dict], root: Path) -> dict[str, str]:
    """Grounding sample id -> "square", "wide" or "tall", from its image's width and height."""
    from PIL import Image

    def aspect(path: Path) -> str:
        with Image.open(path) as image:
            width, height = image.size
        return "square" if width == height else "wide" if width > height else "tall"

    return {i: aspect(root / s["image"]) for i, s in samples.items() if s["task"] == "ground"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.box_errors", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="civic-shapes JSONL the evaluations answered")
    p.add_argument("--eval", action="append", required=True, help="civic eval JSON or a cached eval-*.json")
    p.add_argument("--by", choices=("size", "aspect", "row"), default="size",
                   help="split by object size (default), the image's aspect (square, wide, tall) or the third of "
                        "the image height the object's centre is in")
    args = p.parse_args(argv)
    samples = {}
    for line in Path(args.data).read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            samples[rec["id"]] = rec
    groups = {"size": lambda: None, "aspect": lambda: aspects(samples, Path(args.data).parent),
              "row": lambda: row_thirds(samples)}[args.by]()
    for path in args.eval:
        result = json.loads(Path(path).read_text())
        result = result.get("result", result)
        if "predictions" not in result:
            print(f"{path}: no per-question predictions", file=sys.stderr)
            return 2
        print(f"{path} ({result.get('label', result.get('method', ''))})")
        bands = box_errors(samples, result["predictions"], groups)
        if not any(b["n"] + b["unparseable"] for b in bands):
            print("  no grounding answer of --data in it (another split?)")
            continue
        for b in bands:
            print(f"  {args.by} {b['group']:>8} n={b['n']:4d} (unparseable {b['unparseable']}) "
                  f"|dcx| {b['abs_dcx']:5.1f} |dcy| {b['abs_dcy']:5.1f} dcx {b['dcx']:+6.1f} dcy {b['dcy']:+6.1f} "
                  f"dw {b['dw']:+6.1f} dh {b['dh']:+6.1f} "
                  f"IoU {b['iou']:.3f} Acc@0.5 {b['acc']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
