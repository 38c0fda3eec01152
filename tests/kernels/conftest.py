"""Kernel tests run the Triton kernels through the interpreter on CPU tensors.

``triton.jit`` reads TRITON_INTERPRET when a kernel is decorated, so the
variable must be set before civic_vllm.kernels (or triton) is first imported.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"

import importlib  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture
def triton_interpreter() -> None:
    """Skip unless the kernels were built by the Triton interpreter (CPU tensors work)."""
    # import_module: the package re-exports functions named like the modules.
    _dispatch = importlib.import_module("civic_vllm.kernels._dispatch")
    gather = importlib.import_module("civic_vllm.kernels.gather_rows")
    merge = importlib.import_module("civic_vllm.kernels.merge_projection")

    if not _dispatch.HAS_TRITON:
        pytest.skip("triton is not installed")
    for kernel in (gather._gather_rows_kernel, merge._gather_merge_project_kernel):
        if not _dispatch.is_interpreted(kernel):
            pytest.skip("civic_vllm.kernels was imported before TRITON_INTERPRET=1 was set")


_COMPILE_SCRIPT = """
import importlib, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
spec = json.loads(sys.argv[1])
kernel = getattr(importlib.import_module(spec["module"]), spec["kernel"])
signature = dict(spec["signature"], **{name: "constexpr" for name in spec["constexprs"]})
results = {}
for capability in spec["capabilities"]:
    compiled = triton.compile(
        ASTSource(kernel, signature, spec["constexprs"]),
        target=GPUTarget("cuda", capability, 32),
        options={"num_warps": 4, "num_stages": 2},
    )
    ptx = compiled.asm["ptx"]
    results[capability] = {"mma": "mma" in ptx, "wgmma": "wgmma" in ptx, "cubin": len(compiled.asm["cubin"])}
print(json.dumps(results))
"""


@pytest.fixture
def compile_for_cuda():
    """Compile a kernel to a cubin for an NVIDIA target, without a GPU.

    Runs in a subprocess without TRITON_INTERPRET so the real compiler (and the
    paths the interpreter cannot take, such as bf16 ``tl.dot``) is exercised.
    One subprocess per call (importing torch dominates its cost). Returns
    ``compile(module, kernel, signature, constexprs, capabilities) -> {capability: info}``.
    """
    import json
    import subprocess
    import sys

    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as exc:  # triton missing or its AOT API moved
        pytest.skip(f"cannot compile Triton kernels ahead of time: {exc}")

    def run(
        module: str, kernel: str, signature: dict, constexprs: dict, capabilities: tuple = (80, 90)
    ) -> dict:
        spec = dict(
            module=module, kernel=kernel, signature=signature, constexprs=constexprs,
            capabilities=list(capabilities),
        )
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        proc = subprocess.run(
            [sys.executable, "-c", _COMPILE_SCRIPT, json.dumps(spec)],
            env=env, capture_output=True, text=True, timeout=300,
        )
        if proc.returncode:
            if "ptxas" in proc.stderr and "No such file" in proc.stderr:
                pytest.skip("ptxas is not available")
            raise AssertionError(f"compiling {kernel} failed:\n{proc.stderr[-4000:]}")
        results = json.loads(proc.stdout.strip().splitlines()[-1])
        return {int(k): v for k, v in results.items()}

    return run
