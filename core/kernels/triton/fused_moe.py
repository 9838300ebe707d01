"""Routed experts: tokens sorted by expert in BLOCK_M-aligned groups, a grouped gate/up GEMM with SwiGLU, then a
grouped down GEMM scaled by the routing weight, summed over each token's top-k in fp32.

FP8 block weights are used as they are stored (fp8 dot per 128-wide K block, times the activation and weight
scales); activations are quantized per 1x128 group first, as the reference linear does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv.kernels.triton.common import TL_DTYPES, dot_dtype, interpreting
from dsv.kernels.triton.quant import (
    act_quant,
    e4m3fn_bits,
    quant_group_scale,
    round_to,
    store_cast,
    store_view,
)
from dsv.ops.moe import ExpertWeights, sort_by_expert
from dsv.ops.quant import fp8_dtype_max


def align_by_expert(ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort the T*top_k (token, slot) pairs by expert, each expert's run padded to a multiple of ``block_m``.

    Returns ``sorted_ids`` [P] (flat pair index, ``T*top_k`` = padding) and ``block_expert`` [P / block_m]
    (-1 past the last used block), with P = T*top_k + E*(block_m-1) rounded up: no host sync, graph-safe.
    """
    order, dest, ends, total = sort_by_expert(ids, num_experts, block_m)
    sorted_ids = torch.full((total,), order.numel(), dtype=torch.int32, device=ids.device)
    sorted_ids[dest] = order.to(torch.int32)
    block_start = torch.arange(0, total, block_m, device=ids.device)
    block_expert = torch.searchsorted(ends, block_start, right=True)
    block_expert = torch.where(block_expert < num_experts, block_expert, -1).to(torch.int32)
    return sorted_ids, block_expert


