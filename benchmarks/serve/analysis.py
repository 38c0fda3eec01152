"""Analysis: ratios against vanilla with bootstrap intervals, limits, acceptance checks."""

from __future__ import annotations

import statistics
from typing import Any

import numpy as np

from benchmarks.harness import Geometry
from benchmarks.serve.common import (
    ACCEPT_WORKLOAD,
    GOAL_R1_TOLERANCE,
    GOAL_THROUGHPUT_C8,
    GOAL_TTFT_SPEEDUP,
    GOAL_TTFT_SPEEDUP_DEFAULT,
    GOAL_TTFT_SPEEDUP_EXIT,
    MAX_NUM_BATCHED_TOKENS,
    P95_MIN_CONCURRENCY,
    Config,
    Run,
    WorkloadSpec,
    fmt,
)
from benchmarks.serve.probe import bootstrap_ratio_ci, compact_key
from civic_vllm.budget import num_merged_tokens, num_retained
from civic_vllm.cost import image_encoder_cost


def div(a: float | None, b: float | None) -> float | None:
    return None if a is None or b in (None, 0) else a / b


def find_point(points: list[dict], workload: str, config: str, c: int) -> dict | None:
    return next((p for p in points
                 if p["workload"] == workload and p["config"] == config and p["concurrency"] == c), None)


def ratio_rows(run: Run) -> list[dict]:
    rows = []
    for p in run.points:
        if p["server_kind"] == "vanilla":
            continue
        base = find_point(run.points, p["workload"], "vanilla", p["concurrency"])
        if base is None:
            continue
        vc, cc, vs, cs = base["client"], p["client"], base["server"], p["server"]
        rows.append({
            "workload": p["workload"], "config": p["config"], "concurrency": p["concurrency"],
            "ttft_p50_speedup": div(vc["ttft_p50_s"], cc["ttft_p50_s"]),
            "ttft_p95_speedup": div(vc["ttft_p95_s"], cc["ttft_p95_s"]),
            "server_ttft_mean_speedup": div(vs["ttft_mean_s"], cs["ttft_mean_s"]),
            "itl_p50_civic_over_vanilla": div(cc["itl_p50_s"], vc["itl_p50_s"]),
            "req_per_s_civic_over_vanilla": div(cc["req_per_s"], vc["req_per_s"]),
            "output_tok_per_s_civic_over_vanilla": div(cc["output_tok_per_s"], vc["output_tok_per_s"]),
            "kv_usage_max_vanilla": vs["kv_usage_max"], "kv_usage_max_civic": cs["kv_usage_max"],
            "waiting_mean_vanilla": vs["waiting_mean"], "waiting_mean_civic": cs["waiting_mean"],
            "running_mean_vanilla": vs["running_mean"], "running_mean_civic": cs["running_mean"],
        })
    return rows


def probe_summary(run: Run, spec: WorkloadSpec) -> dict:
    rows = [r for r in run.probe if r["workload"] == spec.name]
    by = {c.label: [r for r in rows if r["config"] == c.label] for c in run.probe_configs}
    out: dict[str, Any] = {"rounds": run.bounds.probe_rounds, "configs": {}}
    for label, rs in by.items():
        rs = sorted(rs, key=lambda r: r["round"])
        med = {k: statistics.median([r[k] for r in rs]) if rs else None
               for k in ("client_ttft_s", "server_ttft_s", "server_queue_s", "server_prefill_s")}
        out["configs"][label] = {
            **med, "n": len(rs),
            "prompt_tokens": rs[0]["prompt_tokens"] if rs else None,
            "visual_tokens_per_request": rs[0]["visual_tokens"] if rs else None,
            "visual_tokens_retained_per_request": rs[0]["visual_tokens_retained"] if rs else None,
            # what the server spent before the request was queued: image decode + HF processor
            "preprocess_s": (med["server_ttft_s"] - med["server_queue_s"] - med["server_prefill_s"])
            if rs else None,
            "client_minus_server_s": (med["client_ttft_s"] - med["server_ttft_s"]) if rs else None,
        }
    van = by.get("vanilla", [])
    for c in run.probe_configs:
        if c.server == "vanilla":
            continue
        cs = by[c.label]
        entry = out["configs"][c.label]
        for key in ("client_ttft_s", "server_ttft_s", "server_prefill_s"):
            v = [r[key] for r in sorted(van, key=lambda r: r["round"])]
            x = [r[key] for r in sorted(cs, key=lambda r: r["round"])]
            entry[key[:-2] + "_speedup"] = div(statistics.median(v) if v else None,
                                                            statistics.median(x) if x else None)
            ci = bootstrap_ratio_ci(v, x)
            entry[key[:-2] + "_speedup_ci95"] = ci
    out["fit"] = prefill_fit(out, run.full_tower_labels)
    return out


