"""The model factory: preset shapes, tokenizer, chat template, and a tiny checkpoint HF loads.

vLLM loading is checked by hand and by the e2e tests (a vLLM start-up takes ~25 s).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from civic_vllm import cost
from civic_vllm import model_factory as mf
from civic_vllm.model_factory import checkpoint, tokenizer

# Published sizes of the real models (parameters, tied embeddings counted once).
REAL_PARAMS = {"qwen3-vl-2b": 2.13e9, "qwen3-vl-4b": 4.44e9, "qwen3-vl-8b": 8.77e9}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return mf.make_model("tiny", tmp_path_factory.mktemp("ckpt") / "tiny")


def _image(h: int, w: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


# --- presets and configs ---------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(mf.PRESETS))
def test_config_matches_preset(name: str) -> None:
    p = mf.PRESETS[name]
    cfg = mf.build_config(name)
    t, v = cfg.text_config, cfg.vision_config
    assert cfg.architectures == [p.family.architecture] and cfg.model_type == p.family.model_type
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads, t.head_dim) == (
        p.text.hidden_size, p.text.num_hidden_layers, p.text.num_attention_heads,
        p.text.num_key_value_heads, p.text.head_dim)
    if p.family.model_type != "qwen3_5_moe":  # Qwen3.5-MoE has no dense MLP
        assert t.intermediate_size == p.text.intermediate_size
    assert (v.depth, v.hidden_size, v.intermediate_size, v.num_heads, v.out_hidden_size) == (
        p.vision.depth, p.vision.hidden_size, p.vision.intermediate_size, p.vision.num_heads,
        p.vision.out_hidden_size)
    assert list(getattr(v, "deepstack_visual_indexes", [])) == list(p.vision.deepstack_visual_indexes)
    assert (v.patch_size, v.spatial_merge_size, v.temporal_patch_size) == (16, 2, 2)
    rope = t.rope_parameters
    rotary = int(t.head_dim * rope.get("partial_rotary_factor", 1.0))
    assert rope["mrope_interleaved"] and sum(rope["mrope_section"]) * 2 == rotary == p.text.rotary_dim
    assert t.head_dim in mf.CPU_ATTENTION_HEAD_DIMS
    assert t.vocab_size >= mf.tokenizer_size()
    assert cfg.tie_word_embeddings == p.text.tie_word_embeddings
    ids = mf.special_token_ids()
    assert cfg.image_token_id == ids["<|image_pad|>"]
    assert cfg.video_token_id == ids["<|video_pad|>"]
    assert cfg.vision_start_token_id == ids["<|vision_start|>"]


def test_real_presets_have_real_dimensions() -> None:
    two, four, eight = (mf.PRESETS[f"qwen3-vl-{s}"] for s in ("2b", "4b", "8b"))
    assert (two.text.hidden_size, two.text.num_hidden_layers, two.text.intermediate_size) == (2048, 28, 6144)
    assert (four.text.hidden_size, four.text.num_hidden_layers, four.text.intermediate_size) == (2560, 36, 9728)
    assert (eight.text.hidden_size, eight.text.num_hidden_layers, eight.text.intermediate_size) == (4096, 36, 12288)
    assert two.text.tie_word_embeddings and four.text.tie_word_embeddings
    assert not eight.text.tie_word_embeddings
    assert all(p.text.vocab_size == 151936 for p in (two, four, eight))
    assert two.vision == dataclasses.replace(four.vision, out_hidden_size=2048)
    assert (eight.vision.depth, eight.vision.hidden_size, eight.vision.intermediate_size) == (27, 1152, 4304)
    assert eight.vision.deepstack_visual_indexes == (8, 16, 24)


@pytest.mark.parametrize("name", sorted(REAL_PARAMS))
def test_real_param_counts(name: str) -> None:
    counts = mf.param_counts(name)
    assert counts["total"] == pytest.approx(REAL_PARAMS[name], rel=0.02)
    assert counts["total"] == counts["vision"] + counts["language"] + counts["lm_head"]
    assert counts["lm_head"] == (0 if mf.PRESETS[name].text.tie_word_embeddings else counts["embedding"])


def test_small_param_counts() -> None:
    assert 4e6 < mf.param_counts("tiny")["total"] < 8e6
    bench = mf.param_counts("bench")
    assert 1.2e8 < bench["total"] < 2.5e8
    assert bench["vision"] < bench["language"]


def test_prefill_flops_llm_share() -> None:
    # bench is sized so the LLM does a real Qwen3-VL's share of image-prefill compute.
    assert 0.55 <= mf.prefill_flops("bench")["llm_share"] <= 0.8
    shares = [mf.prefill_flops(f"qwen3-vl-{s}")["llm_share"] for s in ("2b", "4b", "8b")]
    assert shares == sorted(shares) and 0.45 < shares[0] and shares[-1] < 0.85
    big = mf.prefill_flops("bench", (1344, 1344))
    assert big["image_tokens"] == 1764 and big["llm_share"] < mf.prefill_flops("bench")["llm_share"]
    with pytest.raises(ValueError, match="multiples of 32"):
        mf.prefill_flops("tiny", (450, 448))


def test_preset_validation() -> None:
    with pytest.raises(ValueError, match="mrope_section"):
        mf.TextDims(hidden_size=64, num_hidden_layers=1, num_attention_heads=1,
                    num_key_value_heads=1, head_dim=64, intermediate_size=64)
    with pytest.raises(ValueError, match="CPU attention"):
        mf.TextDims(hidden_size=48, num_hidden_layers=1, num_attention_heads=1,
                    num_key_value_heads=1, head_dim=48, intermediate_size=64, mrope_section=(8, 8, 8))
    with pytest.raises(ValueError, match="unknown model preset"):
        mf.build_config("qwen3-vl-70b")


# --- tokenizer and chat template --------------------------------------------------------


def test_tokenizer_digits_and_specials() -> None:
    tok = mf.build_tokenizer()
    assert len(tok) == mf.TOKENIZER_VOCAB_SIZE
    ids = tok.encode("[112, 430, 251, 640] 2024", add_special_tokens=False)
    digits = [t for t in tok.convert_ids_to_tokens(ids) if t.lstrip("Ġ").isdigit()]
    assert digits == list("1124302516402024")  # one token per digit, never merged
    for name, i in mf.special_token_ids().items():
        assert tok.encode(name, add_special_tokens=False) == [i]
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    text = "What color is the shape? über 3.14\n\n  done"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    # Ordinary words are whole tokens, so prompts are short.
    assert len(tok.encode("Where is the shape? Answer with a bounding box.", add_special_tokens=False)) <= 12


def test_tokenizer_is_deterministic() -> None:
    assert tokenizer._tokenizer_json.__wrapped__() == tokenizer._tokenizer_json()


def test_chat_template_renders_openai_and_hf_parts() -> None:
    tok = mf.build_tokenizer()
    img = "<|vision_start|><|image_pad|><|vision_end|>"
    vid = "<|vision_start|><|video_pad|><|vision_end|>"
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [
            {"type": "image"},  # what vLLM's OpenAI server passes
            {"type": "image_url", "image_url": {"url": "data:,"}},
            {"type": "image", "image": "x.png"},  # HF style
            {"type": "video"},
            {"type": "text", "text": "Compare them."},
        ]},
        {"role": "assistant", "content": [{"type": "text", "text": "Same."}]},
        {"role": "user", "content": "And now?"},
    ]
    out = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert out == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        f"<|im_start|>user\n{img}{img}{img}{vid}Compare them.<|im_end|>\n"
        "<|im_start|>assistant\nSame.<|im_end|>\n"
        "<|im_start|>user\nAnd now?<|im_end|>\n<|im_start|>assistant\n"
    )
    numbered = tok.apply_chat_template(messages[1:2], tokenize=False, add_vision_id=True)
    assert "Picture 1: " in numbered and "Picture 3: " in numbered and "Video 1: " in numbered
    assert not tok.apply_chat_template(messages[:1], tokenize=False).endswith("assistant\n")


@pytest.mark.compat
def test_vllm_detects_openai_content_format() -> None:
    """vLLM's server must pass content parts (not a flattened string) to the template."""
    hf_renderer = pytest.importorskip("vllm.renderers.hf")
    assert hf_renderer._detect_content_format(mf.CHAT_TEMPLATE, default="string") == "openai"


