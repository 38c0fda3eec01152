"""benchmarks/accuracy.py (the fair protocol), object recall, distillation and video accuracy:
accuracy*.json, object_recall.json, distill_*.json, video_accuracy.json.
"""

from __future__ import annotations

from tools.docs_gen.common import ci, command_line, load, pct, table


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
    feature = (f", feature distillation weight {d['feature_weight']:g} (all but downscale)"
               if d.get("feature_weight") else "")
    out.append(f"Test (seed {test['seed']}, {test['n']} questions, {test['bootstrap']} bootstrap resamples; "
               f"{d['minutes_per_contender']:g} CPU-minutes of distillation each{feature}; each model once, "
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
    if d.get("skipped"):
        out.append(f"NOT MEASURED (--skip): {', '.join(d['skipped'])}; the run cannot pass")
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


def render_video_accuracy(name: str = "video_accuracy.json") -> str:
    """Video civic-shapes accuracy of one checkpoint: full, civic, subsampling (EVS where it runs)."""
    d = load(name)
    tasks = d["tasks"]
    rows = [[r["method"], f"{r['mean_video_tokens']:.1f}", f"{r['kept_fraction']:.3f}", f"{r['mean_kv_blocks']:.2f}",
             f"{r['figures']['overall']['value']:.3f} {ci(r['figures']['overall']['ci95'], 3)}",
             *(f"{r['figures'][t]['value']:.3f}" for t in tasks)] for r in d["rows"]]
    rows.append(["most common answer", "", "", "", f"{d['baseline']['accuracy']:.3f}",
                 *(f"{d['baseline']['per_task'][t]:.3f}" for t in tasks)])
    budget = (", civic at EVS's video tokens of each video" if d.get("civic_budget") == "evs"
              else ", civic_video_ratio r (of the span)" if d.get("civic_budget") == "ratio" else "")
    lines = [f"`{d['model']}`, {d['n']} test videos (seed {d['test_seed']}), r = {d['ratio']:.3g}{budget}:", "",
             table(["method", "video tokens", "kept", "KV blocks", "overall (95% CI)", *tasks], rows), ""]
    diff = [[" − ".join(pair.rsplit("-", 1)), *(f"{100 * c[k]['difference']:+.1f} {ci(c[k]['difference_ci95'], 1, 100)}"
                                         for k in ("overall", *tasks))]
            for pair, c in d["comparisons"].items()]
    lines += [table(["paired difference (points)", "overall", *tasks], diff), ""]
    if d.get("evs_error"):
        lines.append("EVS: not measured, the EVS server failed on this backend (error in the JSON's `evs_error`).")
    return "\n".join(lines + ["", command_line(d.get("command"), name, "python -m benchmarks.video_accuracy")])


def render_proportional(name: str) -> str:
    """The proportional-attention probe's tables (benchmarks/proportional_attention.py writes the same Markdown)."""
    from benchmarks.proportional_attention import report

    d = load(name)
    body = report(d).split("\n", 2)[2]  # without the title line and the blank line after it
    return body.rsplit("Written by", 1)[0] + command_line(d["command"], name)
