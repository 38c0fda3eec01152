"""The per-image encoder cap: arithmetic, request checks, and the CIVIC processor applying it
in-process (vLLM's own processor classes on the tiny preset, no server)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from civic_vllm.image_cap import ImageCap, requested_image_size
from civic_vllm.settings import CivicSettings, CivicSettingsError, ServerSettings

VISION = SimpleNamespace(patch_size=16, spatial_merge_size=2)


def cap_of(server_kwargs=None, max_model_len=1024) -> ImageCap:
    return ImageCap.for_model(server_kwargs, max_model_len=max_model_len, vision_config=VISION)


# ---- settings ----------------------------------------------------------------------------------


def test_default_cap_is_max_model_len_merged_tokens():
    cap = cap_of()
    assert cap.max_tokens == 1024 and cap.max_patches == 1024 * 4 and cap.max_pixels == cap.max_patches * 16**2
    assert "max_model_len 1024" in cap.describe() and not cap.allow_request_pixels


def test_operator_cap_and_allowance():
    cap = cap_of({"civic_max_image_patches": 1000, "civic_allow_request_pixels": True, "civic_ratio": 0.5})
    assert cap.max_patches == 1000 and cap.allow_request_pixels and "civic_max_image_patches" in cap.describe()


@pytest.mark.parametrize("kwargs, match", [
    ({"civic_max_image_patches": 0}, "civic_max_image_patches must be an integer >= 1"),
    ({"civic_max_image_patches": 1.5}, "civic_max_image_patches must be an integer"),
    ({"civic_max_image_patches": True}, "civic_max_image_patches must be an integer"),
    ({"civic_allow_request_pixels": "yes"}, "civic_allow_request_pixels must be true or false"),
])
def test_bad_server_settings_are_named(kwargs, match):
    with pytest.raises(CivicSettingsError, match=match):
        ServerSettings.from_mm_kwargs(kwargs)


def test_cap_below_one_merged_token_is_refused():
    with pytest.raises(ValueError, match=r"civic_max_image_patches must be >= 4"):
        cap_of({"civic_max_image_patches": 3})


def test_server_keys_are_not_request_settings():
    # The configured kwargs are merged into every request's: the request settings ignore them...
    assert CivicSettings.from_mm_kwargs({"civic_ratio": 0.5, "civic_max_image_patches": 99}).ratio == 0.5
    # ...and a request that names one is refused.
    with pytest.raises(CivicSettingsError, match="civic_max_image_patches can only be set by the operator"):
        ServerSettings.refuse_in_request({"civic_max_image_patches": 10**9})
    ServerSettings.refuse_in_request({"civic_ratio": 0.5, "max_pixels": 10})


# ---- request limits ----------------------------------------------------------------------------


def test_requested_image_size_reads_every_spelling():
    assert requested_image_size({}) == {}
    assert requested_image_size({"max_pixels": 5}) == {"longest_edge": 5}
    assert requested_image_size({"size": {"longest_edge": 5, "shortest_edge": 2}}) == {"longest_edge": 5,
                                                                                       "shortest_edge": 2}
    assert requested_image_size({"max_pixels": 5, "images_kwargs": {"max_pixels": 7, "min_pixels": 1}}) == {
        "longest_edge": 7, "shortest_edge": 1}
    assert requested_image_size({"size": {"longest_edge": 9}, "max_pixels": 5}) == {"longest_edge": 5}
    assert requested_image_size({"images_kwargs": "junk", "size": 3}) == {}


@pytest.mark.parametrize("kwargs", [
    {"max_pixels": "cap+1"}, {"size": {"longest_edge": "cap+1"}}, {"images_kwargs": {"max_pixels": "cap+1"}},
    {"min_pixels": "cap+1"}, {"max_pixels": "cap*100.0"},
])
def test_requests_raising_a_limit_past_the_cap_are_refused_naming_it(kwargs):
    cap = cap_of()

    def resolve(value):
        return eval(value, {"cap": cap.max_pixels}) if isinstance(value, str) else value  # noqa: S307

    kwargs = {k: ({kk: resolve(vv) for kk, vv in v.items()} if isinstance(v, dict) else resolve(v))
              for k, v in kwargs.items()}
    with pytest.raises(ValueError, match=rf"per-image encoder cap of {cap.max_patches} vision patches"):
        cap.check_request(kwargs)
    allowed = ImageCap(cap.max_patches, 16, 2, "test", allow_request_pixels=True)
    allowed.check_request(kwargs)
    assert allowed.patch_limit(kwargs) is None


@pytest.mark.parametrize("kwargs", [{}, {"max_pixels": "cap"}, {"max_pixels": 256 * 256, "min_pixels": 1},
                                    {"max_pixels": "junk"}])
def test_requests_within_the_cap_pass(kwargs):
    cap = cap_of()
    kwargs = {k: (cap.max_pixels if v == "cap" else v) for k, v in kwargs.items()}
    cap.check_request(kwargs)  # a non-number is left to the HF processor, which refuses it
    assert cap.patch_limit(kwargs) == cap.max_patches


def test_image_size_lowers_the_server_limits_to_the_cap():
    cap = cap_of()
    server = {"longest_edge": 16777216, "shortest_edge": 65536}
    assert cap.image_size(server, {}) == {"longest_edge": cap.max_pixels, "shortest_edge": 65536}
    assert cap.image_size(server, {"max_pixels": 1000}) == {"longest_edge": 1000, "shortest_edge": 65536}
    small = cap_of(max_model_len=8)  # below the processor's own minimum too
    assert small.image_size(server, {}) == {"longest_edge": small.max_pixels, "shortest_edge": small.max_pixels}


def test_check_grids_is_the_last_guard():
    cap = cap_of()
    cap.check_grids([[1, 64, 64], [1, 2, 2]], {})
    with pytest.raises(ValueError, match="image 1 has 4160 vision patches"):
        cap.check_grids([[1, 2, 2], [1, 64, 65]], {})


# ---- the CIVIC processor (in-process vLLM) --------------------------------------------------------


def _processor(max_model_len: int, server_kwargs: dict | None = None):
    from vllm.engine.arg_utils import EngineArgs
    from vllm.multimodal import MULTIMODAL_REGISTRY

    import civic_vllm
    from civic_vllm.model_factory import default_model_dir

    civic_vllm.register()
    args = EngineArgs(model=str(default_model_dir("tiny")), model_impl="civic", dtype="float32",
                      max_num_batched_tokens=256, max_model_len=max_model_len,
                      limit_mm_per_prompt={"image": 2, "video": 0}, mm_processor_kwargs=server_kwargs)
    return MULTIMODAL_REGISTRY.create_processor(args.create_engine_config().model_config)


@pytest.fixture(scope="module")
def processor():
    return _processor(1024)


def _grids(processor, image, request_kwargs):
    items = processor.info.get_data_parser().parse_mm_data({"image": [image]})
    out = processor._apply_hf_processor_main(items, request_kwargs)
    return out["image_grid_thw"].tolist(), out["civic_num_kept"].tolist()


def test_a_huge_image_is_downscaled_to_the_cap_before_the_encoder(processor):
    from PIL import Image

    cap = processor.info.image_cap()
    assert cap.max_tokens == 1024  # the default for --max-model-len 1024
    [grid], [kept] = _grids(processor, Image.new("RGB", (4000, 4000), (20, 120, 220)), {"civic_ratio": 0.05})
    patches = math.prod(grid)
    assert cap.max_patches // 2 < patches <= cap.max_patches  # downscaled to the cap, not far below it
    assert kept == math.ceil(0.05 * patches / 4)
    # vLLM's own largest image (profiling, encoder cache size, the scheduler's budget) is the capped one
    assert processor.info.get_max_image_tokens() == cap.max_tokens


def test_a_request_lowering_max_pixels_is_honoured(processor):
    from PIL import Image

    [grid], _ = _grids(processor, Image.new("RGB", (4000, 4000)), {"max_pixels": 256 * 256})
    assert math.prod(grid) * 16**2 <= 256 * 256


def test_an_allowed_request_may_go_past_the_cap():
    from PIL import Image

    processor = _processor(1024, {"civic_max_image_patches": 256, "civic_allow_request_pixels": True})
    cap = processor.info.image_cap()
    image = Image.new("RGB", (2000, 2000))
    [capped], _ = _grids(processor, image, {})
    [raised], _ = _grids(processor, image, {"max_pixels": 4 * cap.max_pixels})
    assert math.prod(capped) <= cap.max_patches < math.prod(raised) <= 4 * cap.max_patches
