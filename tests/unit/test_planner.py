"""``civic plan`` without a server: image sizes, K, template tokens, KV arithmetic, FLOPs, CLI.

The planner must agree with the server exactly (tests/e2e/test_planner_server.py checks that
against a live vLLM); these tests pin the pieces it is built from to their sources of truth:
transformers' smart_resize and image processor, civic_vllm.budget, the checkpoint's chat
template, model_factory's presets, param_counts and prefill_flops.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

from civic_vllm import cost, planner
from civic_vllm import model_factory as mf
from civic_vllm.budget import num_merged_tokens, num_retained
from civic_vllm.cli import plan as plan_cli
from civic_vllm.planner import GiB, PlanError, PlanRequest, model_info, tokens

QUESTION = "What shapes and colours are in this picture?"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny checkpoint without weights: config, tokenizer, chat template, preprocessor."""
    return mf.make_model("tiny", tmp_path_factory.mktemp("ckpt") / "tiny", weights=False)


@pytest.fixture(scope="module")
def tiny(tiny_dir: Path) -> planner.ModelInfo:
    return planner.load_model(str(tiny_dir))


@pytest.fixture(scope="module")
def q8b() -> planner.ModelInfo:
    return planner.load_model("qwen3-vl-8b")


def run_cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = plan_cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# --- image size -> N --------------------------------------------------------------------

SIZES = [(1344, 1344), (500, 375), (375, 500), (64, 64), (1, 1), (33, 31), (1000, 700), (1500, 100),
         (4096, 4096), (8000, 6000), (199, 1), (640, 480), (1920, 1080)]


@pytest.mark.parametrize(("width", "height"), SIZES)
def test_resized_image_is_transformers_smart_resize(width: int, height: int) -> None:
    h, w = smart_resize(height, width, factor=32, min_pixels=65_536, max_pixels=16_777_216)
    assert planner.resized_image(width, height, 16, 2, 65_536, 16_777_216) == (w, h)
    assert w % 32 == 0 and h % 32 == 0 and 65_536 <= w * h <= 16_777_216


@pytest.mark.parametrize(("width", "height"), [(500, 375), (64, 64), (97, 1234), (1000, 700), (33, 31)])
def test_merged_tokens_match_the_image_processor(tiny: planner.ModelInfo, tiny_dir: Path, width, height) -> None:
    """N from the planner == what the checkpoint's own HF image processor produces (vLLM runs it)."""
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(tiny_dir)
    image = Image.fromarray(np.zeros((height, width, 3), dtype=np.uint8))
    grid = processor(images=[image], return_tensors="pt")["image_grid_thw"][0].tolist()
    plan = planner.make_plan(tiny, PlanRequest(images=[(width, height)], ratios=[], max_tokens=0))
    assert plan.images[0].grid_thw == grid
    assert plan.images[0].merged_tokens == num_merged_tokens(grid, 2)


