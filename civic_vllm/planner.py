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
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

from civic_vllm import model_factory as mf
from civic_vllm.budget import num_merged_tokens, num_retained, validate_ratio
from civic_vllm.cost import (
    DTYPE_BYTES,
    LayoutError,
    kv_blocks,
    kv_layout,
    kv_tokens,
    layers_and_kv_heads_per_gpu,
    text_prefill_flops,
    vision_flops,
)

__all__ = [
    "DEFAULT_RESERVE_BYTES",
    "ModelInfo",
    "PlanError",
    "PlanRequest",
    "PlanResult",
    "add_plan_parser",
    "estimated_template_tokens",
    "kv_blocks",
    "kv_tokens",
    "load_model",
    "main",
    "make_plan",
    "parse_bytes",
    "parse_image_size",
    "parse_video_size",
    "parse_ratios",
    "render_table",
    "resized_image",
    "run_plan",
]

GiB = 1024**3
MiB = 1024**2

# Qwen3-VL's preprocessor_config.json (also model_factory's): 64 .. 16,384 merged tokens per image.
DEFAULT_MIN_PIXELS = mf.IMAGE_MIN_PIXELS
DEFAULT_MAX_PIXELS = mf.IMAGE_MAX_PIXELS

GPU_BLOCK_SIZE = 16  # vLLM's default on CUDA (attention backends may need another: --block-size)
CPU_BLOCK_SIZE = 128  # vllm/platforms/cpu.py sets 128 unless --block-size is given
GPU_MEMORY_UTILIZATION = 0.9  # vLLM's --gpu-memory-utilization default
# What vLLM's profile run takes besides weights before the KV cache gets the rest: peak
# activations (LLM at --max-num-batched-tokens and the vision tower on its largest dummy
# image), non-torch allocations and CUDA graphs. An assumption, not a measurement: read
# "Available KV cache memory" from the server log and pass --kv-cache-memory to be exact.
DEFAULT_RESERVE_BYTES = 4 * GiB

WEIGHT_DTYPES = ("auto", "bfloat16", "float16", "float32")
KV_DTYPES = ("auto", "bfloat16", "float16", "float32", "fp8", "fp8_e4m3", "fp8_e5m2")

# Repo ids whose dimensions are a preset, for when the config cannot be read offline.
KNOWN_REPOS = {
    f"qwen/qwen3-vl-{size}-{kind}": f"qwen3-vl-{size}"
    for size in ("2b", "4b", "8b")
    for kind in ("instruct", "thinking")
}
# Every family CIVIC serves (model_factory.FAMILIES), by model_type; a config's architectures
# may name the stock or the civic class.
SUPPORTED_ARCHITECTURES = tuple(
    arch for family in mf.FAMILIES.values() for arch in (family.architecture, "Civic" + family.architecture)
)


class PlanError(ValueError):
    """Bad input: the CLI prints ``civic plan: error: <message>`` (one line) and exits 2."""


# --------------------------------------------------------------------------------------
# Parsing of command-line values (also usable from Python)
# --------------------------------------------------------------------------------------

