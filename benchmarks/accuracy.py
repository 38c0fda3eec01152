"""The fair accuracy protocol: CIVIC's compact path against equally trained contenders, through vLLM.

    python -m benchmarks.accuracy [--students DIR] [--minutes 15] [--n-val 1200] [--n-test 2400]
                                  [--install]                  (= make bench-accuracy)

Every contender continues the same full-token model (``--teacher``, default
models/civic-shapes-tiny) with the same recipe and the same CPU-minute budget (``civic distill``:
all parameters, lr 5e-5, text-aligned KL + 0.5 x answer cross-entropy, ratios drawn per chat
from {1/2, 1/3, 1/4, 0.15}, one thread):

* ``full-same-budget``  ratio 1: the full-token model trained exactly as long, the reference;
* civic candidates      all select after vision block 1 of 4 (<= depth / 4) and serve with their
                        checkpoint's own recipe: ``learned-exit1`` (the scorer trained towards the
                        teacher's late civic saliency), ``civic-exit1`` (training-free civic
                        selection), ``learned-prior-exit1`` (the scorer frozen at its prior: civic
                        saliency at block 1, top-k) and ``learned-st-exit1`` (the scorer trained only
                        by the answers' loss through a straight-through gate), ``civic-ctx-exit1``
                        (training-free civic selection with exit context: the blocks after the exit
                        layer also attend to the dropped groups). Validation chooses;
* ``pool-exit1``, ``random-exit1``  distilled at the same exit layer, so they cost the same;
  ``pool-ctx-exit1``, ``random-ctx-exit1`` the same with exit context;
* ``downscale``         fine-tuned on images shrunk to each ratio's token budget.

1. Students are trained into ``--students`` (two processes side by side) or reused when one with
   exactly that recipe and budget is there; one of that recipe with a smaller budget is continued
   to it (``--resume``). Their CPU-minutes are recorded and must agree.
2. Validation split (seed VAL_SEED): the civic candidate with the highest minimum, over overall,
   small-object and grounding accuracy at r = 1/3, of its share of ``full-same-budget`` is chosen.
3. Test split (a seed no earlier run used, TEST_SEED): each reported model is scored once: the
   chosen student served with its checkpoint's own default (no per-request setting), the
   baselines at r = 1/3, the full-token reference. Bootstrap 95% intervals for every figure;
   paired intervals (same resampled questions) for shares and differences.
4. The issue's checks at r = 1/3: overall, small and grounding >= 99% of ``full-same-budget``,
   and >= 5 points above every baseline on overall and small objects.

Writes ``benchmarks/results/accuracy.json``, ``accuracy.md`` and ``accuracy.png``; ``--install``
copies the chosen student to models/civic-shapes-tiny-distilled.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.bootstrap import BOOTSTRAP, Scored, bootstrap_indices, figure, paired

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DATA_ROOT = ROOT / "benchmarks" / "results" / "tmp" / "civic-shapes"  # gitignored
DATA_SEED = 2026  # the split earlier protocols chose students on (benchmarks.distill_params); not used here
VAL_SEED = 4242
TEST_SEED = 31337  # never used by a training stream, a validation split or an earlier test
GOAL_RATIO = 1 / 3
KEEP_FRACTION = 0.99
MARGIN = 0.05
METRICS = ("overall", "small", "ground")
MARGIN_METRICS = ("overall", "small")
# The recipe every contender shares; each adds its own retention arguments.
COMMON_DISTILL = ("--params", "all", "--lr", "5e-5", "--ce-weight", "0.5", "--threads", "1")


@dataclass(frozen=True)
class Contender:
    name: str
    role: str  # "reference", "civic" (a candidate) or "baseline"
    distill_args: tuple[str, ...]
    method: str  # how it is evaluated (civic eval's method; "default" = the checkpoint's recipe)
    exit_layer: int | None = None

    @property
    def ratio(self) -> float:
        return 1.0 if self.role == "reference" else GOAL_RATIO

    def own_args(self, feature_weight: float = 0.0) -> tuple[str, ...]:
        """What its ``civic distill`` recipe adds to the shared one: its retention and the protocol's
        feature-distillation weight (downscale has no term: its image has other groups)."""
        feature = ("--feature-weight", str(feature_weight)) if feature_weight and self.method != "downscale" else ()
        return (*self.distill_args, *feature)

    def recipe_args(self, feature_weight: float = 0.0) -> tuple[str, ...]:
        """Its whole ``civic distill`` recipe."""
        return (*COMMON_DISTILL, *self.own_args(feature_weight))


CONTENDERS = (
    Contender("full-same-budget", "reference", ("--ratios", "1"), "full"),
    Contender("learned-exit1", "civic", ("--policy", "learned", "--exit-layer", "1"), "default", 1),
    Contender("civic-exit1", "civic", ("--policy", "civic", "--exit-layer", "1"), "default", 1),
    # the scorer left at its prior (civic saliency at block 1, top-k): the control for the two above
    Contender("learned-prior-exit1", "civic", ("--policy", "learned", "--exit-layer", "1", "--scorer-lr", "0",
                                               "--scorer-weight", "0"), "default", 1),
    # the scorer trained only by the answers' KL/CE through a straight-through gate
    Contender("learned-st-exit1", "civic", ("--policy", "learned", "--exit-layer", "1", "--scorer-weight", "0",
                                            "--straight-through"), "default", 1),
    Contender("civic-ctx-exit1", "civic", ("--policy", "civic", "--exit-layer", "1", "--exit-context"), "default", 1),
    Contender("pool-exit1", "baseline", ("--policy", "pool", "--exit-layer", "1"), "pool", 1),
    Contender("random-exit1", "baseline", ("--policy", "random", "--exit-layer", "1"), "random", 1),
    # the same exit context as civic-ctx-exit1 (served through their checkpoints' recipes, under the
    # per-request policy, ratio and exit layer), so the context does not count as the selection's merit
    Contender("pool-ctx-exit1", "baseline", ("--policy", "pool", "--exit-layer", "1", "--exit-context"), "pool", 1),
    Contender("random-ctx-exit1", "baseline", ("--policy", "random", "--exit-layer", "1", "--exit-context"), "random",
              1),
    Contender("downscale", "baseline", ("--policy", "downscale"), "downscale"),
)


def ratio_label(r: float) -> str:
    return str(Fraction(r).limit_denominator(20))


def split_path(seed: int, split: str, n: int) -> Path:
    """A civic-shapes split of ``n`` samples (written once, then reused)."""
    from civic_vllm.data import shapes

    out = DATA_ROOT / f"seed{seed}-{split}{n}"
    path = out / f"{split}.jsonl"
    if not path.exists():
        print(f"writing {n} {split} samples (seed {seed}) to {out} ...", file=sys.stderr)
        shapes.write_dataset(out, n * 10, seed, splits=[split])
    return path


# --------------------------------------------------------------------------------------
# Students
# --------------------------------------------------------------------------------------


def recipe_matches(student: Path, teacher: str, contender: Contender, minutes: float,
                   feature_weight: float = 0.0) -> bool:
    """A finished student of exactly this contender's recipe and budget is at ``student``."""
    done = same_recipe(student, teacher, contender, feature_weight)
    return done is not None and not done.get("stopped_early") and done.get("cpu_min", 0) >= minutes


