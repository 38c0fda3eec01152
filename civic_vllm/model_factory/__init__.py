"""Random-weight Qwen3-VL checkpoints that HF transformers and vLLM both load, built offline.

No Qwen3-VL weights can be downloaded on the project's machines, yet tests, benchmarks,
training and the planner all need a real ``Qwen3VLForConditionalGeneration`` checkpoint
directory. This module writes one from a named preset:

* ``tiny``  — seconds to build; unit and e2e tests, and the civic-shapes training start point.
* ``bench`` — serving benchmarks: the LLM's share of image-prefill compute is like a real
  Qwen3-VL's (63% measured), and one 448x448 request prefills in 0.6 s on one CPU thread.
* ``qwen3-vl-2b`` / ``-4b`` / ``-8b`` — the real dimensions with random weights, for shape,
  memory and planner checks (weights optional: ``make_model(..., weights=False)``).

Every checkpoint uses the same small local byte-level BPE tokenizer (the real Qwen tokenizer
cannot be fetched) with Qwen's special tokens, pre-tokenizer and a Qwen3-VL-style chat
template; the real-size presets keep ``vocab_size=151936`` so embedding shapes are real.

Importing this module is cheap: transformers and torch are imported only when a config or
checkpoint is built.

The package is cut along its seams: presets (dimensions), tokenizer, hf_config (processor,
config, parameter counts, FLOPs), checkpoint (writing) and paths (lookup, default model).
"""

from __future__ import annotations

from civic_vllm.model_factory.checkpoint import MARKER_FILE, make_model, make_readable, write_checkpoint
from civic_vllm.model_factory.hf_config import (
    IMAGE_MAX_PIXELS,
    IMAGE_MIN_PIXELS,
    VIDEO_MAX_PIXELS,
    VIDEO_MIN_PIXELS,
    build_config,
    build_processor,
    hf_model_class,
    param_counts,
    prefill_flops,
)
from civic_vllm.model_factory.paths import default_model, default_model_dir, models_root, resolve_model
from civic_vllm.model_factory.presets import (
    CPU_ATTENTION_HEAD_DIMS,
    FAMILIES,
    PRESETS,
    Family,
    LinearAttentionDims,
    ModelPreset,
    MoeDims,
    TextDims,
    VisionDims,
    get_preset,
)
from civic_vllm.model_factory.tokenizer import (
    CHAT_TEMPLATE,
    TOKENIZER_VOCAB_SIZE,
    build_tokenizer,
    special_token_ids,
    tokenizer_size,
)

__all__ = [
    "CHAT_TEMPLATE",
    "CPU_ATTENTION_HEAD_DIMS",
    "FAMILIES",
    "IMAGE_MAX_PIXELS",
    "IMAGE_MIN_PIXELS",
    "MARKER_FILE",
    "PRESETS",
    "TOKENIZER_VOCAB_SIZE",
    "VIDEO_MAX_PIXELS",
    "VIDEO_MIN_PIXELS",
    "Family",
    "LinearAttentionDims",
    "ModelPreset",
    "MoeDims",
    "TextDims",
    "VisionDims",
    "build_config",
    "build_processor",
    "build_tokenizer",
    "default_model",
    "default_model_dir",
    "get_preset",
    "hf_model_class",
    "make_model",
    "make_readable",
    "models_root",
    "param_counts",
    "prefill_flops",
    "resolve_model",
    "special_token_ids",
    "tokenizer_size",
    "write_checkpoint",
]
