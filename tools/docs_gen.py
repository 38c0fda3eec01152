"""Writes the figures of README.md and docs/*.md from benchmarks/results/*.json (`make docs`).

A generated block sits between two markers in a Markdown file:

    <!-- generated:serve -->
    ... written by this script, never by hand ...
    <!-- /generated:serve -->

Everything outside the markers is prose and stays as written. Each block name maps to one
renderer: a function of no arguments that reads its results file(s) and returns Markdown.

Adding a renderer for a new results file is two steps: write `def render_x() -> str` (helpers
below: `load`, `x`, `ci`, `pct`, `table`, `command_line`) and register it in RENDERERS at the end
of this file; then put `<!-- generated:x -->` and `<!-- /generated:x -->` where it belongs and run
`make docs`. A results family with the schema of benchmarks/serve.py needs no new code:
`"video-serve": partial(render_serve_run, "video_serve.json")`.

`python tools/docs_gen.py --check` writes nothing and exits 1 naming each file and block that
differs from what the JSON says (tests/unit/test_docs.py runs the same check).
This module imports only the standard library: it never imports civic_vllm or vLLM.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
MARKER = re.compile(r"<!-- generated:(?P<name>[\w.-]+) -->\n(?P<body>.*?)<!-- /generated:(?P=name) -->", re.S)


# ----------------------------------------------------------------------------------------------
# helpers


def load(name: str) -> dict:
    """benchmarks/results/<name> as a dict."""
    return json.loads((RESULTS / name).read_text())


def x(value: float | None, digits: int = 2) -> str:
    """A ratio: 1.49×."""
    return "–" if value is None else f"{value:.{digits}f}×"


def ci(interval: list | None, digits: int = 2, scale: float = 1.0) -> str:
    """A 95% interval: (1.44–1.52)."""
    if not interval:
        return ""
    lo, hi = (v * scale for v in interval)
    sep = " to " if lo < 0 else "–"
    return f"({lo:.{digits}f}{sep}{hi:.{digits}f})"


def pct(value: float | None, digits: int = 1, sign: bool = False) -> str:
    if value is None:
        return "–"
    return f"{value * 100:+.{digits}f}%" if sign else f"{value * 100:.{digits}f}%"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def command_line(command: str | list | None, out: str, fallback: str = "") -> str:
    """The command that wrote a results file, as recorded in it (else the documented one)."""
    if isinstance(command, list):
        command = " ".join(command)
    command = (command or fallback).strip()
    return f"Written by `{command}` → `benchmarks/results/{out}`." if command else f"`benchmarks/results/{out}`."


def ratio_label(config: str) -> str:
    return config.removeprefix("civic ")


# ----------------------------------------------------------------------------------------------
# benchmarks/serve.py: serve.json, serve_moe.json, serve_qwen3.5.json, serve_recipe*.json


def _serve_points(d: dict) -> dict:
    return {(p["config"], p["concurrency"]): p for p in d["points"]}


def _serve_ratios(d: dict) -> dict:
    return {(r["config"], r["concurrency"]): r for r in d["ratios_vs_vanilla"]}


def _serve_setup(d: dict) -> str:
    """One line of a benchmarks.serve run's setup, as the JSON records it."""
    w, pool, b, m = d["workloads"][0], d["pool"], d["bounds"], d["model"]
    lim = next((lim for lim in d["limits"] if lim["config"] == "civic r=1/3"), d["limits"][0])
    return (f"Setup: `{m['preset']}` preset, {m['dtype']}; one {w['width']}×{w['height']} image "
            f"(N = {lim['N_visual_tokens']}, K = {lim['K_kept_tokens']} at r = 1/3) + T = {lim['T_text_tokens']} "
            f"text tokens; KV pool {pool['num_blocks']} blocks × {pool['block_size']} tokens (sized for "
            f"{pool['sized_for_vanilla_image_requests']} vanilla requests); concurrency "
            f"{' / '.join(map(str, b['concurrency']))}, {b['warmup_s']:g} s+ warm-up and {b['duration_s']:g} s "
            f"measured per point; {b['probe_rounds']} paired-probe rounds; load average "
            f"{d['machine']['load_average_at_start'][0]:.2f} at the start; {d['duration_s'] / 60:.0f} min in all.")


