"""gather_merge_project: Triton (interpreter) vs the torch reference, and vs the full merger."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from civic_vllm.kernels import gather_merge_project, gather_merge_project_reference
from torch import nn

G = 4  # 2x2 patch group
# (C, N, D_out): C and D_out are not multiples of the block sizes; the second
# shape spans several row (K > 64) and column (D_out > 128) blocks.
SMALL = (24, 10, 40)
LARGE = (40, 80, 130)
TOL = {  # (atol, rtol) against the reference computed in the same dtype
    torch.float32: (2e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (2e-2, 1.6e-2),
}


def _params(c: int, d_out: int, norm_width: int, dtype: torch.dtype, bias: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    nw = (1 + 0.1 * torch.randn(norm_width, generator=g)).to(dtype)
    nb = (0.1 * torch.randn(norm_width, generator=g)).to(dtype)
    w = (torch.randn(d_out, G * c, generator=g) / (G * c) ** 0.5).to(dtype)
    b = (0.5 * torch.randn(d_out, generator=g)).to(dtype) if bias else None
    return nw, nb, w, b


def _x(n: int, c: int, dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # A shared offset per patch row, as vision-tower activations have.
    return (2 * torch.randn(G * n, c, generator=g) + 3 * torch.randn(G * n, 1, generator=g)).to(dtype)


def _index(case: str, n: int) -> torch.Tensor:
    if case == "one":
        return torch.tensor([n - 1])
    if case == "all":
        return torch.arange(n)
    g = torch.Generator().manual_seed(2)
    k = max(1, (n * 7) // 10)
    return torch.randperm(n, generator=g)[:k].to(torch.int32)  # unsorted int32


def _f64(x, idx, nw, nb, w, b, norm_width):
    d = lambda t: None if t is None else t.double()  # noqa: E731
    return gather_merge_project_reference(d(x), idx, d(nw), d(nb), d(w), d(b), norm_width=norm_width)


@pytest.mark.usefixtures("triton_interpreter")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("post_shuffle", [False, True], ids=["per_patch_norm", "post_shuffle_norm"])
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("case", ["one", "all", "subset"])
def test_triton_matches_reference(dtype, post_shuffle, bias, case):
    c, n, d_out = SMALL
    norm_width = G * c if post_shuffle else c
    x = _x(n, c, dtype)
    nw, nb, w, b = _params(c, d_out, norm_width, dtype, bias)
    idx = _index(case, n)
    out = gather_merge_project(x, idx, nw, nb, w, b, norm_width=norm_width, backend="triton")
    ref = gather_merge_project_reference(x, idx, nw, nb, w, b, norm_width=norm_width)
    assert out.shape == (idx.numel(), d_out) and out.dtype == dtype
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)
    # Fused fp32 math must be no less accurate than the reference's own rounding.
    exact = _f64(x, idx, nw, nb, w, b, norm_width)
    err = (out.double() - exact).abs().max().item()
    ref_err = (ref.double() - exact).abs().max().item()
    assert err <= 1.5 * ref_err + 1e-5


@pytest.mark.usefixtures("triton_interpreter")
@pytest.mark.parametrize("post_shuffle", [False, True], ids=["per_patch_norm", "post_shuffle_norm"])
def test_triton_many_blocks(post_shuffle):
    c, n, d_out = LARGE
    norm_width = G * c if post_shuffle else c
    x = _x(n, c, torch.float32)
    nw, nb, w, b = _params(c, d_out, norm_width, torch.float32, True)
    idx = _index("subset", n)  # K = 56 with N = 80; plus K = N below
    for index in (idx, torch.arange(n)):
        out = gather_merge_project(x, index, nw, nb, w, b, norm_width=norm_width, backend="triton")
        ref = gather_merge_project_reference(x, index, nw, nb, w, b, norm_width=norm_width)
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)


@pytest.mark.usefixtures("triton_interpreter")
def test_triton_strided_x_and_large_mean():
    c, n, d_out = SMALL
    wide = 500.0 + 0.05 * torch.randn(G * n, 2 * c, generator=torch.Generator().manual_seed(3))
    x = wide[:, 1::2]  # non-contiguous; |mean| >> std stresses one-pass variance
    nw, nb, w, b = _params(c, d_out, c, torch.float32, True)
    idx = _index("subset", n)
    out = gather_merge_project(x, idx, nw, nb, w, b, norm_width=c, backend="triton")
    exact = _f64(x, idx, nw, nb, w, b, c)
    torch.testing.assert_close(out.double(), exact, atol=2e-4, rtol=1e-4)


@pytest.mark.usefixtures("triton_interpreter")
def test_triton_empty_index():
    c, n, d_out = SMALL
    nw, nb, w, b = _params(c, d_out, c, torch.float32, True)
    idx = torch.empty(0, dtype=torch.long)
    out = gather_merge_project(_x(n, c, torch.float32), idx, nw, nb, w, b, norm_width=c, backend="triton")
    assert out.shape == (0, d_out)


class _Merger(nn.Module):
    """Mirror of vLLM's Qwen3_VisionPatchMerger forward (single GPU, no quantisation)."""

    def __init__(self, c: int, d_model: int, post_shuffle: bool, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.hidden = G * c
        self.post_shuffle = post_shuffle
        self.norm = nn.LayerNorm(self.hidden if post_shuffle else c, eps=1e-6)
        self.linear_fc1 = nn.Linear(self.hidden, self.hidden)
        self.act_fn = nn.GELU()
        self.linear_fc2 = nn.Linear(self.hidden, d_model)
        with torch.no_grad():
            self.norm.weight.normal_(1.0, 0.1)
            self.norm.bias.normal_(0.0, 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.post_shuffle:
            x = self.norm(x.view(-1, self.hidden))
        else:
            x = self.norm(x).view(-1, self.hidden)
        return self.linear_fc2(self.act_fn(self.linear_fc1(x)))

    def kept(self, x: torch.Tensor, idx: torch.Tensor, backend: str) -> torch.Tensor:
        h = gather_merge_project(
            x, idx, self.norm.weight, self.norm.bias, self.linear_fc1.weight, self.linear_fc1.bias,
            norm_width=self.norm.normalized_shape[0], eps=self.norm.eps, backend=backend,
        )
        return self.linear_fc2(self.act_fn(h))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("post_shuffle", [False, True], ids=["per_patch_norm", "post_shuffle_norm"])
@torch.no_grad()
def test_gather_commutes_with_merger(request, backend, post_shuffle):
    if backend == "triton":
        request.getfixturevalue("triton_interpreter")
    c, n, d_model = SMALL
    merger = _Merger(c, d_model, post_shuffle)
    x = _x(n, c, torch.float32)
    idx = _index("subset", n)
    full = merger(x)[idx.long()]
    torch.testing.assert_close(merger.kept(x, idx, backend), full, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_dispatch_uses_reference(backend, dtype):
    c, n, d_out = SMALL
    x = _x(n, c, dtype)
    nw, nb, w, b = _params(c, d_out, c, dtype, True)
    idx = _index("subset", n)
    out = gather_merge_project(x, idx, nw, nb, w, b, norm_width=c, backend=backend)
    assert torch.equal(out, gather_merge_project_reference(x, idx, nw, nb, w, b, norm_width=c))


def _bad(**overrides) -> dict:
    c, n, d_out = 8, 3, 5
    args = dict(
        x=torch.zeros(G * n, c),
        group_index=torch.tensor([0, 2]),
        norm_weight=torch.ones(c),
        norm_bias=torch.zeros(c),
        weight=torch.randn(d_out, G * c),
        bias=torch.zeros(d_out),
        norm_width=c,
    )
    args.update(overrides)
    return args


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"x": torch.zeros(96)}, "2-D"),
        ({"x": torch.zeros(12, 8, dtype=torch.int32)}, "floating point"),
        ({"x": torch.zeros(10, 8)}, "not divisible by group_size"),
        ({"group_index": torch.tensor([0.0])}, "integer dtype"),
        ({"group_index": torch.tensor([[0]])}, "1-D"),
        ({"group_index": torch.tensor([3])}, r"in \[0, 3\)"),
        ({"group_index": torch.tensor([0], device="meta")}, "group_index is on meta"),
        ({"norm_width": 5}, "norm_width must divide"),
        ({"norm_weight": torch.ones(32)}, r"norm_weight must have shape \(8,\)"),
        ({"norm_bias": torch.ones(32)}, r"norm_bias must have shape \(8,\)"),
        ({"weight": torch.zeros(5, 8)}, r"weight must have shape \[D_out, 32\]"),
        ({"bias": torch.zeros(4)}, r"bias must have shape \(5,\)"),
        ({"weight": torch.zeros(5, 32, dtype=torch.float16)}, "weight dtype"),
        ({"norm_weight": torch.ones(8, device="meta")}, "norm_weight is on meta"),
        ({"group_size": 0}, "group_size"),
        ({"backend": "cuda"}, "backend"),
    ],
)
def test_bad_input(overrides, match):
    with pytest.raises(ValueError, match=match):
        gather_merge_project(**_bad(**overrides))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_optional_norm_bias_and_bias(request, backend):
    if backend == "triton":
        request.getfixturevalue("triton_interpreter")
    args = _bad(norm_bias=None, bias=None, x=torch.randn(12, 8), norm_weight=1 + torch.rand(8))
    out = gather_merge_project(**args, backend=backend)
    rows = args["x"].view(3, 32)[[0, 2]].view(2, 4, 8)
    ref = F.linear(F.layer_norm(rows, (8,), args["norm_weight"], None, 1e-6).view(2, 32), args["weight"])
    torch.testing.assert_close(out, ref)

