"""The plan as a table for a terminal."""

from __future__ import annotations

from typing import Any

from civic_vllm.cost import (
    DTYPE_BYTES,
)
from civic_vllm.planner.model_info import GiB, MiB
from civic_vllm.planner.plan import PlanResult


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
