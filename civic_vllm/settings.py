"""CIVIC settings: what a server default or a request may set, validated in one place.

Settings travel through vLLM's own multimodal processor kwargs, so operators and
clients use flags they already know:

* server default: ``vllm serve M --model-impl civic --mm-processor-kwargs '{"civic_ratio": 0.33}'``
* per request:    ``"mm_processor_kwargs": {"civic_ratio": 0.5}`` in the chat-completions body
  (vLLM only forwards these when the server runs with ``--trust-request-mm-kwargs``).

A few keys are the operator's alone (:class:`ServerSettings`, e.g. the per-image encoder cap): they
are read from ``--mm-processor-kwargs`` and a request that names one gets an HTTP 400.

Every key this plugin owns starts with ``civic_``; they are stripped before the
HF processor sees the kwargs. Invalid values raise :class:`CivicSettingsError`
(a ``ValueError``, which vLLM's OpenAI server turns into an HTTP 400).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from civic_vllm.budget import validate_ratio

KEY_PREFIX = "civic_"

# Policies that pick tokens on the encoder output (see civic_vllm.retention); "learned" needs a
# checkpoint whose CIVIC recipe has a trained scorer (civic_vllm.recipe). Append only: the
# processor ships a policy as its index here.
PolicyName = Literal["civic", "pool", "random", "full", "learned"]
POLICY_CHOICES: tuple[str, ...] = PolicyName.__args__  # type: ignore[attr-defined]

# What the processor hands the model per item (mm_processor_kwargs fields, one value per image or
# video), after a request's settings are resolved; they never reach the HF processor.
NUM_KEPT_KEY = "civic_num_kept"  # K of each image
POLICY_ID_KEY = "civic_policy_id"  # index into POLICY_CHOICES
EXIT_LAYER_KEY = "civic_exit_layer_of_image"  # not "civic_exit_layer": that is the setting
EXIT_CONTEXT_KEY = "civic_exit_context_of_image"  # 1: the blocks after the exit layer read the dropped groups
PER_IMAGE_KEYS = (NUM_KEPT_KEY, POLICY_ID_KEY, EXIT_LAYER_KEY, EXIT_CONTEXT_KEY)
VIDEO_NUM_KEPT_KEY = "civic_video_num_kept"  # K_t, kept tokens in each frame group of a video
VIDEO_EXIT_LAYER_KEY = "civic_exit_layer_of_video"  # not "civic_video_exit_layer": that is the setting
PER_VIDEO_KEYS = (VIDEO_NUM_KEPT_KEY, VIDEO_EXIT_LAYER_KEY)


def policy_id(name: str) -> int:
    return POLICY_CHOICES.index(name)


def policy_name(policy_index: int) -> str:
    return POLICY_CHOICES[policy_index]


class CivicSettingsError(ValueError):
    """A civic_* setting has a bad value; the message names the key and the allowed range."""


def _strict_bool(value: Any) -> bool:
    if not isinstance(value, bool):  # JSON true/false only: "yes" or 1 is a client bug, not a wish
        raise ValueError(f"must be true or false, got {value!r}")
    return value


def _strict_int(value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"must be an integer >= {minimum}, got {value!r}")
    return value


class ServerSettings(BaseModel):
    """Operator-only settings (``--mm-processor-kwargs``); a request may not set them."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    max_image_patches: int | None = None
    """Most vision patches one image may cost the encoder; larger images are downscaled to fit
    before the encoder runs. None: the default derived from the model (see civic_vllm.image_cap)."""

    allow_request_pixels: bool = False
    """Let requests raise ``max_pixels`` / ``min_pixels`` / ``size`` past the cap (refused with a
    400 otherwise). Only matters with ``--trust-request-mm-kwargs``."""

    @field_validator("max_image_patches", mode="before")
    @classmethod
    def _check_max_image_patches(cls, value: Any) -> int | None:
        return None if value is None else _strict_int(value, 1)

    @field_validator("allow_request_pixels", mode="before")
    @classmethod
    def _check_allow(cls, value: Any) -> bool:
        return _strict_bool(value)

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        return tuple(KEY_PREFIX + name for name in cls.model_fields)

    @classmethod
    def from_mm_kwargs(cls, mm_kwargs: Mapping[str, Any] | None) -> ServerSettings:
        """The operator's settings from the server's ``--mm-processor-kwargs``."""
        values = {key[len(KEY_PREFIX) :]: value for key, value in (mm_kwargs or {}).items() if key in cls.keys()}
        try:
            return cls(**values)
        except ValidationError as exc:
            raise CivicSettingsError(_describe(exc, "Invalid CIVIC server setting")) from None

    @classmethod
    def refuse_in_request(cls, request_kwargs: Mapping[str, Any] | None) -> None:
        """HTTP 400 for a request that names an operator-only key."""
        named = sorted(key for key in (request_kwargs or {}) if key in cls.keys())
        if named:
            raise CivicSettingsError(
                f"Invalid CIVIC setting: {', '.join(named)} can only be set by the operator "
                "(vllm serve --mm-processor-kwargs), not per request"
            )