def test_kernel_compiles_for_cuda(compile_for_cuda):
    # bf16 operands go to tl.dot directly on GPU, a path the interpreter cannot run.
    ptr = "*bf16"
    signature = {
        "x_ptr": ptr, "idx_ptr": "*i64", "nw_ptr": ptr, "nb_ptr": ptr, "w_ptr": ptr, "b_ptr": ptr,
        "out_ptr": ptr, "K": "i32", "C": "i32", "D_out": "i32", "norm_width": "i32",
        "n_segments": "i32", "eps": "fp32", "stride_xm": "i32", "stride_xc": "i32",
        "stride_wn": "i32", "stride_wk": "i32", "stride_om": "i32", "stride_on": "i32",
    }
    constexprs = dict(
        GROUP_SIZE=4, HAS_NORM_BIAS=True, HAS_BIAS=True, DOT_FP32=False, EMULATE_BF16_RNE=False,
        BLOCK_K=64, BLOCK_N=128, BLOCK_C=64,
    )
    results = compile_for_cuda(
        "civic_vllm.kernels.merge_projection", "_gather_merge_project_kernel", signature, constexprs,
        capabilities=(80, 90),
    )
    # bf16 projection must run on tensor cores: mma.sync on Ampere, wgmma on Hopper.
    assert results[80]["mma"] and results[90]["wgmma"], results