def render_serve_run(name: str) -> str:
    """One benchmarks.serve run: paired-probe TTFT, throughput and p95 ratios, limits, goals."""
    d = load(name)
    workload = d["workloads"][0]
    wname = workload["name"]
    configs = [c for c in d["configs"] if c != "vanilla"]
    probe = d["probe"][wname]["configs"]
    conc = d["bounds"]["concurrency"]
    loaded = [c for c in conc if c >= 8] or conc[-1:]
    points, ratios = _serve_points(d), _serve_ratios(d)
    limits = {lim["config"]: lim for lim in d["limits"]}
    model = d["model"]
    header = [f"{wname} ({workload['width']}×{workload['height']}), {model['preset']}, {model['dtype']}"]
    header += configs
    rows = [["TTFT speed-up, concurrency 1 (paired probe, 95% CI)"]
            + [f"**{x(probe[c]['client_ttft_speedup'])}** {ci(probe[c]['client_ttft_speedup_ci95'])}"
               for c in configs]]
    rows.append([f"output tok/s vs vanilla at concurrency {' / '.join(map(str, conc))}"]
                + [" / ".join(f"{ratios[(c, n)]['output_tok_per_s_civic_over_vanilla']:.2f}" for n in conc) + "×"
                   for c in configs])

    def vs_vanilla(c: str, key: str) -> str:
        civic = " / ".join(f"{points[(c, n)]['client'][key]:.1f}" for n in loaded)
        vanilla = " / ".join(f"{points[('vanilla', n)]['client'][key]:.1f}" for n in loaded)
        return f"{civic} s vs {vanilla} s"

    at = " / ".join(map(str, loaded))
    rows.append([f"p95 TTFT at concurrency {at}: civic vs vanilla"] + [vs_vanilla(c, "ttft_p95_s") for c in configs])
    rows.append([f"longest gap between two streamed tokens at concurrency {at}: civic vs vanilla"]
                + [vs_vanilla(c, "itl_max_s") for c in configs])
    rows.append([f"mean requests running at concurrency {at}: civic vs vanilla"]
                + [" / ".join(f"{points[(c, n)]['server']['running_mean']:.1f}" for n in loaded) + " vs "
                   + " / ".join(f"{points[('vanilla', n)]['server']['running_mean']:.1f}" for n in loaded)
                   for c in configs])

    def limit(c: str) -> str:
        lim = limits.get(c)
        if not lim:
            return "–"
        text = f"{x(lim['llm_side_limit'])}; {x(lim['attainable_speedup'])} (HF timing)"
        if lim.get("attainable_speedup_fit") is not None:
            text += f" / {x(lim['attainable_speedup_fit'])} (server fit)"
        if lim.get("vision_tower_fraction", 1.0) < 1.0:
            text += f"; the tower keeps {pct(lim['vision_tower_fraction'], 0)} of its patch-row work"
        return text

    rows.append(["LLM-side limit (T+N)/(T+K); attainable with the tower measured"] + [limit(c) for c in configs])
    vanilla_ttft = probe["vanilla"]["client_ttft_s"]
    vision_share = next(iter(limits.values()), {}).get("vision_share")
    out = [_serve_setup(d), "", table(header, rows), ""]
    extra = [c for c in probe if c not in configs and c != "vanilla"]
    out.append(
        f"Vanilla TTFT at concurrency 1: {vanilla_ttft:.2f} s; the vision tower's share of it "
        f"{pct(vision_share, 0)} (HF in-process timing). Other ratios in the paired probe (TTFT speed-up, 95% CI): "
        + "; ".join(f"{ratio_label(c)} {x(probe[c]['client_ttft_speedup'])} {ci(probe[c]['client_ttft_speedup_ci95'])}"
                    for c in extra) + ".")
    checks = [c for c in d["acceptance"]["checks"] if c.get("value") is not None]
    if checks:
        out += ["", "```"]
        for c in checks:
            interval = f" (95% CI {c['ci95'][0]:.3f}..{c['ci95'][1]:.3f})" if c.get("ci95") else ""
            out.append(f"{'PASS' if c['pass'] else 'FAIL'}  {c['name']}: {c['value']:.3f}{interval}, "
                       f"required {c['requirement']}")
        out.append("```")
    if d.get("diagnosis") or d.get("notes"):
        out += ["", "The run's own diagnosis and notes:", ""]
        out += [f"* {line}" for line in d.get("diagnosis", []) + d.get("notes", [])]
    out += ["", command_line(d.get("command"), name)]
    return "\n".join(out)


