"""Part 1: the Triton kernels against their torch references (copies exact, projections within 1.5x
the reference's own error)."""

from __future__ import annotations

import math

from benchmarks.gpu_check.common import (
    BENCH_PRESETS,
    ERROR_FLOOR,
    GROUP,
    IMAGE_SIDE,
    Budget,
    Steps,
    kernels_compiled,
    log,
    merged_tokens,
    part_status,
    seeded,
)


def dtype_of(name: str):
    import torch

    return getattr(torch, name)




def _index(kind: str, n: int, seed: int):
    """One, all, empty, or an unsorted int32 subset of about 2/3 with two repeats."""
    import torch

    subset = torch.randperm(n, generator=seeded(seed))[: max(1, (2 * n) // 3)]
    return {"one": torch.tensor([n - 1]), "all": torch.arange(n), "empty": torch.empty(0, dtype=torch.long),
            "subset": torch.cat([subset, subset[:2]]).to(torch.int32)}[kind]


def gather_cases(cuda: bool) -> list[dict]:
    """Odd sizes: N and the widths off BLOCK_M / BLOCK_N; the third source a column-strided view."""
    blocks, widths = (1763, (1024, 37, 1153)) if cuda else (50, (37, 16, 300))
    kinds = ("subset", "all", "one", "empty") if cuda else ("subset", "empty")
    return [
        {"op": "gather_rows", "dtype": dt, "rows_per_index": rpi, "n_blocks": blocks, "widths": list(widths),
         "index": kind}
        for dt in ("float32", "bfloat16") for rpi in (1, GROUP) for kind in kinds
    ]


def check_gather(case: dict, device) -> dict:
    import torch
    from civic_vllm.kernels import gather_rows, gather_rows_reference

    g = seeded(case["rows_per_index"])
    rows = case["n_blocks"] * case["rows_per_index"]
    sources = []
    for i, width in enumerate(case["widths"]):
        wide = torch.randn(rows, 2 * width if i == 2 else width, generator=g).to(device, dtype_of(case["dtype"]))
        sources.append(wide[:, ::2] if i == 2 else wide)
    index = _index(case["index"], case["n_blocks"], seed=3).to(device)
    out = gather_rows(sources, index, rows_per_index=case["rows_per_index"], backend="triton")
    ref = gather_rows_reference(sources, index, rows_per_index=case["rows_per_index"])
    exact = all(o.shape == r.shape and o.is_contiguous() and torch.equal(o, r) for o, r in zip(out, ref))
    return {**case, "ok": bool(exact and len(out) == len(sources)), "exact": bool(exact)}


def merge_cases(cuda: bool) -> list[dict]:
    """(C, N, D_out, index): small odd shapes, several blocks, the real 2B / 8B merger fc1 at r = 1/3."""
    from civic_vllm.model_factory import get_preset

    shapes = [(24, 10, 40, "subset"), (40, 80, 130, "subset")]
    if cuda:
        shapes += [(100, 77, 257, "all"), (40, 80, 130, "one")]
        for preset in BENCH_PRESETS:
            c = get_preset(preset).vision.hidden_size
            shapes.append((c, merged_tokens(preset, IMAGE_SIDE), GROUP * c, "subset"))
    cases = []
    for c, n, d_out, kind in shapes:
        for dt in ("float32", "bfloat16"):
            if not cuda and dt == "bfloat16" and n > 10:
                continue  # the interpreter's bf16 emulation is slow; the small shape covers it
            for post in (False, True):
                cases.append({"op": "gather_merge_project", "dtype": dt, "C": c, "N": n, "D_out": d_out,
                              "index": kind, "norm": "post_shuffle" if post else "per_patch", "bias": c != 100})
    return cases


def merge_inputs(c: int, n: int, d_out: int, norm_width: int, bias: bool, seed: int) -> dict:
    """fp32 CPU tensors: patch rows with a per-row offset (as vision activations have), LN and fc1 params."""
    import torch

    g = seeded(seed)
    return {
        "x": 2 * torch.randn(GROUP * n, c, generator=g) + 3 * torch.randn(GROUP * n, 1, generator=g),
        "norm_weight": 1 + 0.1 * torch.randn(norm_width, generator=g),
        "norm_bias": 0.1 * torch.randn(norm_width, generator=g),
        "weight": torch.randn(d_out, GROUP * c, generator=g) / math.sqrt(GROUP * c),
        "bias": 0.5 * torch.randn(d_out, generator=g) if bias else None,
    }


def cast_all(tensors: dict, device, dtype) -> dict:
    return {k: None if v is None else v.to(device, dtype) for k, v in tensors.items()}


def _max_err(a, b) -> float:
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0


def accuracy(out, ref, exact, dtype: str) -> dict:
    """Errors against float64: the kernel's may be at most 1.5x the same-dtype torch reference's plus a floor."""
    err, ref_err = _max_err(out, exact), _max_err(ref, exact)
    bound = 1.5 * ref_err + ERROR_FLOOR[dtype]
    return {"max_err": err, "reference_max_err": ref_err, "bound": bound,
            "max_abs_diff_vs_reference": _max_err(out, ref), "ok": bool(err <= bound)}


def check_merge(case: dict, device) -> dict:
    import torch
    from civic_vllm.kernels import gather_merge_project, gather_merge_project_reference

    c, n, d_out = case["C"], case["N"], case["D_out"]
    norm_width = GROUP * c if case["norm"] == "post_shuffle" else c
    params = merge_inputs(c, n, d_out, norm_width, case["bias"], seed=c + n)
    index = _index(case["index"], n, seed=5).to(device)
    low = cast_all(params, device, dtype_of(case["dtype"]))
    x = low.pop("x")
    out = gather_merge_project(x, index, **low, norm_width=norm_width, backend="triton")
    ref = gather_merge_project_reference(x, index, **low, norm_width=norm_width)
    high = cast_all({**low, "x": x}, device, torch.float64)
    exact = gather_merge_project_reference(high.pop("x"), index, **high, norm_width=norm_width)
    shape_ok = tuple(out.shape) == (index.numel(), d_out) and out.dtype == x.dtype
    acc = accuracy(out, ref, exact, case["dtype"])
    return {**case, "K": int(index.numel()), **acc, "ok": bool(acc["ok"] and shape_ok)}


def part_kernels(device, budget: Budget) -> dict:
    cuda = device.type == "cuda"
    compiled = kernels_compiled()
    if not compiled["triton"]:
        return {"status": "skipped", "reason": "triton is not importable", "kernels": compiled, "cases": []}
    interpreted = compiled["gather_rows_interpreted"] or compiled["gather_merge_project_interpreted"]
    if cuda and interpreted:
        return {"status": "fail", "reason": "CUDA present but the kernels were built by the Triton interpreter: "
                "unset TRITON_INTERPRET", "kernels": compiled, "cases": []}
    if not cuda and not interpreted:
        return {"status": "skipped", "reason": "no CUDA, and the kernels were imported without TRITON_INTERPRET=1",
                "kernels": compiled, "cases": []}
    steps, rows = Steps(budget), []
    for case in gather_cases(cuda) + merge_cases(cuda):
        check = check_gather if case["op"] == "gather_rows" else check_merge
        label = " ".join(f"{k}={v}" for k, v in case.items() if k != "widths")
        row = steps.run(label, lambda case=case, check=check: check(case, device))
        if row is not None:
            rows.append(row)
            if not row["ok"]:
                log(f"kernels: FAIL {label}: {row}")
    mode = "compiled on CUDA" if cuda else "Triton interpreter on CPU (small sizes)"
    return {"status": part_status(rows, steps.skipped), "mode": mode, "kernels": compiled,
            "passed": sum(r["ok"] for r in rows), "cases": rows, "skipped": steps.skipped}
