"""Video accuracy at one visual-token budget: CIVIC's temporal retention against vLLM's EVS and naive
frame subsampling, on the civic-shapes-video test split, served by vLLM.

    python -m benchmarks.video_accuracy [--model models/civic-shapes-video-tiny] [--n-test 640]
                                        [--ratio 1/3] [--concurrency 4] [--video-exit-layers 1,2]
                                                                            (= make bench-video-accuracy)

One test split (seed TEST_SEED, tasks balanced: direction, appears, video_count, last_color), each
method scored once, greedy:

* ``full``       every video token (``--model-impl civic`` with ``civic_policy=full``: token-identical
                 to vanilla vLLM, tests/e2e/test_video.py);
* ``civic``      ``civic_video_ratio=R``: R of each video's span (video tokens, timestamps and markers),
                 so K_t = ceil((R (t N_t + T) - T) / t) tokens in every frame group, fewer than R N_t
                 and fewer than EVS keeps at 1-R; chosen by the temporal policy;
* ``evs``        vanilla Qwen3-VL (no CIVIC) started with ``--video-pruning-rate 1-R``: vLLM's
                 Efficient Video Sampling (the first frame group whole, then the tokens least similar
                 to the same position one group earlier);
* ``subsample``  the naive baseline: the client keeps about R of the frame groups, evenly spread, and
                 sends every token of those (``civic eval --method subsample``);
* ``civic-exitL`` (with ``--video-exit-layers``) civic with ``civic_video_exit_layer=L``: the temporal
                 policy selects after vision block L and the later blocks run on the kept tokens only.

Video tokens reaching the LLM are the ``<|video_pad|>`` placeholders of each served prompt, so the kept
fraction of EVS and subsampling is measured next to civic's, not assumed. Bootstrap 95% intervals
(benchmarks.accuracy's resampling: the same resampled questions for every method) for each accuracy and
paired intervals for civic - EVS, civic - subsample and each method - full.

Writes ``benchmarks/results/video_accuracy.json``, ``.md`` and ``.png``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.accuracy import RESULTS, ROOT, ratio_label
from benchmarks.bootstrap import Scored, bootstrap_indices, figure, paired
from benchmarks.harness import evs_cpu_env

DATA_ROOT = ROOT / "benchmarks" / "results" / "tmp" / "civic-shapes-video"  # gitignored
TEST_SEED = 90210  # no training stream or other split uses it (training draws videos on the fly from seed 0)
DEFAULT_MODEL = ROOT / "models" / "civic-shapes-video-tiny"
METHODS = ("full", "civic", "evs", "subsample")
COLOURS = {"full": "0.35", "civic": "C3", "evs": "C0", "subsample": "C2"}
EXIT_COLOURS = ("C1", "C4", "C5", "C6")


def exit_method(layer: int) -> str:
    return f"civic-exit{layer}"


def colour(method: str, exit_methods: list[str]) -> str:
    return COLOURS.get(method) or EXIT_COLOURS[exit_methods.index(method) % len(EXIT_COLOURS)]


def test_split(n_test: int, seed: int = TEST_SEED) -> Path:
    """The test split of ``n_test`` videos drawn from ``seed`` (written once, reused)."""
    from civic_vllm.data.shapes_video import write_video_dataset

    folder = DATA_ROOT / f"seed{seed}-n{n_test}"
    path = folder / "test.jsonl"
    if not path.exists():
        write_video_dataset(folder, n_test * 10, seed=seed, splits=["test"], progress=True)
    return path


def scored(samples, predictions: list[dict[str, Any]], tasks: list[str]) -> Scored:
    masks = {"overall": np.ones(len(samples), dtype=bool)}
    masks.update({t: np.array([s.record["task"] == t for s in samples]) for t in tasks})
    return Scored(np.array([p["correct"] for p in predictions], dtype=bool), masks)


def run_methods(model: str, data: Path, ratio: float, concurrency: int, cache: Path,
                cpu_evs_fix: bool = True, exit_layers: tuple[int, ...] = (),
                civic_budget: str = "evs") -> dict[str, dict[str, Any]]:
    """Every method's ``civic eval`` result (with predictions): a vanilla EVS server, then one civic server
    (``exit_layers``: also civic at each of those video exit layers). ``civic_budget`` "evs": each
    civic video keeps as many video tokens as EVS kept of it, or fewer (:func:`civic_ratios_at`);
    "ratio": civic_video_ratio = ``ratio`` (a fraction of the span, so fewer video tokens than EVS).

    Each result is kept in ``cache`` as soon as it is scored (keyed by model, data, ratio and, for
    civic, its budget), so a run that stops is continued rather than redone.
    """
    from civic_vllm.evaluation import EvalServerError, evaluate, load_samples, server_config
    from civic_vllm.serving import VllmServer

    samples = load_samples(data)
    common_key = {"model": str(Path(model).resolve()), "data": str(data.resolve()), "ratio": ratio}
    cache.mkdir(parents=True, exist_ok=True)

    def key(method: str) -> dict[str, Any]:
        return {**common_key, "civic_budget": civic_budget} if method.startswith("civic") else common_key

    def cached(method: str) -> dict[str, Any] | None:
        path = cache / f"{method}.json"
        if path.exists():
            saved = json.loads(path.read_text())
            if saved.get("key") == key(method):
                return saved["result"]
        return None

    def keep(method: str, result: dict[str, Any]) -> None:
        (cache / f"{method}.json").write_text(json.dumps({"key": key(method), "result": result}))

    results = {m: r for m in (*METHODS, *map(exit_method, exit_layers)) if (r := cached(m)) is not None}
    if "evs" not in results:
        t0 = time.monotonic()
        # benchmarks/evs_cpu (harness.evs_cpu_env), without which EVS fails on vLLM's CPU backend at once.
        evs = server_config(model, samples, civic=False, extra_args=("--video-pruning-rate", f"{1 - ratio:.6f}"),
                            extra_env=evs_cpu_env() if cpu_evs_fix else {})
        server = VllmServer(evs)
        with server:
            print(f"vanilla EVS server up in {time.monotonic() - t0:.0f} s", file=sys.stderr)
            try:
                results["evs"] = evaluate(samples, server.url, method="default", ratio=ratio,
                                          concurrency=concurrency, desc=f"evs q={1 - ratio:.3g}")
            except EvalServerError as exc:  # recorded, and the other methods still run
                errors = root_errors(server.log_text())
                print(f"EVS failed: {exc}\n" + "\n".join(errors), file=sys.stderr)
                results["evs_error"] = {"request": str(exc), "server_log": errors, "cpu_evs_fix": cpu_evs_fix}
            else:
                results["evs"]["video_pruning_rate"] = round(1 - ratio, 6)
                results["evs"]["cpu_evs_fix"] = cpu_evs_fix
                keep("evs", results["evs"])
    runs = [("full", "full", 1.0, None), ("civic", "civic", ratio, None), ("subsample", "subsample", ratio, None),
            *((exit_method(layer), "civic", ratio, layer) for layer in exit_layers)]
    todo = [run for run in runs if run[0] not in results]
    civic_ratios = None
    if civic_budget == "evs" and any(method == "civic" for _, method, _, _ in todo):
        if "evs" not in results:
            raise RuntimeError("civic at EVS's token counts needs EVS's results; EVS failed (see above)")
        civic_ratios = civic_ratios_at(results["evs"]["video_tokens"], samples, model)
    if todo:
        t0 = time.monotonic()
        with VllmServer(server_config(model, samples)) as server:
            print(f"civic server up in {time.monotonic() - t0:.0f} s", file=sys.stderr)
            for name, method, r, layer in todo:
                per_video = civic_ratios if method == "civic" else None
                results[name] = evaluate(samples, server.url, method=method, ratio=r, sample_ratios=per_video,
                                         exit_layer=layer, concurrency=concurrency,
                                         desc=f"{name} r={'EVS tokens' if per_video else ratio_label(r)}")
                keep(name, results[name])
    return results


def civic_ratios_at(kept: list[int], samples, model: str) -> list[float]:
    """Per video, the civic_video_ratio that keeps the most video tokens within ``kept`` (EVS's measured
    count of that video): civic at EVS's kept fraction, counted on the span as civic counts it. Frame
    groups, tokens per group and the span's text tokens come from ``civic plan`` (tested against the
    served prompt); the ratio from the video benchmark's :func:`matching_ratio`."""
    from benchmarks.video_serve.common import matching_ratio
    from civic_vllm import planner

    info = planner.load_model(model)
    videos: dict[tuple[int, int, int], Any] = {}
    ratios = []
    for sample, count in zip(samples, kept, strict=True):
        size = (sample.record["width"], sample.record["height"], sample.record["frames"])
        if size not in videos:
            request = planner.PlanRequest(images=[], videos=[size], max_tokens=1)
            (videos[size],) = planner.make_plan(info, request).videos
        video = videos[size]
        ratios.append(float(matching_ratio(count, video.tokens_per_group, video.grid_thw[0], video.span_text_tokens)))
    return ratios


