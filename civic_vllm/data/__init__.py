"""Synthetic data for measuring what token retention costs in accuracy (civic-shapes)."""

from civic_vllm.data.shapes import generate_sample, is_correct, sample_scene, scene_questions, write_dataset

__all__ = ["generate_sample", "is_correct", "sample_scene", "scene_questions", "write_dataset"]
