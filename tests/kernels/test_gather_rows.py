"""gather_rows: Triton (interpreter) vs the index_select reference, dispatch and errors."""

from __future__ import annotations

import pytest
import torch
from civic_vllm.kernels import gather_rows, gather_rows_reference
from civic_vllm.kernels._dispatch import resolve_backend

N_BLOCKS = 50  # > BLOCK_M / rows_per_index, and not a multiple of it
WIDTHS = (37, 16, 300)  # 300 > BLOCK_N: several column blocks, last one partial


def _sources(n_sources: int, rows_per_index: int, dtype: torch.dtype) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(n_sources * 10 + rows_per_index)
    rows = N_BLOCKS * rows_per_index
    out = []
    for i, width in enumerate(WIDTHS[:n_sources]):
        t = torch.randn(rows, width * (2 if i == 2 else 1), generator=g).to(dtype)
        out.append(t[:, ::2] if i == 2 else t)  # third source is column-strided
    return out


def _index(case: str) -> torch.Tensor:
    if case == "one":
        return torch.tensor([N_BLOCKS - 1])
    if case == "all":
        return torch.arange(N_BLOCKS)
    if case == "empty":
        return torch.empty(0, dtype=torch.long)
    g = torch.Generator().manual_seed(1)
    # Unsorted, with a repeat, int32: the kernel must not assume a sorted int64 index.
    idx = torch.randperm(N_BLOCKS, generator=g)[:37]
    return torch.cat([idx, idx[:2]]).to(torch.int32)


@pytest.mark.usefixtures("triton_interpreter")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows_per_index", [1, 4])
@pytest.mark.parametrize("n_sources", [1, 2, 3])
@pytest.mark.parametrize("case", ["one", "all", "subset", "empty"])
def test_triton_matches_reference(dtype, rows_per_index, n_sources, case):
    sources = _sources(n_sources, rows_per_index, dtype)
    index = _index(case)
    out = gather_rows(sources, index, rows_per_index=rows_per_index, backend="triton")
    ref = gather_rows_reference(sources, index, rows_per_index=rows_per_index)
    assert len(out) == n_sources
    for o, r, s in zip(out, ref, sources):
        assert o.shape == (index.numel() * rows_per_index, s.shape[1])
        assert o.is_contiguous() and o.dtype == s.dtype
        assert torch.equal(o, r)  # a copy is exact


@pytest.mark.usefixtures("triton_interpreter")
def test_triton_output_is_a_new_tensor():
    src = torch.arange(12.0).view(6, 2)
    (out,) = gather_rows([src], torch.arange(3), rows_per_index=2, backend="triton")
    assert torch.equal(out, src)
    out.zero_()
    assert src.sum() == 66.0


def test_reference_block_layout():
    src = torch.arange(8).view(8, 1)
    (out,) = gather_rows_reference([src], torch.tensor([1, 0]), rows_per_index=4)
    assert out.view(-1).tolist() == [4, 5, 6, 7, 0, 1, 2, 3]


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_cpu_dispatch_uses_reference(backend):
    sources = _sources(3, 4, torch.float32)
    index = _index("subset")
    out = gather_rows(sources, index, rows_per_index=4, backend=backend)
    for o, r in zip(out, gather_rows_reference(sources, index, rows_per_index=4)):
        assert torch.equal(o, r)


def test_auto_on_cpu_never_picks_triton():
    assert resolve_backend("auto", [torch.zeros(1)], None, "op") == "torch"


def test_triton_on_cpu_without_interpreter_is_an_error():
    # kernel=None stands for a compiled (non-interpreted) kernel.
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        resolve_backend("triton", [torch.zeros(1)], None, "op")


def test_no_sources_gives_no_outputs():
    assert gather_rows([], torch.tensor([0, 1])) == []


@pytest.mark.parametrize(
    ("sources", "index", "kwargs", "match"),
    [
        ([torch.zeros(4, 2)], torch.tensor([0.0]), {}, "integer dtype"),
        ([torch.zeros(4, 2)], torch.tensor([True]), {}, "integer dtype"),
        ([torch.zeros(4, 2)], torch.tensor([[0]]), {}, "1-D"),
        ([torch.zeros(4, 2)], torch.tensor([4]), {}, r"in \[0, 4\)"),
        ([torch.zeros(4, 2)], torch.tensor([-1]), {}, r"in \[0, 4\)"),
        ([torch.zeros(8, 2)], torch.tensor([2]), {"rows_per_index": 4}, r"in \[0, 2\)"),
        ([torch.zeros(8, 2), torch.zeros(4, 2)], torch.tensor([1]), {"rows_per_index": 4}, r"in \[0, 1\)"),
        ([torch.zeros(4)], torch.tensor([0]), {}, "2-D"),
        ([torch.zeros(4, 2, 1)], torch.tensor([0]), {}, "2-D"),
        ([torch.zeros(4, 2), torch.zeros(4, 2, dtype=torch.float16)], torch.tensor([0]), {}, "dtype"),
        ([torch.zeros(4, 2), torch.zeros(4, 2, device="meta")], torch.tensor([0]), {}, "meta"),
        ([torch.zeros(4, 2)], torch.tensor([0], device="meta"), {}, "index is on meta"),
        ([torch.zeros(6, 2)], torch.tensor([0]), {"rows_per_index": 4}, "not divisible"),
        ([torch.zeros(4, 2)], torch.tensor([0]), {"rows_per_index": 0}, "positive"),
        ([torch.zeros(4, 2)], [0], {}, "torch.Tensor"),
        ([torch.zeros(4, 2)], torch.tensor([0]), {"backend": "cuda"}, "backend"),
    ],
)
def test_bad_input(sources, index, kwargs, match):
    with pytest.raises(ValueError, match=match):
        gather_rows(sources, index, **kwargs)


def test_kernel_compiles_for_cuda(compile_for_cuda):
    signature = {
        "src_table": "*i64", "dst_table": "*i64", "meta": "*i64", "index_ptr": "*i32",
        "dst0": "*bf16", "n_out_rows": "i32",
    }
    constexprs = {"ROWS_PER_INDEX": 4, "BLOCK_M": 32, "BLOCK_N": 256}
    results = compile_for_cuda(
        "civic_vllm.kernels.gather_rows", "_gather_rows_kernel", signature, constexprs, capabilities=(80,)
    )
    assert results[80]["cubin"] > 0