def test_pixel_bounds_come_from_the_preprocessor_config(tmp_path: Path, tiny_dir: Path) -> None:
    assert model_info._pixel_bounds(None)[:2] == (65_536, 16_777_216)
    bounds = model_info._pixel_bounds({"size": {"shortest_edge": 3136, "longest_edge": 1_003_520}})
    assert bounds[:2] == (3136, 1_003_520)
    # Legacy keys win over size, as in vLLM's _get_vision_size.
    assert model_info._pixel_bounds({"size": {"shortest_edge": 1, "longest_edge": 2}, "min_pixels": 10,
                                     "max_pixels": 20})[:2] == (10, 20)
    small = tmp_path / "small"
    small.mkdir()
    for f in tiny_dir.iterdir():
        (small / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((small / "preprocessor_config.json").read_text())
    cfg["size"] = {"shortest_edge": 65_536, "longest_edge": 262_144}  # at most 256 tokens
    (small / "preprocessor_config.json").write_text(json.dumps(cfg))
    plan = planner.make_plan(planner.load_model(str(small)), PlanRequest(images=[(1344, 1344)], ratios=[]))
    assert plan.images[0].merged_tokens == 256 and plan.images[0].resized_size == [512, 512]


# --- K and prompt tokens ----------------------------------------------------------------


@pytest.mark.parametrize("ratio", [1.0, 0.5, 1 / 3, 0.25, 0.1, 0.01])
@pytest.mark.parametrize("min_tokens", [1, 16])
def test_k_is_budget_num_retained(q8b, ratio: float, min_tokens: int) -> None:
    images = [(1344, 1344), (500, 375), (64, 64)]
    plan = planner.make_plan(q8b, PlanRequest(images=images, ratios=[("r", ratio)], min_tokens=min_tokens,
                                              text_tokens=20))
    n = [im.merged_tokens for im in plan.images]
    assert n == [1764, 192, 64]
    kept = [num_retained(x, ratio, min_tokens) for x in n]
    civic = plan.civic[0]
    assert civic.retained_per_image == kept
    assert civic.prompt_tokens == plan.vanilla.prompt_tokens - sum(n) + sum(kept)
    assert plan.vanilla.prompt_tokens == sum(n) + 20 + planner.estimated_template_tokens(3)


@pytest.mark.parametrize("num_images", [1, 2, 3])
def test_estimated_template_equals_a_real_render(tiny: planner.ModelInfo, num_images: int) -> None:
    """Qwen's chat format costs 8 + 2/image tokens; the tiny checkpoint's template (Qwen3-VL's
    without tools) and Qwen-style tokenizer agree."""
    template, question = tokens.exact_template_tokens(tiny.tokenizer, num_images, "")
    assert question == 0
    assert template == planner.estimated_template_tokens(num_images)


def test_exact_prompt_tokens_with_a_question(tiny: planner.ModelInfo) -> None:
    tok = tiny.tokenizer
    plan = planner.make_plan(tiny, PlanRequest(images=[(500, 375), (64, 64)], question=QUESTION,
                                               ratios=[("1/3", 1 / 3)]))
    assert plan.text["exact"]
    n_question = len(tok(QUESTION, add_special_tokens=False)["input_ids"])
    assert plan.text["question_tokens"] == n_question
    # The full render with the image pads expanded to N, as vLLM's processor does.
    messages = tokens._user_turn(2, QUESTION)
    ids = tok(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
              add_special_tokens=False)["input_ids"]
    assert plan.vanilla.prompt_tokens == len(ids) - 2 + 192 + 64
    # --text-tokens T with the question's length gives the same count.
    same = planner.make_plan(tiny, PlanRequest(images=[(500, 375), (64, 64)], text_tokens=n_question,
                                               ratios=[("1/3", 1 / 3)]))
    assert [s.prompt_tokens for s in same.scenarios] == [s.prompt_tokens for s in plan.scenarios]


# --- KV bytes, blocks, pool --------------------------------------------------------------


@pytest.mark.parametrize(("kv_dtype", "expected"), [("auto", 147_456), ("bfloat16", 147_456), ("float32", 294_912),
                                                     ("fp8", 73_728)])
def test_kv_bytes_per_token_8b(q8b, kv_dtype: str, expected: int) -> None:
    plan = planner.make_plan(q8b, PlanRequest(images=[(448, 448)], kv_dtype=kv_dtype))
    assert plan.kv["bytes_per_token"] == expected == 2 * 36 * 8 * 128 * planner.DTYPE_BYTES[plan.model["kv_dtype"]]
    assert plan.kv["block_bytes"] == expected * 16


def test_kv_blocks() -> None:
    assert [planner.kv_blocks(n, 16) for n in (0, 1, 15, 16, 17, 32, 33)] == [0, 1, 1, 1, 2, 2, 3]
    assert [planner.kv_blocks(n, 128) for n in (127, 128, 129)] == [1, 1, 2]
    # max_tokens = 1 is prefill only: the prompt's slots; each further output token adds one.
    assert [planner.kv_tokens(100, m) for m in (0, 1, 2, 29)] == [100, 100, 101, 128]


def test_blocks_and_fit_arithmetic_with_an_exact_pool(q8b) -> None:
    block_bytes = 147_456 * 16
    pool = 1000 * block_bytes + block_bytes - 1  # vLLM floors: 1000 blocks
    plan = planner.make_plan(q8b, PlanRequest(images=[(1344, 1344)], text_tokens=200, max_tokens=256,
                                              ratios=[("1/2", 0.5), ("1/3", 1 / 3)], kv_cache_memory=pool))
    assert plan.memory["num_blocks"] == 1000 and plan.memory["usable_blocks"] == 999  # minus the null block
    for s in plan.scenarios:
        assert s.kv_tokens == s.prompt_tokens + 255  # the last output token's KV is never written
        assert s.kv_blocks == math.ceil(s.kv_tokens / 16)
        assert s.kv_block_bytes == s.kv_blocks * block_bytes and s.kv_bytes == s.kv_tokens * 147_456
        assert s.requests_fit == 999 // s.kv_blocks
    v, half, third = plan.scenarios
    assert (v.prompt_tokens, half.prompt_tokens, third.prompt_tokens) == (1974, 1092, 798)
    assert (v.kv_blocks, half.kv_blocks, third.kv_blocks) == (140, 85, 66)
    assert third.vs_vanilla["kv_blocks"] == 66 / 140


def test_pool_from_gpu_memory(q8b) -> None:
    plan = planner.make_plan(q8b, PlanRequest(images=[(1344, 1344)], gpu_memory=80 * GiB))
    params = mf.param_counts("qwen3-vl-8b")["total"]
    mem = plan.memory
    assert mem["weights_bytes"] == params * 2
    assert mem["kv_cache_bytes"] == int(80 * GiB * 0.9) - params * 2 - planner.DEFAULT_RESERVE_BYTES
    assert mem["num_blocks"] == mem["kv_cache_bytes"] // (147_456 * 16)
    tiny_gpu = planner.make_plan(q8b, PlanRequest(images=[(1344, 1344)], gpu_memory=16 * GiB))
    assert tiny_gpu.memory["num_blocks"] == 0 and tiny_gpu.vanilla.requests_fit == 0
    assert tiny_gpu.vanilla.vs_vanilla["requests_fit"] is None  # JSON null, not NaN
    json.loads(tiny_gpu.to_json(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert any("no KV cache" in n for n in tiny_gpu.notes)


def test_cpu_defaults_and_dtype(tiny: planner.ModelInfo) -> None:
    plan = planner.make_plan(tiny, PlanRequest(images=[(448, 448)], device="cpu", kv_cache_memory=GiB))
    assert plan.kv["block_size"] == 128
    # The tiny checkpoint is bfloat16: 2 x 4 layers x 2 heads x 64 x 2 bytes.
    assert plan.model["dtype"] == "bfloat16" and plan.kv["bytes_per_token"] == 2048
    fp32 = planner.make_plan(tiny, PlanRequest(images=[(448, 448)], device="cpu", dtype="float32",
                                               kv_cache_memory=GiB))
    assert fp32.kv["bytes_per_token"] == 4096 and fp32.memory["num_blocks"] == GiB // (4096 * 128)


@pytest.mark.parametrize(("tp", "pp", "layers", "kv_heads"), [(1, 1, 36, 8), (2, 1, 36, 4), (8, 1, 36, 1),
                                                          (16, 2, 18, 1), (1, 5, 8, 8), (4, 4, 9, 2)])
def test_kv_per_gpu_under_tensor_and_pipeline_parallelism(q8b, tp: int, pp: int, layers: int, kv_heads: int) -> None:
    """TP splits the 8 KV heads (replicated past 8 ranks), PP the 36 layers; the pool is per GPU."""
    single = planner.make_plan(q8b, PlanRequest(images=[(1344, 1344)], kv_cache_memory=GiB))
    split = planner.make_plan(q8b, PlanRequest(images=[(1344, 1344)], kv_cache_memory=GiB,
                                               tensor_parallel_size=tp, pipeline_parallel_size=pp))
    assert (split.model["layers_per_gpu"], split.model["kv_heads_per_gpu"]) == (layers, kv_heads)
    assert split.kv["bytes_per_token"] == 2 * layers * kv_heads * 128 * 2
    assert split.memory["num_blocks"] == GiB // (split.kv["bytes_per_token"] * 16)
    # Blocks per request depend on tokens and block size only: the same in every layout.
    assert [s.kv_blocks for s in split.scenarios] == [s.kv_blocks for s in single.scenarios]


def test_pipeline_stages_as_vllm_partitions_them(tiny: planner.ModelInfo) -> None:
    """36 layers over 5 stages: vLLM gives the remainder to the stages before the last, [7, 7, 7, 8, 7]."""
    assert planner.layers_and_kv_heads_per_gpu(mf.get_preset("qwen3-vl-8b"), 1, 5) == (8, 8)
    assert planner.layers_and_kv_heads_per_gpu(mf.get_preset("tiny-split"), 2, 2) == (4, 1)
    with pytest.raises(PlanError, match="before the 3 DeepStack layers"):
        planner.make_plan(tiny, PlanRequest(images=[(448, 448)], pipeline_parallel_size=2))


def test_checkpoint_dims_and_params_equal_the_preset(tiny: planner.ModelInfo) -> None:
    assert tiny.dims.text == mf.PRESETS["tiny"].text.__class__(
        **{**mf.PRESETS["tiny"].text.__dict__, "vocab_size": tiny.dims.text.vocab_size})
    assert tiny.dims.vision == mf.PRESETS["tiny"].vision
    assert model_info.param_counts(tiny.dims) == mf.param_counts("tiny")


# --- FLOPs ------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["tiny", "bench", "qwen3-vl-8b"])
@pytest.mark.parametrize("size", [(448, 448), (1344, 1344), (640, 320)])
def test_vanilla_flops_equal_model_factory(preset: str, size: tuple[int, int]) -> None:
    model = model_info._from_preset(preset, preset, [])
    plan = planner.make_plan(model, PlanRequest(images=[size], text_tokens=20, ratios=[]))
    n = plan.images[0].merged_tokens
    text = plan.vanilla.prompt_tokens - n
    ref = mf.prefill_flops(preset, (size[1], size[0]), text_tokens=text)
    assert plan.vanilla.vision_flops == ref["vision"]
    assert plan.vanilla.llm_flops == ref["llm"]


def test_civic_flops_and_exit_layer(q8b) -> None:
    req = PlanRequest(images=[(1344, 1344)], text_tokens=200, ratios=[("1", 1.0), ("1/3", 1 / 3)])
    plan = planner.make_plan(q8b, req)
    vanilla, full, third = plan.scenarios
    assert full.prefill_flops == vanilla.prefill_flops
    # Mergers run on K groups: the vision tower gets a little cheaper, the LLM much cheaper.
    assert third.vision_flops < vanilla.vision_flops and third.llm_flops < vanilla.llm_flops / 2
    t = third.vs_vanilla
    assert t["llm_token_speedup_limit"] == pytest.approx((210 + 1764) / (210 + 588))
    assert t["prefill_speedup_limit"] == pytest.approx(vanilla.prefill_flops / third.prefill_flops)
    assert 1 < t["prefill_speedup_limit"] < t["llm_token_speedup_limit"] < t["llm_flops_speedup"]

    depth = q8b.dims.vision.depth
    at_depth = planner.make_plan(q8b, PlanRequest(**{**req.__dict__, "exit_layer": depth}))
    assert [s.vision_flops for s in at_depth.scenarios] == [s.vision_flops for s in plan.scenarios]
    early = planner.make_plan(q8b, PlanRequest(**{**req.__dict__, "exit_layer": 8}))
    assert early.vanilla.vision_flops == vanilla.vision_flops  # vanilla has no exit layer
    assert early.civic[0].vision_flops == full.vision_flops  # K = N: nothing to skip
    assert early.civic[1].vision_flops < third.vision_flops
    v = q8b.dims.vision
    skipped = (depth - 8) * (cost._vision_block_flops(v, 7056) - cost._vision_block_flops(v, 4 * 588))
    assert third.vision_flops - early.civic[1].vision_flops == skipped
    # exit context: the later blocks also project the 7056 - 2352 dropped patches and attend to them
    context = planner.make_plan(q8b, PlanRequest(**{**req.__dict__, "exit_layer": 8, "exit_context": True}))
    kept, dropped = 4 * 588, 7056 - 4 * 588
    extra = (depth - 8) * (2 * dropped * 3 * v.hidden_size**2 + 4 * kept * dropped * v.hidden_size)
    assert context.civic[1].vision_flops - early.civic[1].vision_flops == extra
    assert early.civic[1].vision_flops < context.civic[1].vision_flops < third.vision_flops
    with pytest.raises(planner.PlanError, match="--exit-context needs --exit-layer"):
        planner.make_plan(q8b, PlanRequest(**{**req.__dict__, "exit_context": True}))


# --- model lookup -----------------------------------------------------------------------


def test_known_repo_offline_uses_its_preset() -> None:
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache("Qwen/Qwen3-VL-8B-Instruct", "config.json"), str):
        pytest.skip("the real config is in the local Hugging Face cache: it is read, not the preset")
    model = planner.load_model("Qwen/Qwen3-VL-8B-Instruct")
    assert model.preset == "qwen3-vl-8b" and model.dims == mf.PRESETS["qwen3-vl-8b"]
    assert any("preset's dims were used" in n for n in model.notes)
    with pytest.raises(PlanError, match="offline.*presets? \\(bench, bench-moe, bench-qwen3.5, qwen3-vl-2b"):
        planner.load_model("someone/not-a-model")


def test_non_qwen3vl_checkpoint_is_refused(tmp_path: Path) -> None:
    from transformers import LlamaConfig

    LlamaConfig(num_hidden_layers=1, hidden_size=64, intermediate_size=64, num_attention_heads=2).save_pretrained(
        tmp_path)
    with pytest.raises(PlanError, match="is llama; CIVIC serves Qwen3VLForConditionalGeneration, "
                                        "Qwen3VLMoeForConditionalGeneration, Qwen3_5ForConditionalGeneration"):
        planner.load_model(str(tmp_path))


# --- CLI ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "no-such-model", "--image", "448x448"], "unknown model 'no-such-model'"),
        (["--model", "tiny", "--image", "13x"], "malformed image size '13x'"),
        (["--model", "tiny", "--image", "0x10"], "malformed image size '0x10'"),
        (["--model", "tiny", "--image", "abc"], "malformed image size 'abc'"),
        (["--model", "tiny", "--image", "448x448", "--ratio", "0"], "ratio must be a number in (0, 1], got '0'"),
        (["--model", "tiny", "--image", "448x448", "--ratio", "1.5"], "got '1.5'"),
        (["--model", "tiny", "--image", "448x448", "--ratio", "nan"], "got 'nan'"),
        (["--model", "tiny", "--image", "448x448", "--ratio", "0.5,x"], "got 'x'"),
        (["--model", "tiny", "--image", "10x5000"], "aspect ratio"),
        (["--model", "tiny", "--image", "448x448", "--exit-layer", "9"], "--exit-layer must be in 1..4"),
        (["--model", "tiny", "--image", "448x448", "--gpu-memory", "80XB"], "malformed memory size '80XB'"),
        (["--model", "tiny", "--image", "448x448", "--images", "0"], "must be >= 1"),
        (["--model", "tiny", "--image", "1x1", "--image", "2x2", "--images", "3"], "--images N repeats"),
        (["--model", "tiny", "--image", "448x448", "--gpu-memory-utilization", "1.2"], "must be in (0, 1]"),
        (["--model", "tiny", "--image", "448x448", "--text-tokens", "3", "--question", "hi"], "not allowed with"),
        (["--model", "tiny"], "at least one --image or --video is needed"),
        (["--model", "tiny", "--image", "448x448", "--bogus"], "unrecognized arguments: --bogus"),
        (["--model", "tiny", "--image", "448x448", "--tensor-parallel-size", "3"], "4 attention heads"),
        (["--model", "tiny", "--image", "448x448", "--tensor-parallel-size", "0"], "must be >= 1"),
        (["--model", "tiny", "--image", "448x448", "--pipeline-parallel-size", "5"], "exceeds the 4 layers"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(capsys, argv: list[str], message: str) -> None:
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and out == ""
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith("civic plan: error: ") and message in err, err


def test_bad_input_from_the_real_command_has_no_traceback() -> None:
    result = subprocess.run([sys.executable, "-m", "civic_vllm.planner", "--model", "nope", "--image", "1x"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("civic plan: error: ") and result.stderr.count("\n") == 1


def test_json_schema(capsys) -> None:
    code, out, err = run_cli(capsys, "--model", "qwen3-vl-8b", "--image", "1344x1344", "--images", "2",
                             "--text-tokens", "200", "--ratio", "1", "--ratio", "0.5,1/3", "--json")
    assert code == 0 and err == ""
    plan = json.loads(out)
    assert set(plan) == {"model", "images", "videos", "text", "kv", "memory", "exit_layer", "scenarios", "notes"}
    assert plan["videos"] == []
    assert plan["model"]["preset"] == "qwen3-vl-8b" and plan["model"]["params"]["total"] > 8e9
    assert plan["model"]["max_image_tokens"] == 16_384  # what vLLM profiles per image
    assert len(plan["images"]) == 2 and plan["images"][0] == {
        "input_size": [1344, 1344], "resized_size": [1344, 1344], "grid_thw": [1, 84, 84], "patches": 7056,
        "merged_tokens": 1764}
    assert plan["text"] == {"question_tokens": 200, "template_tokens": 12, "question": None, "exact": False}
    assert plan["kv"] == {"bytes_per_token": 147_456, "block_size": 16, "block_bytes": 2_359_296, "max_tokens": 256,
                          "full_attention_layers": 36, "full_attention_layers_per_gpu": 36,
                          "state_blocks_per_request": 0}
    assert [s["label"] for s in plan["scenarios"]] == ["vanilla", "r=1", "r=0.5", "r=1/3"]
    assert [s["ratio"] for s in plan["scenarios"]] == [None, 1.0, 0.5, 1 / 3]
    scenario_keys = {"label", "ratio", "retained_per_image", "retained_per_video", "visual_tokens", "prompt_tokens",
                     "kv_tokens", "kv_blocks", "kv_bytes", "kv_block_bytes", "requests_fit", "vision_flops",
                     "llm_flops", "prefill_flops", "vs_vanilla"}
    for s in plan["scenarios"]:
        assert set(s) == scenario_keys
        assert set(s["vs_vanilla"]) == {"visual_tokens", "prompt_tokens", "kv_blocks", "requests_fit",
                                        "llm_token_speedup_limit", "llm_flops_speedup", "prefill_speedup_limit"}
    assert plan["scenarios"][3]["retained_per_image"] == [588, 588]
    assert plan["scenarios"][3]["prompt_tokens"] == 2 * 588 + 212
    assert {"num_blocks", "usable_blocks", "kv_cache_bytes", "weights_bytes"} <= set(plan["memory"])


def test_table(capsys) -> None:
    code, out, _ = run_cli(capsys, "--model", "qwen3-vl-8b", "--image", "1344x1344", "--text-tokens", "200",
                           "--ratio", "1,1/2,1/3")
    assert code == 0
    lines = out.splitlines()
    header = next(line for line in lines if "vanilla" in line and "r=1/3" in line)
    assert header.split() == ["vanilla", "r=1", "r=1/2", "r=1/3"]
    for row in ("visual tokens", "prompt tokens", "KV blocks / request", "requests that fit", "vision prefill",
                "LLM prefill", "LLM speed-up limit (tokens)", "prefill speed-up limit (FLOPs)"):
        assert any(line.startswith(row) for line in lines), row
    assert "147,456 B/token" in out and "(estimated)" in out
    prompt_row = next(line for line in lines if line.startswith("prompt tokens"))
    assert "1,974" in prompt_row and "798 (0.40x)" in prompt_row


def test_add_plan_parser_registers_the_subcommand(capsys) -> None:
    parser = argparse.ArgumentParser(prog="civic")
    commands = parser.add_subparsers(dest="command", required=True)
    plan_cli.add_plan_parser(commands)
    args = parser.parse_args(["plan", "--model", "qwen3-vl-2b", "--image", "448x448", "--json"])
    assert args.handler is plan_cli.run_plan
    assert args.handler(args) == 0
    assert json.loads(capsys.readouterr().out)["model"]["preset"] == "qwen3-vl-2b"
    args = parser.parse_args(["plan", "--model", "qwen3-vl-2b", "--image", "448x448", "--ratio", "2"])
    assert args.handler(args) == 2
    assert capsys.readouterr().err == "civic plan: error: retention ratio must be a number in (0, 1], got '2'\n"


@pytest.mark.parametrize(("text", "expected"), [
    ("80GiB", 80 * GiB), ("80GB", 80 * 10**9), ("80G", 80 * GiB), ("80g", 80 * 10**9),
    ("1.5GiB", 3 * GiB // 2), ("512MiB", 512 * 2**20), ("1024", 1024),
])
def test_parse_bytes(text: str, expected: int) -> None:
    assert planner.parse_bytes(text) == expected


def test_importing_the_planner_does_not_import_vllm() -> None:
    code = "import sys, civic_vllm.planner; assert 'vllm' not in sys.modules, 'vllm imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
