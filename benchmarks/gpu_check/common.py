"""Constants, budget and per-part bookkeeping, vLLM placeholders and the environment record."""

from __future__ import annotations

import contextlib
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import platform
import sys
import time
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
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


# ---- environment ----


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


# ---- shapes and seeded inputs ----


def seeded(seed: int):
    import torch

    return torch.Generator().manual_seed(seed)


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
    return torch.randperm(n, generator=seeded(seed))[:k].sort().values
