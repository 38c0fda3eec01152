"""CIVIC kernels (installed as civic_vllm.kernels): Triton on CUDA, torch elsewhere."""

from .gather_rows import gather_rows, gather_rows_reference
from .merge_projection import gather_merge_project, gather_merge_project_reference

__all__ = [
    "gather_rows",
    "gather_rows_reference",
    "gather_merge_project",
    "gather_merge_project_reference",
]
