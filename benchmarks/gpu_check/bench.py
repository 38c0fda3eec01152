"""Part 3: kernel microbenchmarks with bytes moved and FLOPs as shares of the GPU's measured rates."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

from benchmarks.gpu_check.common import (
    BENCH_PRESETS,
    BENCH_RATIOS,
    CPU_IMAGE_SIDE,
    GROUP,
    IMAGE_SIDE,
    Budget,
    Steps,
    kept_groups,
    merged_tokens,
    seeded,
    triton_kernels,
)
from benchmarks.gpu_check.kernels import cast_all, merge_inputs


def make_timer(device, cpu_reps: int = 3) -> Callable[[Callable[[], object]], dict]:
    """CUDA: triton.testing.do_bench (median, 20th and 80th percentile, ms). CPU: perf_counter over a few calls."""
    if device.type == "cuda":
        from triton.testing import do_bench

        def cuda_time(fn: Callable[[], object]) -> dict:
            median, p20, p80 = do_bench(fn, warmup=10, rep=40, quantiles=[0.5, 0.2, 0.8])
            return {"ms": median, "p20_ms": p20, "p80_ms": p80, "timer": "triton.testing.do_bench"}

        return cuda_time

    def cpu_time(fn: Callable[[], object]) -> dict:
        fn()
        times = []
        for _ in range(cpu_reps):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
        return {"ms": statistics.median(times), "p20_ms": min(times), "p80_ms": max(times), "timer": "perf_counter"}

    return cpu_time


def roofline(device, timer) -> dict:
    """What the GPU does on plain work: a device-to-device copy (bytes read + written) and a bf16 matmul."""
    import torch

    if device.type != "cuda":
        return {"copy_gbs": None, "matmul_tflops": None, "note": "no CUDA: no reference rates"}
    src = torch.empty(2**28, dtype=torch.float32, device=device)  # 1 GiB
    dst = torch.empty_like(src)
    copy = timer(lambda: dst.copy_(src))
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    mm = timer(lambda: a @ b)
    return {"copy_gbs": 2 * 2**30 / (copy["ms"] * 1e-3) / 1e9, "copy_ms": copy["ms"],
            "matmul_tflops": 2 * 8192**3 / (mm["ms"] * 1e-3) / 1e12, "matmul_ms": mm["ms"],
            "matmul_shape": [8192, 8192, 8192]}


def rates(row: dict, nbytes: float, flops: float, refs: dict) -> dict:
    """Bytes and FLOPs of a timed op, and as shares of the GPU's reference rates."""
    seconds = row["ms"] * 1e-3
    out = {**row, "min_bytes": nbytes, "flops": flops, "gbs": nbytes / seconds / 1e9,
           "tflops": flops / seconds / 1e12}
    for key, ref in (("of_spec_bandwidth", refs.get("spec_bandwidth_gbs")),
                     ("of_copy_bandwidth", refs.get("copy_gbs"))):
        out[key] = out["gbs"] / ref if ref else None
    out["of_matmul_rate"] = out["tflops"] / refs["matmul_tflops"] if refs.get("matmul_tflops") else None
    return out


def bench_merger(preset: str, side: int, device, dtype, timer, refs: dict, steps: Steps) -> list[dict]:
    """Both merger norms (per-patch: the main merger; post-shuffle: the DeepStack mergers)."""
    return [row for post in (False, True) for row in bench_merger_norm(preset, side, post, device, dtype, timer,
                                                                       refs, steps)]


