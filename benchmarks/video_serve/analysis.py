"""Analysis (pure: state dict in, report dict out): tokens, paired and throughput ratios, acceptance."""

from __future__ import annotations

import statistics
from typing import Any

from benchmarks.serve.analysis import div
from benchmarks.serve.common import fmt
from benchmarks.serve.probe import bootstrap_geomean_ci, bootstrap_ratio_ci
from benchmarks.video_serve.common import PLACEHOLDER_GOAL
from civic_vllm.cost import kv_blocks, kv_tokens

PAIRS = (("civic", "vanilla"), ("civic", "evs"), ("evs", "vanilla"), ("subsample", "vanilla"))


def labels_by_name(state: dict) -> dict[str, str]:
    return {c["name"]: c["label"] for c in state["contenders"]}


def token_summary(state: dict) -> dict[str, dict]:
    """Per counted configuration: median video and prompt tokens, KV blocks held at the first token
    (prompt) and at the last step (prompt + max_tokens - 1)."""
    block = state["block_size"]
    out = {}
    for label in dict.fromkeys(r["contender"] for r in state["counts"]):
        rows = [r for r in state["counts"] if r["contender"] == label]
        video = int(statistics.median(r["video_tokens"] for r in rows))
        prompt = int(statistics.median(r["prompt_tokens"] for r in rows))
        out[label] = {"video_tokens": video, "prompt_tokens": prompt, "kv_blocks_prompt": kv_blocks(prompt, block),
                      "kv_blocks_end": kv_blocks(kv_tokens(prompt, state["max_tokens"]), block)}
    return out


def rows_by_round(rows: list[dict], key: str | None = None) -> dict[int, dict[str, dict]]:
    """Probe or load rows grouped round -> config -> row (with its ``order`` in the run), skipping rows
    without ``key``."""
    by_round: dict[int, dict[str, dict]] = {}
    for order, row in enumerate(rows):
        if key is None or row.get(key) is not None:
            by_round.setdefault(row["round"], {})[row["config"]] = {**row, "order": order}
    return by_round


def paired_ratio(probe: list[dict], num: str, den: str, key: str = "client_ttft_s") -> dict:
    """Ratio of medians num/den of ``key`` over the probe rounds both have, with the paired bootstrap CI."""
    by_round = rows_by_round(probe, key)
    rounds = sorted(r for r, v in by_round.items() if num in v and den in v)
    a, b = [by_round[r][num][key] for r in rounds], [by_round[r][den][key] for r in rounds]
    if not rounds:
        return {"ratio": None, "ci95": None, "rounds": 0}
    geomean, geomean_ci = bootstrap_geomean_ci(a, b)
    return {"ratio": statistics.median(a) / statistics.median(b), "ci95": bootstrap_ratio_ci(a, b),
            "rounds": len(rounds), "num_median_s": statistics.median(a), "den_median_s": statistics.median(b),
            "paired_geomean": geomean, "paired_geomean_ci95": geomean_ci}


def point(points: list[dict], label: str, users: int) -> dict | None:
    return next((p for p in points if p["config"] == label and p["concurrency"] == users), None)


def throughput_ratio(points: list[dict], num: str, den: str, users: int, key: str = "output_tok_per_s") -> float | None:
    a, b = point(points, num, users), point(points, den, users)
    if a is None or b is None:
        return None
    return div(a["client"][key], b["client"][key])


def ratio_table(state: dict) -> list[dict]:
    """Every PAIRS ratio: paired probe TTFT (client and server) at concurrency 1, then per concurrency the
    locust throughput (output tok/s, req/s) and TTFT p50 ratios, video tokens and KV blocks."""
    names = labels_by_name(state)
    tokens = token_summary(state)
    rows = []
    for num, den in PAIRS:
        if num not in names or den not in names:
            continue
        a, b = names[num], names[den]
        row: dict[str, Any] = {"pair": f"{num}/{den}", "num": a, "den": b,
                               "probe_ttft": paired_ratio(state["probe"], a, b),
                               "probe_server_ttft": paired_ratio(state["probe"], a, b, "server_ttft_s"),
                               "video_tokens": div(tokens[a]["video_tokens"], tokens[b]["video_tokens"]),
                               "kv_blocks_end": div(tokens[a]["kv_blocks_end"], tokens[b]["kv_blocks_end"])}
        for users in sorted({p["concurrency"] for p in state["points"]}):
            pa, pb = point(state["points"], a, users), point(state["points"], b, users)
            wa, wb = (pa or {}).get("whole_run") or {}, (pb or {}).get("whole_run") or {}
            row[f"c{users}"] = {
                "output_tok_per_s": throughput_ratio(state["points"], a, b, users),
                "req_per_s": throughput_ratio(state["points"], a, b, users, "req_per_s"),
                "ttft_p50": div(pa["client"]["ttft_p50_s"], pb["client"]["ttft_p50_s"]) if pa and pb else None,
                "whole_run_output_tok_per_s": div(wa.get("output_tok_per_s"), wb.get("output_tok_per_s")),
            }
        rows.append(row)
    return rows


