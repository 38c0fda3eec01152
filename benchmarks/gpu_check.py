"""The prepared GPU check: the Triton kernels compiled on CUDA, the fused merger's call site, kernel
microbenchmarks and the HF compact prefill, in one run that fits a short GPU lease.

    PYTHONPATH=. python -m benchmarks.gpu_check [--out DIR] [--budget-s 420] [--parts kernels,call_site,bench,prefill]
    make gpu-check                      # the same with the machine's own python; GPU_CHECK_ARGS=... passes options

Installs nothing and needs no vLLM: torch, triton, transformers, numpy, pillow and requests are what it imports.
Four parts, each recorded on its own (an error in one is written down and the next part still runs):

1. ``kernels``: ``gather_rows`` and ``gather_merge_project`` against their torch references, fp32 and bf16, odd
   sizes (index unsorted with repeats, int32, empty, one row; strided sources; C, K and D_out off the block sizes;
   the real Qwen3-VL-2B/8B merger shapes). On CUDA the kernels must be *compiled* (``TRITON_INTERPRET`` unset). A
   copy must be exact; a projection passes when its error against a float64 reference is at most 1.5x the torch
   reference's own error in the same dtype plus a small floor.
2. ``call_site``: ``civic_vllm.vllm_adapter.vision.merge_kept_groups``, the production function, on mergers built
   like vLLM's ``Qwen3_VisionPatchMerger`` (per-patch norm for the main merger, post-shuffle norm for the three
   DeepStack mergers, ``linear_fc1`` unquantized). On CUDA it must take the fused path (one ``gather_merge_project``
   per level, counted), elsewhere the gather + stock-merger path; either must match the stock merger on all N
   groups, then indexed.
3. ``bench``: ``triton.testing.do_bench`` medians for the Qwen3-VL-2B and -8B vision widths at one 1344x1344 image
   (N = 1764 merged tokens), r = 1, 1/2, 1/3, bf16: the fused gather + LayerNorm + ``linear_fc1`` on K groups vs the
   unfused torch path on K groups (index_select, layer_norm, linear) vs the stock path on all N; ``gather_rows`` of
   the compacted tensors (patch rows, rotary cos/sin, one DeepStack tap) vs one ``index_select`` each. Each row has
   its minimum bytes moved and FLOPs, and those as a share of the GPU's bandwidth (from its memory clock and bus
   width, and a measured device-to-device copy) and of a measured bf16 matmul rate.
4. ``prefill``: ``civic_vllm.hf_compact`` (through ``benchmarks.serve.hf_compact_prefill``) on the ``qwen3-vl-2b``
   preset with random weights, one 1344x1344 image, bf16: full vs civic r = 1/3 (policy learned, a seeded random
   scorer) with exit none and exit 6, timed with CUDA events, warm-up round then rounds in rotating order; the
   speed-up (TTFT ratio) next to ``civic plan``'s FLOP limit for the same model, image, question and exit layer.

Without CUDA it runs the same code at small sizes, as a harness check whose times mean nothing: the kernels under
the Triton interpreter, the call site's non-fused path, the benchmarks timed with perf_counter, the prefill on the
``tiny`` preset. It says that CUDA is absent and exits 0 when every part passed or was skipped, 1 otherwise.

``--budget-s`` (default 420) is the whole run's allowance: no case, benchmark row or prefill round starts when the
time it is expected to take (the last one's) would pass it; what was left out is listed under ``skipped``. The JSON
(``gpu_check.json``) and a Markdown summary (``gpu_check.md``) are rewritten after every part, so a killed run still
leaves what it measured. Default directory: ``$OUT`` when set, else ``benchmarks/results/gpu/`` on CUDA and
``benchmarks/results/tmp/gpu_check/`` without it.

Without vLLM: ``benchmarks.serve`` and ``civic_vllm.vllm_adapter.vision`` import vLLM names at module level that
the functions used here never call; they are then imported with empty placeholder ``vllm`` modules (listed in the
JSON under ``environment.vllm.placeholders``), removed again right after.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from fractions import Fraction
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SCHEMA_VERSION = 1
PARTS = ("kernels", "call_site", "bench", "prefill")
STATUSES = ("pass", "fail", "error", "skipped")
IMAGE_SIDE = 1344  # px: (1344 / 32)^2 = 1764 merged tokens
CPU_IMAGE_SIDE = 224  # the harness check's image side for call_site and bench (49 merged tokens)
BENCH_PRESETS = ("qwen3-vl-2b", "qwen3-vl-8b")
BENCH_RATIOS = (Fraction(1), Fraction(1, 2), Fraction(1, 3))
DEEPSTACK_LEVELS = 3
GROUP = 4  # patch rows per merged token (2x2)
# Accuracy floors added to "1.5x the torch reference's own error" (float64-exact comparison).
ERROR_FLOOR = {"float32": 1e-5, "bfloat16": 1e-3}
# The prefill part starts on CUDA only with this much budget left: building the model and a warm-up round.
PREFILL_RESERVE_S = 60.0


def log(message: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---------------------------------------------------------------------------------------------------------------
# Budget and per-part bookkeeping
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Budget:
    """The run's time allowance; ``allows(estimate)`` says whether a step of that length still fits."""

    seconds: float
    started: float = field(default_factory=time.monotonic)

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def left(self) -> float:
        return self.seconds - self.elapsed()

    def allows(self, estimate_s: float = 0.0) -> bool:
        return self.left() > estimate_s


