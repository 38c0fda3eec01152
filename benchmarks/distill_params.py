"""Which parameters are worth distilling? Train each choice for the same budget, compare on val.

    python -m benchmarks.distill_params [--minutes 20] [--ce-weights 0.5] [--choices merger,all]
                                        [--n-val 600] [--out FILE] [--install]

For each ``--params`` choice of ``civic distill`` (merger, vision, all), and each weight of the
answers' cross-entropy next to KL (``--ce-weights``), it distils the trained full-token model for
the same CPU-minute budget (one process per candidate, one thread each, run side by side),
then evaluates every student through ``vllm serve --model-impl civic`` with the civic policy on
the civic-shapes *validation* split (the test split stays for ``benchmarks.accuracy``) at
r = 1/3 and 0.15, next to the undistilled model. Writes ``--out``
(default ``benchmarks/results/distill_params.json``); with ``--install`` the best student (highest
mean accuracy over the two ratios) becomes ``models/civic-shapes-tiny-distilled``.

A student already in ``--work`` whose recorded recipe matches (teacher, params, lr, CE weight,
training ratios ``--ratios``, budget) is reused rather than trained again, so a failed evaluation
does not cost the training.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.accuracy import DATA_ROOT, DATA_SEED, RESULTS, install_student, ratio_label
from civic_vllm.cli.common import ratio_list
from civic_vllm.training.distill import CURVE_FILE, DISTILL_MARKER, DistillRecipe

CHOICES = ("merger", "vision", "all")
RATIOS = (1 / 3, 0.15)
# The more parameters learn, the smaller the step: at 1e-4 for all parameters the 6-minute
# students were no better than merger-only ones.
DEFAULT_LR = {"merger": 1e-4, "vision": 5e-5, "all": 5e-5}


def val_split(n_val: int) -> Path:
    from civic_vllm.data import shapes

    out = DATA_ROOT / f"seed{DATA_SEED}-val{n_val}"
    path = out / "val.jsonl"
    if not path.exists():
        shapes.write_dataset(out, n_val * 10, DATA_SEED, splits=["val"])
    return path


def _choices(text: str) -> list[str]:
    choices = [c.strip() for c in text.split(",") if c.strip()]
    unknown = [c for c in choices if c not in CHOICES]
    if unknown or not choices:
        raise argparse.ArgumentTypeError(f"choices are {', '.join(CHOICES)}, got {text!r}")
    return choices


def _weights(text: str) -> list[float]:
    try:
        weights = [float(w) for w in text.split(",") if w.strip()]
    except ValueError:
        weights = []
    if not weights or any(not w >= 0.0 for w in weights):
        raise argparse.ArgumentTypeError(f"expected a comma list of weights >= 0, got {text!r}")
    return weights


def candidate_label(params: str, ce_weight: float, sweep_ce: bool) -> str:
    """Name (and --work subfolder) of one student: its parameter choice, plus its CE weight in a sweep."""
    return f"{params}-ce{ce_weight:g}" if sweep_ce else params


def reusable(student: Path, teacher: str, params: str, lr: float, ce_weight: float, minutes: float,
             ratios: list[float]) -> bool:
    """A finished student of exactly this recipe and budget is already at ``student``."""
    marker = student / DISTILL_MARKER
    if not marker.is_file():
        return False
    done = json.loads(marker.read_text())
    return (done["teacher"] == str(Path(teacher).resolve()) and done["params"] == params and done["lr"] == lr
            and done["ce_weight"] == ce_weight and done["ratios"] == ratios
            and not done["stopped_early"] and done["cpu_min"] >= minutes)


def main(argv: list[str] | None = None) -> int:
    from civic_vllm.evaluation import evaluate, load_samples
    from civic_vllm.model_factory import default_model
    from civic_vllm.serving import ServerConfig, VllmServer

    p = argparse.ArgumentParser(prog="python -m benchmarks.distill_params", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="teacher (default: models/civic-shapes-tiny)")
    p.add_argument("--minutes", type=float, default=20.0, help="distillation budget per choice, CPU-minutes")
    p.add_argument("--choices", type=_choices, default=list(CHOICES), help="comma list of merger, vision, all")
    p.add_argument("--lr", type=float, default=None, help=f"learning rate of every choice (default {DEFAULT_LR})")
    p.add_argument("--ce-weights", type=_weights, default=[0.5],
                   help="comma list: weight of the answers' cross-entropy next to KL (each one a candidate)")
    p.add_argument("--ratios", type=ratio_list, default=DistillRecipe().ratios,
                   help="students' training ratios, e.g. 1/3 (default: civic distill's)")
    p.add_argument("--n-val", type=int, default=600)
    p.add_argument("--work", default=str(RESULTS / "tmp" / "distill"), help="where students are written")
    p.add_argument("--out", default=str(RESULTS / "distill_params.json"), help="result JSON")
    p.add_argument("--install", action="store_true", help="copy the best student to models/civic-shapes-tiny-distilled")
    args = p.parse_args(argv)

    teacher = args.model or default_model()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    samples = load_samples(val_split(args.n_val))
    lrs = {c: args.lr if args.lr is not None else DEFAULT_LR[c] for c in args.choices}
    sweep_ce = len(args.ce_weights) > 1
    # label -> (params, CE weight)
    candidates = {candidate_label(c, w, sweep_ce): (c, w) for c in args.choices for w in args.ce_weights}
    start = time.time()
    procs = {}
    for label, (choice, ce_weight) in candidates.items():  # side by side: each is single-threaded
        if reusable(work / label, teacher, choice, lrs[choice], ce_weight, args.minutes, args.ratios):
            print(f"reusing {work / label}: same recipe and budget", file=sys.stderr)
            continue
        log = (work / f"{label}.log").open("w")
        procs[label] = (subprocess.Popen(
            [sys.executable, "-m", "civic_vllm.training.distill", "--model", teacher, "--out", str(work / label),
             "--params", choice, "--minutes", str(args.minutes), "--lr", str(lrs[choice]),
             "--ce-weight", str(ce_weight), "--threads", "1",
             "--ratios", ",".join(map(str, args.ratios))],
            stdout=log, stderr=subprocess.STDOUT), log)
    for label, (proc, log) in procs.items():
        if proc.wait() != 0:
            raise SystemExit(f"distill {label} failed: see {work / (label + '.log')}")
        log.close()
    distill_minutes = round((time.time() - start) / 60, 1)

    rows = []
    for label, model in [("none", teacher)] + [(c, str(work / c)) for c in candidates]:
        with VllmServer(ServerConfig(model=model, dtype="float32", images_per_prompt=1)) as server:
            for r in RATIOS:
                res = evaluate(samples, server.url, method="civic", ratio=r, desc=f"{label} r={ratio_label(r)}")
                res.pop("predictions")
                rows.append({"params": label, "ratio": r, "accuracy": res["accuracy"], "per_task": res["per_task"],
                             "splits": res["splits"], "visual_tokens": res["mean_visual_tokens"]})
                print(f"params={label} r={ratio_label(r)}: {res['accuracy']:.3f}", file=sys.stderr)

    def mean_acc(label: str) -> float:
        return sum(r["accuracy"] for r in rows if r["params"] == label) / len(RATIOS)

    best = max(candidates, key=mean_acc)
    curves = {c: [json.loads(line) for line in (work / c / CURVE_FILE).read_text().splitlines()] for c in candidates}
    result = {
        "command": "python -m benchmarks.distill_params " + " ".join(argv if argv is not None else sys.argv[1:]),
        "teacher": teacher, "minutes_per_choice": args.minutes, "train_ratios": args.ratios,
        "lr": lrs, "ce_weights": args.ce_weights,
        "n_val": len(samples),
        "distill_wall_minutes": distill_minutes, "rows": rows,
        "mean_accuracy": {label: round(mean_acc(label), 4) for label in ("none", *candidates)},
        "best": best, "final_kl": {c: (curves[c][-1]["kl"] if curves[c] else None) for c in candidates},
        "cpu_minutes": {c: json.loads((work / c / DISTILL_MARKER).read_text())["cpu_min"] for c in candidates},
    }
    out = Path(args.out)
    out.write_text(json.dumps(result, indent=2) + "\n")
    for label in ("none", *candidates):
        print(f"{label:<7} mean accuracy over r={[ratio_label(r) for r in RATIOS]}: {mean_acc(label):.4f}")
    print(f"best: {best} -> {out}")
    if args.install:
        install_student(work / best)
    return 0


if __name__ == "__main__":
    sys.exit(main())