def bench_merger_norm(preset: str, side: int, post: bool, device, dtype, timer, refs: dict,
                      steps: Steps) -> list[dict]:
    """The stock LN + fc1 on all N groups, then per ratio the fused kernel and the unfused torch path on K."""
    import torch.nn.functional as F
    from civic_vllm.kernels import gather_merge_project, gather_merge_project_reference

    from civic_vllm.model_factory import get_preset

    c = get_preset(preset).vision.hidden_size
    n, width, e = merged_tokens(preset, side), GROUP * c, dtype.itemsize
    norm_width = width if post else c
    p = cast_all(merge_inputs(c, n, width, norm_width, bias=True, seed=c), device, dtype)
    x = p.pop("x")
    params_bytes = (width * width + width + 2 * norm_width) * e
    label = {"preset": preset, "C": c, "N": n, "D_out": width, "norm": "post_shuffle" if post else "per_patch"}

    def stock():  # vLLM's merger up to linear_fc1, on every group
        h = F.layer_norm(x.view(-1, width) if post else x, (norm_width,), p["norm_weight"], p["norm_bias"], 1e-6)
        return F.linear(h.view(-1, width), p["weight"], p["bias"])

    rows = []
    t = steps.run(f"{preset} {label['norm']} stock", lambda: timer(stock))
    if t is not None:
        nbytes = n * width * e * 3 + params_bytes + n * width * e  # rows read, LN out written + read, W, output
        rows.append({**label, "ratio": "1", "K": n, "path": "stock LN + fc1 on all N",
                     **rates(t, nbytes, 2 * n * width * width, refs)})
    for ratio in BENCH_RATIOS:
        idx = kept_groups(n, ratio, seed=c).to(device)
        k = int(idx.numel())
        paths = {
            "fused gather_merge_project on K": (
                lambda idx=idx: gather_merge_project(x, idx, **p, norm_width=norm_width, backend="auto"),
                k * width * e + params_bytes + k * width * e),  # kept rows once, W, output
            "torch index_select + LN + fc1 on K": (
                lambda idx=idx: gather_merge_project_reference(x, idx, **p, norm_width=norm_width),
                k * width * e * 5 + params_bytes + k * width * e),  # gather r+w, LN r+w, fc1 read
        }
        for path, (fn, nbytes) in paths.items():
            t = steps.run(f"{preset} {label['norm']} r={ratio} {path}", lambda fn=fn: timer(fn))
            if t is not None:
                rows.append({**label, "ratio": str(ratio), "K": k, "path": path,
                             **rates(t, nbytes, 2 * k * width * width, refs)})
    return rows


def bench_gather(preset: str, side: int, device, dtype, timer, refs: dict, steps: Steps) -> list[dict]:
    """The compaction at an early exit layer: patch rows, rotary cos / sin and one DeepStack tap, K of N groups."""
    import torch
    from civic_vllm.kernels import gather_rows, gather_rows_reference

    from civic_vllm.model_factory import get_preset

    v = get_preset(preset).vision
    n, head = merged_tokens(preset, side), v.hidden_size // v.num_heads
    widths = [v.hidden_size, head // 2, head // 2, v.hidden_size]
    g = seeded(n)
    sources = [torch.randn(GROUP * n, w, generator=g).to(device, dtype) for w in widths]
    rows = []
    for ratio in BENCH_RATIOS:
        idx = kept_groups(n, ratio, seed=n).to(device)
        k = int(idx.numel())
        nbytes = 2 * GROUP * k * sum(widths) * dtype.itemsize  # read and write each kept row
        paths = {
            "gather_rows (one launch)": lambda idx=idx: gather_rows(sources, idx, rows_per_index=GROUP),
            "index_select per tensor": lambda idx=idx: gather_rows_reference(sources, idx, rows_per_index=GROUP),
        }
        for path, fn in paths.items():
            t = steps.run(f"{preset} gather r={ratio} {path}", lambda fn=fn: timer(fn))
            if t is not None:
                rows.append({"preset": preset, "N": n, "widths": widths, "ratio": str(ratio), "K": k, "path": path,
                             **rates(t, nbytes, 0.0, refs)})
    return rows


def part_bench(device, budget: Budget, env: dict) -> dict:
    import torch
    from civic_vllm.kernels import _dispatch

    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    timer = make_timer(device)
    steps = Steps(budget)
    refs = steps.run("roofline", lambda: roofline(device, timer)) or {}
    refs["spec_bandwidth_gbs"] = (env.get("gpu") or {}).get("spec_bandwidth_gbs")
    presets, side = (BENCH_PRESETS, IMAGE_SIDE) if cuda else (BENCH_PRESETS[:1], CPU_IMAGE_SIDE)
    merger, gather = [], []
    for preset in presets:
        merger += bench_merger(preset, side, device, dtype, timer, refs, steps)
        gather += bench_gather(preset, side, device, dtype, timer, refs, steps)
    ok = bool(merger or gather) and all(r["ms"] > 0 for r in merger + gather)
    probe = torch.empty(1, device=device)
    backends = {op: _dispatch.resolve_backend("auto", [probe], kernel, op) for op, kernel in triton_kernels().items()}
    return {"status": ("pass" if ok else "fail") if merger or gather else "skipped",
            "what": "GPU figures (do_bench)" if cuda else "CPU harness check: times are not GPU figures",
            "backends": backends, "dtype": str(dtype).removeprefix("torch."), "image_side": side,
            "reference_rates": refs,
            "merger": merger, "gather": gather, "skipped": steps.skipped}
