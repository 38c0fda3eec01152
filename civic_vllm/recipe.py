"""The CIVIC recipe a checkpoint carries: the retention it was trained for, served by default.

A distilled checkpoint records, in a ``civic`` section of its config.json, the ratio, policy and
exit layer its compact path was trained with, plus the shape of its trained scorer, whose
weights live in ``civic_scorer.safetensors`` beside the model weights (names
``civic_scorer.*``; HF transformers loads only model.safetensors and never sees them, vLLM
hands them to the model's ``load_weights``). ``vllm serve DIR --model-impl civic`` then serves
that recipe without any flag; server flags and per-request settings override it. A checkpoint
without the section behaves as before (ratio 1.0, retention on the encoder output).

Precedence, lowest first: CivicSettings defaults < checkpoint recipe < --mm-processor-kwargs <
request. Pure module: no vLLM import.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from civic_vllm.retention.learned import ScorerConfig, TokenScorer
from civic_vllm.settings import KEY_PREFIX, CivicSettings, CivicSettingsError

RECIPE_KEY = "civic"
SCORER_FILE = "civic_scorer.safetensors"
SCORER_PREFIX = "civic_scorer."
SHARD_INDEX = "model.safetensors.index.json"
_SETTING_KEYS = ("ratio", "policy", "exit_layer")


@dataclass(frozen=True)
class CivicRecipe:
    """Default retention settings of a checkpoint and, for the learned policy, its scorer's shape."""

    ratio: float
    policy: str
    exit_layer: int | None
    scorer: ScorerConfig | None = None

    def __post_init__(self) -> None:
        self.settings()  # validates ratio, policy and exit layer like a request would be
        if self.policy == "learned" and self.scorer is None:
            raise CivicSettingsError("Invalid CIVIC recipe: policy 'learned' needs a scorer")

    def settings(self) -> CivicSettings:
        return CivicSettings(**{key: getattr(self, key) for key in _SETTING_KEYS})

    def as_mm_kwargs(self) -> dict[str, Any]:
        """The recipe as civic_* processor kwargs (the layer under the server's own defaults)."""
        return {KEY_PREFIX + key: getattr(self, key) for key in _SETTING_KEYS}

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {key: getattr(self, key) for key in _SETTING_KEYS}
        out["scorer"] = self.scorer.to_dict() if self.scorer else None
        return out

    @classmethod
    def from_dict(cls, section: Mapping[str, Any]) -> CivicRecipe:
        unknown = set(section) - {*_SETTING_KEYS, "scorer"}
        if unknown:
            raise CivicSettingsError(f"Invalid CIVIC recipe: unknown key(s) {sorted(unknown)}")
        try:
            scorer = ScorerConfig(**section["scorer"]) if section.get("scorer") else None
            return cls(ratio=section.get("ratio", 1.0), policy=section.get("policy", "civic"),
                       exit_layer=section.get("exit_layer"), scorer=scorer)
        except (TypeError, ValueError) as exc:
            raise CivicSettingsError(f"Invalid CIVIC recipe in the checkpoint's config: {exc}") from None


def recipe_of(config: Any) -> CivicRecipe | None:
    """The recipe of an HF config object or config.json dict; None when it has none."""
    section = config.get(RECIPE_KEY) if isinstance(config, Mapping) else getattr(config, RECIPE_KEY, None)
    return CivicRecipe.from_dict(section) if section else None


def read_recipe(checkpoint_dir: str | Path) -> CivicRecipe | None:
    return recipe_of(json.loads((Path(checkpoint_dir) / "config.json").read_text()))


def write_recipe(checkpoint_dir: str | Path, recipe: CivicRecipe, scorer: TokenScorer | None) -> None:
    """Add the ``civic`` section to config.json and, with a scorer, write its weights (fp32)."""
    from safetensors.torch import save_file

    path = Path(checkpoint_dir)
    if (scorer is None) != (recipe.scorer is None):
        raise ValueError("a recipe names a scorer exactly when scorer weights are given")
    config_path = path / "config.json"
    config = json.loads(config_path.read_text())
    config[RECIPE_KEY] = recipe.to_dict()
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if scorer is not None:
        tensors = {SCORER_PREFIX + k: v.detach().float().contiguous() for k, v in scorer.state_dict().items()}
        save_file(tensors, str(path / SCORER_FILE), metadata={"format": "pt"})
        index_path = path / SHARD_INDEX
        if index_path.is_file():  # vLLM loads only the files a sharded checkpoint's index names
            index = json.loads(index_path.read_text())
            index["weight_map"].update({name: SCORER_FILE for name in tensors})
            index_path.write_text(json.dumps(index, indent=2) + "\n")


def load_scorer(checkpoint_dir: str | Path, recipe: CivicRecipe) -> TokenScorer:
    """The trained scorer of a checkpoint (fp32), for the HF path."""
    from safetensors.torch import load_file

    if recipe.scorer is None:
        raise ValueError(f"{checkpoint_dir}: its CIVIC recipe has no scorer")
    scorer = TokenScorer(recipe.scorer)
    weights = load_file(str(Path(checkpoint_dir) / SCORER_FILE))
    scorer.load_state_dict({k.removeprefix(SCORER_PREFIX): v for k, v in weights.items()})
    return scorer.float().eval()


def split_scorer_weights(weights, scorer: TokenScorer | None, loaded: set[str]):
    """Yield the (name, tensor) pairs that are not the scorer's; copy the scorer's into ``scorer``.

    For vLLM's ``load_weights``, which streams every safetensors file of the checkpoint; the
    scorer names copied are added to ``loaded`` (vLLM checks every parameter was loaded).
    """
    for name, tensor in weights:
        if not name.startswith(SCORER_PREFIX):
            yield name, tensor
            continue
        if scorer is None:
            raise ValueError(f"the checkpoint has scorer weights ({name}) but its config has no CIVIC scorer")
        param = scorer.get_parameter(name.removeprefix(SCORER_PREFIX))
        with torch.no_grad():
            param.copy_(tensor.to(param.dtype))
        loaded.add(name)
