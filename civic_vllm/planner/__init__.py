"""``civic plan``: tokens, KV blocks, requests per GPU and prefill FLOPs of an image or video request.

vLLM users keep asking how many tokens an image takes, why profiling reserves a whole
max-size image and how many requests fit in the KV cache (vLLM issues #14557, #18550,
#34209). An operator deciding on CIVIC needs those numbers for their own model and GPU
without a GPU run, and they must be the numbers the server will really use. So every count
here comes from the same code paths as the server:

* image size -> patch grid: transformers' ``smart_resize`` (what vLLM's Qwen3-VL processor
  calls) with the checkpoint's preprocessor min/max pixels;
* N and K: :func:`civic_vllm.budget.num_merged_tokens` / :func:`~civic_vllm.budget.num_retained`,
  the formula the CIVIC processor uses for its placeholders;
* a video (``--video WxHxFRAMES``, FRAMES = the frames that reach the model, i.e. after
  sampling): transformers' video ``smart_resize``, frame groups of ``temporal_patch_size``
  frames, K_t per group (:func:`~civic_vllm.budget.num_retained_per_group`), and per group
  the timestamp ``<t seconds>`` plus ``<|vision_start|> … <|vision_end|>`` that vLLM's
  Qwen3-VL processor writes, timestamps as for frames sampled at 2 per second (Qwen3-VL's
  default sampling rate; other rates change only the timestamp text);
* prompt tokens: the checkpoint's own chat template, rendered with OpenAI-style content parts
  as vLLM's chat endpoint does, and its tokenizer (without one: Qwen's chat format, "estimated");
* KV blocks and the pool: vLLM's arithmetic (``available_bytes // bytes_per_block`` blocks, one
  of them the null block that is never handed out);
* parameters and model dimensions: :mod:`civic_vllm.model_factory` (presets, ``param_counts``).

tests/e2e/test_planner_server.py checks prompt tokens and KV blocks against a live
``vllm serve --model-impl civic``. Importing this module does not import vLLM.

The package is cut along its seams: model_info (what a checkpoint is), tokens (prompt tokens),
plan (the numbers), render (the table) and parse (the values a user types); the command line is
:mod:`civic_vllm.cli.plan`, and the arithmetic of FLOPs and KV lives in :mod:`civic_vllm.cost`.
"""

from __future__ import annotations

from civic_vllm.cost import DTYPE_BYTES, KvLayout, kv_blocks, kv_layout, kv_tokens, layers_and_kv_heads_per_gpu
from civic_vllm.planner.model_info import DEFAULT_RESERVE_BYTES, GiB, ModelInfo, PlanError, load_model
from civic_vllm.planner.parse import parse_bytes, parse_image_size, parse_ratios, parse_video_size
from civic_vllm.planner.plan import PlanRequest, PlanResult, make_plan
from civic_vllm.planner.render import render_table
from civic_vllm.planner.tokens import estimated_template_tokens, resized_image, resized_video, video_timestamps

__all__ = [
    "DEFAULT_RESERVE_BYTES",
    "DTYPE_BYTES",
    "GiB",
    "KvLayout",
    "ModelInfo",
    "PlanError",
    "PlanRequest",
    "PlanResult",
    "estimated_template_tokens",
    "kv_blocks",
    "kv_layout",
    "kv_tokens",
    "layers_and_kv_heads_per_gpu",
    "load_model",
    "make_plan",
    "parse_bytes",
    "parse_image_size",
    "parse_ratios",
    "parse_video_size",
    "render_table",
    "resized_image",
    "resized_video",
    "video_timestamps",
]
