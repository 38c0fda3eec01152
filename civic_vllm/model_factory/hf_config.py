"""A preset as HF transformers sees it: processor (Qwen3-VL's own pixel limits), config and model
class, parameter counts and prefill FLOPs (through civic_vllm.cost).
"""

from __future__ import annotations

from civic_vllm.cost import text_prefill_flops, vision_flops
from civic_vllm.model_factory.presets import ModelPreset, get_preset
from civic_vllm.model_factory.tokenizer import (
    CHAT_TEMPLATE,
    TOKENIZER_VOCAB_SIZE,
    build_tokenizer,
    special_token_ids,
    tokenizer_size,
)

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


def meta_model(cfg, preset: ModelPreset):
    """Instantiate the HF model on the meta device: real parameter names and shapes, no memory."""
    import torch

    with torch.device("meta"):
        return hf_model_class(preset)(cfg)


def param_counts(preset: str | ModelPreset) -> dict[str, int]:
    """Parameters by part (tied embeddings counted once), from a meta-device instantiation."""
    p = get_preset(preset)
    model = meta_model(build_config(p), p)
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
