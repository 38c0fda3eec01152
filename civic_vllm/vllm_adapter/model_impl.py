"""``--model-impl civic``: map each Qwen3-VL-family architecture to its CIVIC class.

vLLM private API touched here: ``vllm.model_executor.models.registry._ModelRegistry``
(``inspect_model_cls`` and ``resolve_model_cls``, vLLM 0.33 registry.py:1323-1430).
Why: ``--model-impl`` is a free string in vLLM's ModelConfig, but the registry only
knows "auto", "vllm", "transformers" and "terratorch"; any other value silently
falls back to the stock class. How: both methods are wrapped so that when
``model_config.model_impl == "civic"`` the architectures list is rewritten before
the stock resolution runs; every other model_impl value is untouched.
Related: vLLM issues asking for out-of-tree image token pruning (#45098, #38888).
Future: drop this module if vLLM accepts registered model_impl values.
"""

from __future__ import annotations

import functools

from civic_vllm.model_factory.presets import FAMILIES

MODEL_IMPL = "civic"
# Every vLLM class built on Qwen3-VL's vision tower and processor (the families CIVIC serves,
# named once in model_factory.presets.FAMILIES) -> its civic class in model.py.
SUPPORTED_ARCHITECTURES = {family.architecture: f"Civic{family.architecture}" for family in FAMILIES.values()}


class UnsupportedArchitectureError(ValueError):
    pass


def civic_architectures(architectures: str | list[str]) -> list[str]:
    """The architectures list with each supported one mapped to its CIVIC class, or a clear error."""
    names = [architectures] if isinstance(architectures, str) else list(architectures)
    civic_names = set(SUPPORTED_ARCHITECTURES.values())
    mapped = [SUPPORTED_ARCHITECTURES.get(n, n) for n in names if n in SUPPORTED_ARCHITECTURES or n in civic_names]
    if not mapped:
        raise UnsupportedArchitectureError(
            f"--model-impl {MODEL_IMPL} supports {', '.join(SUPPORTED_ARCHITECTURES)} only; "
            f"this model's architectures are {names}. Drop --model-impl {MODEL_IMPL} to serve it with vLLM."
        )
    return mapped


def install_model_impl_hook(registry_cls: type) -> None:
    """Wrap the registry's resolution methods once (idempotent across plugin loads)."""
    for name in ("inspect_model_cls", "resolve_model_cls"):
        original = getattr(registry_cls, name)
        if getattr(original, "_civic_wrapped", False):
            continue

        @functools.wraps(original)
        def wrapper(self, architectures, model_config, *args, _original=original, **kwargs):
            if getattr(model_config, "model_impl", None) == MODEL_IMPL:
                architectures = civic_architectures(architectures)
            return _original(self, architectures, model_config, *args, **kwargs)

        wrapper._civic_wrapped = True
        setattr(registry_cls, name, wrapper)
