"""The opt-in CPU fix for vLLM's EVS (civic_vllm.vllm_adapter.cpu_evs): off without its variable, and when on,
the CPU runner gets the pruning flag exactly as GPUModelRunner.load_model computes it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from civic_vllm.vllm_adapter import cpu_evs


def test_nothing_changes_without_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    monkeypatch.delenv(cpu_evs.ENV, raising=False)
    before = CPUModelRunner.load_model
    assert cpu_evs.install_cpu_evs_fix() is False and CPUModelRunner.load_model is before


@pytest.mark.parametrize("pruning", [True, False])
def test_the_runner_gets_the_gpu_runners_flag(monkeypatch: pytest.MonkeyPatch, pruning: bool) -> None:
    from vllm.v1.worker import cpu_model_runner, gpu_model_runner

    class Runner:  # stands in for CPUModelRunner: the patch wraps whatever load_model it has
        def load_model(self):
            self.loaded = True

        def get_model(self):
            return "model"

    monkeypatch.setattr(cpu_model_runner, "CPUModelRunner", Runner)
    monkeypatch.setattr(gpu_model_runner, "supports_multimodal_pruning", lambda model: model == "model")
    monkeypatch.setenv(cpu_evs.ENV, "1")
    assert cpu_evs.install_cpu_evs_fix() and cpu_evs.install_cpu_evs_fix()  # idempotent
    runner = Runner()
    runner.model_config = SimpleNamespace(multimodal_config=SimpleNamespace(
        is_multimodal_pruning_enabled=lambda: pruning))
    runner.load_model()
    assert runner.loaded and runner.is_multimodal_pruning_enabled is pruning
    assert runner.requires_sequential_video_encoding is False
