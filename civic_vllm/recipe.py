"""The CIVIC recipe a checkpoint carries: the retention it was trained for, served by default.

A distilled checkpoint records, in a ``civic`` section of its config.json, the ratio, policy and
exit layer its compact path was trained with, plus the shape of its trained scorer, whose
weights live in ``civic/scorer.safetensors``. The subfolder is deliberate: vLLM's loader streams
every top-level ``*.safetensors`` file into ``load_weights``, and stock Qwen3-VL (vanilla vLLM,
HF transformers) would then fail on names it does not know; a recipe checkpoint stays a plain
Qwen3-VL checkpoint for them. ``vllm serve DIR --model-impl civic`` serves the recipe without
any flag; server flags and per-request settings override it. A checkpoint without the section
behaves as before (ratio 1.0, retention on the encoder output).

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
SCORER_FILE = "civic/scorer.safetensors"
_SETTING_KEYS = ("ratio", "policy", "exit_layer", "exit_context")


@dataclass(frozen=True)
class CivicRecipe:
    """Default retention settings of a checkpoint and, for the learned policy, its scorer's shape."""

    ratio: float
    policy: str
    exit_layer: int | None
    scorer: ScorerConfig | None = None
    exit_context: bool = False

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
                       exit_layer=section.get("exit_layer"), scorer=scorer,
                       exit_context=section.get("exit_context", False))
        except (TypeError, ValueError) as exc:
            raise CivicSettingsError(f"Invalid CIVIC recipe in the checkpoint's config: {exc}") from None


def layered_settings(recipe: CivicRecipe | None, kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    """Processor kwargs with the recipe underneath: keys in ``kwargs`` (server, then request) win."""
    return {**(recipe.as_mm_kwargs() if recipe else {}), **(kwargs or {})}


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
        tensors = {k: v.detach().float().contiguous() for k, v in scorer.state_dict().items()}
        (path / SCORER_FILE).parent.mkdir(exist_ok=True)
        save_file(tensors, str(path / SCORER_FILE), metadata={"format": "pt"})


def load_scorer(checkpoint: str | Path, recipe: CivicRecipe, revision: str | None = None) -> TokenScorer:
    """The trained scorer of a checkpoint (a local directory or a Hugging Face repo id), fp32, eval mode."""
    from safetensors.torch import load_file

    if recipe.scorer is None:
        raise ValueError(f"{checkpoint}: its CIVIC recipe has no scorer")
    local = Path(checkpoint) / SCORER_FILE
    if local.is_file():
        path = str(local)
    elif Path(checkpoint).is_dir():
        raise FileNotFoundError(f"{checkpoint}: its CIVIC recipe names a scorer but {SCORER_FILE} is missing")
    else:  # a hub repo id: vLLM downloaded only the top-level weights, so fetch the scorer too
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(str(checkpoint), SCORER_FILE, revision=revision)
    scorer = TokenScorer(recipe.scorer)
    scorer.load_state_dict(load_file(path))
    return scorer.float().eval()


def attach_recipe(checkpoint_dir: str | Path, recipe: CivicRecipe, seed: int = 0) -> None:
    """Write ``recipe`` into a checkpoint; a learned policy gets a scorer with seeded random weights.

    For random-weight checkpoints (tests, serving benchmarks): the scorer costs exactly what a
    trained one costs and its random residual makes its choice differ from the prior's.
    """
    scorer = None
    if recipe.scorer is not None:
        generator = torch.Generator().manual_seed(seed)
        scorer = TokenScorer(recipe.scorer)
        with torch.no_grad():
            for param in scorer.parameters():
                param.normal_(0.0, 0.5, generator=generator) if param.dim() > 1 else param.zero_()
            scorer.norm.weight.fill_(1.0)
    write_recipe(checkpoint_dir, recipe, scorer)
