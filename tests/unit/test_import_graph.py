"""The project's import graph, read from the source (function-level imports included).

* vLLM internals are touched only in civic_vllm/vllm_adapter (and the plugin entry point that
  loads it); the core (budget, cost, positions, settings, retention, ...) never imports vLLM.
* Tools (planner, evaluation, viz, training, cli, benchmarks) never import the demo script or the
  vLLM adapter: data flows from the core to them, not backwards.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "civic_vllm"
ADAPTER = "civic_vllm.vllm_adapter"
# The package's __init__ holds vLLM's plugin entry point (register), which loads the adapter;
# client.decode_video decodes a video with vLLM's own media IO, so training sees the frames the
# server sees (a function-level import of a public vLLM module, no private API).
VLLM_ALLOWED = {"civic_vllm", "civic_vllm.client"}
TOOLS = ["civic_vllm.planner", "civic_vllm.evaluation", "civic_vllm.viz", "civic_vllm.training", "civic_vllm.cli"]
# gpu_check measures the adapter's compact vision pass itself, by design.
BENCHMARKS_ALLOWED_ADAPTER = "benchmarks.gpu_check"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def sources(folder: Path):
    return sorted(p for p in folder.rglob("*.py") if "__pycache__" not in p.parts)


def _is(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


@pytest.mark.parametrize("path", [p for p in sources(PACKAGE) if not module_name(p).startswith(ADAPTER)],
                         ids=lambda p: module_name(p))
def test_outside_the_adapter_no_module_imports_vllm(path):
    if module_name(path) in VLLM_ALLOWED:
        pytest.skip("allowed on purpose: see VLLM_ALLOWED")
    assert not {n for n in imports_of(path) if _is(n, "vllm")}


def is_tool(path: Path) -> bool:
    return any(_is(module_name(path), tool) for tool in TOOLS) or module_name(path).startswith("benchmarks")


@pytest.mark.parametrize("path", [p for p in sources(PACKAGE) + sources(ROOT / "benchmarks") if is_tool(p)],
                         ids=lambda p: module_name(p))
def test_tools_import_neither_the_demo_nor_the_adapter(path):
    names = imports_of(path)
    assert not {n for n in names if _is(n, "civic_vllm.demo")}
    if not _is(module_name(path), BENCHMARKS_ALLOWED_ADAPTER):
        assert not {n for n in names if _is(n, ADAPTER)}


def test_the_checker_sees_function_level_imports(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from civic_vllm.demo import default_model\n    import vllm.config\n")
    assert {"civic_vllm.demo", "civic_vllm.demo.default_model", "vllm.config"} <= imports_of(source)
