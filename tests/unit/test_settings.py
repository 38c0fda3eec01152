import math

import pytest

from civic_vllm.settings import CivicSettings, CivicSettingsError, strip_civic_kwargs


def test_defaults_keep_everything():
    settings = CivicSettings.from_mm_kwargs({})
    assert settings.ratio == 1.0 and settings.policy == "civic" and settings.min_tokens == 1


def test_reads_only_civic_keys():
    settings = CivicSettings.from_mm_kwargs({"civic_ratio": 0.25, "civic_policy": "pool", "max_pixels": 10})
    assert (settings.ratio, settings.policy) == (0.25, "pool")


@pytest.mark.parametrize("ratio", [1, 1.0, 0.5, 1 / 3, 1e-6])
def test_valid_ratios(ratio):
    assert CivicSettings.from_mm_kwargs({"civic_ratio": ratio}).ratio == float(ratio)


BAD_RATIOS = [0, 0.0, -0.1, 1.0000001, 2, math.nan, math.inf, -math.inf, "0.5", "abc", None, True, [0.5]]


@pytest.mark.parametrize("ratio", BAD_RATIOS)
def test_invalid_ratios_name_the_key_and_range(ratio):
    with pytest.raises(CivicSettingsError) as err:
        CivicSettings.from_mm_kwargs({"civic_ratio": ratio})
    assert "civic_ratio" in str(err.value) and "(0, 1]" in str(err.value)
    assert isinstance(err.value, ValueError)  # vLLM maps ValueError to HTTP 400


def test_unknown_key_lists_known_keys():
    with pytest.raises(CivicSettingsError, match="unknown setting 'civic_ratoi'.*civic_ratio"):
        CivicSettings.from_mm_kwargs({"civic_ratoi": 0.5})


def test_unknown_policy_lists_choices():
    with pytest.raises(CivicSettingsError, match="civic_policy must be one of civic, pool, random, full"):
        CivicSettings.from_mm_kwargs({"civic_policy": "magic"})


@pytest.mark.parametrize("value", [0, -1, 1.5, "2", True])
def test_invalid_min_tokens(value):
    with pytest.raises(CivicSettingsError, match="civic_min_tokens"):
        CivicSettings.from_mm_kwargs({"civic_min_tokens": value})


def test_round_trip_and_strip():
    settings = CivicSettings(ratio=0.5, policy="random", min_tokens=4)
    kwargs = settings.as_mm_kwargs()
    assert CivicSettings.from_mm_kwargs(kwargs) == settings
    assert strip_civic_kwargs({**kwargs, "max_pixels": 7}) == {"max_pixels": 7}


EXIT_LAYER_NAMES = ["exit_layer", "video_exit_layer"]


@pytest.mark.parametrize("name", EXIT_LAYER_NAMES)
def test_exit_layer_default_and_values(name):
    assert getattr(CivicSettings.from_mm_kwargs({}), name) is None
    assert getattr(CivicSettings.from_mm_kwargs({f"civic_{name}": 3}), name) == 3
    assert getattr(CivicSettings.from_mm_kwargs({f"civic_{name}": None}), name) is None


def test_the_two_exit_layers_are_independent():
    settings = CivicSettings.from_mm_kwargs({"civic_video_exit_layer": 2})
    assert (settings.exit_layer, settings.video_exit_layer) == (None, 2)


@pytest.mark.parametrize("name", EXIT_LAYER_NAMES)
@pytest.mark.parametrize("value", [0, -2, 1.5, "3", True])
def test_invalid_exit_layer(name, value):
    with pytest.raises(CivicSettingsError, match=f"civic_{name} must be an integer"):
        CivicSettings.from_mm_kwargs({f"civic_{name}": value})


def test_exit_context_is_a_strict_boolean():
    assert CivicSettings.from_mm_kwargs({}).exit_context is False
    assert CivicSettings.from_mm_kwargs({"civic_exit_context": True}).exit_context is True
    for value in ("yes", 1, None):
        with pytest.raises(CivicSettingsError, match="civic_exit_context must be true or false"):
            CivicSettings.from_mm_kwargs({"civic_exit_context": value})


@pytest.mark.parametrize("name", EXIT_LAYER_NAMES)
def test_exit_layer_beyond_the_vision_depth(name):
    settings = CivicSettings.from_mm_kwargs({f"civic_{name}": 5})
    settings.check_model(5, has_scorer=False)
    with pytest.raises(CivicSettingsError, match=f"civic_{name} must be between 1 and 4"):
        settings.check_model(4, has_scorer=False)


def test_learned_policy_needs_a_scorer():
    settings = CivicSettings.from_mm_kwargs({"civic_policy": "learned", "civic_ratio": 0.5})
    settings.check_model(4, has_scorer=True)
    with pytest.raises(CivicSettingsError, match="trained CIVIC scorer"):
        settings.check_model(4, has_scorer=False)
