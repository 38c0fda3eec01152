"""Real `vllm serve` processes on the tiny Qwen3-VL, shared by the end-to-end tests.

Servers run in float32 so that batching and chunking cannot flip a greedy token
through bf16 rounding: the tests then compare exact token ids.
"""

from __future__ import annotations

import pytest
import torch
from helpers import test_server

from civic_vllm.model_factory import default_model_dir
from civic_vllm.serving import VllmServer


@pytest.fixture(scope="session")
def tiny_model() -> str:
    return str(default_model_dir("tiny"))


def _server(model: str, *, civic: bool, **overrides) -> VllmServer:
    return test_server(model, civic=civic, **overrides)


@pytest.fixture(scope="session")
def civic_server(tiny_model):
    with _server(tiny_model, civic=True) as server:
        yield server


@pytest.fixture(scope="session")
def vanilla_server(tiny_model):
    with _server(tiny_model, civic=False) as server:
        yield server


@pytest.fixture(scope="session")
def hf(tiny_model):
    """The tiny checkpoint in HF transformers (fp32) with its processor: the reference side."""
    from transformers import AutoProcessor, Qwen3VLForConditionalGeneration

    model = Qwen3VLForConditionalGeneration.from_pretrained(tiny_model, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(tiny_model)
