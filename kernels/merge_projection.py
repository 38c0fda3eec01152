"""Fused gather + LayerNorm + Linear for the kept groups of the Qwen3-VL merger.

Qwen3-VL's patch merger normalises patch rows and projects each 2x2 group of
4 consecutive rows (``linear_fc1``). Both steps are row-wise in the group, so
they commute with selecting groups: CIVIC runs them on the K kept groups only.
The Triton kernel reads the kept rows straight from the vision-tower output,
normalises them on the fly (fp32 statistics) and feeds the tiles to ``tl.dot``,
so neither the gathered copy nor the normalised activations touch memory.
Each program owns a [BLOCK_K, BLOCK_N] output tile and recomputes the LayerNorm
statistics of its BLOCK_K rows: one extra read of those rows per column block,
which keeps the whole op in a single launch with no intermediate buffer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._dispatch import HAS_TRITON, check_index, is_interpreted, resolve_backend, tl, triton

__all__ = ["gather_merge_project", "gather_merge_project_reference"]

_OP = "gather_merge_project"

if HAS_TRITON:

    @triton.jit
    def _cast(x, dst_ty: tl.constexpr, EMULATE_BF16_RNE: tl.constexpr):
        """fp32 -> dst_ty; the interpreter truncates fp32 -> bf16, so round first."""
        if EMULATE_BF16_RNE:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16
            x = bits.to(tl.float32, bitcast=True)
        return x.to(dst_ty)

    @triton.jit
    def _load_x(x_ptr, base_row, col, mask, C, stride_xm, stride_xc):
        """fp32 tile of gathered rows: column ``col`` of group row g is x[g*G + col // C, col % C]."""
        ptrs = x_ptr + (base_row[:, None] + (col // C)[None, :]) * stride_xm + (col % C)[None, :] * stride_xc
        return tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)

    @triton.jit
    def _gather_merge_project_kernel(
        x_ptr,  # [M, C] patch rows, group g = rows g*GROUP_SIZE .. +GROUP_SIZE-1
        idx_ptr,  # [K] kept group numbers
        nw_ptr,  # [norm_width] LayerNorm weight
        nb_ptr,  # [norm_width] LayerNorm bias (unused unless HAS_NORM_BIAS)
        w_ptr,  # [D_out, GROUP_SIZE*C] Linear weight
        b_ptr,  # [D_out] Linear bias (unused unless HAS_BIAS)
        out_ptr,  # [K, D_out]
        K,
        C,
        D_out,
        norm_width,
        n_segments,  # GROUP_SIZE*C // norm_width
        eps,
        stride_xm,
        stride_xc,
        stride_wn,
        stride_wk,
        stride_om,
        stride_on,
        GROUP_SIZE: tl.constexpr,
        HAS_NORM_BIAS: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        DOT_FP32: tl.constexpr,  # upcast dot operands (interpreter cannot dot bf16)
        EMULATE_BF16_RNE: tl.constexpr,  # interpreter + bf16: see _cast
        BLOCK_K: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        pid_k = tl.program_id(0)
        pid_n = tl.program_id(1)

        offs_k = pid_k.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
        offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        k_mask = offs_k < K
        n_mask = offs_n < D_out
        group = tl.load(idx_ptr + offs_k, mask=k_mask, other=0).to(tl.int64)
        base_row = group * GROUP_SIZE

        acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
        for seg in range(0, n_segments):
            seg0 = seg * norm_width  # < GROUP_SIZE*C: no int32 overflow
            # Pass 1: statistics of this norm segment. Everything is computed
            # relative to the segment's first element (shift), which keeps the
            # one-pass variance and the centring accurate when |mean| >> std.
            shift = tl.load(
                x_ptr + (base_row + seg0 // C) * stride_xm + (seg0 % C) * stride_xc,
                mask=k_mask,
                other=0.0,
            ).to(tl.float32)
            s1 = tl.zeros((BLOCK_K,), dtype=tl.float32)
            s2 = tl.zeros((BLOCK_K,), dtype=tl.float32)
            for c0 in range(0, norm_width, BLOCK_C):
                offs_c = c0 + tl.arange(0, BLOCK_C)
                col = seg0 + offs_c  # column in the [K, GROUP_SIZE*C] gathered row
                mask = k_mask[:, None] & (offs_c < norm_width)[None, :]
                xv = _load_x(x_ptr, base_row, col, mask, C, stride_xm, stride_xc)
                d = tl.where(mask, xv - shift[:, None], 0.0)
                s1 += tl.sum(d, axis=1)
                s2 += tl.sum(d * d, axis=1)
            mean_d = s1 / norm_width
            var = tl.maximum(s2 / norm_width - mean_d * mean_d, 0.0)
            rstd = 1.0 / tl.sqrt(var + eps)

            # Pass 2: normalise the tile on the fly and accumulate the projection.
            for c0 in range(0, norm_width, BLOCK_C):
                offs_c = c0 + tl.arange(0, BLOCK_C)
                c_mask = offs_c < norm_width
                col = seg0 + offs_c
                mask = k_mask[:, None] & c_mask[None, :]
                xv = _load_x(x_ptr, base_row, col, mask, C, stride_xm, stride_xc)
                nw = tl.load(nw_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)
                xn = ((xv - shift[:, None]) - mean_d[:, None]) * rstd[:, None] * nw[None, :]
                if HAS_NORM_BIAS:
                    nb = tl.load(nb_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)
                    xn += nb[None, :]
                xn = tl.where(mask, xn, 0.0)
                # Round like the reference, whose LayerNorm output is in the input dtype.
                xn = _cast(xn, x_ptr.dtype.element_ty, EMULATE_BF16_RNE)
                wv = tl.load(
                    w_ptr + offs_n[None, :] * stride_wn + col[:, None] * stride_wk,
                    mask=c_mask[:, None] & n_mask[None, :],
                    other=0.0,
                )
                if DOT_FP32:
                    xn = xn.to(tl.float32)
                    wv = wv.to(tl.float32)
                acc = tl.dot(xn, wv, acc, input_precision="ieee")

        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(
            out_ptr + offs_k[:, None] * stride_om + offs_n[None, :] * stride_on,
            _cast(acc, out_ptr.dtype.element_ty, EMULATE_BF16_RNE),
            mask=k_mask[:, None] & n_mask[None, :],
        )

else:  # pragma: no cover
    _gather_merge_project_kernel = None


def _check_inputs(
    x: torch.Tensor,
    group_index: torch.Tensor,
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    group_size: int,
    norm_width: int,
) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"{_OP}: x must be a 2-D tensor [M, C], got {getattr(x, 'shape', type(x))}")
    if not x.dtype.is_floating_point:
        raise ValueError(f"{_OP}: x must be floating point, got {x.dtype}")
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"{_OP}: group_size must be a positive int, got {group_size!r}")
    m, c = x.shape
    if m % group_size:
        raise ValueError(f"{_OP}: x has {m} rows, not divisible by group_size={group_size}")
    width = group_size * c
    if not isinstance(norm_width, int) or norm_width < 1 or width % norm_width:
        raise ValueError(
            f"{_OP}: norm_width must divide group_size*C={width} (C for a per-patch norm, "
            f"{width} for the post-shuffle norm), got {norm_width!r}"
        )
    params = {"norm_weight": norm_weight, "norm_bias": norm_bias, "weight": weight, "bias": bias}
    for name, t in params.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{_OP}: {name} must be a tensor, got {type(t).__name__}")
        if t.dtype != x.dtype:
            raise ValueError(f"{_OP}: {name} dtype {t.dtype} != x dtype {x.dtype}")
        if t.device != x.device:
            raise ValueError(f"{_OP}: {name} is on {t.device}, x on {x.device}")
    if norm_weight is None:
        raise ValueError(f"{_OP}: norm_weight is required")
    for name in ("norm_weight", "norm_bias"):
        t = params[name]
        if t is not None and tuple(t.shape) != (norm_width,):
            raise ValueError(f"{_OP}: {name} must have shape ({norm_width},), got {tuple(t.shape)}")
    if weight is None or weight.dim() != 2 or weight.shape[1] != width:
        raise ValueError(
            f"{_OP}: weight must have shape [D_out, {width}], got "
            f"{None if weight is None else tuple(weight.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"{_OP}: bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if isinstance(group_index, torch.Tensor) and group_index.device != x.device:
        raise ValueError(f"{_OP}: group_index is on {group_index.device}, x on {x.device}")
    check_index(group_index, m // group_size, _OP, name="group_index")


def gather_merge_project_reference(
    x: torch.Tensor,
    group_index: torch.Tensor,
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    group_size: int = 4,
    norm_width: int,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Torch reference: index_select -> F.layer_norm -> F.linear, in x's dtype like vLLM."""
    k = group_index.numel()
    rows = x.reshape(-1, group_size * x.shape[1]).index_select(0, group_index.to(torch.long))
    normed = F.layer_norm(rows.view(k, -1, norm_width), (norm_width,), norm_weight, norm_bias, eps)
    return F.linear(normed.view(k, -1), weight, bias)


def _pick_blocks(k: int, d_out: int, dtype: torch.dtype) -> tuple[int, int, int]:
    block_k = 16 if k <= 16 else 32 if k <= 32 else 64
    block_n = 64 if d_out <= 64 else 128
    block_c = 32 if dtype == torch.float32 else 64
    return block_k, block_n, block_c


def _gather_merge_project_triton(
    x: torch.Tensor,
    group_index: torch.Tensor,
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    group_size: int,
    norm_width: int,
    eps: float,
) -> torch.Tensor:
    k = group_index.numel()
    d_out = weight.shape[0]
    out = torch.empty((k, d_out), dtype=x.dtype, device=x.device)
    if k == 0 or d_out == 0:
        return out
    if group_index.dtype not in (torch.int32, torch.int64):
        group_index = group_index.to(torch.int64)
    group_index = group_index.contiguous()
    norm_weight = norm_weight.contiguous()
    norm_bias = norm_bias.contiguous() if norm_bias is not None else None
    bias = bias.contiguous() if bias is not None else None
    c = x.shape[1]
    interpreted = is_interpreted(_gather_merge_project_kernel)
    block_k, block_n, block_c = _pick_blocks(k, d_out, x.dtype)
    grid = (triton.cdiv(k, block_k), triton.cdiv(d_out, block_n))
    _gather_merge_project_kernel[grid](
        x,
        group_index,
        norm_weight,
        norm_bias if norm_bias is not None else norm_weight,
        weight,
        bias if bias is not None else weight,
        out,
        k,
        c,
        d_out,
        norm_width,
        group_size * c // norm_width,
        float(eps),
        x.stride(0),
        x.stride(1),
        weight.stride(0),
        weight.stride(1),
        out.stride(0),
        out.stride(1),
        GROUP_SIZE=group_size,
        HAS_NORM_BIAS=norm_bias is not None,
        HAS_BIAS=bias is not None,
        DOT_FP32=interpreted or x.dtype == torch.float32,
        EMULATE_BF16_RNE=interpreted and x.dtype == torch.bfloat16,
        BLOCK_K=block_k,
        BLOCK_N=block_n,
        BLOCK_C=block_c,
    )
    return out


def gather_merge_project(
    x: torch.Tensor,
    group_index: torch.Tensor,
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    group_size: int = 4,
    norm_width: int,
    eps: float = 1e-6,
    backend: str = "auto",
) -> torch.Tensor:
    """Project the kept merger groups: ``linear(layer_norm(x.view(-1, G*C)[group_index]))``.

    x is the vision-tower output [M, C] whose groups are ``group_size``
    consecutive rows. The LayerNorm runs over consecutive chunks of
    ``norm_width`` of each gathered [G*C] row: ``norm_width=C`` is the merger's
    per-patch norm, ``norm_width=G*C`` its post-shuffle norm. Returns
    [K, D_out] in x's dtype. backend: "auto" (Triton on CUDA when available,
    else torch), "triton" or "torch".
    """
    _check_inputs(x, group_index, norm_weight, norm_bias, weight, bias, group_size, norm_width)
    tensors = [t for t in (x, group_index, norm_weight, norm_bias, weight, bias) if t is not None]
    chosen = resolve_backend(backend, tensors, _gather_merge_project_kernel, _OP)
    if chosen == "torch":
        return gather_merge_project_reference(
            x, group_index, norm_weight, norm_bias, weight, bias,
            group_size=group_size, norm_width=norm_width, eps=eps,
        )
    return _gather_merge_project_triton(
        x, group_index, norm_weight, norm_bias, weight, bias, group_size, norm_width, eps
    )
