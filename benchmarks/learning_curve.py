"""Plot a ``civic train`` learning curve: per-task held-out accuracy and loss vs training CPU-minutes.

    python -m benchmarks.learning_curve [--curve models/civic-shapes-tiny/training_curve.jsonl]
                                        [--out benchmarks/results/training_curve.png]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("color", "shape", "ground", "count", "has_color", "has_shape")


def main(argv: list[str] | None = None) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p = argparse.ArgumentParser(prog="python -m benchmarks.learning_curve", description=__doc__.split("\n\n")[0])
    p.add_argument("--curve", type=Path, default=ROOT / "models" / "civic-shapes-tiny" / "training_curve.jsonl")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "training_curve.png")
    args = p.parse_args(argv)
    if not args.curve.is_file():
        p.error(f"no curve at {args.curve}")
    records = [json.loads(line) for line in args.curve.read_text().splitlines() if line.strip()]
    evals = [r for r in records if "eval" in r]
    losses = [r for r in records if "loss" in r]
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(13, 4.2))
    for task in TASKS:
        pts = [(r["cpu_min"], r["eval"][task]) for r in evals if task in r["eval"]]
        if pts:
            acc_ax.plot(*zip(*pts), marker=".", label=task)
    acc_ax.set_xlabel("training CPU-minutes")
    acc_ax.set_ylabel("held-out accuracy (25 per task, HF greedy)")
    acc_ax.set_ylim(0, 1.02)
    acc_ax.grid(alpha=0.3)
    acc_ax.legend(fontsize=8)
    for task in TASKS:
        pts = [(r["cpu_min"], r["loss_by_task"][task]) for r in losses if task in r.get("loss_by_task", {})]
        if pts:
            loss_ax.plot(*zip(*pts), linewidth=0.8, label=task)
    loss_ax.set_xlabel("training CPU-minutes")
    loss_ax.set_ylabel("training loss per answer (mean over its tokens)")
    loss_ax.set_yscale("log")
    loss_ax.grid(alpha=0.3)
    loss_ax.legend(fontsize=8)
    name = args.curve.relative_to(ROOT) if args.curve.is_relative_to(ROOT) else args.curve
    fig.suptitle(f"civic train learning curve ({name})")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
