"""Report: JSON, PNG, markdown."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from benchmarks.harness import log
from benchmarks.serve.common import fmt, relroot
from benchmarks.video_serve.analysis import analyse, fmt_ci, point


def plot(state: dict, report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [c["label"] for c in state["contenders"]]
    colours = dict(zip(labels, ["#777777", "#d62728", "#1f77b4", "#2ca02c"]))
    rounds = report.get("load_rounds") or []
    fig, axes = plt.subplots(1, 4 if rounds else 3, figsize=(20 if rounds else 15, 4.2))
    ax = axes[0]
    medians = [statistics.median([r["client_ttft_s"] for r in state["probe"] if r["config"] == x] or [math.nan])
               for x in labels]
    ax.bar(labels, medians, color=[colours[x] for x in labels])
    ax.tick_params(axis="x", labelrotation=20, labelsize=8)  # civic's label carries its ratio and exit layer
    ax.set_ylabel("TTFT, s (median, paired probe, c=1)")
    ax.set_title("time to first token")
    ax = axes[1]
    users = sorted({p["concurrency"] for p in state["points"]})
    for x in labels:
        ys = [(point(state["points"], x, u) or {}).get("client", {}).get("output_tok_per_s") for u in users]
        ax.plot(users, [math.nan if y is None else y for y in ys], "o-", label=f"{x} (window)", color=colours[x])
        ws = [((point(state["points"], x, u) or {}).get("whole_run") or {}).get("output_tok_per_s") for u in users]
        ax.plot(users, [math.nan if y is None else y for y in ws], "s--", label=f"{x} (whole run)", color=colours[x],
                alpha=0.6)
    ax.set_xticks(users)
    ax.set_xlabel("concurrency (locust users)")
    ax.set_ylabel("output tokens / s")
    ax.set_title("throughput")
    ax.legend(fontsize=8)
    ax = axes[2]
    tok = report["tokens"]
    shown = [x for x in tok]
    xs = range(len(shown))
    ax.bar([i - 0.2 for i in xs], [tok[x]["video_tokens"] for x in shown], 0.4, label="video tokens")
    ax2 = ax.twinx()
    ax2.bar([i + 0.2 for i in xs], [tok[x]["kv_blocks_end"] for x in shown], 0.4, color="#ff7f0e",
            label=f"KV blocks ({state['block_size']} tok) per request")
    ax.set_xticks(list(xs))
    ax.set_xticklabels(shown, rotation=20, fontsize=8)
    ax.set_ylabel("video tokens per request")
    ax2.set_ylabel("KV blocks per request (last step)")
    ax.set_title("tokens and KV blocks")
    handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(handles=handles, fontsize=7, loc="upper right")
    if rounds:
        plot_load_rounds(axes[3], rounds, report["load_summary"])
    fig.suptitle(f"Video serving, {state['preset']} ({state['dtype']}), {state['spec']['frames']} frames of "
                 f"{state['spec']['width']}x{state['spec']['height']}" + (" (QUICK)" if state["quick"] else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_load_rounds(ax, rounds: list[dict], summary: dict) -> None:
    """Each paired load round's civic/EVS output tok/s (by who went first), the geometric mean and its CI."""
    for first, marker in (("civic", "o"), ("evs", "s")):
        shown = [r for r in rounds if r["first"] == first]
        ax.scatter([r["round"] for r in shown], [r["ratio"] for r in shown], marker=marker, s=22,
                   label=f"{first} burst first")
    ax.axhline(1.0, color="black", lw=0.8)
    ax.axhline(summary["paired_geomean"], color="#1f77b4", lw=1.2,
               label=f"geometric mean {summary['paired_geomean']:.3f}")
    if summary["paired_geomean_ci95"]:
        ax.axhspan(*summary["paired_geomean_ci95"], color="#1f77b4", alpha=0.15, label="its 95% CI")
    ax.set_yscale("log")
    ax.set_xlabel("round")
    ax.set_ylabel("civic / EVS output tok/s (burst)")
    ax.set_title(f"paired load, {len(rounds)} rounds")
    ax.legend(fontsize=7)