def same_recipe(student: Path, teacher: str, contender: Contender,
                feature_weight: float = 0.0) -> dict[str, Any] | None:
    """The distill record at ``student`` if it is this contender's recipe from ``teacher`` (any budget)."""
    from civic_vllm.cli.distill import parse_recipe
    from civic_vllm.training.distill import DISTILL_MARKER, SCORER_FIELDS, DistillRecipe

    marker = student / DISTILL_MARKER
    if not marker.is_file():
        return None
    done = json.loads(marker.read_text())
    wanted = asdict(parse_recipe(contender.recipe_args(feature_weight)))
    wanted.pop("data")  # the data mix is the distill default for every contender
    if wanted["policy"] != "learned":  # scorer settings mean nothing without a scorer
        for name in SCORER_FIELDS:
            wanted.pop(name)
    if wanted["ratios"] == [1.0]:  # a full-token student exports no recipe
        wanted.pop("serve_ratio")
    defaults = asdict(DistillRecipe())  # a field the record lacks was added later: it ran with the default
    same = all(done.get(name, defaults[name]) == value for name, value in wanted.items())
    return done if same and done.get("teacher") == str(Path(teacher).resolve()) else None


def ensure_students(students: Path, teacher: str, minutes: float, contenders: Sequence[Contender],
                    parallel: int = 2, feature_weight: float = 0.0) -> dict[str, float]:
    """Train the missing ``contenders`` (``parallel`` single-thread processes); their CPU-minutes.

    A student of the same recipe with a smaller budget (an earlier, shorter protocol, or a run
    that was stopped) is continued to ``minutes`` (``civic distill --resume``), not retrained.
    """
    from civic_vllm.training.distill import DISTILL_MARKER

    students.mkdir(parents=True, exist_ok=True)
    todo = [c for c in contenders if not recipe_matches(students / c.name, teacher, c, minutes, feature_weight)]
    for c in contenders:
        if c not in todo:
            print(f"reusing {students / c.name}: same recipe and budget", file=sys.stderr)
    running: list[tuple[Contender, subprocess.Popen, Any]] = []
    while todo or running:
        while todo and len(running) < parallel:
            c = todo.pop(0)
            log = (students / f"{c.name}.log").open("w")
            cmd = [sys.executable, "-m", "civic_vllm.training.distill", "--model", teacher,
                   "--out", str(students / c.name), "--minutes", str(minutes), *c.recipe_args(feature_weight)]
            if same_recipe(students / c.name, teacher, c, feature_weight) is not None:
                cmd += ["--resume", str(students / c.name)]
            print(f"training {c.name}: {' '.join(cmd[3:])}", file=sys.stderr)
            running.append((c, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log))
        c, proc, log = running.pop(0)
        if proc.wait() != 0:
            raise SystemExit(f"distill {c.name} failed: see {students / (c.name + '.log')}")
        log.close()
    spent = {c.name: json.loads((students / c.name / DISTILL_MARKER).read_text())["cpu_min"] for c in contenders}
    if max(spent.values()) - min(spent.values()) > 0.1 * minutes:
        raise SystemExit(f"unequal training budgets: {spent}")
    return spent