_SIZE_RE = re.compile(r"^\s*(\d+)\s*[x×X*]\s*(\d+)\s*$")
_BYTES_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")
_BYTE_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
# A bare letter means what it means to vLLM's --kv-cache-memory-bytes (human_readable_int).
_LETTER_UNITS = {"k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_image_size(text: str) -> tuple[int, int]:
    """``"WxH"`` -> (width, height), both >= 1."""
    match = _SIZE_RE.match(str(text))
    if not match:
        raise PlanError(f"malformed image size {text!r}: expected WIDTHxHEIGHT in pixels, e.g. 1344x1344")
    width, height = int(match.group(1)), int(match.group(2))
    if width < 1 or height < 1:
        raise PlanError(f"malformed image size {text!r}: width and height must be >= 1 pixel")
    return width, height


def parse_video_size(text: str) -> tuple[int, int, int]:
    """``WIDTHxHEIGHTxFRAMES`` -> (width, height, frames)."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not match:
        raise PlanError(f"malformed video size {text!r}: expected WIDTHxHEIGHTxFRAMES, e.g. 448x448x16")
    width, height, frames = (int(g) for g in match.groups())
    if min(width, height, frames) < 1:
        raise PlanError(f"malformed video size {text!r}: width, height and frames must be >= 1")
    return width, height, frames


def parse_ratios(values: Sequence[str]) -> list[tuple[str, float]]:
    """Each value may be a comma list of decimals or fractions ("0.5,1/3"); returns (label, ratio)."""
    ratios: list[tuple[str, float]] = []
    for value in values:
        for item in str(value).split(","):
            label = item.strip()
            try:
                ratios.append((label, validate_ratio(float(Fraction(label)) if "/" in label else float(label))))
            except (ValueError, ZeroDivisionError):  # the message quotes what the user typed
                raise PlanError(f"retention ratio must be a number in (0, 1], got {label!r}") from None
    if not ratios:
        raise PlanError("no retention ratio given")
    return ratios


def parse_bytes(text: str) -> int:
    """``"80GiB"``, ``"80GB"`` (10**9), ``"1073741824"``; ``"80G"`` = 80 GiB, ``"80g"`` = 80 GB as in vLLM."""
    match = _BYTES_RE.match(str(text))
    unit = match.group(2) if match else ""
    scale = _LETTER_UNITS.get(unit) or _BYTE_UNITS.get(unit.lower())
    if not match or scale is None:
        raise PlanError(f"malformed memory size {text!r}: expected e.g. 80GiB, 80GB, 512MiB or a byte count")
    value = int(float(match.group(1)) * scale)
    if value <= 0:
        raise PlanError(f"memory size must be positive, got {text!r}")
    return value


# --------------------------------------------------------------------------------------
# The model: dimensions, preprocessor bounds, tokenizer
# --------------------------------------------------------------------------------------


@dataclass
class ModelInfo:
    """What the plan needs to know about a model; ``dims`` reuses model_factory's preset types."""

    name: str
    source: str  # "directory", "hf-cache" or "preset"
    dims: mf.ModelPreset
    preset: str | None  # the preset whose dims are used, when no config was read
    config_dtype: str
    min_pixels: int
    max_pixels: int
    pixels_source: str
    tokenizer: Any = None  # a transformers tokenizer with a chat template, or None
    notes: list[str] = field(default_factory=list)
    video_min_pixels: int = mf.VIDEO_MIN_PIXELS  # video_preprocessor_config.json's size (all frames of a group)
    video_max_pixels: int = mf.VIDEO_MAX_PIXELS


def _rope_section(text_config: Any, rotary_dim: int) -> tuple[int, int, int]:
    """The config's M-RoPE split if it is one TextDims accepts; it affects no count here."""
    for attr in ("rope_parameters", "rope_scaling"):
        rope = getattr(text_config, attr, None) or {}
        section = rope.get("mrope_section") if isinstance(rope, dict) else None
        if section and len(section) == 3 and 2 * sum(section) == rotary_dim:
            return tuple(int(s) for s in section)  # type: ignore[return-value]
    half = rotary_dim // 2
    return (half - 2 * (half // 3), half // 3, half // 3)


def _moe_dims(t: Any) -> mf.MoeDims | None:
    if not getattr(t, "num_experts", 0):
        return None
    return mf.MoeDims(num_experts=t.num_experts, num_experts_per_tok=t.num_experts_per_tok,
                      moe_intermediate_size=t.moe_intermediate_size,
                      shared_expert_intermediate_size=getattr(t, "shared_expert_intermediate_size", 0) or 0)


def _linear_attention_dims(t: Any) -> mf.LinearAttentionDims | None:
    layer_types = list(getattr(t, "layer_types", None) or [])
    if "linear_attention" not in layer_types:
        return None
    interval = layer_types.index("full_attention") + 1 if "full_attention" in layer_types else len(layer_types) + 1
    dims = mf.LinearAttentionDims(
        full_attention_interval=interval, num_key_heads=t.linear_num_key_heads,
        num_value_heads=t.linear_num_value_heads, key_head_dim=t.linear_key_head_dim,
        value_head_dim=t.linear_value_head_dim, conv_kernel_dim=t.linear_conv_kernel_dim,
        partial_rotary_factor=_partial_rotary_factor(t),
    )
    if dims.layer_types(len(layer_types)) != layer_types:
        raise PlanError(f"layer_types {layer_types} is not one full-attention layer every {interval}")
    return dims


def _partial_rotary_factor(t: Any) -> float:
    rope = getattr(t, "rope_parameters", None) or {}
    return float(rope.get("partial_rotary_factor") or getattr(t, "partial_rotary_factor", 1.0) or 1.0)


def dims_from_config(cfg: Any, name: str) -> mf.ModelPreset:
    """A Qwen3-VL-family config as a ModelPreset, so param_counts and the presets' checks apply to it."""
    archs = list(getattr(cfg, "architectures", None) or [])
    if getattr(cfg, "model_type", None) not in mf.FAMILIES or (archs and not set(archs) & set(SUPPORTED_ARCHITECTURES)):
        found = ", ".join(archs) or getattr(cfg, "model_type", "?")
        supported = ", ".join(f.architecture for f in mf.FAMILIES.values())
        raise PlanError(f"{name} is {found}; CIVIC serves {supported}")
    t, v = cfg.text_config, cfg.vision_config
    head_dim = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
    tie = bool(getattr(cfg, "tie_word_embeddings", False) or getattr(t, "tie_word_embeddings", False))
    linear = _linear_attention_dims(t)
    rotary_dim = int(head_dim * linear.partial_rotary_factor) if linear else head_dim
    try:
        return mf.ModelPreset(
            name=name,
            text=mf.TextDims(
                hidden_size=t.hidden_size, num_hidden_layers=t.num_hidden_layers,
                num_attention_heads=t.num_attention_heads, num_key_value_heads=t.num_key_value_heads,
                head_dim=head_dim, intermediate_size=getattr(t, "intermediate_size", 0) or 0,
                vocab_size=t.vocab_size, tie_word_embeddings=tie, mrope_section=_rope_section(t, rotary_dim),
                max_position_embeddings=t.max_position_embeddings, moe=_moe_dims(t), linear_attention=linear,
            ),
            vision=mf.VisionDims(
                depth=v.depth, hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                num_heads=v.num_heads, out_hidden_size=v.out_hidden_size,
                deepstack_visual_indexes=tuple(getattr(v, "deepstack_visual_indexes", None) or ()),
                patch_size=v.patch_size,
                spatial_merge_size=v.spatial_merge_size, temporal_patch_size=v.temporal_patch_size,
                num_position_embeddings=v.num_position_embeddings,
            ),
        )
    except ValueError as exc:
        raise PlanError(f"{name}: unsupported model dimensions ({exc})") from None


def _config_dtype(cfg: Any) -> str:
    for obj in (cfg, getattr(cfg, "text_config", None)):
        for attr in ("dtype", "torch_dtype"):
            value = getattr(obj, attr, None)
            if value is not None:
                name = str(value).removeprefix("torch.")
                if name in DTYPE_BYTES:
                    return name
    return "bfloat16"


def _pixel_bounds(preprocessor: dict[str, Any] | None) -> tuple[int, int, str]:
    """(min_pixels, max_pixels) as the HF image processor resolves them: ``size``, then the
    legacy ``min_pixels``/``max_pixels`` keys override (as vLLM's ``_get_vision_size`` does)."""
    if not preprocessor:
        return DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS, "Qwen3-VL defaults (no preprocessor_config.json)"
    size = dict(preprocessor.get("size") or {})
    lo = preprocessor.get("min_pixels") or size.get("shortest_edge") or DEFAULT_MIN_PIXELS
    hi = preprocessor.get("max_pixels") or size.get("longest_edge") or DEFAULT_MAX_PIXELS
    return int(lo), int(hi), "preprocessor_config.json"


def _local_file(location: str, filename: str) -> Path | None:
    """A file of a checkpoint directory or of a repo in the local Hugging Face cache; never downloads."""
    if Path(location).is_dir():
        path = Path(location) / filename
        return path if path.is_file() else None
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(location, filename)
    return Path(cached) if isinstance(cached, str) else None


def _load_tokenizer(location: str, notes: list[str]) -> Any:
    """The checkpoint's tokenizer with its chat template (from chat_template.jinja/.json when the
    tokenizer has none, as vLLM falls back to the processor's), or None."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(location, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure means "no tokenizer": estimate instead
        notes.append(f"no tokenizer ({type(exc).__name__}): template tokens estimated")
        return None
    for filename in ("chat_template.jinja", "chat_template.json"):
        path = None if getattr(tokenizer, "chat_template", None) else _local_file(location, filename)
        if path is not None:
            text = path.read_text()
            tokenizer.chat_template = json.loads(text)["chat_template"] if filename.endswith(".json") else text
    if not getattr(tokenizer, "chat_template", None):
        notes.append("tokenizer has no chat template: template tokens estimated")
        return None
    return tokenizer


def _read_preprocessor(location: str, filename: str = "preprocessor_config.json") -> dict[str, Any] | None:
    path = _local_file(location, filename)
    return json.loads(path.read_text()) if path is not None else None


def _from_preset(preset: str, name: str, notes: list[str]) -> ModelInfo:
    dims = mf.get_preset(preset)
    return ModelInfo(
        name=name, source="preset", dims=dims, preset=preset, config_dtype="bfloat16",
        min_pixels=DEFAULT_MIN_PIXELS, max_pixels=DEFAULT_MAX_PIXELS,
        pixels_source="Qwen3-VL defaults", notes=notes,
    )


def load_model(model: str, *, with_tokenizer: bool = True) -> ModelInfo:
    """A checkpoint directory, a repo id in the local Hugging Face cache, or a preset name.

    Never touches the network (``local_files_only``): offline it fails at once instead of
    retrying. A known Qwen3-VL repo id that is not cached falls back to its preset's dims.
    """
    text = str(model).strip()
    if not text:
        raise PlanError("--model is empty")
    path = Path(text).expanduser()
    presets = ", ".join(sorted(mf.PRESETS))
    if path.is_dir():
        location, source, name = str(path.resolve()), "directory", str(path)
        if not (path / "config.json").is_file():
            raise PlanError(f"{text} has no config.json; pass a Qwen3-VL checkpoint directory or a preset ({presets})")
    elif text in mf.PRESETS:
        return _from_preset(text, text, ["preset dims, no tokenizer: template tokens estimated"])
    elif re.fullmatch(r"[\w.-]+/[\w.-]+", text) and not path.exists():
        location, source, name = text, "hf-cache", text
    else:
        raise PlanError(f"unknown model {text!r}: not a directory, a cached Hugging Face repo or a preset ({presets})")

    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(location, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - offline, not cached, or not a config at all
        if source == "directory":
            raise PlanError(f"cannot read {text}/config.json: {exc}".splitlines()[0]) from None
        preset = KNOWN_REPOS.get(text.lower())
        if preset is None:
            raise PlanError(
                f"cannot read the config of {text!r} offline (not in the Hugging Face cache); "
                f"download it or pass a checkpoint directory or a preset ({presets})"
            ) from None
        return _from_preset(preset, text, [
            f"{text} is not in the local Hugging Face cache: the {preset} preset's dims were used; "
            "template tokens estimated",
        ])
    notes: list[str] = []
    dims = dims_from_config(cfg, name)
    lo, hi, pixels_source = _pixel_bounds(_read_preprocessor(location))
    video = _read_preprocessor(location, "video_preprocessor_config.json") or {}
    video_size = video.get("size") or {}
    tokenizer = _load_tokenizer(location, notes) if with_tokenizer else None
    return ModelInfo(
        name=name, source=source, dims=dims, preset=None, config_dtype=_config_dtype(cfg),
        min_pixels=lo, max_pixels=hi, pixels_source=pixels_source, tokenizer=tokenizer, notes=notes,
        video_min_pixels=int(video_size.get("shortest_edge", mf.VIDEO_MIN_PIXELS)),
        video_max_pixels=int(video_size.get("longest_edge", mf.VIDEO_MAX_PIXELS)),
    )


@functools.lru_cache(maxsize=8)
def _param_counts(dims: mf.ModelPreset) -> dict[str, int]:
    """model_factory.param_counts (a meta-device model: seconds on first use), once per shape."""
    return mf.param_counts(dims)


# --------------------------------------------------------------------------------------
# Tokens
# --------------------------------------------------------------------------------------


def resized_image(width: int, height: int, patch_size: int, merge_size: int,
                  min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(width, height) the Qwen-VL image processor resizes to: transformers' smart_resize, the
    function vLLM's Qwen3-VL processor calls, with factor patch_size * merge_size."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    try:
        h, w = smart_resize(height, width, factor=patch_size * merge_size,
                            min_pixels=min_pixels, max_pixels=max_pixels)
    except ValueError as exc:
        raise PlanError(f"image {width}x{height}: {exc}") from None
    return int(w), int(h)


def estimated_template_tokens(num_images: int, num_videos: int = 0) -> int:
    """Qwen3-VL chat format around one user turn, without a tokenizer: ``<|im_start|> user \\n``,
    ``<|vision_start|> … <|vision_end|>`` per image or video, ``<|im_end|> \\n <|im_start|> assistant \\n``.
    Every piece is one token in Qwen's tokenizer (tested against a real template render)."""
    return 8 + 2 * (num_images + num_videos)


def _user_turn(num_images: int, question: str, num_videos: int = 0) -> list[dict[str, Any]]:
    """The conversation vLLM hands the chat template for an OpenAI request with ``num_videos``
    video and ``num_images`` image parts then one text part (OpenAI content format, which
    Qwen3-VL's template uses)."""
    parts: list[dict[str, Any]] = [{"type": "video"} for _ in range(num_videos)]
    parts += [{"type": "image"} for _ in range(num_images)]
    parts.append({"type": "text", "text": question})
    return [{"role": "user", "content": parts}]


@functools.lru_cache(maxsize=64)
def _exact_template_tokens(tokenizer: Any, num_images: int, question: str, num_videos: int = 0) -> tuple[int, int]:
    """(non-visual prompt tokens, question tokens) of the rendered prompt, each image's
    ``<|image_pad|>`` and each video's ``<|video_pad|>`` (which the processor expands) not counted."""
    prompt = tokenizer.apply_chat_template(_user_turn(num_images, question, num_videos), tokenize=False,
                                           add_generation_prompt=True)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    for token, count in (("<|image_pad|>", num_images), ("<|video_pad|>", num_videos)):
        pad = tokenizer.convert_tokens_to_ids(token)
        if ids.count(pad) != count:
            raise PlanError(f"the chat template rendered {ids.count(pad)} {token} for {count} items")
    question_ids = tokenizer(question, add_special_tokens=False)["input_ids"] if question else []
    return len(ids) - num_images - num_videos, len(question_ids)


def _video_replaces_markers() -> bool:
    """Whether the processor replaces a video's whole ``<|vision_start|><|video_pad|><|vision_end|>``
    (transformers < 5.10) rather than the pad alone: vLLM's ``_expands_only_video_token`` test."""
    from transformers import ProcessorMixin
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

    own = getattr(Qwen3VLProcessor, "replace_video_token", None)
    return own is None or own is getattr(ProcessorMixin, "replace_video_token", None)


def video_timestamps(frames: int, temporal_patch_size: int, fps: float = 2.0) -> list[float]:
    """Seconds of each frame group, as vLLM's Qwen3-VL processor computes them for frames
    0..frames-1 sampled at ``fps`` (the last frame repeated to fill the last group)."""
    indices = list(range(frames)) + [frames - 1] * (-frames % temporal_patch_size)
    return [(indices[i] + indices[i + temporal_patch_size - 1]) / 2 / fps
            for i in range(0, len(indices), temporal_patch_size)]


def resized_video(width: int, height: int, frames: int, patch_size: int, merge_size: int, temporal_patch_size: int,
                  min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(width, height) Qwen3-VL's video processor resizes every frame to (transformers' video smart_resize)."""
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize

    try:
        h, w = smart_resize(frames, height, width, temporal_factor=temporal_patch_size,
                            factor=patch_size * merge_size, min_pixels=min_pixels, max_pixels=max_pixels)
    except ValueError as exc:
        raise PlanError(f"video {width}x{height}x{frames}: {exc}") from None
    return int(w), int(h)


@dataclass
class PlanRequest:
    """One request shape and the deployment it runs on (the CLI's flags)."""

    images: list[tuple[int, int]]  # (width, height) of each image, in prompt order
    videos: list[tuple[int, int, int]] = field(default_factory=list)  # (width, height, frames) of each video
    video_ratio: float | None = None  # civic_video_ratio; None: each scenario's ratio
    ratios: list[tuple[str, float]] = field(default_factory=lambda: [("1/3", 1 / 3)])
    text_tokens: int | None = None  # tokens of the question; ignored when question is set
    question: str | None = None
    max_tokens: int = 256  # output tokens per request
    min_tokens: int = 1  # civic_min_tokens
    exit_layer: int | None = None
    dtype: str = "auto"
    kv_dtype: str = "auto"
    device: str = "gpu"
    block_size: int | None = None
    gpu_memory: int = 80 * GiB
    gpu_memory_utilization: float = GPU_MEMORY_UTILIZATION
    reserve: int = DEFAULT_RESERVE_BYTES
    kv_cache_memory: int | None = None
    tensor_parallel_size: int = 1  # vLLM's --tensor-parallel-size: KV heads split across ranks
    pipeline_parallel_size: int = 1  # vLLM's --pipeline-parallel-size: layers split across stages


@dataclass
class ImagePlan:
    input_size: list[int]  # [width, height]
    resized_size: list[int]
    grid_thw: list[int]  # patches
    patches: int
    merged_tokens: int  # N


@dataclass
class VideoPlan:
    input_size: list[int]  # [width, height, frames]
    resized_size: list[int]  # [width, height] of every frame
    grid_thw: list[int]  # [frame groups, patch rows, patch cols]
    patches: int  # all groups
    tokens_per_group: int  # N_t
    merged_tokens: int  # N, all groups
    text_tokens: int  # timestamps and vision markers the processor adds around the groups


@dataclass
class Scenario:
    """One column of the table: vanilla (all N tokens) or CIVIC at one ratio."""

    label: str
    ratio: float | None
    retained_per_image: list[int]
    retained_per_video: list[int]  # all groups of each video: groups x K_t
    visual_tokens: int
    prompt_tokens: int
    kv_tokens: int  # prompt + max_tokens - 1: see kv_tokens()
    kv_blocks: int
    kv_bytes: int  # kv_tokens x bytes per token
    kv_block_bytes: int  # kv_blocks x bytes per block: what is allocated
    requests_fit: int
    vision_flops: int
    llm_flops: int
    prefill_flops: int
    vs_vanilla: dict[str, float | None]  # this / vanilla; None where vanilla is 0


@dataclass
class PlanResult:
    """Everything ``civic plan`` prints; ``to_json`` is the ``--json`` output."""

    model: dict[str, Any]
    images: list[ImagePlan]
    videos: list[VideoPlan]
    text: dict[str, Any]
    kv: dict[str, Any]
    memory: dict[str, Any]
    exit_layer: int | None
    scenarios: list[Scenario]
    notes: list[str]

    @property
    def vanilla(self) -> Scenario:
        return self.scenarios[0]

    @property
    def civic(self) -> list[Scenario]:
        return self.scenarios[1:]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def _weights_dtype(requested: str, config_dtype: str) -> str:
    """vLLM's --dtype auto: the config's dtype, except float32 checkpoints run in bfloat16."""
    if requested != "auto":
        return requested
    return "bfloat16" if config_dtype == "float32" else config_dtype


def _memory(req: PlanRequest, weights_bytes: int, block_bytes: int) -> dict[str, Any]:
    """The KV pool as vLLM sizes it: memory left -> ``// block_bytes`` blocks, one of them null."""
    if req.kv_cache_memory is not None:
        pool, how = req.kv_cache_memory, "given (--kv-cache-memory): exact"
    else:
        pool = int(req.gpu_memory * req.gpu_memory_utilization) - weights_bytes - req.reserve
        how = "estimated: memory x utilization - weights - assumed reserve"
    num_blocks = max(pool, 0) // block_bytes
    return {
        "device": req.device,
        "device_memory_bytes": req.gpu_memory if req.kv_cache_memory is None else None,
        "memory_utilization": req.gpu_memory_utilization if req.kv_cache_memory is None else None,
        "weights_bytes": weights_bytes,
        "reserve_bytes": req.reserve if req.kv_cache_memory is None else None,
        "kv_cache_bytes": max(pool, 0),
        "kv_cache_source": how,
        "num_blocks": num_blocks,  # what vLLM reports as num_gpu_blocks
        "usable_blocks": max(num_blocks - 1, 0),  # minus the null block
    }


def make_plan(model: ModelInfo, req: PlanRequest) -> PlanResult:
    """The numbers for one request shape; pure given ``model`` (raises PlanError on bad input)."""
    t, v = model.dims.text, model.dims.vision
    if not req.images and not req.videos:
        raise PlanError("at least one --image or --video is needed")
    if req.video_ratio is not None:
        validate_ratio(req.video_ratio, "--video-ratio")
    ratios = [(label, validate_ratio(r)) for label, r in req.ratios] if req.ratios else []
    if req.exit_layer is not None and not 1 <= req.exit_layer <= v.depth:
        raise PlanError(f"--exit-layer must be in 1..{v.depth} (vision blocks of {model.name}), got {req.exit_layer}")
    for name, value, low in (("--max-tokens", req.max_tokens, 0), ("--min-tokens", req.min_tokens, 1),
                             ("--text-tokens", req.text_tokens or 0, 0)):
        if value < low:
            raise PlanError(f"{name} must be >= {low}, got {value}")
    if not 0 < req.gpu_memory_utilization <= 1:
        raise PlanError(f"--gpu-memory-utilization must be in (0, 1], got {req.gpu_memory_utilization}")
    if req.dtype not in WEIGHT_DTYPES or req.kv_dtype not in KV_DTYPES:
        raise PlanError(f"unknown dtype {req.dtype!r} / kv dtype {req.kv_dtype!r}")
    if req.device not in ("gpu", "cpu"):
        raise PlanError(f"--device must be gpu or cpu, got {req.device!r}")
    block_size = req.block_size or (CPU_BLOCK_SIZE if req.device == "cpu" else GPU_BLOCK_SIZE)
    if block_size < 1:
        raise PlanError(f"--block-size must be >= 1, got {block_size}")

    # Images: N per image from the resized grid.
    m = v.spatial_merge_size
    images = []
    for width, height in req.images:
        rw, rh = resized_image(width, height, v.patch_size, m, model.min_pixels, model.max_pixels)
        grid = [1, rh // v.patch_size, rw // v.patch_size]
        images.append(ImagePlan([width, height], [rw, rh], grid, grid[1] * grid[2], num_merged_tokens(grid, m)))
    n_per_image = [im.merged_tokens for im in images]
    videos = [_video_plan(model, size) for size in req.videos]

    # Text: template overhead + question.
    notes = list(model.notes)
    if model.tokenizer is not None:
        template_and_question, question_tokens = _exact_template_tokens(
            model.tokenizer, len(images), req.question or "", len(videos))
        if req.question is None:
            question_tokens = req.text_tokens or 0
            template_and_question += question_tokens
        exact = True
    else:
        if req.question is not None:
            question_tokens = len(mf.build_tokenizer()(req.question, add_special_tokens=False)["input_ids"])
            notes.append("question tokens counted with civic's local Qwen-style tokenizer (estimate)")
        else:
            question_tokens = req.text_tokens or 0
        template_and_question = estimated_template_tokens(len(images), len(videos)) + question_tokens
        exact = False
    template_and_question += sum(video.text_tokens for video in videos)
    template_tokens = template_and_question - question_tokens

    # KV geometry and memory, per GPU (per worker process on CPU).
    weights_dtype = _weights_dtype(req.dtype, model.config_dtype)
    kv_dtype = weights_dtype if req.kv_dtype == "auto" else req.kv_dtype
    try:
        layers, kv_heads = layers_and_kv_heads_per_gpu(model.dims, req.tensor_parallel_size, req.pipeline_parallel_size)
        layout = kv_layout(t, block_size, kv_dtype, layers=layers, kv_heads=kv_heads)
    except LayoutError as exc:
        raise PlanError(str(exc)) from None
    block_size, block_bytes, bytes_per_token = layout.block_size, layout.block_bytes, layout.bytes_per_token
    params = _param_counts(model.dims)
    gpus = req.tensor_parallel_size * req.pipeline_parallel_size
    weights_bytes = params["total"] * DTYPE_BYTES[weights_dtype] // gpus
    if gpus > 1:
        notes.append(f"{gpus} GPUs (TP {req.tensor_parallel_size} x PP {req.pipeline_parallel_size}): KV and pool "
                     "per GPU; weights per GPU estimated as total / GPUs; KV blocks per request are the same "
                     "on every GPU")
    memory = _memory(req, weights_bytes, block_bytes)
    if memory["kv_cache_bytes"] == 0:
        notes.append("weights + reserve exceed the usable memory: no KV cache is left")

    vocab = t.vocab_size or mf.TOKENIZER_VOCAB_SIZE

    def scenario(label: str, ratio: float | None, exit_layer: int | None) -> Scenario:
        kept = n_per_image if ratio is None else [num_retained(n, ratio, req.min_tokens) for n in n_per_image]
        video_ratio = ratio if req.video_ratio is None or ratio is None else req.video_ratio
        kept_videos = [
            video.merged_tokens if video_ratio is None
            else video.grid_thw[0] * num_retained(video.tokens_per_group, video_ratio, req.min_tokens)
            for video in videos
        ]
        prompt = template_and_question + sum(kept) + sum(kept_videos)
        held = kv_tokens(prompt, req.max_tokens)
        blocks = layout.blocks(held)
        vision = sum(vision_flops(v, im.patches, k, exit_layer) for im, k in zip(images, kept))
        # A video's frame groups attend within themselves; its mergers run on every token.
        vision += sum(video.grid_thw[0] * vision_flops(v, video.patches // video.grid_thw[0], video.tokens_per_group)
                      for video in videos)
        llm = text_prefill_flops(t, prompt, vocab)
        return Scenario(
            label=label, ratio=ratio, retained_per_image=kept, retained_per_video=kept_videos,
            visual_tokens=sum(kept) + sum(kept_videos),
            prompt_tokens=prompt, kv_tokens=held, kv_blocks=blocks,
            kv_bytes=held * bytes_per_token, kv_block_bytes=blocks * block_bytes,
            requests_fit=memory["usable_blocks"] // blocks if blocks else 0,
            vision_flops=vision, llm_flops=llm, prefill_flops=vision + llm, vs_vanilla={},
        )

    vanilla = scenario("vanilla", None, None)
    scenarios = [vanilla] + [scenario(f"r={label}", r, req.exit_layer) for label, r in ratios]
    for s in scenarios:
        s.vs_vanilla = {
            "visual_tokens": s.visual_tokens / vanilla.visual_tokens,
            "prompt_tokens": s.prompt_tokens / vanilla.prompt_tokens,
            "kv_blocks": s.kv_blocks / vanilla.kv_blocks,
            "requests_fit": s.requests_fit / vanilla.requests_fit if vanilla.requests_fit else None,
            # The LLM-side limit (T + N) / (T + K): prompt length only.
            "llm_token_speedup_limit": vanilla.prompt_tokens / s.prompt_tokens,
            "llm_flops_speedup": vanilla.llm_flops / s.llm_flops,
            "prefill_speedup_limit": vanilla.prefill_flops / s.prefill_flops,
        }
    if req.exit_layer is not None:
        notes.append(f"exit layer {req.exit_layer}: vision blocks {req.exit_layer + 1}..{v.depth} (1-based) run on "
                     "kept groups only, as the server does with civic_exit_layer")

    return PlanResult(
        model={
            "name": model.name, "source": model.source, "preset": model.preset,
            "dtype": weights_dtype, "kv_dtype": kv_dtype, "params": params,
            "family": model.dims.family.architecture,
            "text_layers": t.num_hidden_layers, "kv_heads": t.num_key_value_heads, "head_dim": t.head_dim,
            "tensor_parallel_size": req.tensor_parallel_size, "pipeline_parallel_size": req.pipeline_parallel_size,
            "layers_per_gpu": layers, "kv_heads_per_gpu": kv_heads,
            "vision_depth": v.depth, "patch_size": v.patch_size, "merge_size": m,
            "min_pixels": model.min_pixels, "max_pixels": model.max_pixels, "pixels_source": model.pixels_source,
            # vLLM profiles and sizes the encoder cache for one image of max_pixels: this many
            # tokens (16,384 for Qwen3-VL), whatever the real images are; CIVIC keeps it at N.
            "max_image_tokens": model.max_pixels // (v.patch_size * m) ** 2,
        },
        images=images,
        videos=videos,
        text={"question_tokens": question_tokens, "template_tokens": template_tokens,
              "question": req.question, "exact": exact},
        kv={"bytes_per_token": bytes_per_token, "block_size": block_size, "block_bytes": block_bytes,
            "max_tokens": req.max_tokens, "full_attention_layers": t.num_full_attention_layers,
            "full_attention_layers_per_gpu": layout.attention_layers,
            "state_blocks_per_request": layout.state_blocks},
        memory=memory,
        exit_layer=req.exit_layer,
        scenarios=scenarios,
        notes=notes,
    )


# --------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------


def _video_plan(model: ModelInfo, size: tuple[int, int, int]) -> VideoPlan:
    """Grid, N and the processor's text tokens of one video (see the module docstring)."""
    v = model.dims.vision
    width, height, frames = size
    rw, rh = resized_video(width, height, frames, v.patch_size, v.spatial_merge_size, v.temporal_patch_size,
                           model.video_min_pixels, model.video_max_pixels)
    grid = [-(-frames // v.temporal_patch_size), rh // v.patch_size, rw // v.patch_size]
    tokenize = (model.tokenizer or mf.build_tokenizer())
    stamps = sum(len(tokenize(f"<{stamp:.1f} seconds>", add_special_tokens=False)["input_ids"])
                 for stamp in video_timestamps(frames, v.temporal_patch_size))
    markers = 2 * grid[0] - (2 if _video_replaces_markers() else 0)  # the template's own pair replaced
    n = num_merged_tokens(grid, v.spatial_merge_size)
    return VideoPlan([width, height, frames], [rw, rh], grid, grid[0] * grid[1] * grid[2], n // grid[0], n,
                     stamps + markers)


def _gib(n: float) -> str:
    return f"{n / GiB:,.2f} GiB"


def _size(n: float) -> str:
    return f"{n / GiB:,.2f} GiB" if n >= GiB else f"{n / MiB:,.1f} MiB"


def _flops(n: float) -> str:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if n >= scale:
            return f"{n / scale:,.2f} {unit}"
    return f"{n:,.0f} FLOP"


def _x(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def render_table(plan: PlanResult) -> str:
    """The terminal table: vanilla and each ratio side by side, civic/vanilla in parentheses."""
    mdl, kv, mem, text = plan.model, plan.kv, plan.memory, plan.text
    source = {"directory": "checkpoint", "hf-cache": "HF cache", "preset": f"preset {mdl['preset']}"}[mdl["source"]]
    images = ", ".join(
        f"{im.input_size[0]}x{im.input_size[1]}"
        + ("" if im.input_size == im.resized_size else f"->{im.resized_size[0]}x{im.resized_size[1]}")
        + f" (N={im.merged_tokens})"
        for im in plan.images
    )
    if plan.images:
        images = f"{len(plan.images)} image{'s' * (len(plan.images) > 1)} {images}"
    images = ", ".join([images] * bool(images) + [
        f"video {vd.input_size[0]}x{vd.input_size[1]}x{vd.input_size[2]}->{vd.grid_thw[0]} groups of "
        f"{vd.resized_size[0]}x{vd.resized_size[1]} (N={vd.merged_tokens})"
        for vd in plan.videos
    ])
    lines = [
        f"civic plan: {mdl['name']} ({source}), weights {mdl['dtype']}, KV cache {mdl['kv_dtype']}",
        f"request: {images}; "
        f"{text['question_tokens']} question + {text['template_tokens']} template tokens"
        f"{'' if text['exact'] else ' (estimated)'}; {kv['max_tokens']} output tokens",
        f"images are resized to {mdl['min_pixels']:,}..{mdl['max_pixels']:,} pixels ({mdl['pixels_source']}); "
        f"vLLM's profiling and encoder cache assume {mdl['max_image_tokens']:,} tokens per image",
        f"KV: {kv['bytes_per_token']:,} B/token per GPU = 2 x {kv['full_attention_layers_per_gpu']} "
        f"full-attention layers x {mdl['kv_heads_per_gpu']} KV heads x {mdl['head_dim']} x "
        f"{DTYPE_BYTES[mdl['kv_dtype']]} B; block {kv['block_size']} tokens = {_size(kv['block_bytes'])}",
    ]
    if kv["state_blocks_per_request"]:
        lines.append(f"{mdl['family']}: {mdl['text_layers'] - kv['full_attention_layers']} linear-attention layers "
                     f"keep a fixed-size state, {kv['state_blocks_per_request']} blocks per request at any length")
    if mem["device_memory_bytes"] is not None:
        lines.append(
            f"KV pool: {_gib(mem['device_memory_bytes'])} x {mem['memory_utilization']:g} - weights "
            f"{_gib(mem['weights_bytes'])} ({mdl['params']['total'] / 1e9:.2f} B params) - reserve "
            f"{_gib(mem['reserve_bytes'])} (assumed) = {_gib(mem['kv_cache_bytes'])} "
            f"= {mem['num_blocks']:,} blocks ({mem['usable_blocks']:,} usable)"
        )
    else:
        lines.append(f"KV pool: {_gib(mem['kv_cache_bytes'])} (given) = {mem['num_blocks']:,} blocks "
                     f"({mem['usable_blocks']:,} usable); weights {_gib(mem['weights_bytes'])}")

    rows: list[tuple[str, Any, Any]] = [  # (label, value of a scenario, key of the civic/vanilla ratio)
        ("visual tokens", lambda s: f"{s.visual_tokens:,}", "visual_tokens"),
        ("prompt tokens", lambda s: f"{s.prompt_tokens:,}", "prompt_tokens"),
        ("KV tokens (prompt + output - 1)", lambda s: f"{s.kv_tokens:,}", None),
        ("KV blocks / request", lambda s: f"{s.kv_blocks:,}", "kv_blocks"),
        ("KV bytes / request", lambda s: _size(s.kv_block_bytes), None),
        ("requests that fit", lambda s: f"{s.requests_fit:,}", "requests_fit"),
        ("vision prefill", lambda s: _flops(s.vision_flops), None),
        ("LLM prefill", lambda s: _flops(s.llm_flops), None),
        ("total prefill", lambda s: _flops(s.prefill_flops), None),
        ("LLM speed-up limit (tokens)", lambda s: _x(s.vs_vanilla["llm_token_speedup_limit"]), None),
        ("LLM speed-up (FLOPs)", lambda s: _x(s.vs_vanilla["llm_flops_speedup"]), None),
        ("prefill speed-up limit (FLOPs)", lambda s: _x(s.vs_vanilla["prefill_speedup_limit"]), None),
    ]
    header = ["", *(s.label for s in plan.scenarios)]
    body = []
    for label, value, ratio_key in rows:
        cells = [label]
        for i, s in enumerate(plan.scenarios):
            cell = value(s)
            if ratio_key and i:
                cell += f" ({_x(s.vs_vanilla[ratio_key])})"
            cells.append(cell)
        body.append(cells)
    widths = [max(len(r[c]) for r in [header, *body]) for c in range(len(header))]
    fmt = [lambda x, w=widths[0]: x.ljust(w)] + [lambda x, w=w: x.rjust(w) for w in widths[1:]]
    table = ["  ".join(f(c) for f, c in zip(fmt, r)).rstrip() for r in [header, *body]]
    table.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join([*lines, "", *table, *(f"note: {n}" for n in plan.notes)])


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------


def _arg(parse):
    """Wrap a parser so argparse reports its PlanError message (one line, exit 2)."""
    def convert(text: str):
        try:
            return parse(text)
        except PlanError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    convert.__name__ = parse.__name__
    return convert


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise PlanError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise PlanError(f"must be >= {low}, got {value}")
        return value
    return _arg(parse)


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text!r}")
    return value


def _one_line_error(prog: str):
    def error(message: str):
        print(f"{prog}: error: {' '.join(str(message).split())}", file=sys.stderr)
        raise SystemExit(2)
    return error


def _configure(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.error = _one_line_error("civic plan")  # type: ignore[method-assign]
    parser.add_argument("--model", default=None,
                        help="checkpoint directory, Hugging Face repo id (local cache only) or preset "
                             f"({', '.join(sorted(mf.PRESETS))}); default: the trained models/civic-shapes-tiny")
    parser.add_argument("--image", action="append", default=[], type=_arg(parse_image_size), metavar="WxH",
                        help="image size in pixels; repeat for several images of different sizes")
    parser.add_argument("--video", action="append", default=[], type=_arg(parse_video_size), metavar="WxHxFRAMES",
                        help="video frame size in pixels and the frames that reach the model (after sampling, "
                             "2 per second by default); repeat for several videos")
    parser.add_argument("--video-ratio", type=_fraction, default=None, metavar="R",
                        help="civic_video_ratio: retention of each frame group (default: each --ratio)")
    parser.add_argument("--images", type=_int_at_least(1), default=None, metavar="N",
                        help="number of images of the (single) --image size (default 1)")
    text = parser.add_mutually_exclusive_group()
    text.add_argument("--text-tokens", type=_int_at_least(0), default=None, metavar="T",
                      help="question tokens (default 0)")
    text.add_argument("--question", default=None, help="the question text: counted exactly with the model's tokenizer")
    parser.add_argument("--ratio", action="append", default=None, metavar="R",
                        help="CIVIC retention ratio(s) in (0, 1]; repeat or comma-separate, fractions ok "
                             "(default 1/3)")
    parser.add_argument("--min-tokens", type=_int_at_least(1), default=1, help="civic_min_tokens (default 1)")
    parser.add_argument("--exit-layer", type=_int_at_least(1), default=None, metavar="L",
                        help="like civic_exit_layer: blocks after the first L run on the kept groups only")
    parser.add_argument("--max-tokens", type=_int_at_least(0), default=256, help="output tokens (default 256)")
    parser.add_argument("--device", choices=("gpu", "cpu"), default="gpu")
    parser.add_argument("--gpu-memory", type=_arg(parse_bytes), default=80 * GiB, metavar="SIZE",
                        help="device memory, e.g. 80GiB (default 80GiB)")
    parser.add_argument("--gpu-memory-utilization", type=_fraction, default=GPU_MEMORY_UTILIZATION,
                        help="vLLM's --gpu-memory-utilization (default 0.9)")
    parser.add_argument("--reserve", type=_arg(parse_bytes), default=DEFAULT_RESERVE_BYTES, metavar="SIZE",
                        help="assumed activation/profile/CUDA-graph memory besides weights (default 4GiB)")
    parser.add_argument("--kv-cache-memory", type=_arg(parse_bytes), default=None, metavar="SIZE",
                        help="exact KV pool size (vLLM's --kv-cache-memory-bytes / VLLM_CPU_KVCACHE_SPACE)")
    parser.add_argument("--block-size", type=_int_at_least(1), default=None,
                        help=f"KV block size in tokens (default {GPU_BLOCK_SIZE} on gpu, {CPU_BLOCK_SIZE} on cpu)")
    parser.add_argument("--dtype", choices=WEIGHT_DTYPES, default="auto",
                        help="weights dtype (auto: the config's; float32 checkpoints -> bfloat16 as in vLLM)")
    parser.add_argument("--kv-dtype", choices=KV_DTYPES, default="auto", help="KV cache dtype (auto: weights dtype)")
    parser.add_argument("--tensor-parallel-size", type=_int_at_least(1), default=1, metavar="TP",
                        help="vLLM's --tensor-parallel-size: KV heads per GPU (default 1)")
    parser.add_argument("--pipeline-parallel-size", type=_int_at_least(1), default=1, metavar="PP",
                        help="vLLM's --pipeline-parallel-size: layers per GPU (default 1)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.set_defaults(handler=run_plan)
    return parser


def add_plan_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``plan`` on the ``civic`` command's subparsers; its handler returns an exit code."""
    parser = subparsers.add_parser(
        "plan", help="tokens, KV blocks, requests per GPU and prefill FLOPs of an image or video request",
        description="Plan an image or video request for vanilla Qwen3-VL and CIVIC without a GPU run.",
    )
    return _configure(parser)


def request_from_args(args: argparse.Namespace) -> PlanRequest:
    images = list(args.image)
    if not images and not args.video:
        raise PlanError("at least one --image or --video is needed")
    if args.images is not None:
        if len(images) != 1:
            raise PlanError("--images N repeats one --image size; with several --image, leave --images out")
        images = images * args.images
    return PlanRequest(
        images=images, videos=list(args.video), video_ratio=args.video_ratio,
        ratios=parse_ratios(args.ratio or ["1/3"]), text_tokens=args.text_tokens,
        question=args.question, max_tokens=args.max_tokens, min_tokens=args.min_tokens,
        exit_layer=args.exit_layer, dtype=args.dtype, kv_dtype=args.kv_dtype, device=args.device,
        block_size=args.block_size, gpu_memory=args.gpu_memory,
        gpu_memory_utilization=args.gpu_memory_utilization, reserve=args.reserve,
        kv_cache_memory=args.kv_cache_memory, tensor_parallel_size=args.tensor_parallel_size,
        pipeline_parallel_size=args.pipeline_parallel_size,
    )


def run_plan(args: argparse.Namespace) -> int:
    """The ``plan`` handler: 0 and the table (or JSON) on stdout, 2 and one line on stderr."""
    try:
        request = request_from_args(args)
        if args.model is None:
            from civic_vllm.model_factory import default_model

            args.model = default_model()
        plan = make_plan(load_model(args.model), request)
    except PlanError as exc:
        print(f"civic plan: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    try:
        print(plan.to_json() if args.json else render_table(plan))
    except BrokenPipeError:  # `civic plan ... | head`: not an error
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - keeps the interpreter's final flush quiet
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m civic_vllm.planner ARGS`` = ``civic plan ARGS``."""
    parser = _configure(argparse.ArgumentParser(prog="civic plan"))
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    return args.handler(args)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
