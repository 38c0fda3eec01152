"""Writing a preset as a checkpoint directory that HF transformers and vLLM both load: config,
tokenizer, processor configs and (optionally) seeded random weights, sharded like the hub's.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from civic_vllm.model_factory.hf_config import build_config, build_processor, meta_model
from civic_vllm.model_factory.presets import Family, ModelPreset, TextDims, get_preset
from civic_vllm.model_factory.tokenizer import special_token_ids

if TYPE_CHECKING:
    import torch


# Bump when the bytes make_model writes for a given (preset, seed, dtype) change, so that
# existing directories are rebuilt instead of silently reused.
FACTORY_VERSION = 1
MARKER_FILE = "civic_model.json"


_SHARD_BYTES = 2 * 1024**3
_REQUIRED_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "preprocessor_config.json", "video_preprocessor_config.json", "chat_template.jinja",
)


def _marker(preset: ModelPreset, seed: int, weights: bool, dtype: str) -> dict[str, Any]:
    """What civic_model.json records; JSON round-tripped so it compares equal to a file's."""
    marker = {
        "factory_version": FACTORY_VERSION, "preset": preset.name, "seed": seed,
        "weights": weights, "dtype": dtype,
        "dims": {"text": _text_dims_record(preset.text), "vision": asdict(preset.vision)},
    }
    return json.loads(json.dumps(marker))


def _text_dims_record(text: TextDims) -> dict[str, Any]:
    """asdict without the family fields a dense model leaves unset, so markers written before
    they existed still match (and their checkpoints are not rebuilt)."""
    return {k: v for k, v in asdict(text).items() if not (k in ("moe", "linear_attention") and v is None)}