def prefill_fit(probe: dict, labels: set[str]) -> dict | None:
    """Server-side split of the engine's prefill time: a least-squares line through the civic
    server's median prefill time (``vllm:request_prefill_time_seconds``: scheduled -> first token)
    against its prompt tokens (T + K) over the probed ratios. The slope is the LLM's cost per
    prompt token; the intercept is what does not shrink with K: the vision tower on all patches,
    the merger/selection and fixed per-step costs (an upper bound of the vision tower's time).
    Only ``labels``, configurations without an early exit (which shrinks the tower too), count."""
    pts = [(e["prompt_tokens"], e["server_prefill_s"]) for label, e in probe["configs"].items()
           if label in labels and e.get("prompt_tokens") and e.get("server_prefill_s") is not None]
    if len({x for x, _ in pts}) < 2:
        return None
    x, y = np.array([p[0] for p in pts], float), np.array([p[1] for p in pts], float)
    slope, intercept = np.polyfit(x, y, 1)
    pred = intercept + slope * x
    ss_res, ss_tot = float(((y - pred) ** 2).sum()), float(((y - y.mean()) ** 2).sum())
    # Extrapolating to zero tokens is only meaningful when the probed prompts span a wide range
    # (image-dominated); with text-heavy prompts the intercept can even come out negative.
    reliable = bool(intercept > 0 and slope > 0 and x.min() <= 0.5 * x.max())
    return {"points": [[int(a), float(b)] for a, b in pts], "intercept_s": float(intercept),
            "llm_s_per_token": float(slope), "r2": 1 - ss_res / ss_tot if len(pts) > 2 and ss_tot > 0 else None,
            "reliable": reliable}


def tower_fraction(n: int, k: int, exit_layer: int | None, depth: int) -> float:
    """Vision-tower work with retention at ``exit_layer`` relative to the full tower, as the plugin's
    encoder budget counts it (patch rows per block); the blocks' attention is quadratic in rows, so
    the real saving is a little larger."""
    return image_encoder_cost(n, k, exit_layer or depth, depth) / n