# --------------------------------------------------------------------------------------
# Goal checks and the validation choice (intervals: benchmarks.bootstrap)
# --------------------------------------------------------------------------------------


def checks(civic: Scored, reference: Scored, baselines: dict[str, Scored], idx: np.ndarray) -> list[dict[str, Any]]:
    """The issue's goals at r = 1/3, each with its point estimate, paired interval and PASS/FAIL."""
    out = []
    for metric in METRICS:
        p = paired(civic, reference, metric, idx)
        out.append({"goal": f"civic {metric} >= {KEEP_FRACTION:.0%} of full, same budget", "metric": metric,
                    "civic": round(civic.value(metric), 4), "full_same_budget": round(reference.value(metric), 4),
                    "share": p["share"], "share_ci95": p["share_ci95"],
                    "pass": p["share"] is not None and p["share"] >= KEEP_FRACTION - 1e-12})
    for name, base in baselines.items():
        for metric in MARGIN_METRICS:
            p = paired(civic, base, metric, idx)
            out.append({"goal": f"civic {metric} >= {name} + {MARGIN * 100:.0f} points", "metric": metric,
                        "civic": round(civic.value(metric), 4), name: round(base.value(metric), 4),
                        "difference": p["difference"], "difference_ci95": p["difference_ci95"],
                        "pass": p["difference"] >= MARGIN - 1e-12})
    return out


def choose(candidates: dict[str, Scored], reference: Scored) -> tuple[str, dict[str, float]]:
    """The candidate whose worst share of the reference (over METRICS) is highest."""
    worst = {name: round(min(s.value(m) / max(reference.value(m), 1e-9) for m in METRICS), 4)
             for name, s in candidates.items()}
    return max(worst, key=worst.get), worst


# --------------------------------------------------------------------------------------
# Serving
# --------------------------------------------------------------------------------------


