"""The plan of one request shape: N and K per image and video, prompt tokens, KV blocks and
bytes per GPU, requests that fit the pool, prefill FLOPs, for vanilla and each ratio."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from civic_vllm import model_factory as mf
from civic_vllm.budget import (
    num_merged_tokens,
    num_retained,
    num_retained_per_group,
    validate_ratio,
    video_span_text_tokens,
)
from civic_vllm.cost import (
    DTYPE_BYTES,
    LayoutError,
    kv_layout,
    kv_tokens,
    layers_and_kv_heads_per_gpu,
    text_prefill_flops,
    vision_flops,
)
from civic_vllm.planner.model_info import (
    CPU_BLOCK_SIZE,
    DEFAULT_RESERVE_BYTES,
    GPU_BLOCK_SIZE,
    GPU_MEMORY_UTILIZATION,
    KV_DTYPES,
    WEIGHT_DTYPES,
    GiB,
    ModelInfo,
    PlanError,
    param_counts,
)
from civic_vllm.planner.tokens import (
    estimated_template_tokens,
    exact_template_tokens,
    resized_image,
    resized_video,
    video_replaces_markers,
    video_timestamps,
)


@dataclass
class PlanRequest:
    """One request shape and the deployment it runs on (the CLI's flags)."""

    images: list[tuple[int, int]]  # (width, height) of each image, in prompt order
    videos: list[tuple[int, int, int]] = field(default_factory=list)  # (width, height, frames) of each video
    video_ratio: float | None = None  # civic_video_ratio; None: each scenario's ratio
    video_exit_layer: int | None = None  # civic_video_exit_layer
    ratios: list[tuple[str, float]] = field(default_factory=lambda: [("1/3", 1 / 3)])
    text_tokens: int | None = None  # tokens of the question; ignored when question is set
    question: str | None = None
    max_tokens: int = 256  # output tokens per request
    min_tokens: int = 1  # civic_min_tokens
    exit_layer: int | None = None
    exit_context: bool = False  # civic_exit_context: the blocks after the exit layer also read the dropped groups
    dtype: str = "auto"
    kv_dtype: str = "auto"
    mamba_ssm_cache_dtype: str = "auto"  # vLLM's --mamba-ssm-cache-dtype: a hybrid's recurrent state
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
    span_text_tokens: int  # timestamps and markers inside the placeholder span (what civic_video_ratio counts)


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
    if req.video_exit_layer is not None and not 1 <= req.video_exit_layer <= v.depth:
        raise PlanError(f"--video-exit-layer must be in 1..{v.depth} (vision blocks of {model.name}), "
                        f"got {req.video_exit_layer}")
    if req.exit_context and req.exit_layer is None:
        raise PlanError("--exit-context needs --exit-layer (the context feeds the blocks after the exit layer)")
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
        template_and_question, question_tokens = exact_template_tokens(
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
        layout = kv_layout(t, block_size, kv_dtype, layers=layers, kv_heads=kv_heads,
                           ssm_dtype=ssm_state_dtype(req.device, req.mamba_ssm_cache_dtype))
    except LayoutError as exc:
        raise PlanError(str(exc)) from None
    block_size, block_bytes, bytes_per_token = layout.block_size, layout.block_bytes, layout.bytes_per_token
    params = param_counts(model.dims)
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
            else video.grid_thw[0] * num_retained_per_group(video.grid_thw, v.spatial_merge_size, video_ratio,
                                                            req.min_tokens, video.span_text_tokens)
            for video in videos
        ]
        prompt = template_and_question + sum(kept) + sum(kept_videos)
        held = kv_tokens(prompt, req.max_tokens)
        blocks = layout.blocks(held)
        vision = sum(vision_flops(v, im.patches, k, exit_layer, req.exit_context) for im, k in zip(images, kept))
        # A video's frame groups attend within themselves. On the encoder output its mergers run on every
        # token; with a video exit layer the later blocks and the mergers run on the K_t kept per group.
        video_exit = req.video_exit_layer if ratio is not None else None
        vision += sum(
            video.grid_thw[0] * vision_flops(v, video.patches // video.grid_thw[0],
                                             video.tokens_per_group if video_exit is None else k // video.grid_thw[0],
                                             video_exit)
            for video, k in zip(videos, kept_videos))
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
    if req.video_exit_layer is not None and videos:
        notes.append(f"video exit layer {req.video_exit_layer}: vision blocks {req.video_exit_layer + 1}..{v.depth} "
                     "and the mergers run on each frame group's kept tokens only (civic_video_exit_layer)")
    if req.exit_layer is not None:
        notes.append(f"exit layer {req.exit_layer}: vision blocks {req.exit_layer + 1}..{v.depth} (1-based) run on "
                     "kept groups only, as the server does with civic_exit_layer"
                     + ("; with civic_exit_context their attention also reads the dropped groups' keys and values"
                        if req.exit_context else ""))

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


def ssm_state_dtype(device: str, requested: str = "auto") -> str | None:
    """The linear-attention recurrent state's dtype where it differs from the KV cache's.

    ``requested`` is vLLM's ``--mamba-ssm-cache-dtype``: a dtype given there is used as given.
    With ``auto``, vLLM 0.32's CPU backend stores the state in float32 when this CPU has AVX-512 BF16
    (its accelerated GDN path, vllm/platforms/cpu.py), which doubles a Qwen3.5 state page; read from
    the CPU ``civic plan`` runs on, as a CPU server's pool depends on the CPU it runs on. Elsewhere
    ``auto`` follows the cache (None).
    """
    if requested != "auto":
        return requested
    if device != "cpu":
        return None
    import torch

    return "float32" if torch.cpu._is_avx512_bf16_supported() else None


def _video_plan(model: ModelInfo, size: tuple[int, int, int]) -> VideoPlan:
    """Grid, N and the processor's text tokens of one video (see the module docstring)."""
    v = model.dims.vision
    width, height, frames = size
    rw, rh = resized_video(width, height, frames, v.patch_size, v.spatial_merge_size, v.temporal_patch_size,
                           model.video_min_pixels, model.video_max_pixels)
    grid = [-(-frames // v.temporal_patch_size), rh // v.patch_size, rw // v.patch_size]
    tokenize = (model.tokenizer or mf.build_tokenizer())
    span_text = video_span_text_tokens(video_timestamps(frames, v.temporal_patch_size),
                                       lambda text: len(tokenize(text, add_special_tokens=False)["input_ids"]))
    replaced = 2 if video_replaces_markers() else 0  # the template's own marker pair, replaced by the span
    n = num_merged_tokens(grid, v.spatial_merge_size)
    return VideoPlan([width, height, frames], [rw, rh], grid, grid[0] * grid[1] * grid[2], n // grid[0], n,
                     span_text - replaced, span_text)