def check(name: str, value: float | None, goal: str, passed: bool | None, detail: str = "") -> dict:
    return {"name": name, "value": value, "goal": goal, "pass": passed, "detail": detail}


def acceptance(state: dict, ratios: list[dict], load: dict | None = None) -> list[dict]:
    """Issue 19's serving checks, from the measurements (``load``: the paired load's output tok/s,
    :func:`load_summary`)."""
    by_pair = {r["pair"]: r for r in ratios}
    tokens = token_summary(state)
    names = labels_by_name(state)
    checks = []
    civic, vanilla = tokens[names["civic"]], tokens[names["vanilla"]]
    evs_state = state.get("evs") or {"ok": True}
    if evs_state["ok"]:
        evs_kept_tokens, source = tokens[names["evs"]]["video_tokens"], "measured"
    else:
        evs_kept_tokens, source = evs_state["kept_by_formula"], "vLLM's EVS formula; the EVS server failed"
    checks.append(check("civic keeps no more video tokens than EVS", civic["video_tokens"] / evs_kept_tokens,
                        "civic/EVS video tokens <= 1", civic["video_tokens"] <= evs_kept_tokens,
                        f"civic {civic['video_tokens']} vs EVS {evs_kept_tokens} ({source}; "
                        f"vanilla {vanilla['video_tokens']})"))
    loaded = sorted(u for u in {p["concurrency"] for p in state["points"]} if u >= 8)
    if "civic/evs" not in by_pair:
        why = f"not measured: EVS failed on this backend: {evs_state.get('error')}"
        checks.append(check("civic at least as fast as EVS, TTFT at concurrency 1 (paired probe)", None,
                            "civic/EVS median TTFT <= 1", None, why))
        checks.append(check("civic faster than EVS under load (output tok/s, every concurrency >= 8)", None,
                            "civic/EVS > 1", None, why))
    else:
        ttft = by_pair["civic/evs"]["probe_ttft"]
        checks.append(check("civic at least as fast as EVS, TTFT at concurrency 1 (paired probe)", ttft["ratio"],
                            "civic/EVS median TTFT <= 1", None if ttft["ratio"] is None else ttft["ratio"] <= 1.0,
                            f"95% CI {fmt_ci(ttft).partition(' ')[2] or 'n/a'}, {ttft['rounds']} rounds"))
        values = [by_pair["civic/evs"][f"c{u}"]["output_tok_per_s"]
                  or by_pair["civic/evs"][f"c{u}"]["whole_run_output_tok_per_s"] for u in loaded]
        worst = min((v for v in values if v is not None), default=None)
        checks.append(check("civic faster than EVS under load (output tok/s, every concurrency >= 8)", worst,
                            "civic/EVS > 1", None if worst is None or None in values else worst > 1.0,
                            f"concurrency {loaded}: {[fmt(v) for v in values]}"))
        if load:
            # The round's two bursts run back to back: judged on the per-round ratios (geometric mean),
            # the ratio of medians across rounds shown beside it.
            users = state["load"][0]["users"]
            ci95 = load.get("paired_geomean_ci95")
            checks.append(check(f"civic faster than EVS under load, paired bursts of {users} (output tok/s)",
                                load.get("paired_geomean"), "civic/EVS > 1, whole 95% CI above 1",
                                None if not ci95 else ci95[0] > 1.0,
                                f"{fmt_paired(load)}; ratio of medians {fmt_ci(load)}"))
            ttft = paired_ratio(state["load"], names["civic"], names["evs"], "ttft_p50_s")
            ci95 = ttft.get("paired_geomean_ci95")
            checks.append(check(f"civic's TTFT under load below EVS's, paired bursts of {users} (median TTFT)",
                                ttft.get("paired_geomean"), "civic/EVS < 1, whole 95% CI below 1",
                                None if not ci95 else ci95[1] < 1.0,
                                f"{fmt_paired(ttft)}; ratio of medians {fmt_ci(ttft)}"))
    third = next((v for k, v in tokens.items() if k.startswith("civic r=1/3")), None)
    if third is not None:
        # The placeholder span: video tokens plus each group's timestamp and markers (runs before
        # span_text_tokens was recorded: video tokens only).
        outside = vanilla["prompt_tokens"] - vanilla["video_tokens"] - state.get("span_text_tokens", 0)
        span, vanilla_span = third["prompt_tokens"] - outside, vanilla["prompt_tokens"] - outside
        ratio = span / vanilla_span
        checks.append(check("video placeholders at r = 1/3 vs vanilla", ratio, f"<= {PLACEHOLDER_GOAL}",
                            ratio <= PLACEHOLDER_GOAL,
                            f"span {span} vs {vanilla_span} ({third['video_tokens']} vs {vanilla['video_tokens']} "
                            f"video tokens)"))
        blocks = third["kv_blocks_end"] / vanilla["kv_blocks_end"]
        limit = (vanilla["prompt_tokens"] - vanilla["video_tokens"] + third["video_tokens"] + state["max_tokens"]) / (
            vanilla["prompt_tokens"] + state["max_tokens"])
        checks.append(check("KV blocks per request at r = 1/3 vs vanilla (prompt + output, last step)", blocks,
                            f"<= {PLACEHOLDER_GOAL}", blocks <= PLACEHOLDER_GOAL,
                            f"{third['kv_blocks_end']} vs {vanilla['kv_blocks_end']} blocks of {state['block_size']}; "
                            f"text + output tokens do not shrink: token-level floor (T+K+O)/(T+N+O) = {limit:.3f}; "
                            f"at the first token {third['kv_blocks_prompt']} vs {vanilla['kv_blocks_prompt']}"))
    return checks