def _read_marker(out_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((out_dir / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return None


def _is_complete(out_dir: Path, want: dict[str, Any]) -> bool:
    """Same preset, seed, dtype and factory version, every file present (weights if asked)."""
    have = _read_marker(out_dir)
    if have is None:
        return False
    same = {k: v for k, v in have.items() if k != "weights"} == {k: v for k, v in want.items() if k != "weights"}
    if not same or (want["weights"] and not have["weights"]):
        return False
    files = list(_REQUIRED_FILES)
    if have["weights"]:
        index = out_dir / "model.safetensors.index.json"
        if index.exists():
            files += sorted(set(json.loads(index.read_text())["weight_map"].values()))
        else:
            files.append("model.safetensors")
    return all((out_dir / f).is_file() for f in files)


def _init_tensor(name: str, shape: torch.Size, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Random init that gives non-degenerate outputs: N(0, 0.05) matrices, unit norms, zero biases."""
    import torch

    if len(shape) >= 2:
        return torch.empty(shape, dtype=torch.float32).normal_(0.0, 0.05, generator=gen).to(dtype)
    if name.endswith("bias"):
        return torch.zeros(shape, dtype=dtype)
    return torch.ones(shape, dtype=dtype)  # RMSNorm / LayerNorm weights


def _plan_shards(tensors: list[tuple[str, torch.Size]], itemsize: int) -> list[list[tuple[str, torch.Size]]]:
    """Group tensors, in order, into shards of at most _SHARD_BYTES (a bigger tensor gets its own)."""
    shards: list[list[tuple[str, torch.Size]]] = [[]]
    size = 0
    for name, shape in tensors:
        nbytes = math.prod(shape) * itemsize
        if shards[-1] and size + nbytes > _SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    return shards


def _hub_layout(family: Family, name: str, shape: torch.Size) -> list[tuple[str, torch.Size]]:
    """The tensors a hub checkpoint stores for HF in-memory parameter ``name`` of ``shape``.

    Only MoE expert tensors differ (see FAMILIES): HF 5 holds ``experts.gate_up_proj``
    [E, 2I, H] and ``experts.down_proj`` [E, H, I].
    """
    if family.expert_layout is None or not name.endswith(("experts.gate_up_proj", "experts.down_proj")):
        return [(name, shape)]
    experts, out_dim, in_dim = shape
    if family.expert_layout == "fused_in_out":
        return [(name, type(shape)((experts, in_dim, out_dim)))]
    prefix, _, fused = name.rpartition(".")
    if fused == "down_proj":
        parts = [("down_proj", (out_dim, in_dim))]
    else:
        parts = [("gate_proj", (out_dim // 2, in_dim)), ("up_proj", (out_dim // 2, in_dim))]
    return [(f"{prefix}.{e}.{part}.weight", type(shape)(dims)) for e in range(experts) for part, dims in parts]


def _write_weights(cfg, preset: ModelPreset, out_dir: Path, seed: int, dtype: str) -> None:
    """Stream seeded random weights into safetensors shards without materialising the model.

    Names and shapes come from a meta-device HF model, rewritten to the hub layout
    (:func:`_hub_layout`), so HF's and vLLM's loaders both read them as they read real
    checkpoints; tied embeddings are written once (as ``embed_tokens``), like HF's save_pretrained.
    Peak memory is about one shard (2 GiB), so the 8B preset fits in RAM.
    """
    import torch
    from safetensors.torch import save_file

    torch_dtype = getattr(torch, dtype)
    model = meta_model(cfg, preset)
    persistent = model.state_dict().keys()
    in_memory = [(n, p.shape) for n, p in model.named_parameters()]
    in_memory += [(n, b.shape) for n, b in model.named_buffers() if n in persistent]
    tensors = [hub for n, shape in in_memory for hub in _hub_layout(preset.family, n, shape)]
    plan = _plan_shards(tensors, torch_dtype.itemsize)
    gen = torch.Generator().manual_seed(seed)
    meta = {"format": "pt"}
    if len(plan) == 1:
        save_file({n: _init_tensor(n, s, torch_dtype, gen) for n, s in plan[0]},
                  str(out_dir / "model.safetensors"), metadata=meta)
        return
    weight_map: dict[str, str] = {}
    for i, group in enumerate(plan):
        fname = f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors"
        save_file({n: _init_tensor(n, s, torch_dtype, gen) for n, s in group},
                  str(out_dir / fname), metadata=meta)
        weight_map.update({n: fname for n, _ in group})
    total = sum(math.prod(s) for _, s in tensors) * torch_dtype.itemsize
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def write_checkpoint(p: ModelPreset, out_dir: Path, seed: int, weights: bool, dtype: str) -> None:
    """Every file of a Qwen3-VL repo, laid out like the real ones (no processor_config.json)."""
    cfg = build_config(p, dtype=dtype)
    cfg.save_pretrained(out_dir)
    proc = build_processor(p)
    for part in (proc.tokenizer, proc.image_processor, proc.video_processor):
        part.save_pretrained(out_dir)  # the tokenizer also writes chat_template.jinja
    processor_class = {"processor_class": type(proc).__name__}
    # Real Qwen checkpoints name Qwen2Tokenizer: AutoTokenizer then builds Qwen's class (same
    # pre-tokenizer and encodings as ours) in transformers 4 and 5 alike.
    _update_json(out_dir / "tokenizer_config.json", **processor_class, tokenizer_class="Qwen2Tokenizer")
    _update_json(out_dir / "preprocessor_config.json", **processor_class)
    _update_json(out_dir / "video_preprocessor_config.json", **processor_class)
    _write_generation_config(out_dir)
    if weights:
        _write_weights(cfg, p, out_dir, seed, dtype)


def _update_json(path: Path, **fields: Any) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}, indent=2) + "\n")


def _write_generation_config(out_dir: Path) -> None:
    """Greedy decoding that stops at <|im_end|> (or <|endoftext|>), as HF reads it."""
    from transformers import GenerationConfig

    ids = special_token_ids()
    GenerationConfig(
        do_sample=False, eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"], bos_token_id=ids["<|endoftext|>"],
    ).save_pretrained(out_dir)


def make_model(
    preset: str | ModelPreset,
    out_dir: str | os.PathLike[str],
    *,
    seed: int = 0,
    weights: bool = True,
    dtype: str = "bfloat16",
) -> Path:
    """Write a complete checkpoint directory for ``preset`` and return its absolute path.

    Idempotent: a directory already holding this preset, seed and dtype (per its
    ``civic_model.json``) is returned untouched. The checkpoint is built in a sibling temporary
    directory and renamed into place, so concurrent builders and interrupted builds never leave
    a half-written directory behind. An existing directory is only replaced if it is empty or
    was written by this factory; anything else raises rather than deleting a user's files.
    """
    p = get_preset(preset)
    if dtype not in ("bfloat16", "float16", "float32"):
        raise ValueError(f"dtype must be bfloat16, float16 or float32, not {dtype!r}")
    out = Path(out_dir).expanduser().resolve()
    want = _marker(p, seed, weights, dtype)
    if _is_complete(out, want):
        return out
    if out.exists() and any(out.iterdir()) and _read_marker(out) is None:
        raise FileExistsError(f"{out} exists and was not written by civic_vllm.model_factory; not touching it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write_checkpoint(p, tmp, seed, weights, dtype)
        (tmp / MARKER_FILE).write_text(json.dumps(want, indent=2) + "\n")
        if _is_complete(out, want):  # another process finished first
            return out
        if out.exists():
            shutil.rmtree(out)
        make_readable(tmp)
        try:
            os.replace(tmp, out)
        except OSError:
            if not _is_complete(out, want):  # not a concurrent builder of the same thing
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def make_readable(root: Path) -> None:
    """mkdtemp creates 0700: give the directory and its files the usual umask-based modes."""
    umask = os.umask(0)
    os.umask(umask)
    root.chmod(0o777 & ~umask)
    for f in root.iterdir():
        f.chmod(0o666 & ~umask)
