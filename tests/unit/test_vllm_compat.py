"""Canary for the vLLM version pin: every vLLM symbol the adapter relies on still exists.

The adapter subclasses vLLM's Qwen3-VL model, processor and encoder-cache classes and calls
their private methods (``super()._get_prompt_updates``, ``self._process_image_input``, ...).
A vLLM upgrade that renames one of them would otherwise surface as an AttributeError in the
middle of a request. This test reads the adapter's source, collects every ``super().NAME`` and
``self.NAME(...)`` in each class that derives from a vLLM class, and requires NAME on the
stock base classes (for ``super()``) or anywhere in the class's MRO (for ``self``). It also
requires each ``from vllm... import X`` of the adapter to resolve. (vllm-spyre's compat tests
play the same role.)
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest

import civic_vllm.vllm_adapter as adapter

ADAPTER_DIR = Path(adapter.__file__).parent
MODULES = sorted(info.name for info in pkgutil.iter_modules([str(ADAPTER_DIR)]))


def _vllm_imports(tree: ast.AST) -> list[tuple[str, str]]:
    return [(node.module, alias.name) for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "vllm"
            for alias in node.names]


def _is_super_call(node: ast.AST) -> bool:
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "super"


def _uses(class_node: ast.ClassDef) -> tuple[set[str], set[str]]:
    """(names reached through super(), methods called on self) inside one class body."""
    via_super, via_self = set(), set()
    for node in ast.walk(class_node):
        if isinstance(node, ast.Attribute) and _is_super_call(node.value):
            via_super.add(node.attr)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and isinstance(node.func.value, ast.Name) and node.func.value.id == "self"):
            via_self.add(node.func.attr)
    return via_super, via_self


def _is_vllm(cls: type) -> bool:
    return cls.__module__.split(".")[0] == "vllm"


def _classes_on_vllm(module_name: str):
    """(class, its AST) for each class of the module with a vLLM class in its MRO, plus the mixins
    such classes inherit from this package (their super() calls resolve to the vLLM base)."""
    module = importlib.import_module(f"{adapter.__name__}.{module_name}")
    tree = ast.parse(inspect.getsource(module))
    nodes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
    found = []
    for name, node in nodes.items():
        cls = getattr(module, name, None)
        if isinstance(cls, type) and any(_is_vllm(base) for base in cls.__mro__):
            found.append((cls, node))
    return found


@pytest.mark.parametrize("module_name", MODULES)
def test_vllm_imports_of_the_adapter_resolve(module_name):
    tree = ast.parse((ADAPTER_DIR / f"{module_name}.py").read_text())
    for module, name in _vllm_imports(tree):
        imported = importlib.import_module(module)
        assert hasattr(imported, name) or importlib.util.find_spec(f"{module}.{name}"), f"{module}.{name}"


def _subclass_cases():
    cases = []
    for module_name in MODULES:
        for cls, node in _classes_on_vllm(module_name):
            cases.append(pytest.param(cls, node, id=f"{module_name}.{cls.__name__}"))
    # A mixin's own AST: its super() calls land on whichever vLLM class each concrete class mixes it into.
    for module_name in MODULES:
        module = importlib.import_module(f"{adapter.__name__}.{module_name}")
        tree = ast.parse(inspect.getsource(module))
        for node in tree.body:
            if not (isinstance(node, ast.ClassDef) and node.name.endswith("Mixin")):
                continue
            mixin = getattr(module, node.name)
            for concrete in mixin.__subclasses__():  # also the classes built by factories at import
                if any(map(_is_vllm, concrete.__mro__)):
                    cases.append(pytest.param(concrete, node, id=f"{module_name}.{node.name}@{concrete.__name__}"))
    return cases


SUBCLASS_CASES = _subclass_cases()


def test_the_canary_sees_the_model_processor_and_encoder_cache_classes():
    ids = " ".join(case.id for case in SUBCLASS_CASES)
    for expected in ("CivicQwen3VLMixin@CivicQwen3VLForConditionalGeneration",
                     "CivicQwen3VLMixin@CivicQwen3_5MoeForConditionalGeneration", "CivicProcessingInfoMixin@",
                     "processor.CivicQwen3VLMultiModalProcessor", "encoder_budget.CivicEncoderCacheManager"):
        assert expected in ids


@pytest.mark.parametrize(("cls", "node"), SUBCLASS_CASES)
def test_every_vllm_method_the_adapter_reaches_exists(cls, node):
    via_super, via_self = _uses(node)
    own = next(i for i, klass in enumerate(cls.__mro__) if klass.__name__ == node.name)
    stock = [klass for klass in cls.__mro__[own + 1:] if klass is not object]
    missing_super = sorted(name for name in via_super if not any(name in vars(klass) for klass in stock))
    missing_self = sorted(name for name in via_self if not hasattr(cls, name))
    assert not missing_super, f"{cls.__name__}: super().{missing_super} not on {[k.__name__ for k in stock]}"
    assert not missing_self, f"{cls.__name__}: self.{missing_self} not found"


def test_the_metrics_snapshot_route_renders_in_the_event_loop(monkeypatch):
    """``VllmServer.metrics()`` reads /metrics/ for a scrape no engine step can interleave with.

    On vLLM's app, /metrics is a sync FastAPI endpoint (run in a worker thread, so a scrape can
    straddle an output handler's ``record()``), while /metrics/ falls through to the mounted
    prometheus ASGI app, a coroutine run on the event loop itself.
    """
    from fastapi import FastAPI
    from prometheus_client import CollectorRegistry
    from starlette.routing import Match, Mount
    from vllm.entrypoints.serve.instrumentator import metrics

    from civic_vllm.serving import VllmServer

    monkeypatch.setattr(metrics, "get_prometheus_registry", CollectorRegistry)  # no clash with the global one
    app = FastAPI()
    metrics.attach_router(app)

    def route_of(path: str):
        scope = {"type": "http", "method": "GET", "path": path, "root_path": ""}
        return next(route for route in app.router.routes if route.matches(scope)[0] == Match.FULL)

    snapshot = route_of(VllmServer.METRICS_SNAPSHOT_PATH)
    assert isinstance(snapshot, Mount) and inspect.iscoroutinefunction(snapshot.app)
    assert not inspect.iscoroutinefunction(route_of("/metrics").endpoint)  # why /metrics can tear