def render_serve_families(names: tuple[str, ...] = ("serve_moe.json", "serve_qwen3.5.json")) -> str:
    """Side-by-side serving of the MoE and hybrid presets: one row per results file."""
    rows, commands, setups = [], [], []
    for name in names:
        d = load(name)
        wname = d["workloads"][0]["name"]
        probe = d["probe"][wname]["configs"]
        ratios = _serve_ratios(d)
        conc = d["bounds"]["concurrency"]
        tput = "; ".join(" / ".join(f"{ratios[(c, n)]['output_tok_per_s_civic_over_vanilla']:.2f}" for n in conc)
                         for c in ("civic r=1/3", "civic r=1/3 exit 1"))
        share = d["limits"][0].get("vision_share")
        rows.append([f"`{d['model']['preset']}`", f"{probe['vanilla']['client_ttft_s']:.1f} s", pct(share, 0)]
                    + [f"**{x(probe[c]['client_ttft_speedup'])}** {ci(probe[c]['client_ttft_speedup_ci95'])}"
                       for c in ("civic r=1/3", "civic r=1/3 exit 1")]
                    + [tput, f"{x(probe['civic r=1']['client_ttft_speedup'])} "
                              f"{ci(probe['civic r=1']['client_ttft_speedup_ci95'])}"])
        commands.append(f"    {d['command']}")
        setups.append(f"* {_serve_setup(d)}")
        conc_label = " / c = ".join(map(str, conc))
    for name in names:
        d = load(name)
        fit = d["probe"][d["workloads"][0]["name"]].get("fit") or {}
        if fit.get("llm_s_per_token") is not None:
            commands.append(f"    # {d['model']['preset']}: server-side fit, LLM prefill "
                            f"{fit['llm_s_per_token'] * 1000:.0f} ms per prompt token, "
                            f"{fit['intercept_s']:.2f} s that does not shrink with K (r² {fit['r2']:.3f})")
    header = ["preset", "vanilla TTFT", "vision tower share (HF)", "TTFT speed-up r = 1/3 (paired, 95% CI)",
              "r = 1/3, exit 1", f"out tok/s ratio c = {conc_label} (r = 1/3; exit 1)", "r = 1"]
    return "\n".join([*setups, "", table(header, rows), "", *commands])


def render_serve_headline() -> str:
    """README: the serving, KV and accuracy headline, one row per figure, each linked to its JSON."""
    serve, kv, acc = load("serve.json"), load("kv_blocks.json"), load("accuracy_30min.json")
    probe = serve["probe"][serve["workloads"][0]["name"]]["configs"]
    ratios = _serve_ratios(serve)
    exits = {lim["config"]: lim["exit_layer"] for lim in serve["limits"]}
    kv_row = {m["config"]: m for m in kv["measurements"] if m["workload"] == kv["acceptance"]["workload"]}
    side = next(w["side"] for w in kv["workloads"] if w["name"] == kv["acceptance"]["workload"])
    shares = {c["metric"]: c for c in acc["checks"] if "share" in c}

    def src(name: str, what: str) -> str:
        return f"[{name}](benchmarks/results/{name}) ({what})"

    serve_src = src("serve.json", f"{serve['model']['preset']} preset, {serve['model']['dtype']}")
    rows = []
    for c in (c for c in serve["configs"] if c != "vanilla"):
        where = "on the encoder output" if exits.get(c) is None else f"after vision block {exits[c]}"
        rows.append([f"TTFT, r = 1/3 {where} (paired probe, 95% CI)",
                     f"**{x(probe[c]['client_ttft_speedup'])}** {ci(probe[c]['client_ttft_speedup_ci95'])}", serve_src])
        rows.append([f"output tok/s at concurrency 8, r = 1/3 {where}",
                     x(ratios[(c, 8)]["output_tok_per_s_civic_over_vanilla"]), serve_src])
    r1 = probe["civic r=1"]
    rows.append(["TTFT, r = 1 (paired probe, 95% CI)",
                 f"{x(r1['client_ttft_speedup'])} {ci(r1['client_ttft_speedup_ci95'])}", serve_src])
    kv_src = src("kv_blocks.json", f"{kv['model']['preset']} preset")
    for key, what in (("prompt_tokens", "prompt tokens"), ("blocks_per_request", "KV blocks per request"),
                      ("resident_requests", "requests resident in the same KV pool")):
        van, civ = kv_row["vanilla"][key], kv_row["r=1/3"][key]
        rows.append([f"{what}, one {side}² image, r = 1/3", f"{civ} vs {van} ({x(civ / van)})", kv_src])
    acc_src = src("accuracy_30min.json", "civic-shapes model trained here")
    for metric, what in (("overall", "overall"), ("small", "small objects"), ("ground", "grounding")):
        s = shares[metric]
        rows.append([f"accuracy, {what}: civic r = 1/3 exit 1 as a share of full tokens "
                     f"({acc['minutes_per_contender']:g} CPU-min each)",
                     f"{pct(s['share'])} {ci(s['share_ci95'], 1, 100)}", acc_src])
    return table(["civic vs vanilla vLLM", "measured", "from"], rows)


