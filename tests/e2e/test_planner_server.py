"""``civic plan`` against a live ``vllm serve --model-impl civic``: exact prompt tokens and KV blocks.

One server (the session's ``civic_server``: tiny model, fp32, CPU, 1 GiB KV pool, block size
128, --max-num-batched-tokens 256) answers every case; the planner runs on the same checkpoint
with ``--question`` (so template and question tokens are exact), ``--device cpu --dtype
float32 --kv-cache-memory 1GiB``.

How vLLM 0.32 counts KV blocks, established from its source and checked here:

* the pool has ``kv_cache_bytes // bytes_per_block`` blocks, reported as ``num_gpu_blocks`` in
  the ``vllm:cache_config_info`` labels; block 0 is the *null block* and is never handed out;
* ``vllm:kv_cache_usage_perc`` = 1 - free / (num_gpu_blocks - 1) (BlockPool.get_usage): the
  null block is excluded from both sides, so blocks in use = usage x (num_gpu_blocks - 1),
  an integer. (usage x num_gpu_blocks is off by used/(num_gpu_blocks-1) and is not.) vLLM's
  start-up line "Maximum concurrency ... x" divides num_gpu_blocks *with* the null block;
* the step that samples output token g holds prompt + g - 1 KV slots, ceil(../block_size)
  blocks: the planner's KV blocks for ``--max-tokens g``.
"""

from __future__ import annotations

import argparse
import functools

import helpers
import pytest
from helpers import blocks_across_a_boundary, cache_config, chat, make_image

from civic_vllm import planner
from civic_vllm.cli import plan as plan_cli

pytestmark = pytest.mark.e2e

QUESTION = "What shapes and colours are in this picture? Answer briefly."
KV_CACHE = "1GiB"  # ServerConfig's default kv_cache_gib=1.0 -> VLLM_CPU_KVCACHE_SPACE=1

# (image sizes, ratio): sizes off the 32-pixel grid, below min_pixels (64x64 is upscaled to
# 256x256), large (1344x1344 = 1764 tokens) and lopsided; 1, 2 and 3 images; r in {1, 1/2, 1/3, 0.1}.
PROMPT_CASES = [
    ([(500, 375)], 1.0),
    ([(500, 375)], 0.1),
    ([(64, 64)], 1 / 3),
    ([(1344, 1344)], 0.5),
    ([(1500, 100)], 1 / 3),
    ([(1000, 700), (333, 517)], 1 / 3),
    ([(640, 480), (640, 480)], 1.0),
    ([(640, 480), (97, 1234), (500, 375)], 0.1),
    ([(448, 448), (600, 601), (31, 900)], 0.5),
]
BLOCK_CASES = [
    ([(500, 375)], 1 / 3),
    ([(1344, 1344)], 1.0),
    ([(640, 480), (97, 1234), (500, 375)], 0.1),
]


def planner_argv(model: str, sizes, ratio: float, max_tokens: int = 1) -> list[str]:
    """``civic plan`` flags for this server and request."""
    return helpers.planner_argv(model, sizes, ratio, QUESTION, max_tokens, KV_CACHE)


def run_planner(model: str, sizes, ratio: float, max_tokens: int = 1) -> dict:
    return helpers.run_planner(planner_argv(model, sizes, ratio, max_tokens))


def images_for(sizes):
    return [make_image(w, h, seed=i + w) for i, (w, h) in enumerate(sizes)]


@pytest.fixture(scope="module")
def pool(civic_server) -> dict[str, int]:
    labels = cache_config(civic_server)
    return {"num_blocks": int(labels["num_gpu_blocks"]), "block_size": int(labels["block_size"])}


@pytest.mark.parametrize(("sizes", "ratio"), PROMPT_CASES,
                         ids=[f"{len(s)}img-{'+'.join(f'{w}x{h}' for w, h in s)}-r{r:.3g}" for s, r in PROMPT_CASES])
def test_prompt_tokens_equal_usage_prompt_tokens(civic_server, sizes, ratio):
    plan = run_planner(civic_server.config.model, sizes, ratio)
    civic = plan["scenarios"][1]
    assert plan["text"]["exact"]
    served = chat(civic_server, images_for(sizes), QUESTION, ratio=ratio, max_tokens=1).prompt_tokens
    assert civic["prompt_tokens"] == served
    if ratio == 1.0:  # ratio 1 is vanilla (token-identical, tests/e2e/test_serving.py)
        assert plan["scenarios"][0]["prompt_tokens"] == served


def test_pool_blocks_equal_the_servers(civic_server, pool):
    plan = run_planner(civic_server.config.model, [(448, 448)], 1.0)
    assert plan["kv"]["block_size"] == pool["block_size"] == 128
    assert plan["memory"]["num_blocks"] == pool["num_blocks"]
    assert plan["memory"]["usable_blocks"] == pool["num_blocks"] - 1


@pytest.mark.parametrize(("sizes", "ratio"), BLOCK_CASES,
                         ids=[f"{len(s)}img-r{r:.3g}" for s, r in BLOCK_CASES])
def test_kv_blocks_of_a_request_held_in_decode(civic_server, pool, sizes, ratio):
    """Blocks in use while one request decodes == the planner's blocks for --max-tokens g.

    g is the server's own count, ``vllm:generation_tokens_total`` since the server was idle,
    read in the same scrape as ``vllm:kv_cache_usage_perc``: vLLM sets both in one ``record()``
    per engine step and the scrape runs on the same event loop (``civic_server.metrics()``), so
    every sample pairs a step's blocks with that step's g exactly (no window for how far the
    client lags). The request decodes up to max_model_len; the test needs samples at two
    block counts (decode crossed a block boundary). A scrape can take seconds while the
    engine holds both cores, so the request is sent again (at most 3 times) until it has them.
    """
    model = planner.load_model(civic_server.config.model)
    parser = plan_cli.add_plan_parser(argparse.ArgumentParser().add_subparsers())
    base = plan_cli.request_from_args(parser.parse_args(planner_argv(civic_server.config.model, sizes, ratio)))

    @functools.cache
    def planned_blocks(output_tokens: int) -> int:
        plan = planner.make_plan(model, planner.PlanRequest(**{**base.__dict__, "max_tokens": output_tokens}))
        return plan.scenarios[1].kv_blocks

    usable = pool["num_blocks"] - 1  # the null block is not in kv_cache_usage_perc's denominator
    prompt_tokens = run_planner(civic_server.config.model, sizes, ratio)["scenarios"][1]["prompt_tokens"]
    max_tokens = civic_server.config.max_model_len - prompt_tokens
    decode, usages = blocks_across_a_boundary(civic_server, images_for(sizes), QUESTION, ratio, max_tokens, usable)
    wrong = [(generated, blocks, planned_blocks(generated)) for generated, blocks in decode
             if blocks != planned_blocks(generated)]
    assert not wrong, wrong
    assert all(usage["prompt_tokens"] == prompt_tokens for usage in usages), usages
    assert all(usage["completion_tokens"] == max_tokens for usage in usages), usages
