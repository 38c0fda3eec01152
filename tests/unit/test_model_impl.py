"""--model-impl civic resolution (vLLM private registry API: marked compat)."""

import dataclasses
from types import SimpleNamespace

import pytest

from civic_vllm.vllm_adapter.model_impl import (
    SUPPORTED_ARCHITECTURES,
    UnsupportedArchitectureError,
    civic_architectures,
)

pytestmark = pytest.mark.compat

FAMILIES = sorted(SUPPORTED_ARCHITECTURES)


@pytest.mark.parametrize("stock", FAMILIES)
def test_each_family_maps_to_its_civic_class(stock):
    civic = "Civic" + stock
    assert civic_architectures([stock]) == [civic]
    assert civic_architectures(civic) == [civic]


@pytest.mark.parametrize("arch", [["LlamaForCausalLM"], ["Qwen2_5_VLForConditionalGeneration"], []])
def test_other_architectures_get_a_clear_error_naming_every_supported_one(arch):
    with pytest.raises(UnsupportedArchitectureError, match="--model-impl civic supports ") as err:
        civic_architectures(arch)
    for stock in FAMILIES:
        assert stock in str(err.value)


@pytest.fixture(scope="module")
def registry():
    from vllm import ModelRegistry

    import civic_vllm

    civic_vllm.register()
    civic_vllm.register()  # plugins load once per process, but twice must be harmless
    return ModelRegistry


def test_registry_resolves_civic_only_for_model_impl_civic(registry):
    civic = SimpleNamespace(model_impl="civic", runner_type="generate", convert_type="none")
    auto = SimpleNamespace(model_impl="auto", runner_type="generate", convert_type="none")
    _, arch = registry.inspect_model_cls(["Qwen3VLForConditionalGeneration"], civic)
    assert arch == "CivicQwen3VLForConditionalGeneration"
    _, arch = registry.inspect_model_cls(["Qwen3VLForConditionalGeneration"], auto)
    assert arch == "Qwen3VLForConditionalGeneration"
    # --hf-overrides '{"architectures": ["CivicQwen3VLForConditionalGeneration"]}' works with model_impl auto.
    _, arch = registry.inspect_model_cls(["CivicQwen3VLForConditionalGeneration"], auto)
    assert arch == "CivicQwen3VLForConditionalGeneration"
    with pytest.raises(UnsupportedArchitectureError):
        registry.resolve_model_cls(["LlamaForCausalLM"], civic)


@pytest.mark.parametrize("stock", FAMILIES)
def test_civic_class_keeps_the_stock_class_interfaces(registry, stock):
    """A hybrid stays hybrid (vLLM then allocates its linear-attention state), MoE stays MoE."""
    civic = SimpleNamespace(model_impl="civic", runner_type="generate", convert_type="none")
    auto = SimpleNamespace(model_impl="auto", runner_type="generate", convert_type="none")
    civic_info, arch = registry.inspect_model_cls([stock], civic)
    stock_info, _ = registry.inspect_model_cls([stock], auto)
    assert arch == "Civic" + stock
    assert _fields(civic_info) == {**_fields(stock_info), "architecture": arch}
    assert civic_info.is_hybrid == (stock.startswith("Qwen3_5"))


def _fields(info) -> dict:
    # Lazily inspected classes come back through JSON: lists where the class has tuples.
    return {k: tuple(v) if isinstance(v, list) else v for k, v in dataclasses.asdict(info).items()}


def test_wrapper_installed_once(registry):
    from vllm.model_executor.models.registry import _ModelRegistry

    assert _ModelRegistry.inspect_model_cls._civic_wrapped
    assert not getattr(_ModelRegistry.inspect_model_cls.__wrapped__, "_civic_wrapped", False)
