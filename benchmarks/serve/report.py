"""Output: CSV, plots, Markdown and the JSON report."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.harness import environment_info, log
from benchmarks.load import summarize_sizes
from benchmarks.serve.analysis import acceptance, diagnose, find_point, limits, probe_summary, ratio_rows
from benchmarks.serve.common import (
    ACCEPT_WORKLOAD,
    EXPLICIT_SETTINGS,
    GOAL_THROUGHPUT_C8,
    GOAL_TTFT_SPEEDUP,
    GOAL_TTFT_SPEEDUP_EXIT,
    IDLE_LOAD,
    LOCUSTFILE,
    M_TTFT,
    MAX_NUM_BATCHED_TOKENS,
    PROBE_FIT_RATIOS,
    ROOT,
    VANILLA_RESIDENT,
    Config,
    Run,
    fmt,
    relroot,
)

POINT_COLUMNS = [
    ("workload", lambda p: p["workload"]), ("config", lambda p: p["config"]),
    ("concurrency", lambda p: p["concurrency"]),
    ("window_s", lambda p: p["client"]["window_s"]),
    ("completed", lambda p: p["client"]["requests_completed"]), ("failed", lambda p: p["client"]["requests_failed"]),
    ("ttft_censored", lambda p: p["client"]["ttft_censored"]),
    ("ttft_p50_s", lambda p: p["client"]["ttft_p50_s"]), ("ttft_p95_s", lambda p: p["client"]["ttft_p95_s"]),
    ("server_ttft_mean_s", lambda p: p["server"]["ttft_mean_s"]),
    ("server_ttft_p50_s_hist", lambda p: p["server"]["ttft_p50_s"]),
    ("server_ttft_p95_s_hist", lambda p: p["server"]["ttft_p95_s"]),
    ("itl_p50_s", lambda p: p["client"]["itl_p50_s"]), ("itl_p95_s", lambda p: p["client"]["itl_p95_s"]),
    ("itl_max_s", lambda p: p["client"].get("itl_max_s")),
    ("server_itl_mean_s", lambda p: p["server"]["itl_mean_s"]),
    ("tpot_p50_s", lambda p: p["client"]["tpot_p50_s"]), ("e2e_p50_s", lambda p: p["client"]["e2e_p50_s"]),
    ("req_per_s", lambda p: p["client"]["req_per_s"]), ("output_tok_per_s", lambda p: p["client"]["output_tok_per_s"]),
    ("server_generation_tok_per_s", lambda p: p["server"]["generation_tok_per_s"]),
    ("prompt_tokens_mean", lambda p: p["client"]["prompt_tokens_mean"]),
    ("delivery_bunched_fraction", lambda p: p["client"].get("delivery_bunched_fraction")),
    ("kv_usage_mean", lambda p: p["server"]["kv_usage_mean"]), ("kv_usage_max", lambda p: p["server"]["kv_usage_max"]),
    ("running_mean", lambda p: p["server"]["running_mean"]), ("running_max", lambda p: p["server"]["running_max"]),
    ("waiting_mean", lambda p: p["server"]["waiting_mean"]), ("waiting_max", lambda p: p["server"]["waiting_max"]),
    ("preemptions", lambda p: p["server"]["preemptions"]),
    ("server_queue_mean_s", lambda p: p["server"]["queue_mean_s"]),
    ("server_prefill_mean_s", lambda p: p["server"]["prefill_mean_s"]),
    ("civic_images", lambda p: p["server"]["civic"]["images"]),
    ("civic_visual_tokens", lambda p: p["server"]["civic"]["visual_tokens"]),
    ("civic_visual_tokens_retained", lambda p: p["server"]["civic"]["visual_tokens_retained"]),
    ("civic_retention_ratio_mean", lambda p: p["server"]["civic"]["retention_ratio_mean"]),
]


def write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        for row in rows:
            w.writerow(["" if v is None else (round(v, 6) if isinstance(v, float) else v) for v in row])


def write_csvs(run: Run, ratios: list[dict], lim: list[dict]) -> list[Path]:
    d = run.out_dir
    paths = [d / "points.csv", d / "ratios.csv", d / "limits.csv", d / "probe.csv", d / "timeseries.csv"]
    write_csv(paths[0], [c for c, _ in POINT_COLUMNS], ([f(p) for _, f in POINT_COLUMNS] for p in run.points))
    keys = list(ratios[0]) if ratios else ["workload"]
    write_csv(paths[1], keys, ([r.get(k) for k in keys] for r in ratios))
    lkeys = list(dict.fromkeys(k for r in lim for k in r)) or ["workload"]
    write_csv(paths[2], lkeys, ([r.get(k) for k in lkeys] for r in lim))
    pkeys = list(run.probe[0]) if run.probe else ["workload"]
    write_csv(paths[3], pkeys, ([r.get(k) for k in pkeys] for r in run.probe))
    write_csv(paths[4], ["workload", "config", "concurrency", "t_s", "running", "waiting", "kv_usage"], run.timeseries)
    return paths


COLOURS = {"vanilla": "#777777"}
_PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]


def colour(label: str, configs: list[Config]) -> str:
    civic = [c.label for c in configs if c.server == "civic"]
    return COLOURS.get(label) or _PALETTE[civic.index(label) % len(_PALETTE)]


def concurrency_axes(ax, cs: list[int], ylabel: str, xlabel: str) -> None:
    """Concurrency on a log2 x axis with one tick per measured point, y from 0."""
    ax.set_xscale("log", base=2)
    ax.set_xlim(min(cs) / 1.4, max(cs) * 1.4)  # explicit: a plot with no finite point has no data limits
    ax.set_xticks(cs, [str(c) for c in cs])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)


def plot_all(run: Run, ratios: list[dict], lim: list[dict]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = [s.name for s in run.specs]
    labels = [c.label for c in run.configs]
    cs = list(run.bounds.concurrency)
    paths = []

    def series(workload: str, label: str, getter) -> list[float]:
        out = []
        for c in cs:
            p = find_point(run.points, workload, label, c)
            v = getter(p) if p else None
            out.append(np.nan if v is None else v)
        return out

    def grid(rows: list[tuple[str, list[tuple[Any, str]]]], name: str, title: str) -> None:
        """rows: (y label, [(getter, legend suffix), ...]); the 1st series solid, the 2nd dashed."""
        fig, axes = plt.subplots(len(rows), len(workloads), figsize=(5.2 * len(workloads), 3.2 * len(rows)),
                                 squeeze=False)
        for j, wname in enumerate(workloads):
            for i, (ylabel, getters) in enumerate(rows):
                ax = axes[i][j]
                for label in labels:
                    for (g, suffix), st in zip(getters, ["-o", "--s"]):
                        ax.plot(cs, series(wname, label, g), st, color=colour(label, run.configs),
                                label=label + suffix, ms=4)
                concurrency_axes(ax, cs, ylabel, "concurrency (locust users)")
                if i == 0:
                    ax.set_title(wname)
                ax.legend(fontsize=7)
        fig.suptitle(title, fontsize=11)
        fig.tight_layout()
        path = run.out_dir / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)

    blocks = run.server_info.get("pool", {}).get("num_blocks", "?")
    sub = f"{run.args.preset or 'custom'} model, fixed KV pool of {blocks} blocks"
    grid([("TTFT (s)", [(lambda p: p["client"]["ttft_p50_s"], " p50"), (lambda p: p["client"]["ttft_p95_s"], " p95")]),
          ("ITL (s)", [(lambda p: p["client"]["itl_p50_s"], " p50"), (lambda p: p["client"]["itl_p95_s"], " p95")])],
         "latency.png", f"Latency (client-side, warm-up excluded); {sub}")
    grid([("requests / s", [(lambda p: p["client"]["req_per_s"], "")]),
          ("output tokens / s", [(lambda p: p["client"]["output_tok_per_s"], "")])],
         "throughput.png", f"Throughput; {sub}")
    grid([("KV cache usage", [(lambda p: p["server"]["kv_usage_mean"], " mean"),
                              (lambda p: p["server"]["kv_usage_max"], " max")]),
          ("running requests", [(lambda p: p["server"]["running_mean"], " mean"),
                                (lambda p: p["server"]["running_max"], " max")]),
          ("waiting requests", [(lambda p: p["server"]["waiting_mean"], " mean"),
                                (lambda p: p["server"]["waiting_max"], " max")])],
         "scheduler.png", f"vLLM scheduler (/metrics, sampled every {run.bounds.poll_s:g}s); {sub}")

    # Ratios with the limits and the goals.
    civic_labels = [c.label for c in run.configs if c.server == "civic"]
    fig, axes = plt.subplots(2, len(workloads), figsize=(5.2 * len(workloads), 6.6), squeeze=False)
    for j, wname in enumerate(workloads):
        for i, (key, ylabel, goal) in enumerate([
            ("ttft_p50_speedup", "TTFT speedup vanilla/civic (p50)", GOAL_TTFT_SPEEDUP),
            ("output_tok_per_s_civic_over_vanilla", "throughput civic/vanilla (tok/s)", GOAL_THROUGHPUT_C8),
        ]):
            ax = axes[i][j]
            for label in civic_labels:
                ys = []
                for c in cs:
                    r = next((r for r in ratios if r["workload"] == wname and r["config"] == label
                              and r["concurrency"] == c), None)
                    ys.append(np.nan if r is None or r[key] is None else r[key])
                ax.plot(cs, ys, "-o", color=colour(label, run.configs), label=label, ms=4)
                if i == 0:
                    lr = next((r for r in lim if r["workload"] == wname and r["config"] == label), None)
                    if lr and lr.get("llm_side_limit") and float(lr["ratio"]) != 1.0:
                        ax.axhline(lr["llm_side_limit"], ls=":", color=colour(label, run.configs), lw=1,
                                   label=f"LLM-side limit {lr['llm_side_limit']:.2f}")
                        if lr.get("attainable_speedup"):
                            ax.axhline(lr["attainable_speedup"], ls="-.", color=colour(label, run.configs), lw=1,
                                       label=f"attainable (HF vision) {lr['attainable_speedup']:.2f}")
                        if lr.get("attainable_speedup_fit"):
                            ax.axhline(lr["attainable_speedup_fit"], ls=(0, (1, 3)), lw=1.5,
                                       color=colour(label, run.configs),
                                       label=f"attainable (server fit) {lr['attainable_speedup_fit']:.2f}")
            ax.axhline(1.0, color="black", lw=0.8)
            if wname == ACCEPT_WORKLOAD:
                ax.axhline(goal, color="green", ls="--", lw=0.8, label=f"goal {goal}x")
                if i == 0 and any(c.exit_layer for c in run.main_configs):
                    ax.axhline(GOAL_TTFT_SPEEDUP_EXIT, color="darkgreen", ls="--", lw=0.8,
                               label=f"goal {GOAL_TTFT_SPEEDUP_EXIT}x (exit layer)")
            concurrency_axes(ax, cs, ylabel, "concurrency")
            ax.legend(fontsize=7)
            if i == 0:
                ax.set_title(wname)
    fig.suptitle(f"CIVIC / vanilla; {sub}", fontsize=11)
    fig.tight_layout()
    path = run.out_dir / "ratios.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)

    # Time series of the scheduler at the highest concurrency.
    c_max = max(cs)
    fig, axes = plt.subplots(3, len(workloads), figsize=(5.2 * len(workloads), 7.5), squeeze=False)
    for j, wname in enumerate(workloads):
        for label in labels:
            rows = [r for r in run.timeseries if r[0] == wname and r[1] == label and r[2] == c_max]
            if not rows:
                continue
            t = [r[3] for r in rows]
            for i, (idx, ylabel) in enumerate([(4, "running"), (5, "waiting"), (6, "KV usage")]):
                axes[i][j].plot(t, [r[idx] for r in rows], color=colour(label, run.configs), label=label, lw=1)
                axes[i][j].set_ylabel(ylabel)
        for i in range(3):
            axes[i][j].axvline(0.0, color="black", ls=":", lw=0.8)
            axes[i][j].grid(alpha=0.3)
            axes[i][j].legend(fontsize=7)
        axes[0][j].set_title(f"{wname}, concurrency {c_max} (t=0: end of warm-up)")
        axes[2][j].set_xlabel("seconds since the measuring window opened")
    fig.tight_layout()
    path = run.out_dir / "timeseries.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)
    return paths


def md_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def recipe_line(recipe: dict | None) -> str:
    if not recipe:
        return "* CIVIC recipe: none (--no-recipe or a state from before recipes): no `civic default` configuration."
    return (f"* CIVIC recipe of the served checkpoint ({recipe.get('source')}; `{recipe.get('checkpoint')}`): ratio "
            f"{fmt(recipe['ratio'], '.4f')}, policy {recipe['policy']}, exit layer {recipe['exit_layer']}, scorer "
            f"{recipe.get('scorer')}, seed {recipe.get('seed')}. `civic default` = requests with no civic_* key at "
            "all, which the civic server serves with this recipe; vanilla serves the same checkpoint and ignores it.")


def summary_markdown(report: dict, run: Run) -> str:
    rel = lambda p: os.path.relpath(p, run.out_dir)  # noqa: E731
    lines = [f"# Serving benchmark: vanilla vLLM vs CIVIC ({'QUICK' if report['quick'] else 'full'} run)", ""]
    if report["warnings"]:
        lines += ["**Warnings:**", ""] + [f"* {w}" for w in report["warnings"]] + [""]
    env, pool, srv = report["machine"], report["pool"], report["server"]
    lines += [
        f"Created {report['created']} by `{report['command']}` in {report['duration_s']:.0f} s.",
        "",
        "## Setup",
        "",
        f"* Model: `{report['model']['path']}` (preset `{report['model']['preset']}`), {report['model']['dtype']}.",
        f"* Machine: {env['cpu']}, {env['cpu_count']} CPUs; load average at start "
        f"{fmt(env['load_average_at_start'][0], '.2f')}. "
        f"The load client (locust) runs on the same machine, pinned to CPU(s) {report['client']['cpus']}.",
        f"* OMP binding: VLLM_CPU_OMP_THREADS_BIND="
        f"{report['omp_binding']['vanilla'].get('VLLM_CPU_OMP_THREADS_BIND', '?')}"
        f" (vLLM default, kept); worker cores {report['omp_binding']['vanilla'].get('worker_cores')}, reserved "
        f"{report['omp_binding']['vanilla'].get('reserved_cpus')} (identical for both servers: "
        f"{report['omp_binding']['identical']}).",
        f"* KV pool (both servers): {pool['bytes']} bytes = {pool['num_blocks']} blocks x {pool['block_size']} tokens "
        f"(sized so vanilla holds {VANILLA_RESIDENT} image-dominated requests, prompt + output).",
        f"* Flags (both): {srv['common_flags']}; civic adds `--model-impl civic`; the ratio and the exit layer "
        "(`civic r=R exit L`: retention after vision block L; without it, on the encoder output) are sent per "
        "request to the same civic server"
        + (f", with the settings {report['civic_settings']}" if report.get("civic_settings") else "")
        + "; each of those requests names ratio, policy (civic unless the settings say otherwise) and exit layer "
          "(null: after the last block), so the checkpoint's recipe never fills one in.",
        recipe_line(report.get("recipe")),
        f"* Per point: a warm-up (excluded) of at least {report['bounds']['warmup_s']:g} s that lasts until every "
        f"locust user finished {report['bounds']['warmup_requests']} request(s) (at most "
        f"{report['bounds']['warmup_max_s']:g} s), then {report['bounds']['duration_s']:g} s measured; in-flight "
        f"requests then finish (up to {report['bounds']['stop_timeout_s']:g} s); concurrency "
        f"{list(report['bounds']['concurrency'])}; closed loop, no think time; "
        f"{run.max_tokens} output tokens per request (ignore_eos); every image unique.",
        "",
        "| workload | request |",
        "|---|---|",
    ]
    lines += [f"| {w['name']} | {w['why']} |" for w in report["workloads"]]
    lines += ["", "## Done when (computed)", ""]
    if not report["acceptance"].get("evaluated", True):
        lines += [f"Not evaluated: the goals are defined on the `{ACCEPT_WORKLOAD}` workload, which this run did "
                  "not measure, so every check below fails for want of a measurement. The ratios below are the "
                  "result.", ""]
    for c in report["acceptance"]["checks"]:
        ci = c.get("ci95")
        ci_s = f" (95% CI {fmt(ci[0], '.3f')}..{fmt(ci[1], '.3f')})" if ci else ""
        lines.append(f"* **{'PASS' if c['pass'] else 'FAIL'}** {c['name']}: {fmt(c['value'], '.3f')}{ci_s}, "
                     f"needs {c['requirement']}")
    if report["diagnosis"]:
        lines += ["", "### Why, and what would close it", ""] + [f"* {d}" for d in report["diagnosis"]]
    lines += ["", "## TTFT speedup next to its limits (concurrency 1)", "",
              "Measured = paired probe (configurations alternating one request at a time, medians; client TTFT = "
              "send to first token; server = `vllm:time_to_first_token_seconds`). LLM-side limit = (T+N)/(T+K). "
              "Vision share (HF) = the vision tower alone, timed in-process (see method), / vanilla's server TTFT; "
              "attainable (HF) = vanilla TTFT / (preprocessing + vision + rest / limit). Non-LLM share (fit) = "
              "intercept of the server's prefill time against prompt tokens over the probed ratios (vLLM's own "
              "modules; includes merger, selection and per-step costs) / vanilla TTFT; attainable (fit) = vanilla "
              "TTFT with its fitted LLM part divided by the limit. Engine time ratio = vanilla/civic (prefill + "
              "decode) of one request served alone: what throughput would gain with no batching benefit.", ""]
    lines.append(md_table(
        ["workload", "config", "T", "N", "K", "prompt tok", "measured (client)", "measured (server)", "sweep c=1 p50",
         "LLM-side limit", "vision s (HF)", "vision share (HF)", "attainable (HF)", "non-LLM s (fit)",
         "non-LLM share (fit)", "attainable (fit)", "HF in-process", "engine time ratio (1 request)"],
        [[r["workload"], r["config"], r["T_text_tokens"], r["N_visual_tokens"], r["K_kept_tokens"],
          r["prompt_tokens_measured"], fmt(r["measured_speedup_probe_client"], ".2f"),
          fmt(r["measured_speedup_probe_server"], ".2f"), fmt(r["measured_speedup_sweep_c1_p50"], ".2f"),
          fmt(r["llm_side_limit"], ".2f"), fmt(r.get("vision_s"), ".3f"), fmt(r.get("vision_share"), ".0%"),
          fmt(r.get("attainable_speedup"), ".2f"), fmt(r.get("non_llm_engine_s_fit"), ".3f"),
          fmt(r.get("non_llm_share_fit"), ".0%"), fmt(r.get("attainable_speedup_fit"), ".2f"),
          fmt(r.get("hf_in_process_speedup"), ".2f"), fmt(r.get("service_time_ratio_c1"), ".2f")]
         for r in report["limits"]]))
    for wname, pr in report["probe"].items():
        if fit := pr.get("fit"):
            lines.append(f"\nServer-side fit, {wname}: prefill = {fit['intercept_s']:.3f} s + "
                         f"{fit['llm_s_per_token'] * 1000:.3f} ms x prompt tokens (R² {fmt(fit['r2'], '.3f')}, "
                         f"points {fit['points']})"
                         + ("." if fit.get("reliable") else ": not used (the prompts span too narrow a range "
                            "to extrapolate to zero tokens, or the intercept is not positive)."))
    lines += ["", "## Profile at concurrency 1 (paired probe, medians, seconds)", ""]
    rows = []
    for wname, pr in report["probe"].items():
        vis = report["vision"].get(wname, {})
        for label, e in pr["configs"].items():
            rows.append([wname, label, e["n"], fmt(e["client_ttft_s"]), fmt(e["server_ttft_s"]),
                         fmt(e["client_minus_server_s"]), fmt(e["preprocess_s"]), fmt(e["server_queue_s"]),
                         fmt(e["server_prefill_s"]), fmt(vis.get("vision_s")),
                         fmt(None if e["server_prefill_s"] is None or not vis
                             else e["server_prefill_s"] - vis["vision_s"])])
    lines.append(md_table(["workload", "config", "n", "client TTFT", "server TTFT", "HTTP/SSE (client-server)",
                           "preprocess (derived)", "queue", "prefill (engine)", "vision tower (HF)",
                           "prefill - vision"], rows))
    lines += ["", "Vision method: " + (next(iter(report["vision"].values()), {}).get("method", "not measured")), ""]
    lines += ["## Sweep (client-side unless marked; warm-up excluded)", ""]
    lines.append(md_table(
        ["workload", "config", "c", "n", "TTFT p50", "TTFT p95", "server TTFT mean", "ITL p50", "TPOT p50", "req/s",
         "out tok/s", "KV mean/max", "running", "waiting", "preempt"],
        [[p["workload"], p["config"], p["concurrency"], p["client"]["requests_completed"],
          fmt(p["client"]["ttft_p50_s"]) + ("≥" if p["client"]["ttft_p50_lower_bound"] else ""),
          fmt(p["client"]["ttft_p95_s"]) + ("≥" if p["client"]["ttft_p95_lower_bound"] else ""),
          fmt(p["server"]["ttft_mean_s"]), fmt(p["client"]["itl_p50_s"], ".4f"), fmt(p["client"]["tpot_p50_s"], ".4f"),
          fmt(p["client"]["req_per_s"]), fmt(p["client"]["output_tok_per_s"], ".1f"),
          f"{fmt(p['server']['kv_usage_mean'], '.0%')}/{fmt(p['server']['kv_usage_max'], '.0%')}",
          fmt(p["server"]["running_mean"], ".1f"), fmt(p["server"]["waiting_mean"], ".1f"),
          fmt(p["server"]["preemptions"], ".0f")] for p in report["points"]]))
    lines += ["", "≥: more than 5% (p95) / 50% (p50) of the requests started in the window had no token when the "
              "stop timeout ended them, so the value is a lower bound.", "", "## CIVIC / vanilla", ""]
    lines.append(md_table(
        ["workload", "config", "c", "TTFT p50 speedup", "TTFT p95 speedup", "server TTFT speedup", "req/s ratio",
         "tok/s ratio", "ITL ratio"],
        [[r["workload"], r["config"], r["concurrency"], fmt(r["ttft_p50_speedup"], ".2f"),
          fmt(r["ttft_p95_speedup"], ".2f"),
          fmt(r["server_ttft_mean_speedup"], ".2f"), fmt(r["req_per_s_civic_over_vanilla"], ".2f"),
          fmt(r["output_tok_per_s_civic_over_vanilla"], ".2f"), fmt(r["itl_p50_civic_over_vanilla"], ".2f")]
         for r in report["ratios_vs_vanilla"]]))
    lines += ["", "## CIVIC's own metrics (`/metrics` deltas over each window)", ""]
    lines.append(md_table(
        ["workload", "config", "c", "images", "civic:visual_tokens_total", "civic:visual_tokens_retained_total",
         "kept", "civic:retention_ratio mean"],
        [[p["workload"], p["config"], p["concurrency"], fmt(p["server"]["civic"]["images"], ".0f"),
          fmt(p["server"]["civic"]["visual_tokens"], ".0f"), fmt(p["server"]["civic"]["visual_tokens_retained"], ".0f"),
          fmt(p["server"]["civic"]["retained_fraction"], ".3f"),
          fmt(p["server"]["civic"]["retention_ratio_mean"], ".3f")]
         for p in report["points"] if p["server_kind"] == "civic"]))
    lines += ["", "## Plots", ""] + [f"![{Path(p).stem}]({rel(ROOT / p)})" for p in report["files"]["plots"]]
    lines += ["", "## Files", ""] + [f"* `{p}`" for p in report["files"]["csv"] + [report["files"]["locust_dir"]]]
    if report["notes"]:
        lines += ["", "## Notes", ""] + [f"* {n}" for n in report["notes"]]
    lines += ["", "## Method notes", ""] + [f"* {k}: {v}" for k, v in report["method"].items()]
    return "\n".join(lines) + "\n"


METHOD = {
    "client_ttft": "send of the request to the first SSE chunk whose usage.completion_tokens >= 1 (requests stream "
                   "with continuous usage stats); ITL = gaps between later token chunks; percentiles from the "
                   "per-request records (full resolution; locust's own CSV/JSON round response times above 100 ms "
                   "to 2 significant digits)",
    "server_ttft": f"{M_TTFT} histogram deltas between /metrics samples at the window's edges (mean exact, "
                   "percentiles interpolated in vLLM's coarse buckets); vLLM stamps arrival before image decoding "
                   "and preprocessing, so client - server = HTTP upload/parse + SSE delivery",
    "window": "per point: locust runs warm-up + duration, then lets in-flight requests finish (stop timeout); "
              "latencies (TTFT, ITL, TPOT, e2e) are of the requests started in [start + warm-up, end] (those "
              "still without a token at the stop timeout are counted as censored), req/s counts completions in "
              "the window, output tok/s the tokens arriving in it; gauges are averaged over the window",
    "throughput_check": "output tokens/s (tokens arriving in the window / window length): with a fixed output "
                        "length it is req/s with less quantisation noise",
    "ttft_checks": "paired probe at concurrency 1: one request at a time, configurations alternating in rotating "
                   "order on the two running servers, fresh images; after every switch of server an untimed request "
                   "first, so each measured request follows one on the same server; speedup = ratio of medians, "
                   "95% CI by paired bootstrap over rounds",
    "vision_share": "(1) vision tower alone: HF transformers, in-process, on the pixels of the workload's images, "
                    "one thread pinned to the vLLM worker's core while both servers are idle, / vanilla server "
                    "TTFT at concurrency 1 (probe median); (2) server-side: intercept of a least-squares line of "
                    "the civic server's prefill time (vllm:request_prefill_time_seconds) against prompt tokens over "
                    f"the probed ratios (configs + {[str(r) for r in PROBE_FIT_RATIOS]}), / vanilla server TTFT",
    "limits": "LLM-side limit (T+N)/(T+K) with T = vanilla prompt tokens - N (measured usage), K = ceil(r N); "
              "attainable (HF) = TTFT_v / (preprocess + vision + (TTFT_v - preprocess - vision) / limit); "
              "attainable (fit) = TTFT_v / (TTFT_v - slope (T+N) + slope (T+K))",
    "caches": "prefix caching off on both servers; every image carries a unique stamp, so vLLM's encoder and "
              "multimodal processor caches never hit (their hit counters are checked per point)",
}


def write_report(run: Run, state: dict) -> dict:
    probes = {s.name: probe_summary(run, s) for s in run.specs}
    lim = [row for s in run.specs for row in limits(run, s, probes[s.name], run.vision.get(s.name))]
    ratios = ratio_rows(run)
    acc = acceptance(run, lim, probes, ratios)
    diagnosis = diagnose(run, acc, lim, ratios)
    servers = [n for n in ("vanilla", "civic") if n in run.server_info]
    bindings = {n: run.server_info[n]["binding"] for n in servers}
    env = environment_info()
    load_start = state["load_start"]
    warnings = []
    if load_start[0] > IDLE_LOAD:
        warnings.append(f"The machine was not idle (1-min load average {load_start[0]:.2f} at the start, "
                        f"{state['load_end'][0]:.2f} at the end): timings from this run are not results.")
    if run.args.quick:
        warnings.append("QUICK run: short windows and few samples; a tooling check, not a result.")
    if run.args.preset != "bench":
        warnings.append(f"Model preset {run.args.preset!r}, not the serving preset 'bench'.")
    stalls = [f"{p['workload']} {p['config']} c={p['concurrency']} ({p['client']['delivery_bunched_fraction']:.0%})"
              for p in run.points if (p["client"].get("delivery_bunched_fraction") or 0) > 0.2]
    if stalls:
        warnings.append("Token delivery stalled (half of a request's tokens reached the client in one burst) in "
                        f"more than 20% of the requests at: {', '.join(stalls)}; client TTFT there includes "
                        "the stall: compare with the server-side TTFT, and check for other load on the machine.")
    full_tower = run.full_tower_labels
    for wname, pr in probes.items():
        vis = run.vision.get(wname)
        prefills = [e["server_prefill_s"] for label, e in pr["configs"].items()
                    if label in full_tower and e.get("server_prefill_s") is not None]
        if vis and prefills and vis["vision_s"] > min(prefills):
            run.notes.append(
                f"{wname}: the HF vision tower alone ({vis['vision_s']:.3f} s) took longer than the civic server's "
                f"whole prefill at the smallest probed ratio ({min(prefills):.3f} s): HF's tower is slower than "
                "vLLM's here (or the timing was disturbed), so the HF vision share overstates the encoder; "
                "the server-side fit is measured on vLLM's own modules.")
    csv_paths = write_csvs(run, ratios, lim)
    try:
        plots = plot_all(run, ratios, lim)
    except Exception as exc:  # a plotting bug must not lose a long run's numbers
        plots = []
        run.notes.append(f"plotting failed: {type(exc).__name__}: {exc} (rerun with --from-state)")
    report = {
        "benchmark": "serve", "created": state["created"], "command": state["command"], "quick": run.args.quick,
        "duration_s": state["duration_s"], "warnings": warnings,
        "machine": {**env["machine"], "load_average_at_start": load_start, "load_average_at_end": state["load_end"]},
        "versions": env["versions"],
        "omp_binding": {**bindings, "identical": len({json.dumps(b, sort_keys=True) for b in bindings.values()}) == 1,
                        "environment": env["omp_binding"]},
        "client": {"cpus": run.client_cpus, "tool": "locust (headless, one process per point)",
                   "same_machine": True, "locustfile": relroot(LOCUSTFILE)},
        "model": {"preset": run.args.preset, "path": str(run.model), "dtype": run.dtype, **state["sizing"]},
        "pool": {"bytes": run.pool_bytes,
                 **{k: v for k, v in run.server_info["pool"].items() if k != "cache_config_info"},
                 "sized_for_vanilla_image_requests": VANILLA_RESIDENT},
        "server": {"max_model_len": run.max_model_len, "max_num_batched_tokens": MAX_NUM_BATCHED_TOKENS,
                   "prefix_caching": False,
                   "common_flags": " ".join(a for a in run.server_info[servers[0]]["command"][2:]
                                            if a not in ("--model-impl", "civic")),
                   "runs": {n: {k: v for k, v in run.server_info[n].items() if k != "pool"} for n in servers}},
        "bounds": asdict(run.bounds),
        "workloads": [{**asdict(s), **summarize_sizes(s.workload())} for s in run.specs],
        "configs": [c.label for c in run.configs], "probe_configs": [c.label for c in run.probe_configs],
        "civic_settings": getattr(run.args, "civic_settings", None),
        "explicit_settings": EXPLICIT_SETTINGS,
        "recipe": run.recipe,
        "method": METHOD,
        "vision": run.vision, "points": run.points, "ratios_vs_vanilla": ratios, "probe": probes,
        "probe_requests": run.probe, "limits": lim, "acceptance": acc, "diagnosis": diagnosis, "notes": run.notes,
        "final_metrics_civic": state["final_civic"],
        "files": {"csv": [relroot(p) for p in csv_paths], "plots": [relroot(p) for p in plots],
                  "locust_dir": relroot(run.out_dir / "locust"), "summary": relroot(run.out_dir / "summary.md"),
                  "raw": relroot(run.raw_dir)},
    }
    run.out_json.parent.mkdir(parents=True, exist_ok=True)
    run.out_json.write_text(json.dumps(report, indent=1, default=str) + "\n")
    summary = summary_markdown(report, run)
    (run.out_dir / "summary.md").write_text(summary)
    print()
    print(summary)
    log(f"wrote {relroot(run.out_json)} and {relroot(run.out_dir)}/")
    return report