def limits(run: Run, spec: WorkloadSpec, probe: dict, vision: dict | None) -> list[dict]:
    """Per civic config: LLM-side limit (T+N)/(T+K), the vision share and what is attainable."""
    geometry = Geometry.from_checkpoint(run.model, run.dtype)
    depth = geometry.vision_depth
    n_img = num_merged_tokens((1, spec.height // geometry.patch_size, spec.width // geometry.patch_size),
                              geometry.merge_size)
    van = probe["configs"].get("vanilla", {})
    prompt_v = van.get("prompt_tokens")
    rows = []
    fit = probe.get("fit")
    for c in run.probe_configs:
        if c.ratio is None:
            continue
        k_img = num_retained(n_img, float(c.ratio))
        n, k = n_img * spec.images, k_img * spec.images
        text_tokens = prompt_v - n if prompt_v else None
        llm_limit = div(text_tokens + n, text_tokens + k) if text_tokens is not None else None
        entry = probe["configs"].get(c.label, {})
        tower = tower_fraction(n_img, k_img, c.exit_layer, depth)
        row = {"workload": spec.name, "config": c.label, "ratio": float(c.ratio), "exit_layer": c.exit_layer,
               "T_text_tokens": text_tokens, "N_visual_tokens": n, "K_kept_tokens": k, "llm_side_limit": llm_limit,
               "vision_tower_fraction": tower,
               "prompt_tokens_measured": entry.get("prompt_tokens"),
               "prompt_tokens_expected": text_tokens + k if text_tokens is not None else None}
        ttft_v, pre = van.get("server_ttft_s"), van.get("preprocess_s")
        if vision and ttft_v and llm_limit:
            v_s = vision["vision_s"]
            share = v_s / ttft_v
            rest = max(ttft_v - v_s - (pre or 0.0), 0.0)
            row.update({
                "vision_s": v_s, "vanilla_server_ttft_s": ttft_v, "vision_share": share,
                "preprocess_s": pre,
                # Everything but the vision tower and preprocessing shrinks by the LLM-side limit
                # at best (attention is superlinear in tokens, so this is close to, not exactly, a bound);
                # the tower shrinks to its fraction of patch-row work (1 at the default exit).
                "attainable_speedup": ttft_v / ((pre or 0.0) + v_s * tower + rest / llm_limit),
                "attainable_speedup_simple": 1.0 / (share * tower + (1.0 - share) / llm_limit),
            })
            if (key := compact_key(float(c.ratio), c.exit_layer, c.default)) in vision:
                row["hf_in_process_speedup"] = vision["full_prefill_s"] / vision[key]
        if fit and fit.get("reliable") and ttft_v and text_tokens is not None and tower == 1.0:
            llm_v = fit["llm_s_per_token"] * (text_tokens + n)
            row.update({
                "non_llm_engine_s_fit": fit["intercept_s"], "non_llm_share_fit": fit["intercept_s"] / ttft_v,
                "llm_share_fit": llm_v / ttft_v,
                # vanilla's TTFT with its LLM part (fit slope x tokens) shrunk by exactly (T+N)/(T+K)
                "attainable_speedup_fit": ttft_v / (ttft_v - llm_v + fit["llm_s_per_token"] * (text_tokens + k)),
            })
        row["measured_speedup_probe_client"] = entry.get("client_ttft_speedup")
        row["measured_speedup_probe_server"] = entry.get("server_ttft_speedup")
        p1 = find_point(run.points, spec.name, c.label, 1)
        v1 = find_point(run.points, spec.name, "vanilla", 1)
        row["measured_speedup_sweep_c1_p50"] = (div(v1["client"]["ttft_p50_s"], p1["client"]["ttft_p50_s"])
                                                if p1 and v1 else None)
        # Engine time of one request served alone: prefill (probe) + decode (c=1 TPOT x later tokens). With no
        # batching benefit, throughput civic/vanilla would be this ratio.
        tp_v, tp_c = (v1 or {}).get("client", {}).get("tpot_p50_s"), (p1 or {}).get("client", {}).get("tpot_p50_s")
        pf_v, pf_c = van.get("server_prefill_s"), entry.get("server_prefill_s")
        if None not in (tp_v, tp_c, pf_v, pf_c):
            row["service_time_ratio_c1"] = div(pf_v + (run.max_tokens - 1) * tp_v, pf_c + (run.max_tokens - 1) * tp_c)
        if row.get("attainable_speedup") and row["measured_speedup_probe_client"]:
            row["fraction_of_attainable"] = row["measured_speedup_probe_client"] / row["attainable_speedup"]
        rows.append(row)
    return rows


def every_concurrency_check(base: dict, goal: str, per_concurrency: dict, measured_all: bool, name: str) -> dict:
    """A check that a civic/vanilla ratio is >= 1.0 at every measured concurrency."""
    return {
        **base, "goal": goal, "name": name,
        "value": min((v for v in per_concurrency.values() if v is not None), default=None),
        "requirement": ">= 1.0 at every concurrency",
        "pass": bool(per_concurrency) and measured_all
        and all(v is not None and v >= 1.0 for v in per_concurrency.values()),
        "also": {"per_concurrency": per_concurrency},
    }


def config_checks(run: Run, config: Config, lim: list[dict], probe: dict, ratios: list[dict]) -> list[dict]:
    """The goals of one compared civic configuration: issue 6's for retention on the encoder output,
    issue 8's (a higher TTFT bar) for an early exit layer; the recipe default's: TTFT and throughput at
    concurrency 8 as for an exit layer, and p95 TTFT not worse than vanilla at any concurrency."""
    label = config.label
    goal_ttft = (GOAL_TTFT_SPEEDUP_DEFAULT if config.default
                 else GOAL_TTFT_SPEEDUP_EXIT if config.exit_layer else GOAL_TTFT_SPEEDUP)
    lim_row = next((r for r in lim if r["workload"] == ACCEPT_WORKLOAD and r["config"] == label), {})
    entry = probe.get(label, {})
    speed = entry.get("client_ttft_speedup")
    base = {"config": label, "exit_layer": config.exit_layer, "recipe_default": config.default}
    checks = [{
        **base, "goal": "ttft",
        "name": f"TTFT speedup, {ACCEPT_WORKLOAD}, {label}, concurrency 1 (paired probe, client TTFT)",
        "value": speed, "requirement": f">= {goal_ttft}", "target": goal_ttft,
        "pass": speed is not None and speed >= goal_ttft,
        "ci95": entry.get("client_ttft_speedup_ci95"),
        "also": {"server_ttft_speedup": entry.get("server_ttft_speedup"),
                 "sweep_c1_p50_speedup": lim_row.get("measured_speedup_sweep_c1_p50"),
                 "attainable_speedup": lim_row.get("attainable_speedup"),
                 "attainable_speedup_fit": lim_row.get("attainable_speedup_fit"),
                 "llm_side_limit": lim_row.get("llm_side_limit"), "vision_share": lim_row.get("vision_share"),
                 "vision_tower_fraction": lim_row.get("vision_tower_fraction"),
                 "non_llm_share_fit": lim_row.get("non_llm_share_fit")},
    }]
    rr = {r["concurrency"]: r for r in ratios if r["workload"] == ACCEPT_WORKLOAD and r["config"] == label}
    c8 = rr.get(8, {}).get("output_tok_per_s_civic_over_vanilla")
    checks.append({
        **base, "goal": "throughput_c8",
        "name": f"throughput (output tok/s) civic/vanilla, {ACCEPT_WORKLOAD}, {label}, concurrency 8, fixed KV pool",
        "value": c8, "requirement": f">= {GOAL_THROUGHPUT_C8}", "target": GOAL_THROUGHPUT_C8,
        "pass": c8 is not None and c8 >= GOAL_THROUGHPUT_C8,
        "also": {"req_per_s_ratio": rr.get(8, {}).get("req_per_s_civic_over_vanilla")},
    })
    measured_all = len(rr) == len(run.bounds.concurrency)
    if config.default:
        every = {c: r.get("ttft_p95_speedup") for c, r in sorted(rr.items())}
        checks.append(every_concurrency_check(
            base, "ttft_p95_all", every, measured_all,
            f"p95 TTFT never worse than vanilla (vanilla p95 / civic p95 at concurrency {sorted(every)}), "
            f"{ACCEPT_WORKLOAD}, {label}"))
        return checks
    all_c = {c: r.get("output_tok_per_s_civic_over_vanilla") for c, r in sorted(rr.items())}
    checks.append(every_concurrency_check(
        base, "throughput_all", all_c, measured_all,
        f"throughput civic/vanilla never below 1 at any concurrency ({sorted(all_c)}), {ACCEPT_WORKLOAD}, {label}"))
    loaded = {c: r.get("ttft_p95_speedup") for c, r in sorted(rr.items()) if c >= P95_MIN_CONCURRENCY}
    checks.append({
        **base, "goal": "ttft_p95_under_load",
        "name": f"p95 TTFT under load not worse than vanilla (vanilla p95 / civic p95 at concurrency "
                f"{sorted(loaded)}), {ACCEPT_WORKLOAD}, {label}",
        "value": min((v for v in loaded.values() if v is not None), default=None),
        "requirement": ">= 1.0 at every concurrency >= " + str(P95_MIN_CONCURRENCY),
        "pass": bool(loaded) and measured_all and all(v is not None and v >= 1.0 for v in loaded.values()),
        "also": {"per_concurrency": loaded},
    })
    return checks


def acceptance(run: Run, lim: list[dict], probes: dict[str, dict], ratios: list[dict]) -> dict:
    """The issues' "done when", computed from the measurements; a missing measurement is a FAIL."""
    probe = probes.get(ACCEPT_WORKLOAD, {}).get("configs", {})
    checks = [check for config in run.main_configs for check in config_checks(run, config, lim, probe, ratios)]
    r1 = next((c.label for c in run.probe_configs if c.ratio == 1 and not c.default), None)
    s1 = probe.get(r1, {}).get("client_ttft_speedup")
    dev = None if s1 is None else 1.0 / s1 - 1.0  # civic TTFT / vanilla TTFT - 1
    checks.append({
        "config": r1, "exit_layer": None, "goal": "r1",
        "name": f"civic r=1 TTFT within {GOAL_R1_TOLERANCE:.0%} of vanilla, {ACCEPT_WORKLOAD}, "
                "concurrency 1 (paired probe)",
        "value": dev, "requirement": f"|civic/vanilla - 1| <= {GOAL_R1_TOLERANCE}",
        "pass": dev is not None and abs(dev) <= GOAL_R1_TOLERANCE,
        "ci95": (lambda ci: None if ci is None else [1 / ci[1] - 1, 1 / ci[0] - 1])(
            probe.get(r1, {}).get("client_ttft_speedup_ci95")),
        "also": {"server_ttft_deviation": (lambda s: None if s is None else 1 / s - 1)(
            probe.get(r1, {}).get("server_ttft_speedup"))},
    })
    # The goals are defined on ACCEPT_WORKLOAD; a run without it (a custom workload, e.g. a family's
    # side-by-side) still lists them, each failing for want of a measurement, and says so.
    evaluated = any(spec.name == ACCEPT_WORKLOAD for spec in run.specs)
    return {"checks": checks, "pass": all(c["pass"] for c in checks), "evaluated": evaluated}


def packing_note(run: Run, lim_row: dict, users: int) -> str:
    """How many image prompts fit one scheduler step, and the longest decode stall seen at ``users``.

    vLLM budgets a step's prompt tokens (max_num_batched_tokens) and its encoder work in placeholder
    tokens; a civic image has K placeholders but costs a vision-tower pass over N patches (fewer after an
    early exit), so the plugin's encoder cache manager re-counts encoder work at that cost
    (civic_vllm/vllm_adapter/encoder_budget.py)."""
    t, n, k = lim_row.get("T_text_tokens"), lim_row.get("N_visual_tokens"), lim_row.get("K_kept_tokens")
    if t is None or not n or not k:
        return ""
    civic = find_point(run.points, ACCEPT_WORKLOAD, lim_row["config"], users)
    vanilla = find_point(run.points, ACCEPT_WORKLOAD, "vanilla", users)
    stall = (f"; the longest gap between two tokens of one request was "
             f"{fmt((civic or {}).get('client', {}).get('itl_max_s'), '.1f')} s with civic vs "
             f"{fmt((vanilla or {}).get('client', {}).get('itl_max_s'), '.1f')} s with vanilla") if civic else ""
    cost = n * lim_row.get("vision_tower_fraction", 1.0)  # vision-tower work of one image, in tokens
    return (f"Scheduling: a step's token budget fits {MAX_NUM_BATCHED_TOKENS // (t + k)} civic prompts (T+K = "
            f"{t + k} tokens each) vs {MAX_NUM_BATCHED_TOKENS // (t + n)} vanilla ones (T+N = {t + n}); the plugin's "
            f"encoder budget lets a step start at most {max(1, int(MAX_NUM_BATCHED_TOKENS // cost))} vision passes "
            f"(each {cost:.0f} tokens of tower work){stall}. ")


def diagnose_ttft(check: dict) -> str:
    a, exit_layer = check["also"], check["exit_layer"]
    head = (f"TTFT, {check['config']}: {check['value']:.2f}x measured vs {check['target']}x required "
            f"({(check['value'] / check['target'] - 1) * 100:+.0f}%). Profile: the vision tower alone takes "
            f"{fmt(a.get('vision_share'), '.0%')} of vanilla's TTFT (HF in-process timing)")
    if exit_layer:
        return (head + f"; after exit layer {exit_layer} it does {fmt(a.get('vision_tower_fraction'), '.0%')} of its "
                f"patch-row work, and the LLM-side limit (T+N)/(T+K) is {fmt(a.get('llm_side_limit'), '.2f')}x, so "
                f"shrinking both by exactly that gives {fmt(a.get('attainable_speedup'), '.2f')}x. What remains is "
                "fixed per request (image decode and HF preprocessing, the merger, per-step costs); an earlier "
                "exit layer or a smaller ratio moves the limit, at an accuracy cost to be measured with "
                "`civic eval --exit-layer`.")
    return (head + f" (the server-side fit puts everything that does not shrink with K at "
            f"{fmt(a.get('non_llm_share_fit'), '.0%')}) and runs on every patch whatever r is; the LLM-side limit "
            f"(T+N)/(T+K) is {fmt(a.get('llm_side_limit'), '.2f')}x, so shrinking only the LLM's part by that much "
            f"gives {fmt(a.get('attainable_speedup'), '.2f')}x (HF vision) / "
            f"{fmt(a.get('attainable_speedup_fit'), '.2f')}x (server fit). Closing it needs retention inside the "
            "vision encoder: early retention (civic_exit_layer, measured here with --exit-layers) runs the blocks "
            "after the exit layer, whose attention is quadratic in patches, on the kept patches only. Otherwise only "
            "workloads where the LLM dominates prefill get closer (smaller images, longer text, larger LLMs: the "
            "real Qwen3-VL-8B's LLM share is ~79% by FLOPs).")


def diagnose_throughput(run: Run, check: dict, lim_row: dict, ratios: list[dict]) -> str:
    row = next((r for r in ratios if r["workload"] == ACCEPT_WORKLOAD and r["concurrency"] == 8
                and r["config"] == check["config"]), {})
    kv_bound = (row.get("kv_usage_max_vanilla") or 0) > 0.9 and (row.get("waiting_mean_vanilla") or 0) > 0.5
    tower = "" if check["exit_layer"] else "and the vision tower's cost per image is unchanged, "
    return (f"Throughput at concurrency 8, {check['config']}: {check['value']:.2f}x vs {GOAL_THROUGHPUT_C8}x "
            f"required ({(check['value'] / GOAL_THROUGHPUT_C8 - 1) * 100:+.0f}%). Profile: vanilla KV usage max "
            f"{fmt(row.get('kv_usage_max_vanilla'), '.0%')}, {fmt(row.get('running_mean_vanilla'), '.1f')} running / "
            f"{fmt(row.get('waiting_mean_vanilla'), '.1f')} waiting on average vs civic "
            f"{fmt(row.get('running_mean_civic'), '.1f')} / {fmt(row.get('waiting_mean_civic'), '.1f')}. "
            + ("Vanilla was KV-bound (requests waited for blocks), yet on this one-thread CPU worker "
               if kv_bound else "Vanilla was not KV-bound here: ")
            + f"every step's time grows with the tokens it processes {tower}so throughput tracks the per-request "
              f"engine time: served alone, a civic request takes {fmt(lim_row.get('service_time_ratio_c1'), '.2f')}x "
              "less engine time than a vanilla one (prefill + decode), which bounds what more resident requests "
              "can add on one compute thread. " + packing_note(run, lim_row, 8)
            + "Closing it needs less engine work per request (an earlier exit layer, a smaller ratio) or hardware "
              "where decode is memory-bound so a larger resident batch is nearly free (a GPU).")


def diagnose(run: Run, acc: dict, lim: list[dict], ratios: list[dict]) -> list[str]:
    """Why a goal was missed and what would close it, from the measured profile."""
    out = []
    for check in acc["checks"]:
        if check["pass"] or check["value"] is None:
            continue
        lim_row = next((r for r in lim if r["workload"] == ACCEPT_WORKLOAD and r["config"] == check["config"]), {})
        if check["goal"] == "ttft":
            out.append(diagnose_ttft(check))
        elif check["goal"] == "throughput_c8":
            out.append(diagnose_throughput(run, check, lim_row, ratios))
        elif check["goal"] in ("throughput_all", "ttft_p95_under_load", "ttft_p95_all"):
            bad = {c: v for c, v in check["also"]["per_concurrency"].items() if v is not None and v < 1}
            what = "Throughput" if check["goal"] == "throughput_all" else "p95 TTFT (vanilla/civic)"
            out.append(f"{what} below vanilla for {check['config']} at concurrency {sorted(bad)} (worst "
                       f"{check['value']:.2f}x): see the per-point table and timeseries.png; with few completions "
                       "per window the ratio's noise is large, rerun on an idle machine with a longer --duration "
                       "before reading it as a regression.")
        elif check["goal"] == "r1":
            ci = check.get("ci95")
            noise = ci is not None and ci[0] <= GOAL_R1_TOLERANCE and ci[1] >= -GOAL_R1_TOLERANCE
            out.append(
                f"civic r=1 vs vanilla TTFT: {check['value']:+.1%} (required within ±{GOAL_R1_TOLERANCE:.0%}); 95% "
                f"CI {fmt(ci and ci[0], '+.1%')}..{fmt(ci and ci[1], '+.1%')}"
                + (" includes the tolerance band, so this run cannot resolve it: more probe rounds (--probe-rounds) "
                   "on an idle machine." if noise else
                   ". The civic path at r=1 runs the same tower and LLM; its extra work is the processor's "
                   "budget/metrics, the selection call (skipped when K=N) and the position channels: profile the "
                   "server (py-spy on the worker) to find it."))
    return out
