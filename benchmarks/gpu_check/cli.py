"""``python -m benchmarks.gpu_check``: parse the options, run the parts in budget, write the report."""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from datetime import datetime, timezone
from fractions import Fraction
from pathlib import Path
from typing import Any

from benchmarks.gpu_check.bench import part_bench
from benchmarks.gpu_check.call_site import part_call_site
from benchmarks.gpu_check.common import (
    PARTS,
    PREFILL_RESERVE_S,
    SCHEMA_VERSION,
    Budget,
    environment,
    import_module,
    kernels_compiled,
    log,
)
from benchmarks.gpu_check.kernels import part_kernels
from benchmarks.gpu_check.prefill import part_prefill
from benchmarks.gpu_check.report import default_out_dir, markdown, validate_report, write


def build_parser() -> argparse.ArgumentParser:
    exit_layers_arg = import_module("benchmarks.serve").exit_layers_arg

    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check",
                                     description=sys.modules["benchmarks.gpu_check"].__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="directory for gpu_check.json and gpu_check.md")
    parser.add_argument("--budget-s", type=float, default=420.0, help="the whole run's allowance (default 420)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    parser.add_argument("--ratio", type=Fraction, default=Fraction(1, 3), help="prefill: civic ratio (default 1/3)")
    parser.add_argument("--exit-layers", type=exit_layers_arg, default=(6,), help="prefill: exit layers besides none")
    parser.add_argument("--rounds", type=int, default=None, help="prefill: measured rounds (5 on CUDA, 1 on CPU)")
    parser.add_argument("--seed", type=int, default=0, help="prefill: first image seed")
    parser.add_argument("--prefill-preset", default=None, help="prefill: preset (qwen3-vl-2b on CUDA, tiny on CPU)")
    parser.add_argument("--prefill-size", type=int, default=None, help="prefill: image side (1344 on CUDA, 128 on CPU)")
    parser.add_argument("--prefill-dtype", default=None, choices=["bfloat16", "float32"],
                        help="prefill: model dtype (bfloat16 on CUDA, float32 on CPU)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if unknown := sorted(set(parts) - set(PARTS)):
        raise SystemExit(f"gpu_check: unknown parts {unknown}; choose from {PARTS}")
    budget = Budget(args.budget_s)
    import torch

    cuda = torch.cuda.is_available() and args.device != "cpu"
    if args.device == "cuda" and not cuda:
        raise SystemExit("gpu_check: --device cuda but CUDA is not available")
    if cuda and os.environ.pop("TRITON_INTERPRET", None) is not None:
        log("TRITON_INTERPRET unset: on CUDA the kernels are checked compiled")
    if not cuda:
        log("CUDA is absent: running the CPU harness check (Triton interpreter, small sizes); no GPU figure")
        os.environ.setdefault("TRITON_INTERPRET", "1")  # read when civic_vllm.kernels is first imported
    device = torch.device("cuda" if cuda else "cpu")
    out_dir = args.out or default_out_dir(cuda)
    report: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION, "benchmark": "gpu_check",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m benchmarks.gpu_check " + " ".join(sys.argv[1:] if argv is None else argv),
        "device": str(device), "cuda": cuda, "budget_s": args.budget_s, "duration_s": 0.0, "ok": True,
        "environment": environment(device), "kernels_compiled": kernels_compiled(),
        "parts": {name: {"status": "skipped", "reason": "not in --parts"} for name in PARTS},
    }
    runners = {
        "kernels": lambda: part_kernels(device, budget),
        "call_site": lambda: part_call_site(device, budget),
        "bench": lambda: part_bench(device, budget, report["environment"]),
        "prefill": lambda: part_prefill(device, budget, args),
    }
    reserve = {"prefill": PREFILL_RESERVE_S if cuda else 0.0}
    for name in parts:
        if not budget.allows(reserve.get(name, 0.0)):
            report["parts"][name] = {"status": "skipped", "reason": f"budget of {args.budget_s:g} s spent"}
            continue
        log(f"{name}: start ({budget.left():.0f} s left)")
        t = time.monotonic()
        try:
            result = runners[name]()
        except Exception as exc:  # noqa: BLE001 - written down; the next part still runs
            result = {"status": "error", "reason": f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-3000:]}"}
        if cuda:
            torch.cuda.synchronize()
        result["duration_s"] = round(time.monotonic() - t, 1)
        report["parts"][name] = result
        report["ok"] = all(p["status"] in ("pass", "skipped") for p in report["parts"].values())
        report["duration_s"] = round(budget.elapsed(), 1)
        write(report, out_dir)
        log(f"{name}: {result['status']} in {result['duration_s']} s")
    report["duration_s"] = round(budget.elapsed(), 1)
    problems = validate_report(report)
    if problems:
        report["ok"] = False
        report["schema_problems"] = problems
    write(report, out_dir)
    print(markdown(report))
    log(f"wrote {out_dir / 'gpu_check.json'} and gpu_check.md; ok={report['ok']}"
        + ("" if cuda else " (CUDA absent: CPU harness check only)"))
    return 0 if report["ok"] else 1