def evaluate_model(model: str, label: str, contender_method: str, samples, exit_layer: int | None,
                   ratio: float, concurrency: int) -> tuple[dict[str, Any], Scored]:
    """One model on one split through a fresh ``vllm serve``; cached beside the checkpoint.

    The cache (``eval-<key>.json`` in the checkpoint directory) is keyed by the weights' size and
    mtime, the data file, method, ratio and exit layer, so each model meets a split once even
    when the protocol is resumed, and a retrained checkpoint is measured again.
    """
    from civic_vllm.evaluation import evaluate, geometry_of
    from civic_vllm.serving import ServerConfig, VllmServer

    weights = Path(model, "model.safetensors").stat()
    key = {"weights": [weights.st_size, weights.st_mtime_ns], "data": str(samples[0].image_path.parent.parent),
           "n": len(samples), "method": contender_method, "ratio": ratio, "exit_layer": exit_layer}
    digest = hashlib.blake2b(json.dumps(key, sort_keys=True).encode(), digest_size=6).hexdigest()
    cache = Path(model, f"eval-{digest}.json")
    if cache.is_file() and json.loads(cache.read_text()).get("key") == key:
        res = json.loads(cache.read_text())["result"]
        print(f"{label}: reusing {cache}", file=sys.stderr)
    else:
        geometry = geometry_of(model) if contender_method == "downscale" else None
        with VllmServer(ServerConfig(model=model, dtype="float32", images_per_prompt=1)) as server:
            res = evaluate(samples, server.url, method=contender_method, ratio=ratio, exit_layer=exit_layer,
                           geometry=geometry, concurrency=concurrency, desc=label)
        cache.write_text(json.dumps({"key": key, "result": res}) + "\n")
    res = dict(res)
    scored = Scored.from_predictions(samples, res.pop("predictions"))
    res.update(label=label, checkpoint=model, correct="".join("1" if c else "0" for c in scored.correct))
    print(f"{label}: accuracy {res['accuracy']:.3f}, visual tokens {res['mean_visual_tokens']:.1f}", file=sys.stderr)
    return res, scored


def row_figures(res: dict[str, Any], scored: Scored, idx: np.ndarray) -> dict[str, Any]:
    return {**res, "figures": {m: figure(scored, m, idx) for m in METRICS}}


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| model | served as | r | visual tokens | KV blocks | overall (95% CI) | small (95% CI) | "
            "grounding Acc@0.5 (95% CI) | colour | count | shape |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    def ci(figures: dict[str, Any], m: str) -> str:
        lo, hi = figures[m]["ci95"]
        return f"{figures[m]['value']:.3f} ({lo:.3f}–{hi:.3f})"

    for r in rows:
        f, pt = r["figures"], r["per_task"]
        served = r["method"] + (f", exit {r['exit_layer']}" if r.get("exit_layer") else "")
        lines.append(f"| {r['label']} | {served} | {ratio_label(r['ratio'])} | {r['mean_visual_tokens']:.1f} | "
                     f"{r['mean_kv_blocks']:.2f} | {ci(f, 'overall')} | {ci(f, 'small')} | {ci(f, 'ground')} | "
                     f"{pt.get('color', 0):.3f} | {pt.get('count', 0):.3f} | {pt.get('shape', 0):.3f} |")
    return "\n".join(lines)


