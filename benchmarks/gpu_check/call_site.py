"""Part 2: the fused merger's production call site (``merge_kept_groups``) on vLLM-style mergers."""

from __future__ import annotations

import contextlib
import types
from collections.abc import Callable, Iterator
from fractions import Fraction

from benchmarks.gpu_check.common import (
    BENCH_PRESETS,
    CPU_IMAGE_SIDE,
    DEEPSTACK_LEVELS,
    GROUP,
    IMAGE_SIDE,
    Budget,
    Steps,
    import_module,
    kept_groups,
    log,
    merged_tokens,
    part_status,
    seeded,
)
from benchmarks.gpu_check.kernels import accuracy, dtype_of


class UnquantizedLinearMethod:
    """Stands for vLLM's class of that name: vision.py tells unquantized layers by this class name."""


def vllm_style_merger(c: int, d_model: int, post_shuffle: bool, seed: int):
    """A module shaped like vLLM's ``Qwen3_VisionPatchMerger`` (one GPU): the attributes ``_fused_merger`` reads,
    parallel linears that return ``(out, bias)`` and carry a ``quant_method``, and vLLM's forward."""
    import torch
    from torch import nn

    class TupleLinear(nn.Linear):
        quant_method = UnquantizedLinearMethod()

        def forward(self, x):  # noqa: ANN001
            return super().forward(x), None

    class Merger(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.hidden_size = GROUP * c
            self.use_postshuffle_norm = post_shuffle
            self.norm = nn.LayerNorm(self.hidden_size if post_shuffle else c, eps=1e-6)
            self.linear_fc1 = TupleLinear(self.hidden_size, self.hidden_size)
            self.act_fn = nn.GELU()
            self.linear_fc2 = TupleLinear(self.hidden_size, d_model)

        def forward(self, x):  # noqa: ANN001 - vllm/model_executor/models/qwen3_vl.py, Qwen3_VisionPatchMerger
            x = self.norm(x.view(-1, self.hidden_size)) if self.use_postshuffle_norm else self.norm(x).view(
                -1, self.hidden_size)
            hidden, _ = self.linear_fc1(x)
            out, _ = self.linear_fc2(self.act_fn(hidden))
            return out

    torch.manual_seed(seed)
    merger = Merger()
    with torch.no_grad():
        merger.norm.weight.normal_(1.0, 0.1)
        merger.norm.bias.normal_(0.0, 0.1)
    return merger.eval()


@contextlib.contextmanager
def counting(module: types.ModuleType, names: tuple[str, ...]) -> Iterator[dict[str, int]]:
    """Count calls of ``module.<name>`` for each name while inside (restored afterwards)."""
    counts = dict.fromkeys(names, 0)
    originals = {name: getattr(module, name) for name in names}

    def wrap(name: str) -> Callable:
        def counted(*args, **kwargs):
            counts[name] += 1
            return originals[name](*args, **kwargs)

        return counted

    try:
        for name in names:
            setattr(module, name, wrap(name))
        yield counts
    finally:
        for name, fn in originals.items():
            setattr(module, name, fn)






def check_call_site(vision: types.ModuleType, preset: str, side: int, dtype: str, device) -> dict:
    import torch

    from civic_vllm.model_factory import get_preset

    v = get_preset(preset).vision
    c, n = v.hidden_size, merged_tokens(preset, side)
    mergers = [vllm_style_merger(c, v.out_hidden_size, post_shuffle=level > 0, seed=level)
               for level in range(1 + DEEPSTACK_LEVELS)]
    g = seeded(n)
    sources = [2 * torch.randn(GROUP * n, c, generator=g) + torch.randn(GROUP * n, 1, generator=g)
               for _ in mergers]
    index = kept_groups(n, Fraction(1, 3), seed=n).to(device)

    def stock(precision):  # the vanilla mergers on all N groups, then indexed
        rows = [s.to(device, precision) for s in sources]
        with torch.inference_mode():
            return [m.to(device, precision)(r)[index] for m, r in zip(mergers, rows)], rows

    exact, _ = stock(torch.float64)
    reference, rows = stock(dtype_of(dtype))
    visual = types.SimpleNamespace(merger=mergers[0], deepstack_merger_list=mergers[1:])
    with torch.inference_mode(), counting(vision, ("gather_merge_project", "gather_rows")) as calls:
        kept = vision.merge_kept_groups(visual, rows[0], rows[1:], index)
    calls = dict(calls)
    levels = [accuracy(k, r, e, dtype) for k, r, e in zip(kept, reference, exact)]
    fused = device.type == "cuda"
    expected = {"gather_merge_project": len(mergers), "gather_rows": 0} if fused else {
        "gather_merge_project": 0, "gather_rows": 1}
    shapes_ok = all(tuple(k.shape) == (index.numel(), v.out_hidden_size) for k in kept)
    return {"preset": preset, "dtype": dtype, "C": c, "N": n, "K": int(index.numel()), "levels": levels,
            "path": "fused gather_merge_project" if fused else "gather_rows + stock merger",
            "calls": calls, "expected_calls": expected,
            "ok": bool(calls == expected and shapes_ok and all(lv["ok"] for lv in levels))}


def part_call_site(device, budget: Budget) -> dict:
    cuda = device.type == "cuda"
    vision = import_module("civic_vllm.vllm_adapter.vision")
    steps, rows = Steps(budget), []
    plans = [(p, dt) for p in BENCH_PRESETS for dt in ("bfloat16", "float32")] if cuda else [
        (BENCH_PRESETS[0], "float32")]
    side = IMAGE_SIDE if cuda else CPU_IMAGE_SIDE
    for preset, dtype in plans:
        row = steps.run(f"{preset} {dtype}", lambda p=preset, d=dtype: check_call_site(vision, p, side, d, device))
        if row is not None:
            rows.append(row)
            if not row["ok"]:
                log(f"call_site: FAIL {preset} {dtype}: {row}")
    return {"status": part_status(rows, steps.skipped), "function": "civic_vllm.vllm_adapter.vision.merge_kept_groups",
            "mode": "fused path on CUDA" if cuda else "no CUDA: the gather + stock-merger path",
            "image_side": side, "ratio": "1/3", "cases": rows, "skipped": steps.skipped}
