"""Ratios against vanilla, the acceptance checks, the table and the plot."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from benchmarks.kv_blocks.common import ACCEPT_MAX_SHRINK, ACCEPT_MIN_GROWTH, ACCEPT_RATIO, ACCEPT_WORKLOAD


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def add_ratios(rows: list[dict]) -> list[dict]:
    """civic / vanilla of prompt tokens, blocks per request and resident requests, per workload."""
    vanilla = {r["workload"]: r for r in rows if not r["civic"]}
    out = []
    for row in rows:
        base = vanilla.get(row["workload"])
        if base is None:
            continue
        entry = {"workload": row["workload"], "config": row["config"]}
        for key in ("prompt_tokens", "blocks_per_request", "resident_requests"):
            entry[key] = _ratio(row[key], base[key])
            expected = key + "_expected"
            entry[expected] = _ratio(row.get(expected, row[key]), base.get(expected, base[key]))
        row["vs_vanilla"] = entry
        out.append(entry)
    return out


def acceptance(rows: list[dict]) -> dict:
    """The issue's check, computed from measurements only; a missing measurement is a FAIL."""
    target = next((r for r in rows if r["workload"] == ACCEPT_WORKLOAD and r["ratio_label"] == str(ACCEPT_RATIO)), None)
    vs = (target or {}).get("vs_vanilla", {})
    checks = {
        "prompt_tokens": (vs.get("prompt_tokens"), "<=", ACCEPT_MAX_SHRINK),
        "blocks_per_request": (vs.get("blocks_per_request"), "<=", ACCEPT_MAX_SHRINK),
        "resident_requests": (vs.get("resident_requests"), ">=", ACCEPT_MIN_GROWTH),
    }
    result = {}
    for name, (value, op, bound) in checks.items():
        ok = value is not None and (value <= bound if op == "<=" else value >= bound)
        result[name] = {"civic_over_vanilla": value, "requirement": f"{op} {bound}", "pass": ok}
    return {"workload": ACCEPT_WORKLOAD, "ratio": str(ACCEPT_RATIO), "checks": result,
            "pass": all(c["pass"] for c in result.values())}


def _fmt(value: float | None, spec: str = "d") -> str:
    return "n/a" if value is None else format(value, spec)


def _expected_resident(row: dict) -> str:
    """'15', or '15-20' when admission (prompt blocks only) lets more in for a few steps."""
    low, high = row["resident_requests_expected"], row["resident_requests_expected_at_admission"]
    return str(low) if low == high else f"{low}-{high}"


def print_table(rows: list[dict]) -> None:
    head = (f"{'workload':<16} {'config':<8} {'prompt':>6} {'blocks/req':>10} {'(exp)':>5} "
            f"{'resident':>8} {'(exp)':>5} {'prompt x':>8} {'blocks x':>8} {'resid. x':>8}")
    print(head)
    print("-" * len(head))
    for r in rows:
        vs = r.get("vs_vanilla", {})
        print(f"{r['workload']:<16} {r['config']:<8} {r['prompt_tokens']:>6} {_fmt(r['blocks_per_request']):>10} "
              f"{r['blocks_per_request_expected']:>5} {_fmt(r['resident_requests']):>8} "
              f"{_expected_resident(r):>5} {_fmt(vs.get('prompt_tokens'), '.3f'):>8} "
              f"{_fmt(vs.get('blocks_per_request'), '.3f'):>8} {_fmt(vs.get('resident_requests'), '.2f'):>8}")


def print_acceptance(acc: dict) -> None:
    print(f"\nAcceptance ({acc['workload']}, r = {acc['ratio']}, civic / vanilla, measured):")
    for name, c in acc["checks"].items():
        print(f"  {'PASS' if c['pass'] else 'FAIL'}  {name:<19} {_fmt(c['civic_over_vanilla'], '.3f'):>6} "
              f"(needs {c['requirement']})")
    print(f"  overall: {'PASS' if acc['pass'] else 'FAIL'}")


def plot(rows: list[dict], path: Path, pool: dict) -> None:
    """Bars of blocks/request and resident requests (measured), analytic as black ticks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    fig, axes = plt.subplots(2, len(workloads), figsize=(5.5 * len(workloads), 7.5), squeeze=False)
    metrics = [("blocks_per_request", "KV blocks per request"), ("resident_requests", "requests resident at once")]
    for col, name in enumerate(workloads):
        sub = [r for r in rows if r["workload"] == name]
        xs = np.arange(len(sub))
        for row_i, (key, title) in enumerate(metrics):
            ax = axes[row_i][col]
            values = [r[key] if r[key] is not None else 0 for r in sub]
            colours = ["#888888" if not r["civic"] else "#1f77b4" for r in sub]
            bars = ax.bar(xs, values, color=colours)
            labels = []
            for v, r in zip(values, sub):
                factor = (r.get("vs_vanilla") or {}).get(key)
                extra = f"\n{factor:.2f}x" if r["civic"] and factor is not None else ""
                labels.append(f"{v}\n{r['config']}{extra}" if r[key] is not None else f"n/a\n{r['config']}")
            ax.bar_label(bars, labels=labels, fontsize=8, padding=2)
            ax.scatter(xs, [r[key + "_expected"] for r in sub], marker="_", s=400, color="black",
                       zorder=3, label="analytic (prompt + output)")
            admission = [(x, r["resident_requests_expected_at_admission"]) for x, r in zip(xs, sub)
                         if key == "resident_requests"
                         and r["resident_requests_expected_at_admission"] != r["resident_requests_expected"]]
            if admission:
                ax.scatter(*zip(*admission), marker="_", s=400, color="darkorange", zorder=3,
                           label="analytic at admission (prompt only)")
            ax.set_xticks(xs, ["vanilla" if not r["civic"] else f"civic\n{r['config']}" for r in sub], fontsize=8)
            ax.set_title(f"{name}: {title}", fontsize=10)
            ax.set_ylim(0, max(values + [r[key + "_expected"] for r in sub]) * 1.4 + 1)
            ax.legend(fontsize=8, loc="upper left")
    fig.suptitle(f"One KV pool of {pool['num_blocks']} blocks x {pool['block_size']} tokens "
                 f"(measured bars, analytic ticks)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