# ----------------------------------------------------------------------------------------------
# benchmarks/kv_blocks.py


def render_kv_blocks() -> str:
    d = load("kv_blocks.json")
    out = []
    for w in d["workloads"]:
        ms = [m for m in d["measurements"] if m["workload"] == w["name"]]
        labels = ["vanilla"] + [f"r = {m['ratio_label']}" for m in ms if m["ratio_label"]]
        vanilla = ms[0]
        rows = []
        for key, what in (("prompt_tokens", "prompt tokens"), ("blocks_per_request", "KV blocks per request"),
                          ("resident_requests", "requests resident in the same pool")):
            cells = [str(vanilla[key])]
            for m in ms[1:]:
                cells.append(f"{m[key]} ({x(m[key] / vanilla[key])})" if m["ratio_label"] == "1/3" else str(m[key]))
            rows.append([what] + cells)
        out += [table([f"{w['name']} (one {w['side']}×{w['side']} image, {w['text_tokens_in_prompt']} text tokens)"]
                      + labels, rows), ""]
    pool = d["pool"]
    acc = d["acceptance"]
    out.append(f"Pool: {pool['num_blocks']} blocks × {pool['block_size']} tokens ({pool['bytes'] / 1e6:.2f} MB, "
               f"sized so vanilla holds {pool['sized_for_vanilla_image_requests']} image-dominated requests), "
               f"{d['model']['preset']} preset, {d['model']['dtype']}. "
               f"Acceptance ({acc['workload']}, r = {acc['ratio']}): "
               + ", ".join(f"{k} {v['civic_over_vanilla']:.2f} {v['requirement']} {'PASS' if v['pass'] else 'FAIL'}"
                           for k, v in acc["checks"].items()) + ".")
    out += ["", command_line(d.get("command"), "kv_blocks.json", "make bench-kv")]
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------
# benchmarks/accuracy.py (the fair protocol): accuracy.json, accuracy_30min.json


def render_accuracy(name: str, validation: bool = True) -> str:
    d = load(name)
    out = []
    val = d["validation"]
    if validation:
        ref = val["figures"][next(k for k, c in d["contenders"].items() if c["role"] == "reference")]
        out.append(f"Validation (seed {val['seed']}, {val['n']} questions, r = 1/3; reference "
                   f"{ref['overall']:.3f} overall, {ref['small']:.3f} small, {ref['ground']:.3f} grounding):")
        out.append("")
        rows = []
        for label, ws in val["worst_share"].items():
            f = val["figures"][label]
            mark = "**" if label == val["chosen"] else ""
            rows.append([f"{mark}{label}{mark}", f"{f['overall']:.3f}", f"{f['small']:.3f}", f"{f['ground']:.3f}",
                         f"{mark}{ws:.3f}{mark}"])
        out += [table(["civic candidate (exit 1, its recipe)", "overall", "small", "grounding", "worst share"], rows),
                ""]
    test = d["test"]
    out.append(f"Test (seed {test['seed']}, {test['n']} questions, {test['bootstrap']} bootstrap resamples; "
               f"{d['minutes_per_contender']:g} CPU-minutes of distillation each; each model once, "
               f"{val['chosen']} chosen on validation):")
    out.append("")
    rows = []
    for r in d["rows"]:
        f = r["figures"]
        served = d["contenders"].get(r["label"], {}).get("evaluated_as", r["method"])
        if served == "default":
            served = f"default, exit {r['exit_layer']}"
        ratio = "1" if r["ratio"] == 1 else "1/3" if abs(r["ratio"] - 1 / 3) < 1e-9 else f"{r['ratio']:g}"
        rows.append([r["label"], served, ratio, f"{r['mean_visual_tokens']:.1f}", f"{r['mean_kv_blocks']:.2f}"]
                    + [f"{f[m]['value']:.3f} {ci(f[m]['ci95'], 3)}" for m in ("overall", "small", "ground")]
                    + [f"{r['per_task'][t]:.3f}" for t in ("color", "count", "shape")])
    out += [table(["model", "served as", "r", "visual tokens", "KV blocks", "overall (95% CI)", "small (95% CI)",
                   "grounding Acc@0.5 (95% CI)", "colour", "count", "shape"], rows), "", "```"]
    for c in d["checks"]:
        verdict = "PASS" if c["pass"] else "FAIL"
        if "share" in c:
            out.append(f"{verdict}  {c['goal']}: {c['civic']:.3f} vs {c['full_same_budget']:.3f}: {pct(c['share'])} "
                       f"(95% CI {c['share_ci95'][0] * 100:.1f}%–{c['share_ci95'][1] * 100:.1f}%)")
        else:
            lo, hi = (v * 100 for v in c["difference_ci95"])
            out.append(f"{verdict}  {c['goal']}: {c['difference'] * 100:+.1f} points (95% CI {lo:+.1f} to {hi:+.1f})")
    out += ["```", "", command_line(d.get("command"), name, "make bench-accuracy")]
    return "\n".join(out)