@dataclass
class Steps:
    """Runs a part's steps while the budget allows, each one's duration the next one's estimate."""

    budget: Budget
    skipped: list[str] = field(default_factory=list)
    last_s: float = 0.0

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        if not self.budget.allows(self.last_s):
            self.skipped.append(name)
            return None
        t = time.monotonic()
        try:
            return fn()
        finally:
            self.last_s = time.monotonic() - t


def part_status(rows: list[dict], skipped: list[str]) -> str:
    """fail if any row failed; pass if some ran and all passed; skipped if none ran."""
    if any(not r["ok"] for r in rows):
        return "fail"
    return "pass" if rows else "skipped"


# ---------------------------------------------------------------------------------------------------------------
# vLLM: optional
# ---------------------------------------------------------------------------------------------------------------


def vllm_available() -> bool:
    try:
        return importlib.util.find_spec("vllm") is not None
    except (ImportError, ValueError):
        return False


class _Placeholders(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Empty ``vllm`` / ``vllm.*`` modules whose every attribute is a fresh empty class."""

    def __init__(self) -> None:
        self.made: list[str] = []

    def find_spec(self, fullname, path=None, target=None):  # noqa: ANN001 - importlib's signature
        if fullname == "vllm" or fullname.startswith("vllm."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):  # noqa: ANN001
        module = types.ModuleType(spec.name)
        module.__path__ = []

        def placeholder(name: str) -> type:
            if name.startswith("__"):
                raise AttributeError(name)
            return type(name, (), {"__module__": spec.name, "__doc__": "gpu_check placeholder (no vLLM)"})

        module.__getattr__ = placeholder
        self.made.append(spec.name)
        return module

    def exec_module(self, module) -> None:  # noqa: ANN001
        pass


@contextlib.contextmanager
def vllm_placeholders(record: list[str]) -> Iterator[None]:
    """Inside: ``import vllm...`` gives placeholders when vLLM is not installed; the names made go to ``record``."""
    if vllm_available():
        yield
        return
    saved = {name: mod for name, mod in sys.modules.items() if name == "vllm" or name.startswith("vllm.")}
    for name in saved:  # a None entry (an import blocker) would stop the finder from being asked
        del sys.modules[name]
    finder = _Placeholders()
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)
        for name in finder.made:
            sys.modules.pop(name, None)
        sys.modules.update(saved)
        record.extend(n for n in finder.made if n not in record)


PLACEHOLDERS: list[str] = []  # the placeholder vllm modules this process made


def import_module(name: str) -> types.ModuleType:
    """``importlib.import_module``, with placeholder vllm modules while vLLM is not installed."""
    with vllm_placeholders(PLACEHOLDERS):
        return importlib.import_module(name)


# ---------------------------------------------------------------------------------------------------------------
# Environment
# ---------------------------------------------------------------------------------------------------------------


def environment(device) -> dict:
    import torch
    from civic_vllm.kernels import _dispatch

    env: dict[str, Any] = {
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": None,
        "transformers": None,
        "triton_interpret": os.environ.get("TRITON_INTERPRET"),
        "vllm": {"installed": vllm_available(), "placeholders": PLACEHOLDERS},
        "cuda": device.type == "cuda",
        "gpu": None,
    }
    if _dispatch.HAS_TRITON:
        env["triton"] = _dispatch.triton.__version__
    with contextlib.suppress(ImportError):
        import transformers

        env["transformers"] = transformers.__version__
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        clock_khz = getattr(props, "memory_clock_rate", None)
        bus_bits = getattr(props, "memory_bus_width", None)
        env["gpu"] = {
            "name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "multiprocessors": props.multi_processor_count,
            "memory_gib": round(props.total_memory / 2**30, 1),
            "memory_clock_khz": clock_khz,
            "memory_bus_bits": bus_bits,
            # double data rate: two transfers per clock over the whole bus
            "spec_bandwidth_gbs": (2 * clock_khz * 1e3 * bus_bits / 8 / 1e9) if clock_khz and bus_bits else None,
        }
    return env


def triton_kernels() -> dict[str, Any]:
    """The ``@triton.jit`` objects by op (the package re-exports functions named like the modules)."""
    return {
        "gather_rows": importlib.import_module("civic_vllm.kernels.gather_rows")._gather_rows_kernel,
        "gather_merge_project":
            importlib.import_module("civic_vllm.kernels.merge_projection")._gather_merge_project_kernel,
    }


def kernels_compiled() -> dict[str, bool]:
    from civic_vllm.kernels import _dispatch

    return {"triton": _dispatch.HAS_TRITON,
            **{f"{op}_interpreted": _dispatch.is_interpreted(k) for op, k in triton_kernels().items()}}


# ---------------------------------------------------------------------------------------------------------------
# Part 1: kernels against their references
# ---------------------------------------------------------------------------------------------------------------


def _dtype(name: str):
    import torch

    return getattr(torch, name)


def _seeded(seed: int):
    import torch

    return torch.Generator().manual_seed(seed)


def _index(kind: str, n: int, seed: int):
    """One, all, empty, or an unsorted int32 subset of about 2/3 with two repeats."""
    import torch

    subset = torch.randperm(n, generator=_seeded(seed))[: max(1, (2 * n) // 3)]
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

    g = _seeded(case["rows_per_index"])
    rows = case["n_blocks"] * case["rows_per_index"]
    sources = []
    for i, width in enumerate(case["widths"]):
        wide = torch.randn(rows, 2 * width if i == 2 else width, generator=g).to(device, _dtype(case["dtype"]))
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


def _merge_inputs(c: int, n: int, d_out: int, norm_width: int, bias: bool, seed: int) -> dict:
    """fp32 CPU tensors: patch rows with a per-row offset (as vision activations have), LN and fc1 params."""
    import torch

    g = _seeded(seed)
    return {
        "x": 2 * torch.randn(GROUP * n, c, generator=g) + 3 * torch.randn(GROUP * n, 1, generator=g),
        "norm_weight": 1 + 0.1 * torch.randn(norm_width, generator=g),
        "norm_bias": 0.1 * torch.randn(norm_width, generator=g),
        "weight": torch.randn(d_out, GROUP * c, generator=g) / math.sqrt(GROUP * c),
        "bias": 0.5 * torch.randn(d_out, generator=g) if bias else None,
    }


def _cast(tensors: dict, device, dtype) -> dict:
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
    params = _merge_inputs(c, n, d_out, norm_width, case["bias"], seed=c + n)
    index = _index(case["index"], n, seed=5).to(device)
    low = _cast(params, device, _dtype(case["dtype"]))
    x = low.pop("x")
    out = gather_merge_project(x, index, **low, norm_width=norm_width, backend="triton")
    ref = gather_merge_project_reference(x, index, **low, norm_width=norm_width)
    high = _cast({**low, "x": x}, device, torch.float64)
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


# ---------------------------------------------------------------------------------------------------------------
# Part 2: the fused merger's production call site
# ---------------------------------------------------------------------------------------------------------------


class UnquantizedLinearMethod:
    """Stands for vLLM's class of that name: vision.py tells unquantized layers by this class name."""


def vllm_style_merger(c: int, d_model: int, post_shuffle: bool, seed: int):
    """A module shaped like vLLM's ``Qwen3_VisionPatchMerger`` (one GPU): the attributes ``_fused_merger`` reads,
    parallel linears that return ``(out, bias)`` and carry a ``quant_method``, and vLLM's forward."""
    import torch
    from torch import nn

    class TupleLinear(nn.Linear):
        quant_method = UnquantizedLinearMethod()

        def forward(self, x):  # noqa: ANN001
            return super().forward(x), None

    class Merger(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.hidden_size = GROUP * c
            self.use_postshuffle_norm = post_shuffle
            self.norm = nn.LayerNorm(self.hidden_size if post_shuffle else c, eps=1e-6)
            self.linear_fc1 = TupleLinear(self.hidden_size, self.hidden_size)
            self.act_fn = nn.GELU()
            self.linear_fc2 = TupleLinear(self.hidden_size, d_model)

        def forward(self, x):  # noqa: ANN001 - vllm/model_executor/models/qwen3_vl.py, Qwen3_VisionPatchMerger
            x = self.norm(x.view(-1, self.hidden_size)) if self.use_postshuffle_norm else self.norm(x).view(
                -1, self.hidden_size)
            hidden, _ = self.linear_fc1(x)
            out, _ = self.linear_fc2(self.act_fn(hidden))
            return out

    torch.manual_seed(seed)
    merger = Merger()
    with torch.no_grad():
        merger.norm.weight.normal_(1.0, 0.1)
        merger.norm.bias.normal_(0.0, 0.1)
    return merger.eval()


@contextlib.contextmanager
def counting(module: types.ModuleType, names: tuple[str, ...]) -> Iterator[dict[str, int]]:
    """Count calls of ``module.<name>`` for each name while inside (restored afterwards)."""
    counts = dict.fromkeys(names, 0)
    originals = {name: getattr(module, name) for name in names}

    def wrap(name: str) -> Callable:
        def counted(*args, **kwargs):
            counts[name] += 1
            return originals[name](*args, **kwargs)

        return counted

    try:
        for name in names:
            setattr(module, name, wrap(name))
        yield counts
    finally:
        for name, fn in originals.items():
            setattr(module, name, fn)


def merged_tokens(preset: str, side: int) -> int:
    from civic_vllm.budget import num_merged_tokens
    from civic_vllm.model_factory import get_preset

    v = get_preset(preset).vision
    return num_merged_tokens((1, side // v.patch_size, side // v.patch_size), v.spatial_merge_size)


def kept_groups(n: int, ratio: Fraction, seed: int):
    """K = num_retained(N, r) ascending group indices, as the retention stage hands them on."""
    import torch

    from civic_vllm.budget import num_retained

    k = num_retained(n, float(ratio))
    return torch.randperm(n, generator=_seeded(seed))[:k].sort().values


def check_call_site(vision: types.ModuleType, preset: str, side: int, dtype: str, device) -> dict:
    import torch

    from civic_vllm.model_factory import get_preset

    v = get_preset(preset).vision
    c, n = v.hidden_size, merged_tokens(preset, side)
    mergers = [vllm_style_merger(c, v.out_hidden_size, post_shuffle=level > 0, seed=level)
               for level in range(1 + DEEPSTACK_LEVELS)]
    g = _seeded(n)
    sources = [2 * torch.randn(GROUP * n, c, generator=g) + torch.randn(GROUP * n, 1, generator=g)
               for _ in mergers]
    index = kept_groups(n, Fraction(1, 3), seed=n).to(device)

    def stock(precision):  # the vanilla mergers on all N groups, then indexed
        rows = [s.to(device, precision) for s in sources]
        with torch.inference_mode():
            return [m.to(device, precision)(r)[index] for m, r in zip(mergers, rows)], rows

    exact, _ = stock(torch.float64)
    reference, rows = stock(_dtype(dtype))
    visual = types.SimpleNamespace(merger=mergers[0], deepstack_merger_list=mergers[1:])
    with torch.inference_mode(), counting(vision, ("gather_merge_project", "gather_rows")) as calls:
        kept = vision.merge_kept_groups(visual, rows[0], rows[1:], index)
    calls = dict(calls)
    levels = [accuracy(k, r, e, dtype) for k, r, e in zip(kept, reference, exact)]
    fused = device.type == "cuda"
    expected = {"gather_merge_project": len(mergers), "gather_rows": 0} if fused else {
        "gather_merge_project": 0, "gather_rows": 1}
    shapes_ok = all(tuple(k.shape) == (index.numel(), v.out_hidden_size) for k in kept)
    return {"preset": preset, "dtype": dtype, "C": c, "N": n, "K": int(index.numel()), "levels": levels,
            "path": "fused gather_merge_project" if fused else "gather_rows + stock merger",
            "calls": calls, "expected_calls": expected,
            "ok": bool(calls == expected and shapes_ok and all(lv["ok"] for lv in levels))}


def part_call_site(device, budget: Budget) -> dict:
    cuda = device.type == "cuda"
    vision = import_module("civic_vllm.vllm_adapter.vision")
    steps, rows = Steps(budget), []
    plans = [(p, dt) for p in BENCH_PRESETS for dt in ("bfloat16", "float32")] if cuda else [
        (BENCH_PRESETS[0], "float32")]
    side = IMAGE_SIDE if cuda else CPU_IMAGE_SIDE
    for preset, dtype in plans:
        row = steps.run(f"{preset} {dtype}", lambda p=preset, d=dtype: check_call_site(vision, p, side, d, device))
        if row is not None:
            rows.append(row)
            if not row["ok"]:
                log(f"call_site: FAIL {preset} {dtype}: {row}")
    return {"status": part_status(rows, steps.skipped), "function": "civic_vllm.vllm_adapter.vision.merge_kept_groups",
            "mode": "fused path on CUDA" if cuda else "no CUDA: the gather + stock-merger path",
            "image_side": side, "ratio": "1/3", "cases": rows, "skipped": steps.skipped}


# ---------------------------------------------------------------------------------------------------------------
# Part 3: microbenchmarks
# ---------------------------------------------------------------------------------------------------------------


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
    p = _cast(_merge_inputs(c, n, width, norm_width, bias=True, seed=c), device, dtype)
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
    g = _seeded(n)
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


# ---------------------------------------------------------------------------------------------------------------
# Part 4: HF compact prefill, full vs civic
# ---------------------------------------------------------------------------------------------------------------


def event_timer(device) -> Callable[[Callable[[], object]], float]:
    """Seconds of one call: CUDA events on CUDA, perf_counter elsewhere."""
    import torch

    def run(fn: Callable[[], object]) -> float:
        if device.type != "cuda":
            t = time.perf_counter()
            fn()
            return time.perf_counter() - t
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3

    return run


def scorer_for(depth_probe: types.ModuleType, vision_hidden: int) -> tuple[Any, str, str | None]:
    """depth_probe's seeded random scorer (policy learned), or the civic policy when the recipe cannot load."""
    try:
        scorer, _ = depth_probe.random_scorer(vision_hidden, depth_probe.SCORER_SEED)
        return scorer, depth_probe.POLICY, None
    except ImportError as exc:  # civic_vllm.recipe needs pydantic
        return None, "civic", f"policy civic instead of learned: {exc}"


def part_prefill(device, budget: Budget, args) -> dict:
    import torch

    depth_probe = import_module("benchmarks.depth_probe")
    serve = import_module("benchmarks.serve")
    from transformers import AutoConfig, AutoProcessor, Qwen3VLForConditionalGeneration

    from benchmarks.locust import synthetic_image
    from civic_vllm.model_factory import make_model

    cuda = device.type == "cuda"
    preset, side = args.prefill_preset or ("qwen3-vl-2b" if cuda else "tiny"), args.prefill_size or (
        IMAGE_SIDE if cuda else 128)
    dtype = args.prefill_dtype or ("bfloat16" if cuda else "float32")
    rounds = args.rounds or (5 if cuda else 1)
    time_one = event_timer(device)
    with tempfile.TemporaryDirectory(prefix="civic-gpu-check-") as tmp:
        model_dir = make_model(preset, Path(tmp) / preset, weights=False)  # config, tokenizer, processor
        config = AutoConfig.from_pretrained(model_dir)
        depth = config.vision_config.depth
        exit_layers = tuple(min(layer, depth - 1) for layer in args.exit_layers)
        configs = depth_probe.configurations(args.ratio, exit_layers, depth)
        limits = {c["label"]: depth_probe.planner_limits(model_dir, side, args.ratio, c["exit_layer"])
                  for c in configs if c["ratio"] is not None}
        processor = AutoProcessor.from_pretrained(model_dir)
    t = time.monotonic()
    with torch.device(device):  # random weights made on the device, no checkpoint written or read
        model = Qwen3VLForConditionalGeneration._from_config(config, dtype=_dtype(dtype)).eval()
    build_s = time.monotonic() - t
    scorer, policy, policy_note = scorer_for(depth_probe, config.vision_config.hidden_size)
    if scorer is not None:
        scorer = scorer.to(device)
    merge = config.vision_config.spatial_merge_size

    def inputs_for(seed: int):
        inputs, seed_pixels = serve.hf_prompt_inputs(processor, [synthetic_image((side, side), seed)],
                                                     depth_probe.QUESTION)
        return inputs.to(device), seed_pixels

    def plans_for(config_: dict, grid) -> list:
        ratio = 1.0 if config_["ratio"] is None else float(config_["ratio"])
        return serve.retention_plans(grid, merge, ratio, config_["exit_layer"], policy)

    def prefill(config_: dict, inputs, seed_pixels) -> float:
        plans = plans_for(config_, inputs["image_grid_thw"].cpu())

        def once():
            # factory calls inside hf_compact (torch.arange, torch.tensor) land on the model's device
            with torch.inference_mode(), torch.device(device):
                serve.hf_compact_prefill(model, inputs, seed_pixels, plans, scorer=scorer, last_token_only=True)

        return time_one(once)

    inputs, seed_pixels = inputs_for(args.seed + rounds)  # warm-up image: a seed no round uses
    grid = inputs["image_grid_thw"].cpu()
    kept = {c["label"]: sum(p.num_kept for p in plans_for(c, grid)) for c in configs}
    t = time.monotonic()
    warmup = {c["label"]: prefill(c, inputs, seed_pixels) for c in configs}
    round_estimate = time.monotonic() - t
    measured, steps = [], Steps(budget, last_s=round_estimate)
    for rnd in range(rounds):
        def one_round(rnd=rnd):
            inputs, seed_pixels = inputs_for(args.seed + rnd)
            order = configs[rnd % len(configs):] + configs[: rnd % len(configs)]
            times = {c["label"]: prefill(c, inputs, seed_pixels) for c in order}
            return {"round": rnd, "image_seed": args.seed + rnd, "order": [c["label"] for c in order],
                    "times_s": times}

        result = steps.run(f"round {rnd}", one_round)
        if result is not None:
            measured.append(result)
            log("prefill round " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in result["times_s"].items()))
    results = depth_probe.summarise(configs, measured)
    for label, entry in results.items():
        entry["kept_tokens"] = kept[label]
        if label in limits:
            entry["flop_limit"] = limits[label]["prefill_speedup_limit"]
            entry["fraction_of_flop_limit"] = (entry["speedup_vs_full"] / entry["flop_limit"]
                                               if entry["speedup_vs_full"] else None)
    memory = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
    ok = bool(measured) and all(e["median_s"] and e["median_s"] > 0 for e in results.values())
    return {"status": ("pass" if ok else "fail") if measured else "skipped",
            "what": "GPU figures (CUDA events)" if cuda else "CPU harness check on a small preset: not GPU figures",
            "preset": preset, "image_side": side, "dtype": dtype, "policy": policy, "policy_note": policy_note,
            "vision_depth": depth, "visual_tokens": kept["full"],
            "prompt_tokens_full": int(inputs["input_ids"].shape[1]),
            "attn_implementation": getattr(model.config, "_attn_implementation", None),
            "model_build_s": build_s, "max_memory_gib": memory, "timer": "cuda events" if cuda else "perf_counter",
            "configs": [{**c, "ratio": None if c["ratio"] is None else str(c["ratio"])} for c in configs],
            "warmup_s": warmup, "rounds": measured, "rounds_done": len(measured), "results": results,
            "planner_limits": limits, "skipped": steps.skipped}


# ---------------------------------------------------------------------------------------------------------------
# Report: schema, Markdown, files
# ---------------------------------------------------------------------------------------------------------------

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


def build_parser() -> argparse.ArgumentParser:
    exit_layers_arg = import_module("benchmarks.serve").exit_layers_arg

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
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


if __name__ == "__main__":
    sys.exit(main())
