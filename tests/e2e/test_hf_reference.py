"""vLLM's civic path against an explicit HF transformers reference of the same retention.

The reference (civic_vllm.hf_compact) shares only the token *selection* with the
vLLM adapter. If compaction, DeepStack rows, M-RoPE positions or chunked prefill
were wrong on the vLLM side, greedy tokens and logprobs would differ.
"""

from __future__ import annotations

import pytest
from helpers import MAX_TOKENS, chat, hf_reference, make_image

pytestmark = pytest.mark.e2e

ONE_IMAGE = [(448, 448)]
THREE_IMAGES = [(448, 448), (640, 320), (320, 512)]  # 556 image tokens: chunked at ratio >= 0.5


@pytest.mark.parametrize("ratio", [1.0, 0.5, 1 / 3, 0.1], ids=["r1", "r0.5", "r0.33", "r0.1"])
@pytest.mark.parametrize("sizes", [ONE_IMAGE, THREE_IMAGES], ids=["1img", "3img"])
def test_vllm_civic_matches_hf_reference(civic_server, hf, sizes, ratio):
    images = [make_image(w, h, seed=7 * i + w) for i, (w, h) in enumerate(sizes)]
    question = "What is in the picture?"
    prompt_len, tokens, logprobs = hf_reference(hf, images, question, ratio, "civic")
    served = chat(civic_server, images, question, ratio=ratio, max_tokens=MAX_TOKENS, ignore_eos=True)
    assert served.prompt_tokens == prompt_len
    assert served.token_ids == tokens
    assert served.logprobs == pytest.approx(logprobs, abs=2e-3)


@pytest.mark.parametrize("policy", ["pool", "random"])
def test_other_policies_match_hf_reference(civic_server, hf, policy):
    images = [make_image(w, h, seed=w) for w, h in THREE_IMAGES]
    prompt_len, tokens, logprobs = hf_reference(hf, images, "Describe this image.", 1 / 3, policy)
    served = chat(civic_server, images, "Describe this image.", ratio=1 / 3, policy=policy,
                  max_tokens=MAX_TOKENS, ignore_eos=True)
    assert served.prompt_tokens == prompt_len
    assert served.token_ids == tokens
    assert served.logprobs == pytest.approx(logprobs, abs=2e-3)


@pytest.mark.parametrize("exit_layer", [1, 2, 3])
@pytest.mark.parametrize("ratio", [0.5, 1 / 3], ids=["r0.5", "r0.33"])
def test_early_exit_matches_hf_reference(civic_server, hf, ratio, exit_layer):
    """Retention after vision block L: later blocks, DeepStack taps and mergers see kept rows only."""
    images = [make_image(w, h, seed=3 * w + h) for w, h in THREE_IMAGES]
    question = "What is in the picture?"
    prompt_len, tokens, logprobs = hf_reference(hf, images, question, ratio, "civic", exit_layer)
    served = chat(civic_server, images, question, ratio=ratio, exit_layer=exit_layer,
                  max_tokens=MAX_TOKENS, ignore_eos=True)
    assert served.prompt_tokens == prompt_len
    assert served.token_ids == tokens
    assert served.logprobs == pytest.approx(logprobs, abs=2e-3)


@pytest.mark.parametrize("exit_layer", [1, 2])
def test_exit_context_matches_hf_reference(civic_server, hf, exit_layer):
    """Exit context: the blocks after L attend to the dropped groups too (kept rows as queries)."""
    images = [make_image(w, h, seed=5 * w + h) for w, h in THREE_IMAGES]
    question = "What is in the picture?"
    prompt_len, tokens, logprobs = hf_reference(hf, images, question, 1 / 3, "civic", exit_layer, exit_context=True)
    served = chat(civic_server, images, question, ratio=1 / 3, exit_layer=exit_layer, exit_context=True,
                  max_tokens=MAX_TOKENS, ignore_eos=True)
    assert served.prompt_tokens == prompt_len
    assert served.token_ids == tokens
    assert served.logprobs == pytest.approx(logprobs, abs=2e-3)
    plain = chat(civic_server, images, question, ratio=1 / 3, exit_layer=exit_layer, max_tokens=MAX_TOKENS,
                 ignore_eos=True)
    assert plain.logprobs != pytest.approx(served.logprobs, abs=1e-4)  # the context is not silently ignored


def test_early_exit_changes_the_encoder_output(civic_server):
    """Guards the test above against an exit layer that is silently ignored."""
    images = [make_image(448, 448, seed=5)]
    late = chat(civic_server, images, ratio=1 / 3, max_tokens=MAX_TOKENS, ignore_eos=True)
    early = chat(civic_server, images, ratio=1 / 3, exit_layer=1, max_tokens=MAX_TOKENS, ignore_eos=True)
    assert early.prompt_tokens == late.prompt_tokens
    assert early.logprobs != pytest.approx(late.logprobs, abs=1e-4)