def render_accuracy_readout(name: str = "accuracy.json") -> str:
    """The figures the fair protocol's read-out leans on, derived from the same JSON as its tables."""
    d = load(name)
    rows = {r["label"]: r for r in d["rows"]}
    ref = next(k for k, c in d["contenders"].items() if c["role"] == "reference")
    chosen = d["validation"]["chosen"]
    shares = {c["metric"]: c for c in d["checks"] if "share" in c}
    margins = {(c["metric"], next(k for k in c if k not in ("goal", "metric", "civic", "difference",
                                                              "difference_ci95", "pass"))): c
               for c in d["checks"] if "difference" in c}
    baselines = [k for k, c in d["contenders"].items() if c["role"] == "baseline"]
    f_ref, f_civ = rows[ref]["figures"], rows[chosen]["figures"]
    out = [f"* {chosen} against {ref} (test): overall {pct(shares['overall']['share'])}, small objects "
           f"{pct(shares['small']['share'])}, grounding {pct(shares['ground']['share'])} "
           f"({f_civ['ground']['value']:.3f} vs {f_ref['ground']['value']:.3f}); the grounding share's 95% "
           f"interval {ci(shares['ground']['share_ci95'], 1, 100)}, the overall share's "
           f"{ci(shares['overall']['share_ci95'], 1, 100)}."]
    for b in baselines:
        o, s = margins.get(("overall", b)), margins.get(("small", b))
        if o and s:
            out.append(f"* {chosen} minus {b}: {o['difference'] * 100:+.1f} points overall "
                       f"{ci(o['difference_ci95'], 1, 100)}, {s['difference'] * 100:+.1f} on small objects "
                       f"{ci(s['difference_ci95'], 1, 100)}.")
    for b in baselines:
        r = rows[b]
        out.append(f"* {b}: overall {r['accuracy']:.3f} ({(r['accuracy'] - rows[ref]['accuracy']) * 100:+.1f} points "
                   f"against {ref}), shape {r['per_task']['shape']:.3f}, grounding {r['per_task']['ground']:.3f}.")
    presence = ", ".join(f"{k} {r['per_task']['has_color']:.3f} / {r['per_task']['has_shape']:.3f}"
                         for k, r in rows.items())
    out.append(f"* has_color / has_shape (the majority answer scores about 0.5): {presence}.")
    val = d["validation"]["figures"]
    out.append("* grounding on validation: " + ", ".join(f"{k} {v['ground']:.3f}" for k, v in val.items()) + ".")
    return "\n".join(out)


def render_object_recall() -> str:
    d = load("object_recall.json")
    rows = [[r["model"], r["policy"], "after the last block" if r["exit_layer"] is None else str(r["exit_layer"]),
             f"{r['object_recall']:.2f}", f"{r['ring_recall']:.2f}"] for r in d["rows"]]
    head = (f"{d['n']} validation boxes, r = {d['ratio']:.3g}; recall = share of the object's (ring's) tokens kept.")
    return "\n".join([head, "", table(["model", "selection", "exit layer", "object-token recall", "ring recall"], rows),
                      "", command_line(d.get("command"), "object_recall.json",
                                       "python -m benchmarks.object_recall --model DIR --data val.jsonl")])


