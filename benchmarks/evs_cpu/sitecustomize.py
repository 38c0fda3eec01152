"""Lets vLLM's EVS video pruning run on its CPU backend (the EVS server of benchmarks/video_serve/ only).

vLLM's ``CPUModelRunner.load_model`` replaces ``GPUModelRunner.load_model`` and never sets
``is_multimodal_pruning_enabled``, so with ``--video-pruning-rate`` the runner does not strip the
5 position channels EVS appends to the video embeddings and the first video request fails:
``split_with_sizes expects split_sizes to sum exactly to 4101 ..., but got split_sizes=[1024, 3072]``.
This file is on PYTHONPATH of that server's processes only; when vLLM's CPU runner module is
imported it sets the flag after ``load_model`` exactly as ``GPUModelRunner.load_model`` does.
Nothing is imported eagerly (this runs at interpreter start-up of every process of the server).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

TARGET = "vllm.v1.worker.cpu_model_runner"


def _patch(module) -> None:
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


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != TARGET:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_patch(module) -> None:
            exec_module(module)
            _patch(module)

        spec.loader.exec_module = exec_then_patch
        return spec


sys.meta_path.insert(0, _Finder())
