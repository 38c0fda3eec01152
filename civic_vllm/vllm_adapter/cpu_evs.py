"""Opt-in fix so vanilla vLLM's video pruning (EVS, ``--video-pruning-rate``) runs on the CPU backend.

vLLM's ``CPUModelRunner.load_model`` (this vLLM) replaces ``GPUModelRunner.load_model`` without its
lines that set ``is_multimodal_pruning_enabled``, so on CPU the flag stays False: the pruned video
embeddings keep the position channels EVS appends to them (hidden + deepstack + 5 columns) and the
first video request fails in ``Qwen3VLForConditionalGeneration._compute_deepstack_embeds``, e.g. with
the bench preset (hidden 1024): ``RuntimeError: split_with_sizes expects split_sizes to sum exactly to
4101 (input tensor's size at dimension -1), but got split_sizes=[1024, 3072]``; the engine dies and
the request gets ``HTTP 500: EngineCore encountered an issue``. The fix sets the two attributes
exactly as ``GPUModelRunner.load_model`` does, after the CPU runner loads the model.

Only with ``CIVIC_CPU_EVS=1`` in the server's environment (benchmarks.video_accuracy sets it for its
vanilla EVS server): it changes nothing else, and nothing at all without that variable.
"""

from __future__ import annotations

import os

ENV = "CIVIC_CPU_EVS"


def install_cpu_evs_fix() -> bool:
    """Patch ``CPUModelRunner.load_model`` when ``CIVIC_CPU_EVS=1``; True when patched."""
    if os.environ.get(ENV) != "1":
        return False
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    if getattr(CPUModelRunner.load_model, "_civic_evs_fix", False):
        return True
    original = CPUModelRunner.load_model

    def load_model(self, *args, **kwargs):
        from vllm.v1.worker import gpu_model_runner as gmr

        original(self, *args, **kwargs)
        mm_config = self.model_config.multimodal_config
        self.is_multimodal_pruning_enabled = (
            gmr.supports_multimodal_pruning(self.get_model())
            and mm_config is not None
            and mm_config.is_multimodal_pruning_enabled()
        )
        self.requires_sequential_video_encoding = hasattr(self.get_model(), "requires_sequential_video_encoding")

    load_model._civic_evs_fix = True  # type: ignore[attr-defined]
    CPUModelRunner.load_model = load_model
    return True
