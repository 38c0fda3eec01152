"""The other benchmarks: kv_blocks/, depth_probe.py, soak.py, kernels/, gpu_check/."""

from __future__ import annotations

import json

from tools.docs_gen.common import RESULTS, ci, command_line, load, pct, table, x


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
