"""--model-impl civic resolution (vLLM private registry API: marked compat)."""

from types import SimpleNamespace

import pytest

from civic_vllm.vllm_adapter.model_impl import UnsupportedArchitectureError, civic_architectures

pytestmark = pytest.mark.compat


def test_qwen3_vl_maps_to_civic_class():
    assert civic_architectures(["Qwen3VLForConditionalGeneration"]) == ["CivicQwen3VLForConditionalGeneration"]
    assert civic_architectures("CivicQwen3VLForConditionalGeneration") == ["CivicQwen3VLForConditionalGeneration"]


@pytest.mark.parametrize("arch", [["LlamaForCausalLM"], ["Qwen2_5_VLForConditionalGeneration"], []])
def test_other_architectures_get_a_clear_error(arch):
    expected = "--model-impl civic supports Qwen3VLForConditionalGeneration only"
    with pytest.raises(UnsupportedArchitectureError, match=expected):
        civic_architectures(arch)


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


def test_wrapper_installed_once(registry):
    from vllm.model_executor.models.registry import _ModelRegistry

    assert _ModelRegistry.inspect_model_cls._civic_wrapped
    assert not getattr(_ModelRegistry.inspect_model_cls.__wrapped__, "_civic_wrapped", False)