def _distill_rows(d: dict) -> list[list[str]]:
    return [[r["params"], "1/3" if abs(r["ratio"] - 1 / 3) < 1e-9 else f"{r['ratio']:g}", f"{r['accuracy']:.3f}",
             f"{r['splits']['small']:.3f}", f"{r['per_task']['ground']:.2f}", f"{r['visual_tokens']:.1f}"]
            for r in d["rows"]]


def render_distill(name: str) -> str:
    d = load(name)
    head = ["student (`--params`, CE weight)", "r", "overall", "small", "grounding", "visual tokens"]
    return "\n".join([f"{d['n_val']} validation questions; {d['minutes_per_choice']:g} CPU-minutes per student.", "",
                      table(head, _distill_rows(d)), "", command_line(d.get("command"), name)])


def render_distill_soup() -> str:
    d = load("distill_soup_val.json")
    rows = [[r["name"], r["made_by"], str(r["n"]), f"{r['accuracy']:.3f}", f"{r['small']:.3f}", f"{r['ground']:.3f}",
             f"{min(r['of_full'].values()):.3f}"] for r in d["rows"]]
    return "\n".join([f"{d['purpose']}: {d['data']}; r = {d['ratio']}; rule: {d['rule']}.", "",
                      table(["student", "made by", "n", "overall", "small", "grounding", "worst share of full"], rows),
                      "", "`benchmarks/results/distill_soup_val.json`."])


# ----------------------------------------------------------------------------------------------
# benchmarks/depth_probe.py, benchmarks/soak.py, benchmarks/kernels, benchmarks/gpu_check.py


def render_depth_probe() -> str:
    d = load("depth_probe.json")
    m, img, s = d["model"], d["image"], d["settings"]
    rows = [[label, f"{r['median_s']:.2f} s", str(r["kept_tokens"]),
             "1" if r["speedup_ci95"] is None else f"**{x(r['speedup_vs_full'])}** {ci(r['speedup_ci95'])}",
             x(r.get("flop_limit")) if r.get("flop_limit") else "–"] for label, r in d["results"].items()]
    head = (f"`{m['preset']}` preset ({m['parameters'] / 1e9:.2f} B parameters, random weights, "
            f"{m['vision_depth']}-block vision tower), one {img['size']}×{img['size']} image "
            f"(N = {img['visual_tokens']}), {s['dtype']}, "
            f"{s['threads']} threads, policy `{s['policy']}` (seeded random scorer), {d['rounds_done']} rounds, "
            "medians:")
    return "\n".join([head, "", table(["configuration", "prefill", "visual tokens kept", "speed-up vs full (95% CI)",
                                       "`civic plan` FLOP limit"], rows), "",
                      command_line(d.get("command"), "depth_probe.json", "make bench-depth")])


def render_soak() -> str:
    d = load("soak.json")
    loc, mem, load_ = d["locust"], d["memory"], d["load"]
    lat = loc["latency_ms"]
    verdict = "PASSED" if d["passed"] else "FAILED"
    lines = [
        f"{load_['seconds']} s, {load_['users']} users, `{d['server']['model']}` preset ({d['server']['dtype']}): "
        f"{loc['requests']} requests, {loc['failures']} failures, {loc['requests_per_second']:.2f} req/s, "
        f"median {lat['median']:.0f} ms, p95 {lat['p95']:.0f} ms.",
        f"RSS slope over the second half: **{mem['slope_mib_per_min']:+.2f} ± {mem['slope_stderr_mib_per_min']:.2f} "
        f"MiB/min** (limit {mem['max_slope_mib_per_min']:g}: "
        f"{(mem['max_slope_mib_per_min'] - mem['slope_mib_per_min']) / mem['slope_stderr_mib_per_min']:.1f} standard "
        f"errors below it; {mem['slope_mib_per_min'] * 60:.0f} MiB/hour at this load); "
        f"RSS {mem['rss_after_warmup_mib']:.0f} → "
        f"{mem['rss_end_mib']:.0f} MiB from the warm-up's end ({pct(mem['growth'], 1, sign=True)}); "
        f"afterwards {d['idle_after']['num_requests_running']:g} requests running, KV usage "
        f"{d['idle_after']['kv_cache_usage_perc']:g}: **{verdict}**.",
        "", command_line(d.get("command"), "soak.json", "make soak"),
    ]
    return "\n".join(lines)


