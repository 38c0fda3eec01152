"""The scheduler of a real `vllm serve --model-impl civic` caps vision-tower work per step.

The shared tiny fp32 server runs with max_num_batched_tokens 256 and max_model_len 4096. vLLM's own
encoder budget is the max tokens per image, 4096 placeholder tokens (the tiny preset's 16384 lowered
to the default per-image encoder cap, N <= max_model_len), so without the CIVIC manager two 448x448
images at ratio 0.1 (K = 20 each, N = 196 each) are both encoded in the first step (40
placeholders); with it, their vision-tower cost 392 > 256 puts the second in the next step.
"""

from __future__ import annotations

import re

import pytest
from helpers import chat, make_image, merged_tokens

from civic_vllm.budget import num_retained

pytestmark = pytest.mark.e2e

STARTUP = re.compile(r"CIVIC encoder budget per scheduler step: vanilla=(\d+) placeholder tokens .*civic=(\d+) vision")
DEFERRED = "CIVIC encoder budget deferred an image to a later step"
SIZE, RATIO = 448, 0.1


def test_scheduler_uses_the_civic_budget(civic_server):
    found = STARTUP.findall(civic_server.log_text())
    # One scheduler, in the engine core: vLLM's placeholder budget (the largest image it admits:
    # the per-image encoder cap, by default max_model_len merged tokens) and the CIVIC cap on N.
    config = civic_server.config
    assert found == [(str(config.max_model_len), str(config.max_num_batched_tokens))], civic_server.log_tail()


def test_two_images_over_the_cap_are_encoded_in_two_steps_with_the_same_answer(civic_server):
    n = merged_tokens(SIZE, SIZE)
    k = num_retained(n, RATIO, 1)
    assert 2 * k <= 256 < 2 * n  # vLLM's budgets would encode both at once; the cap must not
    images = [make_image(SIZE, SIZE, seed=801), make_image(SIZE, SIZE, seed=802)]  # not cached by other tests
    first = chat(civic_server, images, "Compare the two pictures.", ratio=RATIO, max_tokens=6, ignore_eos=True)
    assert DEFERRED in civic_server.log_text(), civic_server.log_tail()
    # Again, now from the encoder cache (no deferral possible): the answer must not change.
    again = chat(civic_server, images, "Compare the two pictures.", ratio=RATIO, max_tokens=6, ignore_eos=True)
    assert first.prompt_tokens == again.prompt_tokens
    assert first.prompt_tokens < 256  # the whole prompt fits one step: only the cap splits it
    assert first.token_ids == again.token_ids