def metrics_blocks(state: dict) -> dict[str, int | None]:
    """KV blocks one request held at most, from /metrics: vllm:kv_cache_usage_perc's maximum over the
    concurrency-1 window (one request at a time) x the usable blocks. Sampled every poll, so a lower bound."""
    usable = state.get("pool", {}).get("usable_blocks")
    out = {}
    for c in state["contenders"]:
        p = point(state["points"], c["label"], 1)
        peak = p and p["server"].get("kv_usage_max")
        out[c["label"]] = round(peak * usable) if peak is not None and usable else None
    return out


def load_labels(state: dict) -> dict[str, str] | None:
    """Contender labels by name, or None when the run has no paired civic/EVS load."""
    names = labels_by_name(state)
    return names if state.get("load") and "evs" in names else None


def load_rounds(state: dict) -> list[dict]:
    """Paired load, one row per round both civic and EVS ran: who went first, each burst's wall time and
    output tok/s, and the round's civic/EVS ratio."""
    names = load_labels(state)
    if names is None:
        return []
    rows = []
    for rnd, bursts in sorted(rows_by_round(state["load"]).items()):
        civic, evs = bursts.get(names["civic"]), bursts.get(names["evs"])
        if civic and evs:
            rows.append({"round": rnd, "first": "civic" if civic["order"] < evs["order"] else "evs",
                         "civic_wall_s": civic["wall_s"], "evs_wall_s": evs["wall_s"],
                         "civic_output_tok_per_s": civic["output_tok_per_s"],
                         "evs_output_tok_per_s": evs["output_tok_per_s"],
                         "ratio": civic["output_tok_per_s"] / evs["output_tok_per_s"]})
    return rows


def load_summary(state: dict) -> dict | None:
    """The paired load's civic/EVS output tok/s (:func:`paired_ratio`), if the run had paired load."""
    names = load_labels(state)
    if names is None:
        return None
    return paired_ratio(state["load"], names["civic"], names["evs"], "output_tok_per_s")


def analyse(state: dict) -> dict:
    ratios = ratio_table(state)
    load = load_summary(state)
    return {"tokens": token_summary(state), "kv_blocks_from_metrics_c1": metrics_blocks(state), "ratios": ratios,
            "acceptance": acceptance(state, ratios, load), "load_rounds": load_rounds(state), "load_summary": load}


def fmt_paired(r: dict) -> str:
    """The geometric mean of per-round ratios, its interval and the round count."""
    if r.get("paired_geomean") is None:
        return "n/a"
    ci = r.get("paired_geomean_ci95")
    return (f"geometric mean of per-round ratios {r['paired_geomean']:.3f}"
            + (f" ({ci[0]:.3f}..{ci[1]:.3f})" if ci else "") + f", {r['rounds']} rounds")


def fmt_ci(r: dict) -> str:
    if r.get("ratio") is None:
        return "n/a"
    ci = r.get("ci95")
    return f"{r['ratio']:.3f}" + (f" ({ci[0]:.3f}..{ci[1]:.3f})" if ci else "")