# --- the tiny checkpoint ---------------------------------------------------------------


def test_tiny_checkpoint_files(tiny_dir: Path) -> None:
    names = {p.name for p in tiny_dir.iterdir()}
    assert set(checkpoint._REQUIRED_FILES) | {"model.safetensors", mf.MARKER_FILE} <= names
    cfg = json.loads((tiny_dir / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen3VLForConditionalGeneration"]
    gen = json.loads((tiny_dir / "generation_config.json").read_text())
    assert gen["do_sample"] is False
    assert mf.special_token_ids()["<|im_end|>"] in gen["eos_token_id"]
    pre = json.loads((tiny_dir / "preprocessor_config.json").read_text())
    assert pre["size"] == {"shortest_edge": 65536, "longest_edge": 16777216}
    assert pre["patch_size"] == 16 and pre["merge_size"] == 2 and pre["image_mean"] == [0.5] * 3


def test_tiny_checkpoint_runs_in_hf(tiny_dir: Path) -> None:
    from transformers import AutoProcessor, Qwen3VLForConditionalGeneration

    processor = AutoProcessor.from_pretrained(tiny_dir)
    model, info = Qwen3VLForConditionalGeneration.from_pretrained(tiny_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.dtype == torch.bfloat16
    messages = [{"role": "user", "content": [
        {"type": "image", "image": _image(448, 448)},
        {"type": "text", "text": "What color is the shape?"},
    ]}]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    ids = inputs["input_ids"][0].tolist()
    assert ids.count(model.config.image_token_id) == 196
    assert inputs["image_grid_thw"].tolist() == [[1, 28, 28]]
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    new = out[0, len(ids):]
    assert 1 <= len(new) <= 4
    logits = model(**inputs).logits[0, -1].float()
    assert torch.isfinite(logits).all() and logits.std() > 0.1  # random but not degenerate


def test_image_token_counts(tiny_dir: Path) -> None:
    from transformers import AutoProcessor

    image_processor = AutoProcessor.from_pretrained(tiny_dir).image_processor
    for (h, w), tokens in {(448, 448): 196, (1344, 1344): 1764, (64, 64): 64}.items():
        grid = image_processor(images=[_image(h, w)], return_tensors="pt")["image_grid_thw"][0]
        assert int(grid.prod()) // 4 == tokens, (h, w)


# --- idempotence, sharding, lookup ---------------------------------------------------------


def test_make_model_is_idempotent(tiny_dir: Path) -> None:
    stamp = {p.name: p.stat().st_mtime_ns for p in tiny_dir.iterdir()}
    assert mf.make_model("tiny", tiny_dir) == tiny_dir
    assert mf.make_model("tiny", str(tiny_dir), weights=False) == tiny_dir  # weights already there
    assert {p.name: p.stat().st_mtime_ns for p in tiny_dir.iterdir()} == stamp


def test_make_model_rebuilds_for_other_seed(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    out = tmp_path / "m"
    mf.make_model("tiny", out, seed=0)
    w0 = load_file(out / "model.safetensors")
    mf.make_model("tiny", out, seed=1)
    w1 = load_file(out / "model.safetensors")
    assert json.loads((out / mf.MARKER_FILE).read_text())["seed"] == 1
    name = "model.language_model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(w0[name], w1[name])
    assert not list(tmp_path.glob(".m.*"))  # no temporary directories left behind


def test_make_model_refuses_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        mf.make_model("tiny", tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_config_only_then_weights(tmp_path: Path) -> None:
    out = mf.make_model("qwen3-vl-2b", tmp_path / "2b", weights=False)
    assert not list(out.glob("*.safetensors"))
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(out)
    assert cfg.text_config.vocab_size == 151936 and cfg.vision_config.depth == 24
    tiny = mf.make_model("tiny", tmp_path / "t", weights=False)
    assert mf.make_model("tiny", tiny) == tiny and (tiny / "model.safetensors").is_file()


def test_sharded_weights_match_single_file(tmp_path: Path, tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from safetensors.torch import load_file

    monkeypatch.setattr(checkpoint, "_SHARD_BYTES", 2 * 1024**2)
    out = mf.make_model("tiny", tmp_path / "sharded")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2
    merged = {k: v for s in shards for k, v in load_file(out / s).items()}
    single = load_file(tiny_dir / "model.safetensors")
    assert merged.keys() == single.keys()
    assert all(torch.equal(merged[k], single[k]) for k in single)


def test_resolve_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "local").mkdir()
    assert mf.resolve_model("local") == str(tmp_path / "local")
    assert mf.resolve_model("Qwen/Qwen3-VL-2B-Instruct") == "Qwen/Qwen3-VL-2B-Instruct"


def test_default_model_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CIVIC_MODELS_DIR", str(tmp_path))
    out = mf.default_model_dir()
    assert out == tmp_path / "tiny" and (out / "model.safetensors").is_file()


@pytest.mark.slow  # writes 370 MB; keeps the default suite well under 30 s on a busy machine
def test_bench_checkpoint_runs_in_hf(tmp_path: Path) -> None:
    from transformers import Qwen3VLForConditionalGeneration

    out = mf.make_model("bench", tmp_path / "bench")
    model, info = Qwen3VLForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert sum(p.numel() for p in model.parameters()) == mf.param_counts("bench")["total"]


@pytest.mark.slow
def test_real_size_checkpoint_loads_in_hf(tmp_path: Path) -> None:
    """The 2B preset: 4.3 GB of sharded bf16 weights, tied embeddings, real vocabulary."""
    from transformers import Qwen3VLForConditionalGeneration

    out = mf.make_model("qwen3-vl-2b", tmp_path / "2b")
    assert len(list(out.glob("model-*-of-*.safetensors"))) >= 2
    model, info = Qwen3VLForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert sum(p.numel() for p in model.parameters()) == mf.param_counts("qwen3-vl-2b")["total"]
    assert model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()


# --- the other families: configs as the hub's, experts in the hub layout ------------------


@pytest.mark.parametrize("name", [n for n, p in sorted(mf.PRESETS.items()) if p.text.linear_attention])
def test_hybrid_presets_follow_hf_layer_rule_and_cpu_kernel_dims(name: str) -> None:
    p = mf.PRESETS[name]
    t = mf.build_config(name).text_config
    assert t.layer_types == p.text.layer_types
    assert t.layer_types.count("full_attention") == p.text.num_full_attention_layers >= 1
    # vLLM's CPU Gated DeltaNet kernel: head dim 64 probed to work, 32 refused.
    assert t.linear_key_head_dim == t.linear_value_head_dim == 64
    assert not p.vision.deepstack_visual_indexes


@pytest.mark.parametrize("name", [n for n, p in sorted(mf.PRESETS.items()) if p.text.moe])
def test_moe_presets_configure_experts(name: str) -> None:
    m, t = mf.PRESETS[name].text.moe, mf.build_config(name).text_config
    assert (t.num_experts, t.num_experts_per_tok, t.moe_intermediate_size) == (
        m.num_experts, m.num_experts_per_tok, m.moe_intermediate_size)


@pytest.mark.parametrize(("name", "hub_names"), [
    ("tiny-moe", {"mlp.experts.gate_up_proj", "mlp.experts.down_proj"}),
    ("tiny-qwen3.5-moe", {"mlp.experts.3.gate_proj.weight", "mlp.experts.3.up_proj.weight",
                          "mlp.experts.3.down_proj.weight"}),
])
def test_moe_checkpoint_has_the_hub_layout_and_hf_reads_it(tmp_path: Path, name: str, hub_names: set[str]) -> None:
    """Written as hub checkpoints are; HF's own conversion then gives its in-memory experts."""
    from safetensors import safe_open

    p = mf.PRESETS[name]
    out = mf.make_model(name, tmp_path / name, dtype="float32")
    layer = "model.language_model.layers.0."
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        stored = {k.removeprefix(layer): f.get_tensor(k) for k in f.keys() if k.startswith(layer + "mlp.experts")}
    assert hub_names <= set(stored)
    model, info = mf.hf_model_class(name).from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not any(info.values()), info
    experts = model.model.language_model.layers[0].mlp.experts
    hidden, inner = p.text.hidden_size, p.text.moe.moe_intermediate_size
    if name == "tiny-moe":  # hub [E, in, out], HF [E, out, in]
        assert stored["mlp.experts.down_proj"].shape == (p.text.moe.num_experts, inner, hidden)
        assert torch.equal(experts.down_proj, stored["mlp.experts.down_proj"].transpose(1, 2))
    else:  # hub: one Linear per expert; HF fuses gate and up
        gate_up = torch.cat([stored["mlp.experts.3.gate_proj.weight"], stored["mlp.experts.3.up_proj.weight"]])
        assert torch.equal(experts.gate_up_proj[3], gate_up)
        assert torch.equal(experts.down_proj[3], stored["mlp.experts.3.down_proj.weight"])


def test_text_prefill_flops_counts_active_experts_and_full_attention_only() -> None:
    dense, moe, hybrid = (mf.PRESETS[n].text for n in ("tiny", "tiny-moe", "tiny-qwen3.5"))
    n, vocab = 300, 2048
    h, m = moe.hidden_size, moe.moe
    mlp_gap = 2 * n * 3 * h * (dense.intermediate_size - m.num_experts_per_tok * m.moe_intermediate_size)
    router = 2 * n * h * m.num_experts
    assert cost.text_prefill_flops(dense, n, vocab) - cost.text_prefill_flops(moe, n, vocab) == (
        (mlp_gap - router) * dense.num_hidden_layers)
    # f(2n) - 2 f(n) keeps only the causal attention (4 n^2 q per full-attention layer) and -1 LM head.
    def quadratic(t):
        return cost.text_prefill_flops(t, 2 * n, vocab) - 2 * cost.text_prefill_flops(t, n, vocab) + 2 * h * vocab

    q = dense.num_attention_heads * dense.head_dim
    assert quadratic(dense) == 4 * n * n * q * dense.num_hidden_layers
    assert quadratic(hybrid) == 4 * n * n * q * hybrid.num_full_attention_layers == quadratic(dense) // 4


def test_a_float32_recurrent_state_doubles_the_hybrid_block() -> None:
    """vLLM's CPU backend keeps Qwen3.5's recurrent state in float32 on AVX-512 BF16 CPUs: the state
    page then outgrows a 128-token bf16 attention page and vLLM serves 256-token blocks (measured on
    such a CPU: tests/e2e/test_families.py::test_pool_has_the_planned_blocks)."""
    from civic_vllm.planner.plan import ssm_state_dtype

    text = mf.PRESETS["tiny-qwen3.5"].text
    same = cost.kv_layout(text, 128, "bfloat16")
    wide = cost.kv_layout(text, 128, "bfloat16", ssm_dtype="float32")
    assert (same.block_size, wide.block_size) == (128, 256)
    assert wide.block_bytes == 2 * same.block_bytes and wide.bytes_per_token == same.bytes_per_token
    dense = mf.PRESETS["tiny"].text
    assert cost.kv_layout(dense, 128, "bfloat16", ssm_dtype="float32") == cost.kv_layout(dense, 128, "bfloat16")
    assert ssm_state_dtype("cuda") is None
    assert ssm_state_dtype("cpu") == ("float32" if torch.cpu._is_avx512_bf16_supported() else None)
    # vLLM's --mamba-ssm-cache-dtype, when given, is what the server uses on either device
    assert ssm_state_dtype("cpu", "bfloat16") == ssm_state_dtype("gpu", "bfloat16") == "bfloat16"
    assert ssm_state_dtype("gpu", "float32") == "float32"


def test_civic_plan_reads_the_recurrent_state_dtype_as_vllm_does() -> None:
    """--mamba-ssm-cache-dtype float32 widens Qwen3.5's planned block on a GPU (the state page must fit
    in one block); auto and bfloat16 keep the bf16 KV dtype's."""
    from civic_vllm.cli.plan import add_plan_parser, request_from_args
    from civic_vllm.planner import model_info
    from civic_vllm.planner.plan import make_plan

    parser = argparse.ArgumentParser()
    add_plan_parser(parser.add_subparsers())

    def block(*extra: str) -> int:
        args = parser.parse_args(["plan", "--model", "tiny-qwen3.5", "--image", "448x448", "--dtype", "bfloat16",
                                  *extra])
        return make_plan(model_info.load_model("tiny-qwen3.5"), request_from_args(args)).kv["block_size"]

    assert block("--mamba-ssm-cache-dtype", "float32") > block()
    assert block("--mamba-ssm-cache-dtype", "bfloat16") == block()