@triton.jit
def _moe_gemm_kernel(
    a_ptr,
    as_ptr,
    b_ptr,
    bs_ptr,
    b2_ptr,
    b2s_ptr,
    out_ptr,
    out_scale_ptr,
    sorted_ptr,
    expert_ptr,
    route_ptr,
    N_PAIRS,
    N,
    K,
    stride_am,
    stride_asm,
    stride_be,
    stride_bn,
    stride_bse,
    stride_bsn,
    stride_om,
    stride_osm,
    TOPK: tl.constexpr,
    GATHER_A: tl.constexpr,
    SWIGLU: tl.constexpr,
    FP8: tl.constexpr,
    BLOCK_OUT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    X_DTYPE: tl.constexpr,
    COMPUTE: tl.constexpr,
    BF16_BITS: tl.constexpr,
    INTERPRET: tl.constexpr,
    QUANT_OUT: tl.constexpr,
    FP8_MAX: tl.constexpr,
    UE8M0: tl.constexpr,
    EXACT_E4M3FN: tl.constexpr,
):
    """One BLOCK_M run of rows sorted by expert x one BLOCK_N slice of the expert's output features.

    SWIGLU (gate/up): A rows are tokens (GATHER_A), B = w1[e] and B2 = w3[e]; writes silu(gate) * up per row
    into out [P, N], quantized per 1xBLOCK_N group when QUANT_OUT (fp8 out, scales [P, N/BLOCK_N]) so the down
    GEMM reads FP8 activations as the reference's act_quant makes them. Otherwise (down): A rows are the sorted rows, writes y * routing weight into out [pairs, N].
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(expert_ptr + pid_m).to(tl.int64)
    if e < 0:
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_ptr + rows)
    rmask = pair < N_PAIRS
    a_row = pair // TOPK if GATHER_A else rows
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_row.to(tl.int64)[:, None] * stride_am
    b_off = e * stride_be + offs_n.to(tl.int64)[:, None] * stride_bn
    bs_off = e * stride_bse + (offs_n // BLOCK_OUT) * stride_bsn
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc2 = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        k = kb * BLOCK_K + offs_k
        kmask = k[None, :] < K
        a = tl.load(a_ptrs + k[None, :], mask=rmask[:, None] & kmask, other=0.0)
        b = tl.load(b_ptr + b_off + k[None, :], mask=nmask[:, None] & kmask, other=0.0)
        if FP8:
            a_s = tl.load(as_ptr + a_row * stride_asm + kb, mask=rmask, other=0.0)
            b_s = tl.load(bs_ptr + bs_off + kb, mask=nmask, other=0.0)
            acc += tl.dot(a, tl.trans(b)) * a_s[:, None] * b_s[None, :]
        else:
            a = a.to(COMPUTE)
            acc = tl.dot(a, tl.trans(b.to(X_DTYPE).to(COMPUTE)), acc=acc, input_precision="ieee")
        if SWIGLU:
            b2 = tl.load(b2_ptr + b_off + k[None, :], mask=nmask[:, None] & kmask, other=0.0)
            if FP8:
                b2_s = tl.load(b2s_ptr + bs_off + kb, mask=nmask, other=0.0)
                acc2 += tl.dot(a, tl.trans(b2)) * a_s[:, None] * b2_s[None, :]
            else:
                acc2 = tl.dot(a, tl.trans(b2.to(X_DTYPE).to(COMPUTE)), acc=acc2, input_precision="ieee")
    # Each linear's output is rounded to x's dtype, as in the reference.
    y = round_to(acc, X_DTYPE, INTERPRET).to(tl.float32)
    omask = rmask[:, None] & nmask[None, :]
    if SWIGLU:
        up = round_to(acc2, X_DTYPE, INTERPRET).to(tl.float32)
        h = y / (1.0 + tl.exp(-y)) * up
        h_ptrs = out_ptr + rows.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
        if QUANT_OUT:
            # h is rounded to x's dtype first (the reference quantizes the bf16 h), then one scale per row.
            h = tl.where(nmask[None, :], round_to(h, X_DTYPE, INTERPRET).to(tl.float32), 0.0)
            scale = quant_group_scale(tl.max(tl.abs(h), axis=1), FP8_MAX, UE8M0)
            h8 = tl.minimum(tl.maximum(tl.math.div_rn(h, scale[:, None]), -FP8_MAX), FP8_MAX)
            if EXACT_E4M3FN:
                tl.store(h_ptrs, e4m3fn_bits(h8).to(tl.uint8), mask=omask)
            else:
                tl.store(h_ptrs, h8.to(out_ptr.dtype.element_ty), mask=omask)
            tl.store(out_scale_ptr + rows * stride_osm + pid_n, scale, mask=rmask)
        else:
            store_cast(h_ptrs, h, omask, BF16_BITS)
    else:
        w = tl.load(route_ptr + pair, mask=rmask, other=0.0)
        out_rows = out_ptr + pair.to(tl.int64)[:, None] * stride_om
        tl.store(out_rows + offs_n[None, :], y * w[:, None], mask=omask)


def _moe_gemm(
    a: torch.Tensor,
    a_scale: torch.Tensor | None,
    w: torch.Tensor,
    w_scale: torch.Tensor | None,
    w2: torch.Tensor | None,
    w2_scale: torch.Tensor | None,
    out: torch.Tensor,
    out_scale: torch.Tensor | None,
    sorted_ids: torch.Tensor,
    block_expert: torch.Tensor,
    route: torch.Tensor,
    top_k: int,
    x_dtype: torch.dtype,
    experts: ExpertWeights,
    block_m: int,
    block_n: int,
    num_warps: int = 4,
    num_stages: int = 3,
) -> None:
    fp8 = w_scale is not None
    block = experts.block
    n_feat, k = w.shape[1], w.shape[2]
    block_k = block[1] if fp8 else 64
    quant_out = out_scale is not None
    exact = out.dtype == torch.float8_e4m3fn
    if quant_out:
        block_n = block[1]  # one activation-scale group per program
        out_view, bf16_bits = (out.view(torch.uint8) if exact else out), False
    else:
        out_view, bf16_bits = store_view(out)
    grid = (block_expert.numel(), triton.cdiv(n_feat, block_n))
    dummy = w_scale if fp8 else w
    _moe_gemm_kernel[grid](
        a,
        a_scale if fp8 else a,
        w,
        dummy,
        w2 if w2 is not None else w,
        (w2_scale if w2_scale is not None else dummy),
        out_view,
        out_scale if quant_out else route,
        sorted_ids,
        block_expert,
        route,
        route.numel(),
        n_feat,
        k,
        a.stride(0),
        a_scale.stride(0) if fp8 else 0,
        w.stride(0),
        w.stride(1),
        w_scale.stride(0) if fp8 else 0,
        w_scale.stride(1) if fp8 else 0,
        out.stride(0),
        out_scale.stride(0) if quant_out else 0,
        TOPK=top_k,
        GATHER_A=w2 is not None,
        SWIGLU=w2 is not None,
        FP8=fp8,
        BLOCK_OUT=block[0],
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        X_DTYPE=TL_DTYPES[x_dtype],
        COMPUTE=dot_dtype(x_dtype),
        BF16_BITS=bf16_bits,
        INTERPRET=interpreting(),
        QUANT_OUT=quant_out,
        FP8_MAX=fp8_dtype_max(out.dtype) if quant_out else 448.0,
        UE8M0=experts.act_scale_fmt == "ue8m0",
        EXACT_E4M3FN=exact,
        num_warps=num_warps,
        num_stages=num_stages,
    )


def fused_moe(
    x: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    experts: ExpertWeights,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int = 4,
    num_stages: int = 3,
    gate_up_block_n: int | None = None,
) -> torch.Tensor:
    """Triton twin of :func:`dsv.ops.moe.fused_moe`: sum_i weights[t, i] * Expert_{ids[t, i]}(x[t]).

    Args:
        x: [T, D] activations; weights: [T, top_k] routing weights; ids: [T, top_k] expert ids.
        experts: stacked w1/w3 [E, I, D] and w2 [E, D, I], FP8 with block scales or float.

    ``block_m`` (default: 16 up to 512 routed rows, else 64), ``block_n`` (default 128 for FP8 experts from
    16K routed rows, else 64), ``num_warps`` and ``num_stages`` set the tiling only (same math). The FP8
    gate/up GEMM quantizes its output in its epilogue, so its tiles span one 128-wide scale group; with
    ``gate_up_block_n`` (default 64 for FP8 experts from 16K routed rows) it instead writes h in x's dtype with
    tiles that wide and one act_quant pass quantizes it (same values: the epilogue also rounds h to x's dtype
    first; identical outputs on the H200). Narrower tiles halve the gate/up kernel's
    two accumulators, which spill registers at 64 x 128 with 4 warps (Nsight Compute, H200).

    Returns:
        [T, D] in x's dtype (the top-k contributions are summed in fp32).
    """
    t, d = x.shape
    top_k = ids.shape[1]
    fp8 = experts.w1_scale is not None
    inter = experts.w1.shape[1]
    if t == 0:
        return x.new_zeros(t, experts.w2.shape[1])
    if block_m is None:
        block_m = 16 if t * top_k <= 512 else 64
    large = fp8 and t * top_k >= 16384  # what the H200 sweeps measured (FP8 experts, 32K and 65K routed rows)
    if block_n is None:  # 128-wide down tiles: +9-10% over 64
        block_n = 128 if large else 64
    if gate_up_block_n is None and large:  # 64-wide gate/up tiles, separate act_quant: +11-18%, no spills
        gate_up_block_n = 64
    x = x.contiguous()
    sorted_ids, block_expert = align_by_expert(ids, experts.num_experts, block_m)
    route = weights.reshape(-1).float().contiguous()
    p = sorted_ids.numel()
    y = torch.empty(t * top_k, d, dtype=torch.float32, device=x.device)  # every pair is written once

    def gemm(a, a_scale, w, w_scale, w2, w2_scale, out, out_scale, tile_n: int = block_n) -> None:
        _moe_gemm(a, a_scale, w, w_scale, w2, w2_scale, out, out_scale, sorted_ids, block_expert, route,
                  top_k, x.dtype, experts, block_m, tile_n, num_warps, num_stages)  # fmt: skip

    if fp8:
        group = experts.block[1]
        xq, xs = act_quant(x, group, experts.act_scale_fmt, experts.w1.dtype)
        gate_up = (experts.w1, experts.w1_scale, experts.w3, experts.w3_scale)
        if gate_up_block_n is None:
            hq = torch.empty(p, inter, dtype=experts.w2.dtype, device=x.device)
            hs = torch.empty(p, triton.cdiv(inter, group), dtype=torch.float32, device=x.device)
            gemm(xq, xs, *gate_up, hq, hs)
        else:
            # Padding rows of h stay unwritten: their quantized values only reach padding rows of the down GEMM,
            # which it never stores.
            h = torch.empty(p, inter, dtype=x.dtype, device=x.device)
            gemm(xq, xs, *gate_up, h, None, tile_n=gate_up_block_n)
            hq, hs = act_quant(h, group, experts.act_scale_fmt, experts.w2.dtype)
        gemm(hq, hs, experts.w2, experts.w2_scale, None, None, y, None)
    else:
        h = torch.empty(p, inter, dtype=x.dtype, device=x.device)
        gemm(x, None, experts.w1, None, experts.w3, None, h, None)
        gemm(h, None, experts.w2, None, None, None, y, None)
    return y.view(t, top_k, d).sum(1).to(x.dtype)