def markdown(state: dict, report: dict) -> str:
    spec = state["spec"]
    lines = [f"# Video serving benchmark{' (QUICK run)' if state['quick'] else ''}", "",
             f"* Model: `{state['preset']}` preset ({state['dtype']}), `{state['command']}`, {state['created']}, "
             f"{state['duration_s']:.0f} s; load average {state['load_start'][0]:.2f} at the start.",
             f"* Workload: one fresh random video per request, {spec['frames']} frames of {spec['width']}x"
             f"{spec['height']} at {spec['fps']:g} fps, {state['max_tokens']} output tokens (ignore_eos); prefix "
             "caching and the multimodal processor cache off.",
             f"* KV pool (every server): {state['pool']['num_blocks']} blocks x {state['block_size']} tokens.", ""]
    lines += ["## Tokens per request", "", "| configuration | video tokens | prompt tokens | KV blocks (first token) | "
              "KV blocks (last step) |", "|---|---|---|---|---|"]
    lines += [f"| {k} | {v['video_tokens']} | {v['prompt_tokens']} | {v['kv_blocks_prompt']} | {v['kv_blocks_end']} |"
              for k, v in report["tokens"].items()]
    lines += ["", "KV blocks from `/metrics` (peak `vllm:kv_cache_usage_perc` x usable blocks, concurrency 1): "
              + ", ".join(f"{k} {fmt(v, 'd')}" for k, v in report["kv_blocks_from_metrics_c1"].items()) + "."]
    evs = state.get("evs") or {"ok": True}
    if not evs["ok"]:
        lines += ["", f"**EVS ({evs['label']}) could not be served on this backend**: the engine died on the first "
                  f"video request with `{evs['error']}`. Its video tokens by vLLM's own formula: "
                  f"{evs['kept_by_formula']} (civic's ratio is chosen from it); EVS is not timed."]
    users = sorted({p["concurrency"] for p in state["points"]})
    lines += ["", "## Ratios", "", "| ratio | TTFT c=1 (paired probe, 95% CI) | server TTFT c=1 | "
              + " | ".join(f"tok/s c={u} (window) | tok/s c={u} (whole run) | TTFT p50 c={u}" for u in users)
              + " | video tokens | KV blocks |", "|---" * (5 + 3 * len(users)) + "|"]
    for r in report["ratios"]:
        cells = [f"{fmt(r[f'c{u}']['output_tok_per_s'])} | "
                 f"{fmt(r[f'c{u}'].get('whole_run_output_tok_per_s'))} | {fmt(r[f'c{u}']['ttft_p50'])}"
                 for u in users]
        lines.append(f"| {r['num']} / {r['den']} | {fmt_ci(r['probe_ttft'])} | {fmt_ci(r['probe_server_ttft'])} | "
                     + " | ".join(cells) + f" | {fmt(r['video_tokens'])} | {fmt(r['kv_blocks_end'])} |")
    lines += ["", "## Locust points", "",
              "Window: the measuring window after the warm-up; whole run: test start to the last completion, "
              "warm-up included (completed requests only).", "",
              "| configuration | c | TTFT p50 s | TTFT p95 s | req/s | output tok/s | KV usage max | requests | "
              "whole run: requests, output tok/s, TTFT p50 s |", "|---|---|---|---|---|---|---|---|---|"]
    for p in state["points"]:
        c, s = p["client"], p["server"]
        lines.append(f"| {p['config']} | {p['concurrency']} | {fmt(c['ttft_p50_s'])} | "
                     f"{fmt(c['ttft_p95_s'])} | {fmt(c['req_per_s'])} | "
                     f"{fmt(c['output_tok_per_s'], '.1f')} | "
                     f"{fmt(s['kv_usage_max'], '.0%')} | {c['requests_completed']} | "
                     f"{(p.get('whole_run') or {}).get('requests_completed', 0)}, "
                     f"{fmt((p.get('whole_run') or {}).get('output_tok_per_s'), '.2f')}, "
                     f"{fmt((p.get('whole_run') or {}).get('ttft_p50_s'))} |")
    if state["random_mm"]:
        lines += ["", "## vllm bench serve --dataset-name random-mm (video bucket)", "",
                  "| configuration | c | prompts | ok | input tok/request | output tok/s | req/s | median TTFT ms |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in state["random_mm"]:
            lines.append(f"| {r['contender']} | {r['concurrency']} | {r['num_prompts']} | "
                         f"{'yes' if r['ok'] else 'no: ' + r['error'].strip().splitlines()[-1][:200]} | "
                         f"{fmt(r.get('input_tokens_per_request'), '.0f')} | "
                         f"{fmt(r.get('output_throughput'), '.1f')} | {fmt(r.get('request_throughput'))} | "
                         f"{fmt(r.get('median_ttft_ms'), '.0f')} |")
    if report.get("load_rounds"):
        lines += ["", "## Paired load rounds (civic vs EVS, bursts run back to back)", "",
                  "| round | first | civic burst s | EVS burst s | civic tok/s | EVS tok/s | civic/EVS |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['round']} | {r['first']} | {r['civic_wall_s']:.1f} | {r['evs_wall_s']:.1f} | "
                  f"{r['civic_output_tok_per_s']:.1f} | {r['evs_output_tok_per_s']:.1f} | {r['ratio']:.3f} |"
                  for r in report["load_rounds"]]
    lines += ["", "## Acceptance (issue 19, serving)", ""]
    for c in report["acceptance"]:
        verdict = {True: "PASS", False: "FAIL", None: "n/a"}[c["pass"]]
        lines.append(f"* **{verdict}** {c['name']}: {fmt(c['value'])}, needs {c['goal']} ({c['detail']})")
    lines += ["", "## Notes", ""] + [f"* {n}" for n in state["notes"]]
    return "\n".join(lines) + "\n"


NOTES = [
    "EVS on CPU: the EVS server runs with benchmarks/evs_cpu/sitecustomize.py on its PYTHONPATH, which fixes two "
    "faults of vLLM 0.32 + transformers 5.19: CPUModelRunner.load_model never sets is_multimodal_pruning_enabled "
    "(`split_with_sizes expects split_sizes to sum exactly to 4101 ...`), and EVS's M-RoPE recomputation "
    "(vllm/multimodal/video_prune/evs.py:323) mistakes the outer <|vision_start|> that transformers >= 5.10 keeps "
    "before a video's first timestamp for the first frame's (`The expanded size of the tensor (0) must match the "
    "existing size ...`; not CPU specific). Where EVS still fails, the error it logged is under `evs` and the report "
    "compares civic with EVS's token count from vLLM's own formula only (EVS is then not timed).",
    "EVS keeps max(N_t, int(N (1 - q))) tokens (the first frame group whole) and, unlike civic, keeps Qwen3-VL's "
    "M-RoPE positions of dropped tokens (4x position storage); civic's ratio is chosen from EVS's measured count "
    "(from vLLM's formula where the EVS server fails) unless --civic-ratio fixes it (see `command`).",
    "random-mm writes its videos at 30 fps and Qwen3-VL samples 2 frames a second (at least 4 frames), so its "
    "requests carry fewer video tokens than the locust workload (see input tok/request); the subsample row sends "
    "the bucket's frames / stride.",
]


def write_report(state: dict, out_json: Path) -> dict:
    report = analyse(state)
    full = {"benchmark": "video_serve", **{k: v for k, v in state.items() if k not in ("probe", "timeseries")},
            **report, "probe": state["probe"]}
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(full, indent=1, default=str) + "\n")
    plot(state, report, out_json.with_suffix(".png"))
    out_json.with_suffix(".md").write_text(markdown(state, report))
    log(f"wrote {relroot(out_json)} (+ .png, .md)")
    return full
