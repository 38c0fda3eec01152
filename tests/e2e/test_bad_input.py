"""Bad client input against a real `vllm serve --model-impl civic`: a clear 4xx, and nothing breaks.

After every bad request the server must still be healthy, answer a normal request, and
return to an idle KV cache (no leaked blocks). Statuses and messages are vLLM 0.32's own
unless a comment says the CIVIC processor produces them. Invalid civic_ratio values that
test_serving.py already covers (0, <0, >1, NaN, strings, null, bool, list) are not repeated.
"""

from __future__ import annotations

import base64
import io
import math

import pytest
from helpers import assert_still_serving, chat, error_message, make_image, post_chat
from PIL import Image

from civic_vllm.budget import num_retained
from civic_vllm.client import image_data_url

pytestmark = pytest.mark.e2e


def _b64_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def _png_bytes(image: Image.Image, **save_kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **save_kwargs)
    return buffer.getvalue()


def _image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


PNG_64 = _png_bytes(make_image(64, 64, seed=1))
TEXT = {"type": "text", "text": "What is in the picture?"}


def _bad_requests():
    """(id, content, mm_kwargs, expected message fragment); every one must answer 400."""
    image = _image_part(image_data_url(make_image(64, 64)))
    yield "corrupt-bytes", [_image_part(_b64_url(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)), TEXT], None, \
        "Failed to load image"
    yield "truncated-png", [_image_part(_b64_url(PNG_64[: len(PNG_64) // 2])), TEXT], None, \
        "Failed to load image: image file is truncated"
    yield "empty-image-bytes", [_image_part("data:image/png;base64,"), TEXT], None, "Failed to load image"
    yield "empty-url", [_image_part(""), TEXT], None, "is empty"
    yield "non-image-data-url", [_image_part(_b64_url(b"just some text", "text/plain")), TEXT], None, \
        "Failed to load image"
    yield "svg-is-not-decoded", [_image_part(_b64_url(b"<svg xmlns='http://www.w3.org/2000/svg'/>", "image/svg+xml")),
                                 TEXT], None, "Failed to load image"
    yield "invalid-base64", [_image_part("data:image/png;base64,@@not*base64@@"), TEXT], None, "base64"
    yield "unsupported-url-scheme", [_image_part("ftp://127.0.0.1/image.png"), TEXT], None, \
        "The URL must be either a HTTP, data or file URL"
    # The HF processor refuses extreme aspect ratios; the CIVIC processor appends that reason
    # to vLLM's generic "Failed to apply Qwen3VLProcessor" message.
    yield "aspect-ratio-1x400", [_image_part(image_data_url(Image.new("RGB", (1, 400)))), TEXT], None, \
        "aspect ratio"
    # limit-mm-per-prompt is 4 on the test server.
    yield "20-images", [_image_part(image_data_url(make_image(64, 64, seed=i))) for i in range(20)] + [TEXT], None, \
        "At most 4 image(s) may be provided in one prompt"
    yield "text-beyond-max-model-len", [{"type": "text", "text": "hello " * 5000}], None, \
        "maximum context length is 4096 tokens"
    # Settings test_serving.py does not cover: infinities, other civic_* keys.
    yield "ratio-infinity", [image, TEXT], {"civic_ratio": math.inf}, "civic_ratio must be a number in (0, 1]"
    yield "ratio-minus-infinity", [image, TEXT], {"civic_ratio": -math.inf}, "civic_ratio must be a number in (0, 1]"
    yield "policy-unknown", [image, TEXT], {"civic_policy": "bogus"}, "civic_policy must be one of civic, pool"
    yield "min-tokens-zero", [image, TEXT], {"civic_min_tokens": 0}, "civic_min_tokens must be an integer >= 1"
    yield "min-tokens-float", [image, TEXT], {"civic_min_tokens": 2.5}, "civic_min_tokens must be an integer >= 1"
    yield "min-tokens-string", [image, TEXT], {"civic_min_tokens": "3"}, "civic_min_tokens must be an integer >= 1"
    # Unknown processor kwargs: vanilla vLLM passes them to the HF processor, which ignores them
    # (HTTP 200); the CIVIC processor refuses them by name.
    yield "unknown-kwarg", [image, TEXT], {"max_pixel": 100_000}, "Unknown multimodal processor kwarg(s) ['max_pixel']"
    yield "unknown-scoped-kwarg", [image, TEXT], {"images_kwargs": {"foo": 1}}, \
        "Unknown multimodal processor kwarg(s) ['images_kwargs.foo']"
    yield "known-kwarg-bad-value", [image, TEXT], {"max_pixels": "many"}, "Failed to apply Qwen3VLProcessor"
    yield "kwargs-not-an-object", [image, TEXT], "civic_ratio=0.5", "Input should be a valid dictionary"


BAD_REQUESTS = list(_bad_requests())


@pytest.mark.parametrize(("content", "mm_kwargs", "message"), [case[1:] for case in BAD_REQUESTS],
                         ids=[case[0] for case in BAD_REQUESTS])
def test_bad_input_is_a_clear_400_and_server_keeps_serving(civic_server, content, mm_kwargs, message):
    response = post_chat(civic_server, content, mm_kwargs=mm_kwargs)
    assert response.status_code == 400, response.text[:500]
    assert message in error_message(response), response.text[:1000]
    assert_still_serving(civic_server)


def test_huge_image_is_refused_by_length_not_by_a_crash(civic_server):
    # 10000x10000 is resized to the processor's 16.7 MP cap: 16384 visual tokens, more than
    # max_model_len (4096) at the default ratio 1.0, so vLLM refuses it, as it would vanilla.
    png = _png_bytes(Image.new("RGB", (10_000, 10_000), (40, 160, 90)), compress_level=1)
    response = post_chat(civic_server, [_image_part(_b64_url(png)), TEXT], timeout=300)
    assert response.status_code == 400, response.text[:500]
    assert "exceeds model's maximum context length (4096)" in error_message(response)
    assert_still_serving(civic_server)


@pytest.mark.parametrize("ratio", [1.0, 0.1])
def test_one_pixel_image_is_served_as_the_smallest_image(civic_server, ratio):
    # Not an error, in vanilla vLLM either: the processor upsizes it to its minimum of 65,536
    # pixels (256x256, 64 merged tokens), so it costs what a 256x256 image costs.
    smallest = chat(civic_server, [make_image(256, 256)], ratio=1.0, max_tokens=1).prompt_tokens
    one_pixel = chat(civic_server, [Image.new("RGB", (1, 1), (200, 30, 30))], ratio=ratio, max_tokens=1)
    assert one_pixel.prompt_tokens == smallest - 64 + num_retained(64, ratio)
    assert_still_serving(civic_server)


def test_known_processor_kwarg_still_passes(civic_server):
    # The unknown-kwarg check must not refuse what the HF processor accepts.
    response = post_chat(civic_server, [_image_part(image_data_url(make_image(640, 640))), TEXT],
                         mm_kwargs={"max_pixels": 256 * 256, "civic_ratio": 0.5})
    assert response.status_code == 200, response.text[:500]
    assert response.json()["usage"]["prompt_tokens"] < 100  # 64 tokens before retention, 32 kept