def render_kernels() -> str:
    d = load("kernels/bench_kernels_cpu_quick.json")
    rows = []
    for m in d["merge"]:
        for c in m["civic"]:
            rows.append([f"LN + fc1, C {m['C']} → {m['D_out']} ({m['backend']})", f"{c['ratio']:.3g}", str(c["K"]),
                         f"{c['civic_median_s']:.3f} s", f"{m['vanilla_median_s']:.3f} s", x(c["civic_over_vanilla"])])
    head = (f"{d['machine']['device']}, {d['dtype']}, {d['machine']['torch_threads']} thread, N = {d['N']} "
            f"({d['image_side_px']}² image), median of {d['repeats']}{', quick' if d['quick'] else ''}; "
            "the torch path only, so it says nothing about the Triton kernels' speed:")
    return "\n".join([head, "", table(["op", "r", "K", "civic (K groups)", "vanilla (all N)", "civic / vanilla"], rows),
                      "", command_line(d.get("command"), "kernels/bench_kernels_cpu_quick.json",
                                       "python -m benchmarks.kernels.bench_kernels --quick")])


def render_gpu() -> str:
    path = RESULTS / "gpu" / "gpu_check.json"
    if not path.exists():
        return ("**No GPU figure has been measured yet**: no run's JSON is committed under "
                "`benchmarks/results/gpu/`.")
    d = json.loads(path.read_text())
    rows = [[name, part.get("status", "–"), part.get("reason", "")] for name, part in d["parts"].items()]
    out = [f"{d.get('device', '')}, {d.get('created', '')}; ok: **{d.get('ok')}**", "",
           table(["part", "status", "note"], rows)]
    prefill = d["parts"].get("prefill", {}).get("results") or {}
    if prefill:
        out += ["", table(["prefill", "median", "speed-up vs full", "FLOP limit"],
                          [[label, f"{r['median_s']:.3f} s" if r["median_s"] is not None else "–",
                            x(r["speedup_vs_full"]), x(r.get("flop_limit"))] for label, r in prefill.items()])]
    out += ["", command_line(d.get("command"), "gpu/gpu_check.json",
                             "python3 -m benchmarks.gpu_check --out $OUT --budget-s 420")]
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------
# the registration point: block name -> renderer

def render_video_serve(name: str = "video_serve.json") -> str:
    """The video serving benchmark: ratios against vanilla, vLLM's random-mm, acceptance."""
    d = load(name)
    spec = d["spec"]
    lines = [f"{d['preset']} preset, {d['dtype']}, one {spec['width']}x{spec['height']} video of {spec['frames']} "
             f"frames at {spec['fps']:g} fps per request, {d['max_tokens']} output tokens, one KV pool for all; "
             f"load average {d['load_start'][0]:.2f} at the start.", ""]
    rows = []
    for r in d["ratios"]:
        probe, c1, c8 = r.get("probe_ttft") or {}, r.get("c1") or {}, r.get("c8") or {}
        rows.append([r["pair"], f"{x(probe.get('ratio'), 3)} {ci(probe.get('ci95'), 3)}".strip(),
                     x(c1.get("whole_run_output_tok_per_s")), x(c8.get("whole_run_output_tok_per_s")),
                     x(r.get("video_tokens"), 3), x(r.get("kv_blocks_end"), 3)])
    lines.append(table(["pair", "TTFT, paired probe (95% CI)", "output tok/s c=1 (whole run)",
                        "output tok/s c=8 (whole run)", "video tokens", "KV blocks"], rows))
    mm = {(m["contender"], m["concurrency"]): m for m in d.get("random_mm", []) if m.get("ok")}
    if mm:
        lines += ["", "vLLM's own `vllm bench serve --dataset-name random-mm` (video bucket), output tok/s and "
                  "median TTFT:", ""]
        rows = [[c, str(n), f"{m['output_throughput']:.1f}", f"{m['median_ttft_ms'] / 1000:.1f} s",
                 f"{m['input_tokens_per_request']:.0f}"] for (c, n), m in mm.items()]
        lines.append(table(["contender", "concurrency", "output tok/s", "median TTFT", "input tokens"], rows))
    lines += [""] + [f"- {'PASS' if a['pass'] else 'n/a' if a['pass'] is None else 'FAIL'}: {a['name']} "
                     f"({a['detail']})" for a in d["acceptance"]]
    return "\n".join(lines + ["", command_line(d.get("command"), name)])


