"""Lets vLLM's EVS video pruning serve Qwen3-VL on its CPU backend (the EVS servers of the video benchmarks only).

Two faults stand between ``--video-pruning-rate`` and a first answer on vLLM 0.32 + transformers 5.19:

1. CPU only. ``CPUModelRunner.load_model`` (vllm/v1/worker/cpu_model_runner.py) replaces
   ``GPUModelRunner.load_model`` and never sets ``is_multimodal_pruning_enabled``, so the runner does not
   strip the 5 position channels EVS appends to the video embeddings:
   ``split_with_sizes expects split_sizes to sum exactly to 4101 ..., but got split_sizes=[1024, 3072]``.
   :func:`_patch_cpu_runner` sets the flag after ``load_model`` exactly as ``GPUModelRunner.load_model`` does.

2. Not CPU specific: EVS's M-RoPE recomputation vs the prompt layout of transformers >= 5.10.
   Those processors expand only the bare ``<|video_pad|>`` and keep the chat template's outer
   ``<|vision_start|>`` ... ``<|vision_end|>`` (vllm/model_executor/models/qwen3_vl.py:1409
   ``_expands_only_video_token``, target chosen at :1729), so a video reads
   ``<|vision_start|> <0.5 seconds> <|vision_start|> pads <|vision_end|> <1.5 seconds> ... <|vision_end|>``.
   ``recompute_mrope_positions`` (vllm/multimodal/video_prune/evs.py:154) takes the first
   ``<|vision_start|>`` at or after ``num_computed_tokens`` as the one *after* the first timestamp and
   steps back over the timestamp tokens (evs.py:323 ``global_mm_start -= num_timestamp_tokens``); with the
   outer marker found first that start lands before the media (index 3 - 6 = -3 for a 12-frame clip), the
   slice ``positions[:, local_start:local_end]`` is empty and evs.py:337 raises
   ``The expanded size of the tensor (0) must match the existing size (174) ... Target sizes: [3, 0]``.
   :func:`_patch_qwen3_vl` wraps ``Qwen3VLForConditionalGeneration.recompute_mrope_positions`` so that the
   input ids it passes hide every such outer marker (a ``<|vision_start|>`` followed by neither a
   placeholder nor ``<|vision_end|>``: :func:`hide_outer_vision_starts`). The outer markers are text tokens
   for M-RoPE either way, so the positions are those of the layout EVS was written for.

This file is on PYTHONPATH of those servers' processes only (``benchmarks.harness.evs_cpu_env``); each patch
is applied when vLLM imports its module. Nothing is imported eagerly (this runs at interpreter start-up of
every process of the server).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

HIDDEN = -1  # what an outer <|vision_start|> becomes in the ids EVS's position code sees (a text token)


def _patch_cpu_runner(module) -> None:
    runner = module.CPUModelRunner
    load_model = runner.load_model

    def load_model_with_pruning(self, *args, **kwargs):
        load_model(self, *args, **kwargs)
        from vllm.model_executor.models.interfaces import supports_multimodal_pruning

        mm_config = self.model_config.multimodal_config
        self.is_multimodal_pruning_enabled = (
            supports_multimodal_pruning(self.get_model())
            and mm_config is not None
            and mm_config.is_multimodal_pruning_enabled()
        )

    runner.load_model = load_model_with_pruning


def hide_outer_vision_starts(input_ids, *, vision_start: int, vision_end: int, placeholders: tuple[int, ...]):
    """``input_ids`` (a list or a tensor; the same kind comes back) with every ``vision_start`` that is not
    directly followed by a placeholder or ``vision_end`` replaced by :data:`HIDDEN`: the outer marker
    that transformers >= 5.10 keeps in front of a video's first timestamp. Frame and image markers (always
    followed by a placeholder, or by ``vision_end`` for a frame EVS emptied) stay. Unchanged input is
    returned as is."""
    import torch

    ids = torch.as_tensor(input_ids) if isinstance(input_ids, list) else input_ids
    if ids.numel() < 2:
        return input_ids
    starts = (ids[:-1] == vision_start).nonzero(as_tuple=True)[0]
    follow = torch.tensor([*placeholders, vision_end], device=ids.device, dtype=ids.dtype)
    outer = starts[~torch.isin(ids[starts + 1], follow)]
    if not len(outer):
        return input_ids
    if isinstance(input_ids, list):
        out = list(input_ids)
        for i in outer.tolist():
            out[i] = HIDDEN
        return out
    out = ids.clone()
    out[outer] = HIDDEN
    return out


def _patch_qwen3_vl(module) -> None:
    model = module.Qwen3VLForConditionalGeneration
    recompute = model.recompute_mrope_positions

    def recompute_mrope_positions(self, input_ids, *args, **kwargs):
        config = self.config
        input_ids = hide_outer_vision_starts(
            input_ids, vision_start=config.vision_start_token_id, vision_end=config.vision_end_token_id,
            placeholders=(config.image_token_id, config.video_token_id))
        return recompute(self, input_ids, *args, **kwargs)

    model.recompute_mrope_positions = recompute_mrope_positions


PATCHES = {
    "vllm.v1.worker.cpu_model_runner": _patch_cpu_runner,
    "vllm.model_executor.models.qwen3_vl": _patch_qwen3_vl,
}


class _Finder(importlib.abc.MetaPathFinder):
    def __init__(self) -> None:
        self.pending = dict(PATCHES)

    def find_spec(self, name, path=None, target=None):
        patch = self.pending.pop(name, None)
        if patch is None:
            return None
        if not self.pending:
            sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)  # this finder no longer answers for `name`
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_patch(module) -> None:
            exec_module(module)
            patch(module)

        spec.loader.exec_module = exec_then_patch
        return spec


if __name__ == "sitecustomize":  # on an EVS server's PYTHONPATH; tests load this file under another name
    sys.meta_path.insert(0, _Finder())
