"""Backend selection shared by the kernels: Triton on CUDA, torch elsewhere.

Triton is optional (CPU installs of vLLM do not ship it), so it is imported
here once and every kernel module defines its ``@triton.jit`` functions only
when ``HAS_TRITON`` is true.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

try:  # pragma: no cover - exercised implicitly by the import
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the install
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]
    HAS_TRITON = False

BACKENDS = ("auto", "triton", "torch")


def is_interpreted(kernel: Any) -> bool:
    """True when ``kernel`` was decorated under ``TRITON_INTERPRET=1``.

    The flag is read by ``triton.jit`` at decoration time, so asking the
    kernel object is more reliable than reading the environment at call time.
    """
    if not HAS_TRITON:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernel, InterpretedFunction)


def resolve_backend(
    backend: str, tensors: Iterable[torch.Tensor], kernel: Any, op: str
) -> str:
    """Return "triton" or "torch" for ``backend`` and the op's tensors.

    "auto" picks Triton only for CUDA tensors with a compiled (not
    interpreted) kernel; "triton" is honoured or fails loudly, never silently
    falls back, so tests and benchmarks measure what they ask for.
    """
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    all_cuda = all(t.is_cuda for t in tensors)
    interpreted = is_interpreted(kernel)
    if backend == "auto":
        return "triton" if HAS_TRITON and all_cuda and not interpreted else "torch"
    # backend == "triton"
    if not HAS_TRITON:
        raise RuntimeError(f"{op}: backend='triton' requested but triton is not importable")
    if interpreted and all_cuda:
        raise RuntimeError(
            f"{op}: the Triton kernel was built in interpreter mode "
            "(TRITON_INTERPRET=1); pass CPU tensors or unset the variable"
        )
    if not interpreted and not all_cuda:
        raise RuntimeError(
            f"{op}: backend='triton' needs CUDA tensors, or CPU tensors with "
            "TRITON_INTERPRET=1 set before triton and civic_vllm.kernels are imported"
        )
    return "triton"


def check_index(index: torch.Tensor, size: int | None, op: str, name: str = "index") -> None:
    """Validate a 1-D integer index into ``size`` rows (range check only on CPU, and not for None)."""
    if not isinstance(index, torch.Tensor):
        raise ValueError(f"{op}: {name} must be a torch.Tensor, got {type(index).__name__}")
    if index.dtype.is_floating_point or index.dtype.is_complex or index.dtype == torch.bool:
        raise ValueError(f"{op}: {name} must have an integer dtype, got {index.dtype}")
    if index.dim() != 1:
        raise ValueError(f"{op}: {name} must be 1-D, got shape {tuple(index.shape)}")
    # A device-side check would force a host sync on every call; skip it on CUDA.
    if size is not None and index.device.type == "cpu" and index.numel() > 0:
        lo, hi = int(index.min()), int(index.max())
        if lo < 0 or hi >= size:
            raise ValueError(
                f"{op}: {name} values must be in [0, {size}), got min {lo}, max {hi}"
            )
