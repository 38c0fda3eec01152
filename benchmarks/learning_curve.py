"""Plot a ``civic train`` learning curve: per-task held-out accuracy and loss vs training CPU-minutes.

    python -m benchmarks.learning_curve [--curve models/civic-shapes-tiny/training_curve.jsonl]
                                        [--compare OTHER.jsonl] [--out benchmarks/results/training_curve.png]
    python -m benchmarks.learning_curve --curve STAGE1.jsonl --curve STAGE2.jsonl --write-joined OUT.jsonl

Several ``--curve`` files are consecutive stages of one model (a run continued with ``--init-from``):
their CPU-minutes are chained and each record gets its ``stage``; ``--write-joined`` saves that
curve. ``--compare`` draws another run's overall accuracy in grey (e.g. an earlier recipe).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("color", "shape", "ground", "count", "has_color", "has_shape")


def read_curve(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def join_stages(stages: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One curve from consecutive runs: CPU-minutes and steps continue where the last stage stopped.

    A record that already has a ``stage`` (a joined curve) keeps its own numbers.
    """
    if len(stages) == 1:
        return stages[0]
    joined: list[dict[str, Any]] = []
    keys = ("step", "cpu_min", "cpu_min_total", "wall_min")
    offset = dict.fromkeys(keys, 0.0)
    for k, records in enumerate(stages, 1):
        for r in records:
            joined.append({**r, "stage": k, **{key: round(r[key] + offset[key], 3) for key in keys if key in r}})
            joined[-1]["step"] = int(joined[-1]["step"])
        for key in keys:
            offset[key] += max((r[key] for r in records if key in r), default=0.0)
    return joined


def stage_starts(records: list[dict[str, Any]]) -> list[float]:
    starts, last = [], None
    for r in records:
        if "stage" in r and r["stage"] != last:
            if last is not None:
                starts.append(r["cpu_min"])
            last = r["stage"]
    return starts


def main(argv: list[str] | None = None) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p = argparse.ArgumentParser(prog="python -m benchmarks.learning_curve", description=__doc__.split("\n\n")[0])
    p.add_argument("--curve", type=Path, action="append", default=None,
                   help="curve JSONL, repeated for consecutive stages (default: the committed model's curve)")
    p.add_argument("--compare", type=Path, default=None, help="another run's curve: its overall accuracy in grey")
    p.add_argument("--write-joined", type=Path, default=None, help="also write the joined curve here")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "training_curve.png")
    args = p.parse_args(argv)
    curves = args.curve or [ROOT / "models" / "civic-shapes-tiny" / "training_curve.jsonl"]
    for path in [*curves, *([args.compare] if args.compare else [])]:
        if not path.is_file():
            p.error(f"no curve at {path}")
    records = join_stages([read_curve(c) for c in curves])
    if args.write_joined:
        args.write_joined.write_text("".join(json.dumps(r) + "\n" for r in records))
    evals = [r for r in records if "eval" in r]
    losses = [r for r in records if "loss" in r]
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(13, 4.6))
    for task in (*TASKS, "overall"):
        pts = [(r["cpu_min"], r["eval"][task]) for r in evals if task in r["eval"]]
        if pts:
            style = {"color": "k", "linewidth": 2} if task == "overall" else {}
            acc_ax.plot(*zip(*pts), marker=".", label=task, **style)
    if args.compare:
        pts = [(r["cpu_min"], r["eval"]["overall"]) for r in read_curve(args.compare) if "eval" in r]
        acc_ax.plot(*zip(*pts), color="grey", linestyle="--", label=f"overall, {args.compare.stem}")
    acc_ax.set_xlabel("training CPU-minutes")
    acc_ax.set_ylabel("held-out accuracy (25 per task, HF greedy)")
    acc_ax.set_ylim(0, 1.02)
    acc_ax.grid(alpha=0.3)
    acc_ax.legend(fontsize=7, ncol=2)
    heads = sorted({t for r in losses for t in r.get("loss_by_task", {}) if t.startswith("dense_")})
    for task in (*TASKS, *heads):
        pts = [(r["cpu_min"], r["loss_by_task"][task]) for r in losses if task in r.get("loss_by_task", {})]
        if pts:
            loss_ax.plot(*zip(*pts), linewidth=0.8, label=task, linestyle="--" if task in heads else "-")
    loss_ax.set_xlabel("training CPU-minutes")
    loss_ax.set_ylabel("training loss per answer (dashed: dense heads)")
    loss_ax.set_yscale("log")
    loss_ax.grid(alpha=0.3)
    loss_ax.legend(fontsize=7, ncol=2)
    for x in stage_starts(records):
        for ax in (acc_ax, loss_ax):
            ax.axvline(x, color="k", linestyle=":", linewidth=1)
    name = ", ".join(str(c.relative_to(ROOT) if c.is_relative_to(ROOT) else c) for c in curves)
    fig.suptitle(f"civic train learning curve ({name}); dotted line: next stage (--init-from)", fontsize=10)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