def check_lines(goal_checks: list[dict[str, Any]]) -> str:
    lines = []
    for c in goal_checks:
        if "share" in c:
            detail = f"{c['civic']:.3f} vs {c['full_same_budget']:.3f}: {c['share']:.1%} (95% CI " \
                     f"{c['share_ci95'][0]:.1%}–{c['share_ci95'][1]:.1%})"
        else:
            detail = f"{c['difference'] * 100:+.1f} points (95% CI {c['difference_ci95'][0] * 100:+.1f} to " \
                     f"{c['difference_ci95'][1] * 100:+.1f})"
        lines.append(f"{'PASS' if c['pass'] else 'FAIL'}  {c['goal']}: {detail}")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METRICS), figsize=(15, 4.6), sharey=True)
    titles = {"overall": "overall", "small": "small objects (16–40 px)", "ground": "grounding Acc@0.5"}
    colours = {"reference": "0.35", "civic": "C3", "baseline": "C0"}
    for ax, metric in zip(axes, METRICS):
        for i, r in enumerate(rows):
            fig_m = r["figures"][metric]
            lo, hi = fig_m["ci95"]
            ax.barh(i, fig_m["value"], color=colours.get(r.get("role"), "C7"), alpha=0.85)
            ax.errorbar(fig_m["value"], i, xerr=[[fig_m["value"] - lo], [hi - fig_m["value"]]], color="k",
                        capsize=3, linewidth=1)
        ax.set_yticks(range(len(rows)), [f"{r['label']} ({r['mean_visual_tokens']:.0f} tok)" for r in rows],
                      fontsize=8)
        ax.invert_yaxis()
        ax.set_title(titles[metric])
        ax.set_xlim(0, 1)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_xlabel("accuracy, civic-shapes test split (bars: 95% bootstrap CI)")
    fig.suptitle("Fair protocol, served by vLLM: every contender trained for the same CPU-minutes from the same model")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    from civic_vllm.evaluation import load_samples
    from civic_vllm.model_factory import default_model

    p = argparse.ArgumentParser(prog="python -m benchmarks.accuracy", description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default=None, help="full-token model every contender continues "
                                                   "(default: models/civic-shapes-tiny)")
    p.add_argument("--students", default=str(RESULTS / "tmp" / "fair"), help="where contenders are trained/reused")
    p.add_argument("--minutes", type=float, default=15.0, help="training CPU-minutes per contender")
    p.add_argument("--n-val", type=int, default=1200, help="validation questions (choice of the civic student)")
    p.add_argument("--n-test", type=int, default=2400, help="test questions (scored once per model)")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--feature-weight", type=float, default=0.0,
                   help="every contender but downscale also distils its kept groups' features with this weight "
                        "(civic distill --feature-weight; recorded)")
    p.add_argument("--parallel", type=int, default=2,
                   help="students trained side by side (single-thread processes; the budget is CPU time, "
                        "so this changes only the wall time)")
    p.add_argument("--out", default=str(RESULTS / "accuracy.json"))
    p.add_argument("--install", action="store_true",
                   help="copy the chosen student to models/civic-shapes-tiny-distilled")
    p.add_argument("--replot", action="store_true", help="redraw PNG and Markdown from --out without measuring")
    p.add_argument("--candidates", default="", metavar="NAME[,NAME]",
                   help="consider only these civic candidates (default: all; recorded): e.g. when a longer "
                        "budget continues the one an earlier validation chose")
    p.add_argument("--skip", default="", metavar="NAME[,NAME]",
                   help="leave these baselines out (not trained, not measured; recorded, and the run "
                        "cannot pass): for a run short of time")
    p.add_argument("--prefetch", default=None, metavar="NAME[,NAME]",
                   help="only evaluate these trained contenders into the cache (validation: reference and "
                        "civic candidates; test: reference and baselines), e.g. while others train; no report")
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.replot:
        result = json.loads(out.read_text())
        write_report(result, out)
        return 0

    teacher = str(Path(args.teacher or default_model()).resolve())
    students = Path(args.students)
    start = time.time()
    by_name = {c.name: c for c in CONTENDERS}
    candidates = [name for name in args.candidates.split(",") if name]
    if any(by_name.get(name) is None or by_name[name].role != "civic" for name in candidates):
        p.error("--candidates takes civic candidates only: "
                + ", ".join(c.name for c in CONTENDERS if c.role == "civic"))
    candidates = candidates or [c.name for c in CONTENDERS if c.role == "civic"]
    if args.prefetch:  # the rows the full run will need, for contenders already trained
        splits = {"val": load_samples(split_path(VAL_SEED, "val", args.n_val)),
                  "test": load_samples(split_path(TEST_SEED, "test", args.n_test))}
        for name in args.prefetch.split(","):
            c = by_name[name]
            if not recipe_matches(students / name, teacher, c, args.minutes, args.feature_weight):
                raise SystemExit(f"{students / name} is not a finished {name} student of this recipe and budget")
            # validation: the reference and the civic candidates; test: the reference and the baselines.
            # A civic candidate meets the test split only once validation has chosen it, which is
            # settled in advance only when it is the sole candidate (its validation row comes first).
            sole = candidates == [name]
            wanted = {"reference": ("val", "test"), "civic": ("val", "test") if sole else ("val",),
                      "baseline": ("test",)}[c.role]
            for split in wanted:
                evaluate_model(str(students / name), f"{name} ({split})", c.method, splits[split], c.exit_layer,
                               c.ratio, args.concurrency)
        return 0
    skipped = [name for name in args.skip.split(",") if name]
    if any(by_name.get(name) is None or by_name[name].role != "baseline" for name in skipped):
        p.error(f"--skip takes baselines only: {', '.join(c.name for c in CONTENDERS if c.role == 'baseline')}")
    contenders = [c for c in CONTENDERS if c.name not in skipped and (c.role != "civic" or c.name in candidates)]
    spent = ensure_students(students, teacher, args.minutes, contenders, args.parallel, args.feature_weight)

    def run(name: str, samples, split: str):
        c = by_name[name]
        return evaluate_model(str(students / name), f"{name} ({split})", c.method, samples, c.exit_layer,
                              c.ratio, args.concurrency)

    val = load_samples(split_path(VAL_SEED, "val", args.n_val))
    val_ref = run("full-same-budget", val, "val")[1]
    val_scored = {c.name: run(c.name, val, "val")[1] for c in contenders if c.role == "civic"}
    chosen, worst_share = choose(val_scored, val_ref)
    print(f"chosen on validation: {chosen} (worst share of full-same-budget: {worst_share})", file=sys.stderr)

    test = load_samples(split_path(TEST_SEED, "test", args.n_test))
    idx = bootstrap_indices(len(test))
    reported = [("full-same-budget", by_name["full-same-budget"]), (chosen, by_name[chosen])]
    reported += [(c.name, c) for c in contenders if c.role == "baseline"]
    rows, scored = [], {}
    for name, c in reported:
        res, scored[name] = run(name, test, "test")
        rows.append(row_figures({**res, "label": name, "role": c.role}, scored[name], idx))

    baselines = {name: scored[name] for name, c in reported if c.role == "baseline"}
    result = {
        "command": "python -m benchmarks.accuracy " + " ".join(argv if argv is not None else sys.argv[1:]),
        "teacher": teacher, "students": str(students.resolve()), "minutes_per_contender": args.minutes,
        "cpu_minutes": spent, "recipe": list(COMMON_DISTILL), "feature_weight": args.feature_weight,
        "pieces": {c.name: same_recipe(students / c.name, teacher, c, args.feature_weight).get("pieces", [])
                   for c in contenders},
        "contenders": {c.name: {"role": c.role, "distill_args": list(c.own_args(args.feature_weight)),
                                "evaluated_as": c.method}
                       for c in CONTENDERS},
        "skipped": skipped, "candidates": [c.name for c in contenders if c.role == "civic"],
        "validation": {"seed": VAL_SEED, "n": len(val), "chosen": chosen, "worst_share": worst_share,
                       "figures": {name: {m: round(s.value(m), 4) for m in METRICS}
                                   for name, s in {"full-same-budget": val_ref, **val_scored}.items()}},
        "test": {"seed": TEST_SEED, "n": len(test), "bootstrap": BOOTSTRAP},
        "checks": checks(scored[chosen], scored["full-same-budget"], baselines, idx),
        "rows": rows, "minutes": round((time.time() - start) / 60, 1),
    }
    result["pass"] = not skipped and all(c["pass"] for c in result["checks"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    write_report(result, out)
    if args.install:
        install_student(students / chosen)
    return 0


def install_student(student: Path) -> Path:
    """Copy a student to models/civic-shapes-tiny-distilled (replacing it), without eval caches."""
    dest = ROOT / "models" / "civic-shapes-tiny-distilled"
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(student, dest, ignore=shutil.ignore_patterns("eval-*.json", "distill_state.pt"))
    print(f"installed {student} -> {dest}")
    return dest


def write_report(result: dict[str, Any], out: Path) -> None:
    md = table(result["rows"]) + "\n\n" + check_lines(result["checks"]) + "\n"
    if result.get("skipped"):
        md += f"NOT MEASURED (--skip): {', '.join(result['skipped'])}; the run cannot pass\n"
    out.with_suffix(".md").write_text(md)
    plot(result["rows"], out.with_suffix(".png"))
    print(md)
    print(f"-> {out}, {out.with_suffix('.png')}")


if __name__ == "__main__":
    sys.exit(main())
