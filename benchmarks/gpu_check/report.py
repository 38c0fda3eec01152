"""The report: JSON schema check, Markdown summary, output files."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from benchmarks.gpu_check.common import PARTS, ROOT, SCHEMA_VERSION, STATUSES

REPORT_KEYS = {"schema_version": int, "benchmark": str, "created": str, "command": str, "device": str, "cuda": bool,
               "budget_s": (int, float), "duration_s": (int, float), "ok": bool, "environment": dict, "parts": dict}
PART_KEYS = {
    "kernels": {"cases": list},
    "call_site": {"cases": list, "function": str},
    "bench": {"merger": list, "gather": list, "reference_rates": dict},
    "prefill": {"results": dict, "planner_limits": dict, "rounds": list, "configs": list},
}
ROW_KEYS = {
    "kernels": {"op": str, "dtype": str, "ok": bool},
    "call_site": {"preset": str, "dtype": str, "path": str, "calls": dict, "levels": list, "ok": bool},
    "merger": {"preset": str, "ratio": str, "K": int, "path": str, "ms": float, "min_bytes": (int, float),
               "gbs": float, "tflops": float},
    "gather": {"preset": str, "ratio": str, "K": int, "path": str, "ms": float, "gbs": float},
    "prefill": {"median_s": (int, float, type(None)), "speedup_vs_full": (int, float, type(None)), "kept_tokens": int},
}


def _check_keys(obj: Any, keys: dict, where: str) -> list[str]:
    if not isinstance(obj, dict):
        return [f"{where}: not an object"]
    problems = []
    for key, kind in keys.items():
        if key not in obj:
            problems.append(f"{where}: missing {key!r}")
        elif not isinstance(obj[key], kind) or (kind is int and isinstance(obj[key], bool)):
            problems.append(f"{where}.{key}: {type(obj[key]).__name__}, expected {kind}")
    return problems


def validate_report(report: Any) -> list[str]:
    """Problems with the report's shape (empty when it is well formed); parts that ran carry their rows."""
    problems = _check_keys(report, REPORT_KEYS, "report")
    if problems:
        return problems
    if report["schema_version"] != SCHEMA_VERSION:
        problems.append(f"report.schema_version {report['schema_version']} != {SCHEMA_VERSION}")
    for name in PARTS:
        part = report["parts"].get(name)
        if not isinstance(part, dict) or part.get("status") not in STATUSES:
            problems.append(f"parts.{name}: missing, or status not one of {STATUSES}")
            continue
        if part["status"] == "error" and not isinstance(part.get("reason"), str):
            problems.append(f"parts.{name}: error without a reason")
        if part["status"] in ("skipped", "error"):
            if not isinstance(part.get("reason"), str) and not isinstance(part.get("skipped"), list):
                problems.append(f"parts.{name}: {part['status']} without a reason")
            continue
        problems += _check_keys(part, PART_KEYS[name], f"parts.{name}")
        if name == "bench":
            for table in ("merger", "gather"):
                for i, row in enumerate(part.get(table, [])):
                    problems += _check_keys(row, ROW_KEYS[table], f"parts.bench.{table}[{i}]")
        elif name == "prefill":
            for label, row in part.get("results", {}).items():
                problems += _check_keys(row, ROW_KEYS["prefill"], f"parts.prefill.results[{label!r}]")
        else:
            for i, row in enumerate(part.get("cases", [])):
                problems += _check_keys(row, ROW_KEYS[name], f"parts.{name}.cases[{i}]")
    expected_ok = all(report["parts"][p].get("status") in ("pass", "skipped") for p in PARTS if p in report["parts"])
    if report["ok"] != expected_ok:
        problems.append(f"report.ok is {report['ok']} but the parts' statuses say {expected_ok}")
    return problems


def _fmt(value: Any, spec: str = ".3g") -> str:
    return "-" if value is None else format(value, spec)


def markdown(report: dict) -> str:
    env, parts = report["environment"], report["parts"]
    gpu = env.get("gpu") or {}
    lines = [f"# GPU check ({report['created']})", ""]
    if not report["cuda"]:
        lines += ["**CUDA absent: a CPU harness check. Every time below is a CPU time on small sizes, not a GPU "
                  "figure.**", ""]
    lines += [f"device {gpu.get('name', report['device'])}, torch {env['torch']}, triton {env['triton']}, "
              f"transformers {env['transformers']}, vLLM installed: {env['vllm']['installed']}; "
              f"{report['duration_s']:.0f} s of a {report['budget_s']:g} s budget; ok: **{report['ok']}**", "",
              "| part | status | note |", "| --- | --- | --- |"]
    for name in PARTS:
        part = parts.get(name, {})
        note = part.get("reason") or part.get("mode") or part.get("what") or ""
        if part.get("cases") is not None:
            note += f" ({sum(c['ok'] for c in part['cases'])}/{len(part['cases'])} cases pass)"
        if part.get("skipped"):
            note += f"; left out for the budget: {len(part['skipped'])}"
        lines.append(f"| {name} | {part.get('status', '-')} | {note.strip()} |")
    bench = parts.get("bench", {})
    if bench.get("merger") or bench.get("gather"):
        refs = bench["reference_rates"]
        lines += ["", f"## Microbenchmarks ({bench['dtype']}, {bench['image_side']}² image)", "",
                  f"reference rates: spec bandwidth {_fmt(refs.get('spec_bandwidth_gbs'), '.0f')} GB/s, measured "
                  f"copy {_fmt(refs.get('copy_gbs'), '.0f')} GB/s, bf16 matmul {_fmt(refs.get('matmul_tflops'), '.0f')}"
                  " TFLOP/s", "",
                  "| preset | op | r | K | path | ms (median) | GB/s | share of spec bandwidth | TFLOP/s |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for row in bench["merger"] + bench["gather"]:
            op = f"merger {row['norm']}" if "norm" in row else "compaction"
            lines.append(f"| {row['preset']} | {op} | {row['ratio']} | {row['K']} | {row['path']} | {row['ms']:.4g} | "
                         f"{row['gbs']:.4g} | {_fmt(row['of_spec_bandwidth'], '.1%')} | {row['tflops']:.3g} |")
    prefill = parts.get("prefill", {})
    if prefill.get("results"):
        lines += ["", f"## Prefill ({prefill['preset']}, {prefill['image_side']}² image, {prefill['dtype']}, "
                  f"{prefill['timer']}, {prefill['rounds_done']} rounds, policy {prefill['policy']})", "",
                  "| configuration | kept tokens | median ms | speed-up vs full (TTFT ratio) "
                  "| FLOP limit (civic plan) |",
                  "| --- | --- | --- | --- | --- |"]
        for label, e in prefill["results"].items():
            median = None if e["median_s"] is None else e["median_s"] * 1e3
            lines.append(f"| {label} | {e['kept_tokens']} | {_fmt(median, '.4g')} | "
                         f"{_fmt(e['speedup_vs_full'], '.3g')} | {_fmt(e.get('flop_limit'), '.3g')} |")
    for name in PARTS:
        if parts.get(name, {}).get("status") == "error":
            lines += ["", f"## {name}: error", "", "```", parts[name]["reason"], "```"]
    return "\n".join(lines) + "\n"


def default_out_dir(cuda: bool) -> Path:
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"])
    return ROOT / "benchmarks" / "results" / ("gpu" if cuda else "tmp/gpu_check")


def write(report: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (out_dir / "gpu_check.md").write_text(markdown(report))
