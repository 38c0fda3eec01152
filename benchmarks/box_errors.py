"""Where do a model's boxes go wrong? Centre and size errors of grounding answers, by object size.

    python -m benchmarks.box_errors --data split.jsonl --eval EVAL.json [--eval EVAL.json ...]

``--data``: a civic-shapes JSONL (grounding samples carry ``box`` and ``size``); each ``--eval``: a
``civic eval`` result, or an evaluation cached beside a fair-protocol student (``eval-*.json``,
whose ``result`` is one), with per-question ``predictions``. For every size band it prints the mean
|centre error| in x and y, the mean width and height error (predicted minus true, 0-1000 units),
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


def box_errors(samples: dict[str, dict], predictions: list[dict]) -> list[dict]:
    """Per size band: n, unparseable, mean |dcx|, |dcy|, dw, dh, IoU and Acc@0.5 of the grounding answers."""
    rows: list[tuple[float, ...]] = []
    unparseable: list[int] = []
    for p in predictions:
        sample = samples.get(p["id"])
        if sample is None or sample["task"] != "ground":
            continue
        box, true = shapes.parse_box(p["output"]), sample["box"]
        if box is None:
            unparseable.append(sample["size"])
            continue
        rows.append((sample["size"], abs((box[0] + box[2] - true[0] - true[2]) / 2),
                     abs((box[1] + box[3] - true[1] - true[3]) / 2), (box[2] - box[0]) - (true[2] - true[0]),
                     (box[3] - box[1]) - (true[3] - true[1]), shapes.box_iou(box, true)))
    table = np.array(rows, dtype=float).reshape(-1, 6)
    bands = []
    for lo, hi in SIZE_BANDS:
        band = table[(table[:, 0] >= lo) & (table[:, 0] <= hi)]
        mean = band.mean(axis=0) if len(band) else np.full(6, np.nan)
        bands.append({"size": [lo, hi], "n": len(band), "unparseable": sum(lo <= s <= hi for s in unparseable),
                      "abs_dcx": mean[1], "abs_dcy": mean[2], "dw": mean[3], "dh": mean[4], "iou": mean[5],
                      "acc": float((band[:, 5] >= 0.5).mean()) if len(band) else float("nan")})
    return bands


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.box_errors", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="civic-shapes JSONL the evaluations answered")
    p.add_argument("--eval", action="append", required=True, help="civic eval JSON or a cached eval-*.json")
    args = p.parse_args(argv)
    samples = {}
    for line in Path(args.data).read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            samples[rec["id"]] = rec
    for path in args.eval:
        result = json.loads(Path(path).read_text())
        result = result.get("result", result)
        if "predictions" not in result:
            print(f"{path}: no per-question predictions", file=sys.stderr)
            return 2
        print(f"{path} ({result.get('label', result.get('method', ''))})")
        bands = box_errors(samples, result["predictions"])
        if not any(b["n"] + b["unparseable"] for b in bands):
            print("  no grounding answer of --data in it (another split?)")
            continue
        for b in bands:
            print(f"  size {b['size'][0]:3d}-{b['size'][1]:3d} n={b['n']:4d} (unparseable {b['unparseable']}) "
                  f"|dcx| {b['abs_dcx']:5.1f} |dcy| {b['abs_dcy']:5.1f} dw {b['dw']:+6.1f} dh {b['dh']:+6.1f} "
                  f"IoU {b['iou']:.3f} Acc@0.5 {b['acc']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
