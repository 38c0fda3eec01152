"""benchmarks/serve/ and benchmarks/video_serve/: serve.json, serve_moe.json, serve_qwen3.5.json,
serve_recipe*.json, video_serve.json.
"""

from __future__ import annotations

from pathlib import Path

from tools.docs_gen.common import ci, command_line, load, pct, ratio_label, table, x


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
    serve, kv, acc = load("serve.json"), load("kv_blocks.json"), load("accuracy.json")
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
    ctx = load("serve_recipe_ctx.json")  # the accuracy rows' student serves with exit context: its speed
    ctx_probe = ctx["probe"][ctx["workloads"][0]["name"]]["configs"]["civic default"]
    ctx_src = src("serve_recipe_ctx.json", f"{ctx['model']['preset']} preset, {ctx['model']['dtype']}")
    rows.append(["TTFT, r = 1/3 after vision block 1 with exit context (recipe default, paired probe, 95% CI)",
                 f"{x(ctx_probe['client_ttft_speedup'])} {ci(ctx_probe['client_ttft_speedup_ci95'])}", ctx_src])
    rows.append(["output tok/s at concurrency 8, r = 1/3 after vision block 1 with exit context (recipe default)",
                 x(_serve_ratios(ctx)[("civic default", 8)]["output_tok_per_s_civic_over_vanilla"]), ctx_src])
    kv_src = src("kv_blocks.json", f"{kv['model']['preset']} preset")
    for key, what in (("prompt_tokens", "prompt tokens"), ("blocks_per_request", "KV blocks per request"),
                      ("resident_requests", "requests resident in the same KV pool")):
        van, civ = kv_row["vanilla"][key], kv_row["r=1/3"][key]
        rows.append([f"{what}, one {side}² image, r = 1/3", f"{civ} vs {van} ({x(civ / van)})", kv_src])
    acc_src = src("accuracy.json", "civic-shapes model trained here")
    chosen = acc["validation"]["chosen"]
    for metric, what in (("overall", "overall"), ("small", "small objects"), ("ground", "grounding")):
        s = shares[metric]
        rows.append([f"accuracy, {what}: {chosen} (r = 1/3) as a share of full tokens, same training "
                     f"({acc['minutes_per_contender']:g} CPU-min each)",
                     f"{pct(s['share'])} {ci(s['share_ci95'], 1, 100)}", acc_src])
    return table(["civic vs vanilla vLLM", "measured", "from"], rows)


def render_video_serve(name: str = "video_serve.json") -> str:
    """The video serving benchmark: ratios against vanilla, vLLM's random-mm, acceptance."""
    d = load(name)
    spec = d["spec"]
    model = f"model {Path(d['preset']).name}" if "/" in d["preset"] else f"{d['preset']} preset"  # --model: a path
    lines = [f"{model}, {d['dtype']}, one {spec['width']}x{spec['height']} video of {spec['frames']} "
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