def root_errors(log: str, most: int = 3) -> list[str]:
    """The distinct exception lines (``SomeError: message``) of a server log, first first: the root cause."""
    seen: list[str] = []
    for line in log.splitlines():
        match = re.search(r"\b([A-Za-z_.]*(?:Error|Exception)): (.*)$", line)
        if match and (text := f"{match.group(1)}: {match.group(2)}") not in seen:
            seen.append(text)
    return seen[:most]


def summarise(results: dict[str, dict[str, Any]], samples, ratio: float,
              exit_layers: tuple[int, ...] = ()) -> dict[str, Any]:
    tasks = sorted({s.record["task"] for s in samples})
    idx = bootstrap_indices(len(samples))
    civics = ["civic", *map(exit_method, exit_layers)]
    methods = [m for m in (*METHODS, *civics[1:]) if m in results]
    sc = {m: scored(samples, results[m]["predictions"], tasks) for m in methods}
    full_tokens = np.array(results["full"]["video_tokens"], dtype=float)
    evs_tokens = np.array(results["evs"]["video_tokens"], dtype=float) if "evs" in results else None
    rows = []
    for m in methods:
        res = results[m]
        tokens = np.array(res["video_tokens"], dtype=float)
        rows.append({
            "method": m, "ratio": 1.0 if m == "full" else ratio, "n": res["n"],
            # civic at EVS's token counts: one ratio per video; how many videos kept more tokens than EVS
            **({"ratio": "EVS tokens", "videos_above_evs": int((tokens > evs_tokens).sum())}
               if "sample_ratios" in res and evs_tokens is not None else {}),
            "figures": {k: figure(sc[m], k, idx) for k in ["overall", *tasks]},
            "mean_video_tokens": res["mean_video_tokens"],
            "kept_fraction": round(float(tokens.sum() / full_tokens.sum()), 4),
            "kept_fraction_per_video_mean": round(float((tokens / full_tokens).mean()), 4),
            "mean_prompt_tokens": res["mean_prompt_tokens"], "mean_kv_blocks": res["mean_kv_blocks"],
            "block_size": res["block_size"], "wall_s": res["wall_s"], "requests_per_s": res["requests_per_s"],
            **{k: res[k] for k in ("video_pruning_rate", "cpu_evs_fix") if k in res},
            **({"video_exit_layer": res["exit_layer"]} if res.get("exit_layer") is not None else {}),
        })
    pairs = [*((c, b) for c in civics for b in ("evs", "subsample", "full")), ("evs", "full"), ("subsample", "full")]
    comparisons = {f"{a}-{b}": {k: paired(sc[a], sc[b], k, idx) for k in ["overall", *tasks]}
                   for a, b in pairs if a in sc and b in sc}
    return {"tasks": tasks, "rows": rows, "comparisons": comparisons,
            "baseline": results["full"]["baseline"],
            **({"evs_error": results["evs_error"]} if "evs_error" in results else {})}


