"""Retention policies: the selection contract, determinism, and what each policy is for."""

from __future__ import annotations

import random

import pytest
import torch

from civic_vllm.retention import (
    POLICY_NAMES,
    CivicPolicy,
    RetentionPolicy,
    content_seed,
    get_policy,
    retention_map,
)

SELECTING = ("civic", "pool", "random")


def _features(h: int, w: int, d: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randn(h * w, d, generator=torch.Generator().manual_seed(seed))


def _select(
    name: str, features: torch.Tensor, grid_hw: tuple[int, int], k: int, seed: int = 7
) -> torch.Tensor:
    """Any policy by name; the seed is ignored by all but random."""
    return get_policy(name).select(features, grid_hw, k, seed=seed)


def _check_contract(indices: torch.Tensor, n: int, k: int) -> None:
    assert indices.dtype == torch.long and indices.dim() == 1
    assert indices.numel() == k
    assert bool((indices[1:] > indices[:-1]).all()), "indices must be unique and sorted ascending"
    assert 0 <= int(indices[0]) and int(indices[-1]) < n


def _quadrant_counts(indices: torch.Tensor, grid_hw: tuple[int, int]) -> list[int]:
    h, w = grid_hw
    kept = retention_map(indices, grid_hw)
    halves_h, halves_w = (slice(0, h // 2), slice(h // 2, h)), (slice(0, w // 2), slice(w // 2, w))
    return [int(kept[rs, cs].sum()) for rs in halves_h for cs in halves_w]


def _object_scene(h: int = 16, w: int = 16, d: int = 64, top_left: tuple[int, int] = (5, 9), seed: int = 0):
    """Near-identical background tokens plus a 2x2 object with a very different feature."""
    g = torch.Generator().manual_seed(seed)
    background, thing = torch.randn(d, generator=g), torch.randn(d, generator=g)
    features = background + 0.05 * torch.randn(h * w, d, generator=g)
    r, c = top_left
    obj = [r * w + c, r * w + c + 1, (r + 1) * w + c, (r + 1) * w + c + 1]
    features[obj] = thing + 0.05 * torch.randn(4, d, generator=g)
    return features, set(obj)


# -- registry and validation -------------------------------------------------------------


def test_registry() -> None:
    assert set(POLICY_NAMES) == {"civic", "pool", "random", "full"}
    for name in POLICY_NAMES:
        policy = get_policy(name)
        assert isinstance(policy, RetentionPolicy) and policy.name == name
    with pytest.raises(ValueError, match="civic, pool, random, full"):
        get_policy("topk")


def test_registry_matches_settings() -> None:
    from civic_vllm.retention.selection import LEARNED_POLICY
    from civic_vllm.settings import POLICY_CHOICES

    # Every setting names a stateless policy, except the learned one (it needs the checkpoint's scorer).
    assert set(POLICY_CHOICES) == set(POLICY_NAMES) | {LEARNED_POLICY}
    assert LEARNED_POLICY not in POLICY_NAMES


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_validation(name: str) -> None:
    policy, f = get_policy(name), _features(4, 5)
    with pytest.raises(ValueError, match="20 rows but grid 4x4 has 16 tokens"):
        policy.select(f, (4, 4), 3, seed=1)
    for k in (0, -1, 21):
        with pytest.raises(ValueError, match=r"k must be in \[1, 20\]"):
            policy.select(f, (4, 5), k, seed=1)
    with pytest.raises(ValueError, match="float tensor"):
        policy.select(f[:, 0], (4, 5), 3, seed=1)
    with pytest.raises(ValueError, match="float tensor"):
        policy.select(f.long(), (4, 5), 3, seed=1)
    with pytest.raises(ValueError):
        policy.select(f, (0, 5), 3, seed=1)


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_keep_all_is_arange(name: str) -> None:
    for h, w in ((1, 1), (1, 7), (13, 5), (6, 6)):
        indices = _select(name, _features(h, w), (h, w), h * w)
        assert torch.equal(indices, torch.arange(h * w))


def test_full_refuses_to_drop() -> None:
    with pytest.raises(ValueError, match="keeps all"):
        get_policy("full").select(_features(4, 4), (4, 4), 8)


def test_random_needs_seed() -> None:
    with pytest.raises(ValueError, match="seed"):
        get_policy("random").select(_features(4, 4), (4, 4), 8)


def test_civic_parameters_are_validated() -> None:
    for bad in ({"tau": 1.0}, {"floor_fraction": 1.5}, {"redundancy_weight": -0.1}, {"batch_fraction": 2.0},
                {"max_rounds": 0}, {"local_weight": -1.0}):
        with pytest.raises(ValueError):
            CivicPolicy(**bad)


# -- the selection contract --------------------------------------------------------------


def _grids_and_budgets() -> list[tuple[tuple[int, int], int]]:
    fixed = [(1, 7), (7, 1), (13, 5), (5, 13), (16, 16), (1, 2), (2, 1), (3, 4), (42, 42)]
    rng = random.Random(1234)
    grids = fixed + [(rng.randint(1, 24), rng.randint(1, 24)) for _ in range(25)]
    cases = []
    for h, w in grids:
        n = h * w
        budgets = {1, 2, max(1, n // 10), max(1, n // 4), max(1, n // 2), max(1, n - 1), n, rng.randint(1, n)}
        cases += [((h, w), k) for k in sorted(budgets) if k <= n]
    return cases


@pytest.mark.parametrize("name", SELECTING)
def test_contract_over_many_grids(name: str) -> None:
    for (h, w), k in _grids_and_budgets():
        f = _features(h, w, seed=h * 100 + w)
        _check_contract(_select(name, f, (h, w), k), h * w, k)


@pytest.mark.parametrize("name", SELECTING)
def test_any_float_dtype_and_grad(name: str) -> None:
    f = _features(6, 7).requires_grad_(True)
    _check_contract(_select(name, f, (6, 7), 10), 42, 10)
    low = _features(6, 7).to(torch.bfloat16)
    assert torch.equal(_select(name, low, (6, 7), 10), _select(name, low.float(), (6, 7), 10))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", SELECTING)
def test_runs_on_features_device(name: str) -> None:
    f = _features(12, 9).cuda()
    indices = _select(name, f, (12, 9), 30)
    assert indices.device == f.device
    _check_contract(indices.cpu(), 108, 30)


# -- determinism ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", SELECTING)
def test_deterministic(name: str) -> None:
    f = _features(13, 11)
    for k in (1, 14, 36, 100):
        assert torch.equal(_select(name, f, (13, 11), k), _select(name, f.clone(), (13, 11), k))


def test_random_depends_on_seed_only() -> None:
    f = _features(16, 16)
    a = _select("random", f, (16, 16), 64, seed=1)
    assert torch.equal(a, _select("random", torch.zeros_like(f), (16, 16), 64, seed=1))
    assert not torch.equal(a, _select("random", f, (16, 16), 64, seed=2))
    assert len({tuple(_select("random", f, (16, 16), 64, seed=s).tolist()) for s in range(10)}) == 10


def test_content_seed() -> None:
    pixels = torch.randn(64, 48)
    seed = content_seed(pixels)
    assert isinstance(seed, int) and 0 <= seed < 2**63
    assert content_seed(pixels.clone()) == seed == content_seed(pixels.T.contiguous().T)
    changed = pixels.clone()
    changed[10, 3] += 1e-3
    assert content_seed(changed) != seed
    assert content_seed(pixels.reshape(48, 64)) != seed  # shape is part of the content
    assert content_seed(pixels.double()) != seed
    assert content_seed(pixels.bfloat16()) == content_seed(pixels.bfloat16())


def test_content_seed_subsamples_large_tensors() -> None:
    big = torch.randn(1_000, 1_536)
    seed = content_seed(big, max_elements=1 << 12)
    assert seed == content_seed(big.clone(), max_elements=1 << 12)
    assert seed != content_seed(big)  # different stride, different digest
    changed = big.clone()
    changed[0, 0] += 1.0  # element 0 is always sampled
    assert content_seed(changed, max_elements=1 << 12) != seed


# -- pool ----------------------------------------------------------------------------------


def test_pool_lattice() -> None:
    f = _features(16, 16)
    assert retention_map(_select("pool", f, (16, 16), 64), (16, 16))[1::2, 1::2].all()  # centred 2x2 cells
    assert _select("pool", _features(1, 7), (1, 7), 3).tolist() == [1, 3, 5]
    assert _select("pool", _features(7, 1), (7, 1), 3).tolist() == [1, 3, 5]


@pytest.mark.parametrize(
    ("grid_hw", "k"), [((16, 16), 64), ((42, 42), 588), ((24, 32), 100), ((40, 20), 81), ((64, 64), 410)]
)
def test_pool_covers_quadrants_evenly(grid_hw: tuple[int, int], k: int) -> None:
    counts = _quadrant_counts(_select("pool", _features(*grid_hw), grid_hw, k), grid_hw)
    # An odd lattice dimension puts its middle line in one half, hence the slack.
    assert all(abs(c - k / 4) <= 0.25 * k / 4 for c in counts), counts


def test_pool_ignores_content() -> None:
    blank = torch.zeros(126, 3)
    assert torch.equal(_select("pool", _features(9, 14), (9, 14), 30), _select("pool", blank, (9, 14), 30))


# -- civic ---------------------------------------------------------------------------------


@pytest.mark.parametrize("top_left", [(5, 9), (0, 0), (14, 3)])
def test_civic_keeps_small_distinctive_object(top_left: tuple[int, int]) -> None:
    features, obj = _object_scene(top_left=top_left)
    for k in (64, 26):  # N/4 and N/10
        kept = set(_select("civic", features, (16, 16), k).tolist())
        assert obj <= kept, (k, sorted(obj - kept))


def test_baselines_miss_the_object() -> None:
    features, obj = _object_scene()
    assert not obj <= set(_select("pool", features, (16, 16), 64).tolist())
    hits = sum(obj <= set(_select("random", features, (16, 16), 64, seed=s).tolist()) for s in range(20))
    assert hits < 10


def test_civic_coverage_floor() -> None:
    policy = CivicPolicy()
    features, _ = _object_scene()
    for grid_hw, f in (((16, 16), features), ((13, 5), _features(13, 5)), ((42, 42), _features(42, 42))):
        n = grid_hw[0] * grid_hw[1]
        for k in sorted({1, 4, n // 10, n // 4, n // 2}):
            cells = policy.floor_cells(grid_hw, k)
            assert int(cells.max()) + 1 <= k
            kept = policy.select(f, grid_hw, k)
            assert (torch.bincount(cells[kept], minlength=int(cells.max()) + 1) >= 1).all(), (grid_hw, k)


@pytest.mark.parametrize("noise", [0.0, 0.01])
def test_civic_uniform_features_spread_out(noise: float) -> None:
    g = torch.Generator().manual_seed(3)
    features = torch.randn(64, generator=g) + noise * torch.randn(256, 64, generator=g)
    for k in (64, 16):
        counts = _quadrant_counts(_select("civic", features, (16, 16), k), (16, 16))
        assert min(counts) >= k / 8, counts


def test_civic_without_floor() -> None:
    features, obj = _object_scene()
    kept = CivicPolicy(floor_fraction=0.0).select(features, (16, 16), 26)
    _check_contract(kept, 256, 26)
    assert obj <= set(kept.tolist())


def _greedy_reference(policy: CivicPolicy, f: torch.Tensor, grid_hw: tuple[int, int], k: int) -> set[int]:
    """Step 3 as the plain one-token-at-a-time loop the batched rounds stand in for."""
    h, w = grid_hw
    s = policy.saliency(f, grid_hw)
    cells = policy.floor_cells(grid_hw, k)
    kept = {int(torch.nonzero(cells == c)[s[cells == c].argmax()]) for c in range(int(cells.max()) + 1)}
    unit = torch.nn.functional.normalize(f, dim=1)
    while len(kept) < k:
        best, best_eff = -1, -1.0
        for i in range(h * w):
            if i in kept:
                continue
            r, c = divmod(i, w)
            red = 0.0
            for dr in (-1, 0, 1):
                for dc in (-1, 0, 1):
                    j = (r + dr) * w + (c + dc)
                    if (dr or dc) and 0 <= r + dr < h and 0 <= c + dc < w and j in kept:
                        cos = float(unit[i] @ unit[j])
                        red = max(red, min(1.0, max(0.0, (cos - policy.tau) / (1 - policy.tau))))
            eff = float(s[i]) * (1 - policy.redundancy_weight * red)
            if eff > best_eff:
                best, best_eff = i, eff
        kept.add(best)
    return kept


def test_civic_batched_rounds_track_greedy() -> None:
    g = torch.Generator().manual_seed(5)
    h, w = 12, 10
    coarse = torch.randn(1, 32, 3, 3, generator=g)
    field = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear")
    features = field[0].permute(1, 2, 0).reshape(h * w, 32) + 0.05 * torch.randn(h * w, 32, generator=g)
    k = 40
    reference = _greedy_reference(CivicPolicy(), features, (h, w), k)
    exact = CivicPolicy(batch_fraction=0.0, max_rounds=10_000).select(features, (h, w), k)
    assert set(exact.tolist()) == reference
    batched = set(CivicPolicy().select(features, (h, w), k).tolist())
    assert len(batched & reference) >= 0.9 * k


def test_retention_map() -> None:
    mask = retention_map(torch.tensor([0, 5, 11]), (3, 4))
    assert mask.shape == (3, 4) and mask.dtype == torch.bool
    assert mask.sum() == 3 and mask[0, 0] and mask[1, 1] and mask[2, 3]


def test_civic_survives_non_finite_features() -> None:
    features, _ = _object_scene()
    features[3] = float("nan")
    features[40] = float("inf")
    features[77] = 0.0
    _check_contract(_select("civic", features, (16, 16), 26), 256, 26)
