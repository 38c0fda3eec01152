"""What the planner knows of a model: dimensions (from its config.json, or a preset offline),
preprocessor pixel bounds, dtype and tokenizer; vLLM's deployment defaults."""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from civic_vllm import model_factory as mf
from civic_vllm.cost import (
    DTYPE_BYTES,
)

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
SSM_DTYPES = ("auto", "float32", "bfloat16", "float16")  # vLLM's --mamba-ssm-cache-dtype

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
def param_counts(dims: mf.ModelPreset) -> dict[str, int]:
    """model_factory.param_counts (a meta-device model: seconds on first use), once per shape."""
    return mf.param_counts(dims)
