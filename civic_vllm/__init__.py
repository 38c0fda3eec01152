"""CIVIC for vLLM: compact, contiguous visual sequences from the vision encoder to the KV cache.

Importing this package must stay cheap and must not import vLLM: the pure stages
(budget, retention, positions, kernels) are used by training and tests without it.
"""

__version__ = "0.1.0"


def register() -> None:
    """vLLM `general_plugins` entry point: runs in every vLLM process before CLI parsing."""
    from civic_vllm.vllm_adapter.registration import register_with_vllm

    register_with_vllm()
