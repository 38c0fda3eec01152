"""Where checkpoints live and which model a command uses when none is given."""

from __future__ import annotations

import os
from pathlib import Path

from civic_vllm.model_factory.checkpoint import make_model

REPO = Path(__file__).resolve().parents[2]  # the source checkout (pyproject.toml) when run from one


def resolve_model(name_or_path: str | os.PathLike[str]) -> str:
    """A local directory becomes an absolute path; anything else is passed on as a hub repo id.

    There is no network here, so a repo id fails later in vLLM / transformers with their own
    message; this function does not guess.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return str(path.resolve())
    return str(name_or_path)


def models_root() -> Path:
    """Where default checkpoints live: $CIVIC_MODELS_DIR, else <repo>/models in a source
    checkout, else ~/.cache/civic_vllm/models (an installed, read-only package)."""
    if env := os.environ.get("CIVIC_MODELS_DIR"):
        return Path(env).expanduser().resolve()
    if (REPO / "pyproject.toml").is_file() and os.access(REPO, os.W_OK):
        return REPO / "models"
    return Path.home() / ".cache" / "civic_vllm" / "models"


def default_model() -> str:
    """The model every command uses when none is given: the trained civic-shapes checkpoint
    committed in the repository (models/civic-shapes-tiny), else the tiny random preset."""
    trained = REPO / "models" / "civic-shapes-tiny"
    if (trained / "config.json").exists():
        return str(trained)
    return str(default_model_dir("tiny"))


def default_model_dir(preset: str = "tiny", *, seed: int = 0) -> Path:
    """The checkpoint of ``preset`` under :func:`models_root`, built on first use."""
    return make_model(preset, models_root() / preset, seed=seed)