def render_video_accuracy(name: str = "video_accuracy.json") -> str:
    """Video civic-shapes accuracy of one checkpoint: full, civic, subsampling (EVS where it runs)."""
    d = load(name)
    tasks = d["tasks"]
    rows = [[r["method"], f"{r['mean_video_tokens']:.1f}", f"{r['kept_fraction']:.3f}", f"{r['mean_kv_blocks']:.2f}",
             f"{r['figures']['overall']['value']:.3f} {ci(r['figures']['overall']['ci95'], 3)}",
             *(f"{r['figures'][t]['value']:.3f}" for t in tasks)] for r in d["rows"]]
    rows.append(["most common answer", "", "", "", f"{d['baseline']['accuracy']:.3f}",
                 *(f"{d['baseline']['per_task'][t]:.3f}" for t in tasks)])
    lines = [f"`{d['model']}`, {d['n']} test videos (seed {d['test_seed']}), r = {d['ratio']:.3g}:", "",
             table(["method", "video tokens", "kept", "KV blocks", "overall (95% CI)", *tasks], rows), ""]
    diff = [[pair.replace("-", " − "), *(f"{100 * c[k]['difference']:+.1f} {ci(c[k]['difference_ci95'], 1, 100)}"
                                         for k in ("overall", *tasks))]
            for pair, c in d["comparisons"].items()]
    lines += [table(["paired difference (points)", "overall", *tasks], diff), ""]
    if d.get("evs_error"):
        lines.append("EVS: not measured, the EVS server failed on this backend (error in the JSON's `evs_error`).")
    return "\n".join(lines + ["", command_line(d.get("command"), name, "python -m benchmarks.video_accuracy")])


RENDERERS: dict[str, Callable[[], str]] = {
    "headline": render_serve_headline,
    "serve": partial(render_serve_run, "serve.json"),
    "serve-recipe": partial(render_serve_run, "serve_recipe.json"),
    "serve-recipe-civic": partial(render_serve_run, "serve_recipe_civic.json"),
    "serve-families": render_serve_families,
    "kv-blocks": render_kv_blocks,
    "accuracy": partial(render_accuracy, "accuracy.json"),
    "accuracy-30min": partial(render_accuracy, "accuracy_30min.json", validation=False),
    "accuracy-readout": render_accuracy_readout,
    "object-recall": render_object_recall,
    "distill-params": partial(render_distill, "distill_params.json"),
    "distill-ce": partial(render_distill, "distill_ce.json"),
    "distill-soup": render_distill_soup,
    "depth-probe": render_depth_probe,
    "soak": render_soak,
    "kernels": render_kernels,
    "gpu": render_gpu,
    "video-serve": render_video_serve,
    "video-accuracy": render_video_accuracy,
}


# ----------------------------------------------------------------------------------------------
# rewriting the Markdown


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def regenerate(text: str, where: str = "") -> str:
    """`text` with every generated block rewritten from the JSON."""

    def block(m: re.Match) -> str:
        name = m["name"]
        if name not in RENDERERS:
            raise KeyError(f"{where}: unknown generated block {name!r} (known: {', '.join(sorted(RENDERERS))})")
        return f"<!-- generated:{name} -->\n{RENDERERS[name]().rstrip()}\n<!-- /generated:{name} -->"

    return MARKER.sub(block, text)


def blocks(text: str) -> dict[str, str]:
    return {m["name"]: m["body"] for m in MARKER.finditer(text)}


def drift(files: list[Path] | None = None, root: Path = ROOT) -> list[str]:
    """One line per generated block whose text differs from what the JSON gives (paths relative to root)."""
    problems = []
    for path in files or doc_files():
        where = str(path.relative_to(root))
        text = path.read_text()
        new = blocks(regenerate(text, where))
        for name, body in blocks(text).items():
            if body != new[name]:
                problems.append(f"{where}: block '{name}' differs from benchmarks/results (run make docs)")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 when a block is out of date")
    args = parser.parse_args(argv)
    if args.check:
        problems = drift()
        print("\n".join(problems) or "docs: every generated block matches benchmarks/results")
        return 1 if problems else 0
    for path in doc_files():
        text = path.read_text()
        new = regenerate(text, str(path.relative_to(ROOT)))
        if new != text:
            path.write_text(new)
            print(f"docs: rewrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