def table(result: dict[str, Any]) -> str:
    tasks = result["tasks"]
    head = ("| method | r | video tokens | kept fraction | KV blocks | overall (95% CI) | "
            + " | ".join(tasks) + " |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in result["rows"]:
        f = r["figures"]
        lo, hi = f["overall"]["ci95"]
        label = r["method"] + (f" (--video-pruning-rate {r['video_pruning_rate']:.3g}"
                               + (", with benchmarks/evs_cpu" if r.get("cpu_evs_fix") else "") + ")"
                               if "video_pruning_rate" in r else "")
        r_text = r["ratio"] if isinstance(r["ratio"], str) else ratio_label(r["ratio"])
        lines.append(f"| {label} | {r_text} | {r['mean_video_tokens']:.1f} | "
                     f"{r['kept_fraction']:.3f} | {r['mean_kv_blocks']:.2f} | "
                     f"{f['overall']['value']:.3f} ({lo:.3f}–{hi:.3f}) | "
                     + " | ".join(f"{f[t]['value']:.3f}" for t in tasks) + " |")
    base = result["baseline"]
    lines.append(f"| most common answer | | | | | {base['accuracy']:.3f} | "
                 + " | ".join(f"{base['per_task'][t]:.3f}" for t in tasks) + " |")
    return "\n".join(lines)


def comparison_lines(result: dict[str, Any]) -> str:
    lines = ["| paired difference | " + " | ".join(["overall", *result["tasks"]]) + " |",
             "|---|" + "---|" * (len(result["tasks"]) + 1)]
    for name, by_metric in result["comparisons"].items():
        cells = []
        for m in ["overall", *result["tasks"]]:
            p = by_metric[m]
            lo, hi = p["difference_ci95"]
            cells.append(f"{p['difference'] * 100:+.1f} ({lo * 100:+.1f} to {hi * 100:+.1f})")
        first, second = name.rsplit("-", 1)
        lines.append(f"| {first} − {second} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(result: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = ["overall", *result["tasks"]]
    fig, ax = plt.subplots(figsize=(13, 4.6))
    width = 0.8 / len(result["rows"])
    exit_methods = [r["method"] for r in result["rows"] if r["method"] not in COLOURS]
    for i, r in enumerate(result["rows"]):
        xs = np.arange(len(metrics)) + (i - (len(result["rows"]) - 1) / 2) * width
        vals = np.array([r["figures"][m]["value"] for m in metrics])
        los = np.array([r["figures"][m]["ci95"][0] for m in metrics])
        his = np.array([r["figures"][m]["ci95"][1] for m in metrics])
        ax.bar(xs, vals, width, color=colour(r["method"], exit_methods), alpha=0.85,
               label=f"{r['method']} ({r['mean_video_tokens']:.0f} video tokens, {r['kept_fraction']:.0%})")
        ax.errorbar(xs, vals, yerr=[vals - los, his - vals], fmt="none", color="k", capsize=2, linewidth=1)
    base = result["baseline"]
    ax.scatter(np.arange(len(metrics)), [base["accuracy"], *[base["per_task"][t] for t in result["tasks"]]],
               marker="_", s=400, color="k", label="most common answer", zorder=3)
    ax.set_xticks(range(len(metrics)), metrics)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy (bars: 95% bootstrap CI)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: no bar hidden
    ax.set_title(f"civic-shapes-video test split (n={result['n']}), {Path(result['model']).name}, served by vLLM")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    from civic_vllm.cli.common import one_ratio
    from civic_vllm.evaluation import load_samples

    parser = argparse.ArgumentParser(prog="python -m benchmarks.video_accuracy", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--n-test", type=int, default=640, help="test videos (default 640, 160 per task)")
    parser.add_argument("--test-seed", type=int, default=TEST_SEED,
                        help=f"seed of the test split (default {TEST_SEED}); a fresh seed is a split no run has seen")
    parser.add_argument("--ratio", type=one_ratio, default=1 / 3,
                        help="kept fraction: of the span (civic), of video tokens (EVS), of frame groups (subsample)")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--out", default=str(RESULTS / "video_accuracy.json"))
    parser.add_argument("--video-exit-layers", type=_layers, default=(),
                        help="also civic with civic_video_exit_layer at each of these vision blocks, e.g. 1,2")
    parser.add_argument("--civic-budget", choices=("evs", "ratio"), default="evs",
                        help="civic keeps EVS's video tokens of each video (evs, the default) or R of the span (ratio)")
    parser.add_argument("--no-cpu-evs-fix", action="store_true",
                        help="serve EVS without benchmarks/evs_cpu (on vLLM's CPU backend it then fails at once)")
    args = parser.parse_args(argv)

    data = test_split(args.n_test, args.test_seed)
    samples = load_samples(data)
    start = time.monotonic()
    results = run_methods(args.model, data, args.ratio, args.concurrency, DATA_ROOT / "results" / data.parent.name,
                          cpu_evs_fix=not args.no_cpu_evs_fix, exit_layers=args.video_exit_layers,
                          civic_budget=args.civic_budget)
    model = Path(args.model).resolve()
    result = {"model": str(model.relative_to(ROOT)) if model.is_relative_to(ROOT) else args.model,
              "data": str(data.relative_to(ROOT)), "test_seed": args.test_seed, "n": len(samples),
              "ratio": args.ratio, "civic_budget": args.civic_budget, "wall_s": round(time.monotonic() - start, 1),
              "command": "python -m benchmarks.video_accuracy " + " ".join(sys.argv[1:] if argv is None else argv),
              **summarise(results, samples, args.ratio, args.video_exit_layers)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    md = (f"# Video accuracy at r = {ratio_label(args.ratio)} ({result['model']}, n = {result['n']})\n\n"
          + table(result) + "\n\n" + comparison_lines(result) + "\n\nDifferences in accuracy points, paired 95% "
          "bootstrap intervals (the same resampled questions for both methods).\n")
    if "evs_error" in result:
        err = result["evs_error"]
        md += "\nEVS FAILED: " + err["request"] + "\n" + "\n".join(err["server_log"]) + "\n"
    out.with_suffix(".md").write_text(md)
    plot(result, out.with_suffix(".png"))
    print(md)
    print(f"-> {out}, {out.with_suffix('.md')}, {out.with_suffix('.png')}")
    return 0


def _layers(text: str) -> tuple[int, ...]:
    layers = tuple(int(part) for part in text.split(","))
    if any(layer < 1 for layer in layers):
        raise argparse.ArgumentTypeError(f"vision blocks are counted from 1, got {text!r}")
    return layers


if __name__ == "__main__":
    sys.exit(main())
