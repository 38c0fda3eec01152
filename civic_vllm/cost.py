"""The cost model: prefill FLOPs, vision-tower work and KV-cache tokens, blocks and bytes.

One place for each quantity, pure arithmetic on a model's dimensions (no vLLM, no torch), called
by the planner (``civic plan``), the presets (``model_factory.prefill_flops``), the encoder
budget in the vLLM adapter, evaluation and the benchmarks. FLOPs count 2 per multiply-add; KV
follows vLLM 0.32's paging (v1/core/kv_cache_utils.py), checked against live servers by
tests/e2e/test_planner_server.py, test_families.py and test_parallel.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from civic_vllm.model_factory import ModelPreset, TextDims, VisionDims

__all__ = [
    "DTYPE_BYTES",
    "KvLayout",
    "LayoutError",
    "image_encoder_cost",
    "kv_blocks",
    "kv_layout",
    "kv_tokens",
    "layers_and_kv_heads_per_gpu",
    "text_prefill_flops",
    "vision_flops",
]

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1}


class LayoutError(ValueError):
    """A deployment vLLM would refuse, or one this model does not describe (said before a GPU is rented)."""


# ---- FLOPs -------------------------------------------------------------------------------------


def _vision_block_flops(v: VisionDims, patches: int) -> int:
    """One ViT block: QKV + output projection, MLP, full attention within the image."""
    hv = v.hidden_size
    return 2 * patches * (4 * hv * hv + 2 * hv * v.intermediate_size) + 4 * patches**2 * hv


def vision_flops(v: VisionDims, patches: int, merged_in: int, exit_layer: int | None = None,
                 context: bool = False) -> int:
    """Vision tower on one image of ``patches`` patches whose mergers run on ``merged_in`` groups.

    CIVIC runs every block on all patches and the main + DeepStack mergers on the K kept
    groups only; with an exit layer L, blocks L.. run on the kept groups' patches only, and with
    exit ``context`` they also project the dropped patches' keys and values (with the queries:
    one QKV GEMM) and the kept queries attend to them.
    model_factory.prefill_flops (one image, all N groups, no exit layer) calls this.
    """
    hv, group = v.hidden_size, v.spatial_merge_size**2
    flops = 2 * patches * (3 * v.temporal_patch_size * v.patch_size**2) * hv  # patch embedding
    full_blocks = v.depth if exit_layer is None else exit_layer
    kept = merged_in * group
    flops += full_blocks * _vision_block_flops(v, patches)
    later = _vision_block_flops(v, kept)
    if context and exit_layer is not None:
        dropped = patches - kept
        later += 2 * dropped * 3 * hv * hv + 4 * kept * dropped * hv  # their QKV; kept queries over them
    flops += (v.depth - full_blocks) * later
    merge_in, mergers = hv * group, 1 + len(v.deepstack_visual_indexes)
    flops += mergers * 2 * merged_in * (merge_in * merge_in + merge_in * v.out_hidden_size)
    return flops


def text_prefill_flops(t: TextDims, prompt_tokens: int, vocab_size: int) -> int:
    """Causal prefill of one ``prompt_tokens`` sequence plus the LM head on its last token.

    Per family: MoE MLPs count the router and the ``num_experts_per_tok`` experts each token
    runs (plus the shared expert), not all experts; Qwen3.5's full-attention layers project a
    query gate too (q_proj is 2x wide) and its Gated DeltaNet layers cost projections, the
    causal conv and the recurrent state update (about 4 d_k d_v per value head per token: the
    decay, delta-rule update and read-out), linear in the prompt length.
    """
    n, h = prompt_tokens, t.hidden_size
    q, kv = t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim
    gated_q = 2 * q if t.linear_attention is not None else q
    attention = 2 * n * h * (gated_q + 2 * kv + q) + 2 * n * n * q  # causal QK^T + AV: half of 2 (2 n^2 q)
    if t.moe is None:
        mlp = 2 * n * 3 * h * t.intermediate_size
    else:
        m = t.moe
        active = m.num_experts_per_tok * m.moe_intermediate_size + m.shared_expert_intermediate_size
        mlp = 2 * n * (3 * h * active + h * m.num_experts + (h if m.shared_expert_intermediate_size else 0))
    flops = t.num_full_attention_layers * attention + t.num_hidden_layers * mlp
    if (la := t.linear_attention) is not None:
        keys, values = la.num_key_heads * la.key_head_dim, la.num_value_heads * la.value_head_dim
        conv = 2 * keys + values
        projections = h * (conv + values + 2 * la.num_value_heads) + values * h  # qkv, z, b/a; out
        per_token = 2 * projections + 2 * conv * la.conv_kernel_dim + 8 * la.num_value_heads * la.key_head_dim * (
            la.value_head_dim)
        flops += (t.num_hidden_layers - t.num_full_attention_layers) * n * per_token
    return flops + 2 * h * vocab_size


# With exit context a dropped row still goes through norm1 and the QKV projection of every later
# block: 3 of the block's 12 d^2 multiply-adds per row (QKV 3, output projection 1, MLP 8 at ratio 4).
CONTEXT_ROW_SHARE = (1, 4)


def image_encoder_cost(num_tokens: int, num_kept: int, exit_layer: int, depth: int, context: bool = False) -> int:
    """Vision-tower work for one image in merged tokens, comparable with vanilla's N.

    Blocks 1..exit_layer run on all N tokens' patches, the other depth − exit_layer blocks on the
    K kept ones (the mergers on K are cheaper than vanilla's on N and not counted); with
    ``context`` those blocks also project the N − K dropped ones (``CONTEXT_ROW_SHARE``).
    """
    if not 1 <= exit_layer <= depth:
        raise ValueError(f"exit_layer must be in [1, {depth}], got {exit_layer}")
    if not 0 < num_kept <= num_tokens:
        raise ValueError(f"num_kept must be in [1, {num_tokens}], got {num_kept}")
    share, whole = CONTEXT_ROW_SHARE
    later = num_kept * whole + (num_tokens - num_kept) * share * context
    return -(-(num_tokens * exit_layer * whole + later * (depth - exit_layer)) // (depth * whole))


# ---- KV cache ----------------------------------------------------------------------------------


def kv_blocks(tokens: int, block_size: int) -> int:
    """Blocks vLLM's KV-cache manager gives a request holding ``tokens`` tokens: ceil(tokens / block_size)."""
    return -(-tokens // block_size)


def layers_and_kv_heads_per_gpu(dims: ModelPreset, tensor_parallel: int, pipeline_parallel: int) -> tuple[int, int]:
    """Decoder layers and KV heads whose cache one GPU holds, as vLLM 0.32 splits them.

    Pipeline stages get ``layers // PP`` layers, the remainder one each to the stages before the
    last (``get_pp_indices``, without VLLM_PP_LAYER_PARTITION); every worker gets the
    same pool and vLLM keeps the smallest block count, the largest stage's. Tensor parallelism
    splits KV heads, or replicates them when there are fewer heads than ranks.
    The checks are vLLM's own start-up refusals, said before a GPU is rented.
    """
    t, v = dims.text, dims.vision
    if tensor_parallel < 1 or pipeline_parallel < 1:
        raise LayoutError("--tensor-parallel-size and --pipeline-parallel-size must be >= 1")
    if t.num_attention_heads % tensor_parallel:
        raise LayoutError(f"vLLM refuses --tensor-parallel-size {tensor_parallel}: {t.num_attention_heads} attention "
                        "heads do not divide evenly")
    kv = t.num_key_value_heads
    if (kv % tensor_parallel) if kv >= tensor_parallel else (tensor_parallel % kv):
        raise LayoutError(f"vLLM refuses --tensor-parallel-size {tensor_parallel} with {kv} KV heads: one must divide "
                        "the other")
    if pipeline_parallel > t.num_hidden_layers:
        raise LayoutError(f"--pipeline-parallel-size {pipeline_parallel} exceeds the {t.num_hidden_layers} layers")
    stages = [t.num_hidden_layers // pipeline_parallel] * pipeline_parallel
    for i in range(2, t.num_hidden_layers % pipeline_parallel + 2):
        stages[-i] += 1
    if pipeline_parallel > 1 and stages[0] < len(v.deepstack_visual_indexes):
        raise LayoutError(f"vLLM (qwen3_vl.py) refuses --pipeline-parallel-size {pipeline_parallel}: the second stage "
                        f"would start at layer {stages[0]}, before the {len(v.deepstack_visual_indexes)} "
                        "DeepStack layers end")
    return max(stages), max(kv // tensor_parallel, 1)


@dataclass(frozen=True)
class KvLayout:
    """How vLLM 0.32 pages a model's cache (v1/core/kv_cache_utils.py, platforms/interface.py).

    Dense and MoE: one group of all layers; a request holds ceil(tokens / block_size) blocks.
    Hybrid (Qwen3.5): layers are grouped by type into groups of ``group_size`` layers
    (the smaller of the two layer counts); every group has its own blocks in one shared pool
    whose block spans ``group_size`` layer pages. A full-attention group holds ceil(tokens /
    block_size) blocks per request, a linear-attention group one state block, whatever the
    length (measured on the server, tests/e2e/test_families.py, prefix caching on and off).
    The state page (conv + recurrent state) is padded up to the attention page; if it is
    larger, vLLM raises the attention block size to the next multiple of ``block_size`` that
    holds it (measured: the tiny Qwen3.5 preset on a CPU with AVX-512 BF16, whose float32
    recurrent state takes 256-token blocks).
    """

    block_size: int
    block_bytes: int  # one block of the pool: group_size layer pages
    attention_groups: int
    state_blocks: int  # per request: one per linear-attention group
    bytes_per_token: int  # K and V of the full-attention layers only
    attention_layers: int  # full-attention layers in one GPU's cache

    def blocks(self, tokens: int) -> int:
        return self.attention_groups * kv_blocks(tokens, self.block_size) + self.state_blocks


def kv_layout(t: TextDims, block_size: int, kv_dtype: str, layers: int | None = None,
              kv_heads: int | None = None, ssm_dtype: str | None = None) -> KvLayout:
    """``layers`` / ``kv_heads``: what one GPU holds (:func:`layers_and_kv_heads_per_gpu`); default all.
    ``ssm_dtype``: the linear-attention recurrent state's dtype (None: ``kv_dtype``; vLLM's CPU
    backend keeps it in float32 on CPUs with AVX-512 BF16, see the planner's ``ssm_state_dtype``).

    Hybrids are modelled on one GPU only: how vLLM splits their linear-attention state across
    tensor- and pipeline-parallel ranks is not measured here, so a split hybrid is refused.
    """
    full, linear = t.num_full_attention_layers, t.num_hidden_layers - t.num_full_attention_layers
    layers = t.num_hidden_layers if layers is None else layers
    kv_heads = t.num_key_value_heads if kv_heads is None else kv_heads
    if linear and (layers, kv_heads) != (t.num_hidden_layers, t.num_key_value_heads):
        raise LayoutError("civic plan models hybrid (linear-attention) models on one GPU only: "
                        "--tensor-parallel-size / --pipeline-parallel-size > 1 are not modelled for them")
    token_page = 2 * kv_heads * t.head_dim * DTYPE_BYTES[kv_dtype]  # one layer, one token
    if not linear:
        full = layers
        return KvLayout(block_size, token_page * block_size * full, 1, 0, token_page * full, full)
    la = t.linear_attention
    conv_channels = 2 * la.num_key_heads * la.key_head_dim + la.num_value_heads * la.value_head_dim
    state_page = (DTYPE_BYTES[kv_dtype] * conv_channels * (la.conv_kernel_dim - 1)
                  + DTYPE_BYTES[ssm_dtype or kv_dtype] * la.num_value_heads * la.key_head_dim * la.value_head_dim)
    block_size = max(block_size, block_size * -(-state_page // (block_size * token_page)))
    group_size = min(full, linear)
    return KvLayout(block_size, token_page * block_size * group_size, -(-full // group_size),
                    -(-linear // group_size), token_page * full, full)


def kv_tokens(prompt_tokens: int, max_tokens: int) -> int:
    """KV slots a request holds at its last step: prompt + max_tokens - 1.

    The last sampled token is returned, never fed back, so its K/V are never written. vLLM's
    scheduler allocates ``num_computed + num_new`` slots per step (v1/core/sched/scheduler.py);
    the step that samples output token g feeds token g - 1, holding prompt + g - 1 slots, and
    the async scheduler skips the extra step once max_tokens is reached, so both schedulers
    peak here. (A request that stops at EOS early under async scheduling may get one more slot.)
    """
    return prompt_tokens + max(max_tokens - 1, 0)
