"""Plugin entry point: register the CIVIC class and ``--model-impl civic`` in a vLLM process."""

from __future__ import annotations

import logging

logger = logging.getLogger("vllm.civic")

# The vLLM release line this adapter was written and tested against. Other
# versions are allowed (the seams are probed below) but warned about.
TESTED_VLLM_VERSIONS = ("0.32.", "0.33.")


def register_with_vllm() -> None:
    import vllm
    from vllm import ModelRegistry
    from vllm.model_executor.models.registry import _ModelRegistry

    from civic_vllm.vllm_adapter.encoder_budget import install_encoder_budget_hook
    from civic_vllm.vllm_adapter.model_impl import SUPPORTED_ARCHITECTURES, install_model_impl_hook

    if not vllm.__version__.startswith(TESTED_VLLM_VERSIONS):
        logger.warning(
            "civic_vllm was tested with vLLM %s; found %s. Its adapter touches vLLM internals "
            "(see civic_vllm/vllm_adapter); run `make test` before serving.",
            "/".join(v + "x" for v in TESTED_VLLM_VERSIONS),
            vllm.__version__,
        )
    for civic_arch in SUPPORTED_ARCHITECTURES.values():
        if civic_arch not in ModelRegistry.get_supported_archs():
            # Lazy "module:Class" form: the model module imports only when it is used.
            ModelRegistry.register_model(civic_arch, f"civic_vllm.vllm_adapter.model:{civic_arch}")
    install_model_impl_hook(_ModelRegistry)
    install_encoder_budget_hook()
