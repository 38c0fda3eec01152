"""Benchmark CIVIC's merger kernels against the vanilla Qwen3-VL merger path.

(a) vanilla: LayerNorm + linear_fc1 on all N merged groups (what vLLM runs);
(b) civic:   gather_merge_project on the K = r*N kept groups;
(c) gather_rows of 4 patch-row tensors (last hidden state + 3 deepstack
    features) in one call vs 4 separate index_selects.

Runs the torch path on CPU today and the Triton kernels on CUDA when a GPU and
triton are present (the output says which). Writes JSON + PNG to
benchmarks/results/kernels/.

    python benchmarks/kernels/bench_kernels.py --quick
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from civic_vllm.kernels import gather_merge_project, gather_rows, gather_rows_reference
from civic_vllm.kernels._dispatch import HAS_TRITON, resolve_backend

GROUP = 4  # 2x2 spatial merge
IMAGE_SIDE = 1344  # px; patch 16, merge 2 -> (1344 / 32)^2 = 1764 merged tokens
N_GROUPS = (IMAGE_SIDE // 32) ** 2
RATIOS = (1.0, 0.5, 1 / 3, 0.25)
WIDTHS = (1024, 1152)  # vision hidden size C of Qwen3-VL towers
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The package re-exports functions named like their modules, hence import_module.
_MERGE_KERNEL = importlib.import_module("civic_vllm.kernels.merge_projection")._gather_merge_project_kernel
_GATHER_KERNEL = importlib.import_module("civic_vllm.kernels.gather_rows")._gather_rows_kernel
RESULTS_DIR = Path(__file__).resolve().parents[1] / "results" / "kernels"


def _timer(device: torch.device, warmup: int, repeats: int) -> Callable[[Callable[[], object]], list[float]]:
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def run(fn: Callable[[], object]) -> list[float]:
        for _ in range(warmup):
            fn()
        sync()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t0)
        return times

    return run


def _machine(device: torch.device) -> dict:
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "triton": None,
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    if HAS_TRITON:
        import triton

        info["triton"] = triton.__version__
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def bench_merge(c: int, post_shuffle: bool, dtype: torch.dtype, device: torch.device, timer) -> dict:
    """Vanilla LN+fc1 on all N groups vs gather_merge_project on K groups."""
    g = torch.Generator(device="cpu").manual_seed(c)
    width = GROUP * c
    norm_width = width if post_shuffle else c
    x = torch.randn(GROUP * N_GROUPS, c, generator=g).to(device, dtype)
    nw = (1 + 0.1 * torch.randn(norm_width, generator=g)).to(device, dtype)
    nb = (0.1 * torch.randn(norm_width, generator=g)).to(device, dtype)
    w1 = (torch.randn(width, width, generator=g) / width**0.5).to(device, dtype)
    b1 = (0.1 * torch.randn(width, generator=g)).to(device, dtype)

    def vanilla() -> torch.Tensor:  # Qwen3_VisionPatchMerger.forward up to linear_fc1
        if post_shuffle:
            h = F.layer_norm(x.view(-1, width), (width,), nw, nb, 1e-6)
        else:
            h = F.layer_norm(x, (c,), nw, nb, 1e-6).view(-1, width)
        return F.linear(h, w1, b1)

    backend = resolve_backend("auto", [x], _MERGE_KERNEL, "bench")
    vanilla_times = timer(vanilla)
    rows = []
    for r in RATIOS:
        k = max(1, round(r * N_GROUPS))
        idx = torch.randperm(N_GROUPS, generator=g)[:k].sort().values.to(device)
        row = {"ratio": r, "K": k}
        row["civic_s"] = timer(
            lambda idx=idx: gather_merge_project(x, idx, nw, nb, w1, b1, norm_width=norm_width, backend="auto")
        )
        if backend == "triton":  # the unfused torch path on the same device, for reference
            row["civic_torch_s"] = timer(
                lambda idx=idx: gather_merge_project(x, idx, nw, nb, w1, b1, norm_width=norm_width, backend="torch")
            )
        rows.append(row)
    return {
        "C": c,
        "N": N_GROUPS,
        "D_out": width,
        "norm": "post_shuffle" if post_shuffle else "per_patch",
        "backend": backend,
        "vanilla_s": vanilla_times,
        "civic": rows,
    }


def bench_gather(c: int, dtype: torch.dtype, device: torch.device, timer) -> dict:
    """gather_rows over 4 [4N, C] tensors vs 4 index_selects with one expanded index."""
    g = torch.Generator(device="cpu").manual_seed(c + 1)
    sources = [torch.randn(GROUP * N_GROUPS, c, generator=g).to(device, dtype) for _ in range(4)]
    backend = resolve_backend("auto", sources, _GATHER_KERNEL, "bench")
    rows = []
    for r in RATIOS:
        k = max(1, round(r * N_GROUPS))
        idx = torch.randperm(N_GROUPS, generator=g)[:k].sort().values.to(device)
        rows.append(
            {
                "ratio": r,
                "K": k,
                "fused_s": timer(lambda idx=idx: gather_rows(sources, idx, rows_per_index=GROUP, backend="auto")),
                "index_select_s": timer(lambda idx=idx: gather_rows_reference(sources, idx, rows_per_index=GROUP)),
            }
        )
    return {"C": c, "rows": GROUP * N_GROUPS, "n_sources": 4, "backend": backend, "gather": rows}


def _summarise(results: dict) -> None:
    """Add medians and civic/vanilla ratios next to the raw repeat times."""
    med = statistics.median
    for m in results["merge"]:
        m["vanilla_median_s"] = med(m["vanilla_s"])
        for row in m["civic"]:
            row["civic_median_s"] = med(row["civic_s"])
            row["civic_over_vanilla"] = row["civic_median_s"] / m["vanilla_median_s"]
            if "civic_torch_s" in row:
                row["civic_torch_median_s"] = med(row["civic_torch_s"])
    for gth in results["gather"]:
        for row in gth["gather"]:
            row["fused_median_s"] = med(row["fused_s"])
            row["index_select_median_s"] = med(row["index_select_s"])
            row["fused_over_index_select"] = row["fused_median_s"] / row["index_select_median_s"]


def _print(results: dict) -> None:
    m0 = results["machine"]
    print(f"device={m0['device']} dtype={results['dtype']} threads={m0['torch_threads']} "
          f"torch={m0['torch']} triton={m0['triton']}")
    for m in results["merge"]:
        print(f"\nmerge LN+fc1  C={m['C']} N={m['N']} D_out={m['D_out']} norm={m['norm']} "
              f"backend={m['backend']}: vanilla {m['vanilla_median_s'] * 1e3:.2f} ms")
        for row in m["civic"]:
            extra = ""
            if "civic_torch_median_s" in row:
                extra = f"  (torch {row['civic_torch_median_s'] * 1e3:.2f} ms)"
            print(f"  r={row['ratio']:.3f} K={row['K']:5d}: civic {row['civic_median_s'] * 1e3:8.2f} ms"
                  f"  civic/vanilla {row['civic_over_vanilla']:.3f}{extra}")
    for gth in results["gather"]:
        print(f"\ngather_rows 4 x [{gth['rows']}, {gth['C']}] backend={gth['backend']}")
        for row in gth["gather"]:
            print(f"  r={row['ratio']:.3f} K={row['K']:5d}: fused {row['fused_median_s'] * 1e3:7.3f} ms"
                  f"  4x index_select {row['index_select_median_s'] * 1e3:7.3f} ms"
                  f"  ratio {row['fused_over_index_select']:.2f}")


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_m, ax_g) = plt.subplots(1, 2, figsize=(11, 4.2))
    for m in results["merge"]:
        label = f"C={m['C']} {m['norm']}"
        rs = [row["ratio"] for row in m["civic"]]
        ys = [row["civic_over_vanilla"] for row in m["civic"]]
        ax_m.plot(rs, ys, "o-", label=f"civic ({m['backend']}) {label}")
    ax_m.plot([0, 1], [0, 1], ":", color="gray", label="ideal (= r)")
    ax_m.axhline(1.0, color="black", lw=0.8)
    ax_m.set(xlabel="kept ratio r = K/N", ylabel="time / vanilla (all N)", title="LN + fc1 of the merger",
             xlim=(0, 1.05), ylim=(0, None))
    ax_m.legend(fontsize=7)
    for gth in results["gather"]:
        rs = [row["ratio"] for row in gth["gather"]]
        ax_g.plot(rs, [row["fused_median_s"] * 1e3 for row in gth["gather"]], "o-",
                  label=f"gather_rows ({gth['backend']}) C={gth['C']}")
        ax_g.plot(rs, [row["index_select_median_s"] * 1e3 for row in gth["gather"]], "s--",
                  label=f"4x index_select C={gth['C']}")
    ax_g.set(xlabel="kept ratio r = K/N", ylabel="median time (ms)", title="gather 4 tensors [4N, C]",
             xlim=(0, 1.05), ylim=(0, None))
    ax_g.legend(fontsize=7)
    m0 = results["machine"]
    fig.suptitle(f"{m0.get('gpu', m0['processor'])}, {results['dtype']}, {m0['torch_threads']} thread(s), "
                 f"N={N_GROUPS}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="C=1024, per-patch norm only, fewer repeats")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                        help="auto: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (median reported)")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          args.device if args.device != "auto" else "cpu")
    dtype = DTYPES[args.dtype] if args.dtype != "auto" else (
        torch.bfloat16 if device.type == "cuda" else torch.float32)
    torch.set_num_threads(args.threads)
    repeats = args.repeats or (3 if args.quick else 7)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    if device.type == "cuda":  # cheap per call: more repeats, warm-up also compiles Triton
        repeats, warmup = repeats * 5, warmup + 3
    widths = WIDTHS[:1] if args.quick else WIDTHS
    norms = (False,) if args.quick else (False, True)
    timer = _timer(device, warmup, repeats)

    results = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "quick": args.quick,
        "machine": _machine(device),
        "dtype": str(dtype).removeprefix("torch."),
        "repeats": repeats,
        "warmup": warmup,
        "image_side_px": IMAGE_SIDE,
        "N": N_GROUPS,
        "ratios": list(RATIOS),
        "merge": [bench_merge(c, post, dtype, device, timer) for c in widths for post in norms],
        # Gathers take milliseconds: more repeats for a stable median.
        "gather": [bench_gather(c, dtype, device, _timer(device, warmup + 2, repeats * 5)) for c in widths],
    }
    _summarise(results)
    _print(results)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"bench_kernels_{device.type}" + ("_quick" if args.quick else "")
    (args.out_dir / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
    _plot(results, args.out_dir / f"{stem}.png")
    print(f"\nwrote {args.out_dir / stem}.json and .png")
    return results


if __name__ == "__main__":
    main()
