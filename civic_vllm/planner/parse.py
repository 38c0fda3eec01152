"""The values ``civic plan`` reads (image and video sizes, ratios, memory sizes), also usable from Python.

Each parser raises :class:`~civic_vllm.planner.model_info.PlanError` with a message for the user;
the command line itself is :mod:`civic_vllm.cli.plan`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from fractions import Fraction

from civic_vllm.budget import validate_ratio
from civic_vllm.planner.model_info import PlanError

_SIZE_RE = re.compile(r"^\s*(\d+)\s*[x×X*]\s*(\d+)\s*$")
_BYTES_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")
_BYTE_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
# A bare letter means what it means to vLLM's --kv-cache-memory-bytes (human_readable_int).
_LETTER_UNITS = {"k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_image_size(text: str) -> tuple[int, int]:
    """``"WxH"`` -> (width, height), both >= 1."""
    match = _SIZE_RE.match(str(text))
    if not match:
        raise PlanError(f"malformed image size {text!r}: expected WIDTHxHEIGHT in pixels, e.g. 1344x1344")
    width, height = int(match.group(1)), int(match.group(2))
    if width < 1 or height < 1:
        raise PlanError(f"malformed image size {text!r}: width and height must be >= 1 pixel")
    return width, height


def parse_video_size(text: str) -> tuple[int, int, int]:
    """``WIDTHxHEIGHTxFRAMES`` -> (width, height, frames)."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not match:
        raise PlanError(f"malformed video size {text!r}: expected WIDTHxHEIGHTxFRAMES, e.g. 448x448x16")
    width, height, frames = (int(g) for g in match.groups())
    if min(width, height, frames) < 1:
        raise PlanError(f"malformed video size {text!r}: width, height and frames must be >= 1")
    return width, height, frames


def parse_ratios(values: Sequence[str]) -> list[tuple[str, float]]:
    """Each value may be a comma list of decimals or fractions ("0.5,1/3"); returns (label, ratio)."""
    ratios: list[tuple[str, float]] = []
    for value in values:
        for item in str(value).split(","):
            label = item.strip()
            try:
                ratios.append((label, validate_ratio(float(Fraction(label)) if "/" in label else float(label))))
            except (ValueError, ZeroDivisionError):  # the message quotes what the user typed
                raise PlanError(f"retention ratio must be a number in (0, 1], got {label!r}") from None
    if not ratios:
        raise PlanError("no retention ratio given")
    return ratios


def parse_bytes(text: str) -> int:
    """``"80GiB"``, ``"80GB"`` (10**9), ``"1073741824"``; ``"80G"`` = 80 GiB, ``"80g"`` = 80 GB as in vLLM."""
    match = _BYTES_RE.match(str(text))
    unit = match.group(2) if match else ""
    scale = _LETTER_UNITS.get(unit) or _BYTE_UNITS.get(unit.lower())
    if not match or scale is None:
        raise PlanError(f"malformed memory size {text!r}: expected e.g. 80GiB, 80GB, 512MiB or a byte count")
    value = int(float(match.group(1)) * scale)
    if value <= 0:
        raise PlanError(f"memory size must be positive, got {text!r}")
    return value
