"""Content-blind reference policies: full, random and pool (uniform spatial subsampling).

They bracket CIVIC in evaluations: full is the quality ceiling, random and pool
are what any content-aware policy has to beat at the same K.
"""

from __future__ import annotations

import hashlib

import torch

from civic_vllm.budget import _as_int

from .base import RetentionPolicy, evenly_spaced, lattice_indices, lattice_shape

_SEED_MASK = (1 << 64) - 1


class FullPolicy(RetentionPolicy):
    """Keeps every token (vanilla Qwen3-VL); only valid with k == N."""

    name = "full"

    def _select(self, features: torch.Tensor, h: int, w: int, k: int, seed: int | None) -> torch.Tensor:
        raise ValueError(f"policy 'full' keeps all {h * w} tokens, so k must equal N; got k={k}")


class RandomPolicy(RetentionPolicy):
    """A uniformly random k-subset drawn from a CPU generator seeded by the caller.

    The seed is required (see content_seed) because every tensor-parallel rank draws
    independently; the CPU generator makes the subset identical on every device type.
    """

    name = "random"
    requires_seed = True

    def _select(self, features: torch.Tensor, h: int, w: int, k: int, seed: int | None) -> torch.Tensor:
        assert seed is not None  # enforced by select()
        generator = torch.Generator(device="cpu")
        generator.manual_seed(seed & _SEED_MASK)
        return torch.randperm(h * w, generator=generator)[:k]


class PoolPolicy(RetentionPolicy):
    """Uniform spatial subsampling: the centres of an aspect-matched lattice, topped up to k.

    The lattice has rows*cols <= k points (about sqrt(k*h/w) x sqrt(k*w/h)); the
    shortfall is taken evenly spaced, in raster order, from the tokens off the lattice.
    """

    name = "pool"

    def _select(self, features: torch.Tensor, h: int, w: int, k: int, seed: int | None) -> torch.Tensor:
        rows, cols = lattice_shape(h, w, k)
        lattice = lattice_indices(h, w, rows, cols)
        extra = k - lattice.numel()
        if extra == 0:
            return lattice
        off_lattice = torch.ones(h * w, dtype=torch.bool)
        off_lattice[lattice] = False
        leftovers = off_lattice.nonzero().squeeze(1)
        return torch.cat([lattice, leftovers[evenly_spaced(leftovers.numel(), extra)]])


def content_seed(t: torch.Tensor, *, max_elements: int = 1 << 20) -> int:
    """A deterministic 63-bit seed from a tensor's content (blake2b of its bytes).

    Lets callers seed the random policy from an image's pixels, so all ranks (and
    reruns) draw the same subset without sharing state. Tensors larger than
    max_elements are hashed on an odd-strided subsample (shape, dtype and stride
    are hashed too) to keep this cheap; a change confined to skipped elements then
    goes unnoticed, which is acceptable for seeding.
    """
    max_elements = _as_int("max_elements", max_elements)
    if max_elements < 1:
        raise ValueError(f"max_elements must be >= 1, got {max_elements}")
    flat = t.detach().reshape(-1)
    stride = -(-flat.numel() // max_elements) if flat.numel() > max_elements else 1
    if stride > 1:
        stride |= 1  # odd, so the samples do not lock onto one channel of even-sized rows
    sample = flat[::stride].contiguous().cpu()
    digest = hashlib.blake2b(digest_size=8)
    digest.update(repr((tuple(t.shape), str(t.dtype), stride)).encode())
    digest.update(sample.view(torch.uint8).numpy())
    return int.from_bytes(digest.digest(), "little") >> 1