class CivicSettings(BaseModel):
    """Retention settings for one request (server defaults merged with request values)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    ratio: float = 1.0
    """Fraction of merged visual tokens kept per image, in (0, 1]. 1.0 keeps all (vanilla)."""

    policy: PolicyName = "civic"
    """How the kept tokens are chosen."""

    min_tokens: int = 1
    """Floor on kept tokens per image, so tiny images at small ratios keep something useful."""

    video_ratio: float | None = None
    """Fraction of each video's placeholder span kept, in (0, 1], or None: the span is the
    video tokens plus each frame group's timestamp and markers, which are kept, so the video
    tokens kept per group are fewer than this fraction (civic_vllm.budget.num_retained_per_group)
    and the span's KV blocks fall to it.

    Default None: videos follow ``ratio``, so a server or request that asks for one retention
    level gets it for every visual item, and the default (ratio 1.0) leaves video untouched,
    exactly like vanilla vLLM. Set it when videos should be pruned harder or softer than
    images (video frames repeat each other, so a lower value usually costs less accuracy).
    ``policy`` "full" keeps every video token too; any other policy selects video tokens
    with the temporal-novelty policy (civic_vllm.retention.video). ``min_tokens`` is the
    floor per frame group; ``exit_layer`` applies to images only (see ``video_exit_layer``)."""

    video_exit_layer: int | None = None
    """``exit_layer`` for videos: vision blocks that run on every patch of every frame group
    before the temporal policy selects K_t tokens per group; the later blocks and the mergers
    then run on the kept tokens only. Default None: selection on the encoder output."""

    exit_layer: int | None = None
    """Vision blocks that run on all patches before retention; None: all of them (retention on
    the encoder output). Smaller values let the later blocks run on kept tokens only. The upper
    bound (the vision depth) is checked by the processor, which knows the model."""

    exit_context: bool = False
    """With ``exit_layer``: the blocks after it also attend to the dropped groups (frozen at the
    exit layer, keys and values only), which keeps the kept tokens' context; costs their K/V
    projection per later block. Ignored without an exit layer."""

    @field_validator("exit_context", mode="before")
    @classmethod
    def _check_exit_context(cls, value: Any) -> bool:
        return _strict_bool(value)

    @field_validator("ratio", mode="before")
    @classmethod
    def _check_ratio(cls, value: Any) -> float:
        return validate_ratio(value, name="")  # the error names the setting

    @field_validator("video_ratio", mode="before")
    @classmethod
    def _check_video_ratio(cls, value: Any) -> float | None:
        return None if value is None else validate_ratio(value, name="")

    @property
    def effective_video_ratio(self) -> float:
        """The ratio each frame group of a video is retained at (``video_ratio``, else ``ratio``)."""
        return self.ratio if self.video_ratio is None else self.video_ratio

    @field_validator("min_tokens", mode="before")
    @classmethod
    def _check_min_tokens(cls, value: Any) -> int:
        return _strict_int(value, 1)

    @field_validator("exit_layer", "video_exit_layer", mode="before")
    @classmethod
    def _check_exit_layer(cls, value: Any) -> int | None:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"must be an integer >= 1 (vision blocks run before retention) or null, got {value!r}")
        return value

    def check_model(self, depth: int, has_scorer: bool) -> None:
        """Settings that need the model: the exit layer must name one of its vision blocks, and
        the learned policy needs a checkpoint with a trained scorer."""
        for name in ("exit_layer", "video_exit_layer"):
            value = getattr(self, name)
            if value is not None and value > depth:
                raise CivicSettingsError(
                    f"Invalid CIVIC setting: {KEY_PREFIX}{name} must be between 1 and {depth} "
                    f"(this model's vision blocks) or null, got {value}"
                )
        if self.policy == "learned" and not has_scorer:
            raise CivicSettingsError(
                "Invalid CIVIC setting: civic_policy 'learned' needs a checkpoint with a trained CIVIC scorer "
                "(a 'civic' recipe with a scorer in its config.json); this model has none"
            )

    @classmethod
    def from_mm_kwargs(cls, mm_kwargs: Mapping[str, Any] | None) -> CivicSettings:
        """Build settings from (merged) multimodal processor kwargs; other keys (the HF
        processor's, the operator-only :class:`ServerSettings`) are ignored."""
        values = {
            key[len(KEY_PREFIX) :]: value
            for key, value in (mm_kwargs or {}).items()
            if key.startswith(KEY_PREFIX) and key not in ServerSettings.keys()
        }
        try:
            return cls(**values)
        except ValidationError as exc:
            raise CivicSettingsError(_describe(exc)) from None

    def as_mm_kwargs(self) -> dict[str, Any]:
        """The inverse of :meth:`from_mm_kwargs`, for clients and tests."""
        return {KEY_PREFIX + key: value for key, value in self.model_dump().items()}


def strip_civic_kwargs(mm_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Drop civic_* keys so the HF processor never sees them."""
    return {k: v for k, v in mm_kwargs.items() if not k.startswith(KEY_PREFIX)}


def _describe(exc: ValidationError, title: str = "Invalid CIVIC setting") -> str:
    known = ", ".join(KEY_PREFIX + name for name in CivicSettings.model_fields)
    problems = []
    for err in exc.errors():
        key = KEY_PREFIX + ".".join(str(p) for p in err["loc"]) if err["loc"] else "civic"
        if err["type"] == "extra_forbidden":
            problems.append(f"unknown setting {key!r} (known: {known})")
        elif err["type"] == "literal_error":
            problems.append(f"{key} must be one of {', '.join(POLICY_CHOICES)}, got {err['input']!r}")
        else:
            message = err["msg"].removeprefix("Value error, ")
            problems.append(f"{key} {message}")
    return f"{title}: " + "; ".join(problems)
