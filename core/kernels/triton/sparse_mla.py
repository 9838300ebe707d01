"""Absorbed sparse MLA (prefill and decode) over top-k global slots, float or FP8 (656-byte) KV rows.

One program handles a block of heads of one query token, so each gathered KV row is loaded once for BLOCK_H
heads; an online softmax runs over blocks of the K indices. For small batches the K indices are split across
programs (split-KV) and a second kernel merges the partial results through their log-sum-exp.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv.kernels.triton.common import TL_DTYPES, dot_dtype, interpreting, sm_count
from dsv.kernels.triton.quant import round_to, store_cast, store_view
from dsv.ops.kv_cache import MLACacheLayer

_LOG2E = 1.4426950408889634


@triton.jit
def _load_rows(
    kv_ptr,
    scale_ptr,
    rope_ptr,
    slot,
    valid,
    offs_r,
    offs_dr,
    R: tl.constexpr,
    DR: tl.constexpr,
    WIDTH: tl.constexpr,
    FP8: tl.constexpr,
    ROW_DTYPE: tl.constexpr,
    COMPUTE: tl.constexpr,
    INTERPRET: tl.constexpr,
    TILE_SCALES: tl.constexpr,
):
    """Gather [BLOCK_N, R] latents and [BLOCK_N, DR] rope keys; FP8 rows are dequantized (x * tile scale)."""
    lmask = valid[:, None] & (offs_r[None, :] < R)
    pmask = valid[:, None] & (offs_dr[None, :] < DR)
    if FP8:
        q8 = tl.load(kv_ptr + slot[:, None] * WIDTH + offs_r[None, :], mask=lmask, other=0.0).to(tl.float32)
        if TILE_SCALES:
            # R is a power of two: one scale load per 128-wide tile, broadcast over the tile by a reshape
            # (per-element scale gathers would cost more load instructions than the data).
            block_n: tl.constexpr = slot.shape[0]
            tiles = tl.arange(0, R // 128)
            scale_offs = slot[:, None] * (WIDTH // 4) + R // 4 + tiles[None, :]
            scale = tl.load(scale_ptr + scale_offs, mask=valid[:, None], other=0.0)
            deq = tl.reshape(q8, [block_n, R // 128, 128]) * scale[:, :, None]
            deq = tl.reshape(deq, [block_n, R])
        else:
            scale_offs = slot[:, None] * (WIDTH // 4) + R // 4 + offs_r[None, :] // 128
            deq = q8 * tl.load(scale_ptr + scale_offs, mask=lmask, other=0.0)
        # Rows are materialized in the cache's dtype first, exactly as MLACacheLayer.read_rows does.
        lat = round_to(deq, ROW_DTYPE, INTERPRET)
        rope_offs = slot[:, None] * (WIDTH // 2) + (R + R // 32) // 2 + offs_dr[None, :]
        rope = tl.load(rope_ptr + rope_offs, mask=pmask, other=0.0).to(ROW_DTYPE)
    else:
        lat = tl.load(kv_ptr + slot[:, None] * (R + DR) + offs_r[None, :], mask=lmask, other=0.0)
        rope = tl.load(kv_ptr + slot[:, None] * (R + DR) + R + offs_dr[None, :], mask=pmask, other=0.0)
    return lat.to(COMPUTE), rope.to(COMPUTE)


@triton.jit
def _sparse_mla_kernel(
    q_ptr,
    idx_ptr,
    kv_ptr,
    scale_ptr,
    rope_ptr,
    out_ptr,
    part_ptr,
    lse_ptr,
    H,
    K,
    split_len,
    qk_scale,
    stride_qt,
    stride_qh,
    stride_it,
    stride_ot,
    stride_oh,
    R: tl.constexpr,
    DR: tl.constexpr,
    WIDTH: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_DR: tl.constexpr,
    FP8: tl.constexpr,
    ROW_DTYPE: tl.constexpr,
    COMPUTE: tl.constexpr,
    SPLIT: tl.constexpr,
    BF16_BITS: tl.constexpr,
    INTERPRET: tl.constexpr,
    TILE_SCALES: tl.constexpr,
):
    t = tl.program_id(0)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    split = tl.program_id(2)
    num_splits = tl.num_programs(2)
    offs_r = tl.arange(0, BLOCK_R)
    offs_dr = tl.arange(0, BLOCK_DR)
    hmask = heads < H
    q_row = q_ptr + t.to(tl.int64) * stride_qt + heads[:, None] * stride_qh
    q_lat = tl.load(q_row + offs_r[None, :], mask=hmask[:, None] & (offs_r[None, :] < R), other=0.0)
    q_rope = tl.load(q_row + R + offs_dr[None, :], mask=hmask[:, None] & (offs_dr[None, :] < DR), other=0.0)
    q_lat = q_lat.to(COMPUTE)
    q_rope = q_rope.to(COMPUTE)

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_R], tl.float32)
    start = split * split_len
    end = tl.minimum(start + split_len, K)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        idx = tl.load(idx_ptr + t.to(tl.int64) * stride_it + offs_n, mask=offs_n < end, other=-1)
        valid = idx >= 0
        slot = tl.where(valid, idx, 0).to(tl.int64)
        lat, rope = _load_rows(
            kv_ptr,
            scale_ptr,
            rope_ptr,
            slot,
            valid,
            offs_r,
            offs_dr,
            R,
            DR,
            WIDTH,
            FP8,
            ROW_DTYPE,
            COMPUTE,
            INTERPRET,
            TILE_SCALES,
        )
        s = tl.dot(q_lat, tl.trans(lat), input_precision="ieee")
        s = tl.dot(q_rope, tl.trans(rope), acc=s, input_precision="ieee")
        s = tl.where(valid[None, :], s * qk_scale, float("-inf"))  # log2 domain
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a fully masked block must not make NaNs
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(COMPUTE), lat, input_precision="ieee")
        m_i = m_new

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    omask = hmask[:, None] & (offs_r[None, :] < R)
    if SPLIT:
        # Partial results: fp32 [T, S, H, R] normalized outputs and [T, S, H] log2-sum-exp.
        row = (t.to(tl.int64) * num_splits + split) * H + heads
        tl.store(part_ptr + row[:, None] * R + offs_r[None, :], out, mask=omask)
        tl.store(lse_ptr + row, tl.where(empty, float("-inf"), m_i + tl.log2(l_safe)), mask=hmask)
    else:
        o_ptrs = out_ptr + t.to(tl.int64) * stride_ot + heads[:, None] * stride_oh + offs_r[None, :]
        store_cast(o_ptrs, out, omask, BF16_BITS)


@triton.jit
def _merge_splits_kernel(
    part_ptr,
    lse_ptr,
    out_ptr,
    H,
    S,
    stride_ot,
    stride_oh,
    R: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BF16_BITS: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_r = tl.arange(0, BLOCK_R)
    rows = (t * S + offs_s) * H + h
    lse = tl.load(lse_ptr + rows, mask=offs_s < S, other=float("-inf"))
    m = tl.max(lse, axis=0)
    w = tl.exp2(lse - tl.where(m == float("-inf"), 0.0, m))  # 0 for empty splits
    mask = (offs_s[:, None] < S) & (offs_r[None, :] < R)
    part = tl.load(part_ptr + rows[:, None] * R + offs_r[None, :], mask=mask, other=0.0)
    total = tl.sum(w, axis=0)
    out = tl.sum(part * w[:, None], axis=0) / tl.where(total == 0.0, 1.0, total)
    store_cast(out_ptr + t * stride_ot + h * stride_oh + offs_r, out, offs_r < R, BF16_BITS)


def _auto_splits(q: torch.Tensor, programs: int, k_blocks: int) -> int:
    """Enough splits to give every SM about two programs; one on CPU (the interpreter)."""
    if q.device.type != "cuda" or k_blocks < 4:
        return 1
    return max(1, min(k_blocks // 2, triton.cdiv(2 * sm_count(q.device), max(programs, 1)), 32))


def sparse_mla(
    q: torch.Tensor,
    cache: MLACacheLayer,
    indices: torch.Tensor,
    sm_scale: float,
    *,
    num_splits: int | None = None,
    block_h: int = 64,
    block_n: int = 64,
    num_warps: int = 8,
    num_stages: int = 2,
) -> torch.Tensor:
    """Triton twin of :func:`dsv.ops.attention.sparse_mla` (same arguments; tuning knobs are keyword-only).

    Args:
        q: [T, H, R + Dr] absorbed queries (bf16/fp16/fp32).
        cache: MLA cache, ``"float"`` rows or the FP8 656-byte layout (dequantized in-kernel to ``cache.dtype``).
        indices: [T, K] int global slots, -1 = unused.
        sm_scale: softmax scale.
        num_splits: split-KV factor (None = pick from the SM count; 1 on CPU).
        block_h, block_n, num_warps, num_stages: tiles; the defaults were the fastest of a sweep on an H200
            (64 heads x 64 indices, 8 warps, 2 stages: each gathered row serves 64 heads).

    Returns:
        [T, H, R] in q's dtype; a row with no valid index is 0.
    """
    t, h, d = q.shape
    r, dr = cache.kv_lora_rank, cache.rope_dim
    if d != r + dr:
        raise ValueError(f"q has {d} dims, the cache rows {r} + {dr}")
    out = torch.empty(t, h, r, dtype=q.dtype, device=q.device)
    if t == 0 or indices.shape[1] == 0:
        return out.zero_()
    q = q if q.stride(-1) == 1 else q.contiguous()
    indices = indices.contiguous()
    k = indices.shape[1]
    flat = cache.flat
    fp8 = cache.layout == "fp8"
    if fp8:
        width = flat.shape[-1]
        kv, scales, rope = flat.view(torch.float8_e4m3fn), flat.view(torch.float32), flat.view(torch.bfloat16)
    else:
        width = r + dr
        kv = scales = rope = flat
    compute = dot_dtype(q.dtype, cache.dtype)  # bf16 x bf16 on tensor cores, else fp32
    block_h = max(16, min(block_h, triton.next_power_of_2(h)))
    head_blocks = triton.cdiv(h, block_h)
    k_blocks = triton.cdiv(k, block_n)
    splits = num_splits or _auto_splits(q, t * head_blocks, k_blocks)
    splits = max(1, min(splits, k_blocks))
    split_len = triton.cdiv(k_blocks, splits) * block_n
    splits = triton.cdiv(k, split_len) if k else 1
    out_view, bf16_bits = store_view(out)
    if splits > 1:
        part = torch.empty(t, splits, h, r, dtype=torch.float32, device=q.device)
        lse = torch.empty(t, splits, h, dtype=torch.float32, device=q.device)
    else:
        part = lse = out  # unused
    _sparse_mla_kernel[(t, head_blocks, splits)](
        q,
        indices,
        kv,
        scales,
        rope,
        out_view,
        part,
        lse,
        h,
        k,
        split_len,
        sm_scale * _LOG2E,
        q.stride(0),
        q.stride(1),
        indices.stride(0),
        out.stride(0),
        out.stride(1),
        R=r,
        DR=dr,
        WIDTH=width,
        BLOCK_H=block_h,
        BLOCK_N=block_n,
        BLOCK_R=triton.next_power_of_2(r),
        BLOCK_DR=triton.next_power_of_2(dr),
        FP8=fp8,
        ROW_DTYPE=TL_DTYPES[cache.dtype],
        COMPUTE=compute,
        SPLIT=splits > 1,
        BF16_BITS=bf16_bits,
        INTERPRET=interpreting(),
        TILE_SCALES=fp8 and r & (r - 1) == 0,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    if splits > 1:
        merge_splits(part, lse, out)
    return out


def merge_splits(part: torch.Tensor, lse: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Merge split-KV partial outputs ``part`` [T, S, H, R] fp32 with their base-2 log-sum-exps ``lse``
    [T, S, H] into ``out`` [T, H, R] in one launch (a split with lse -inf contributes nothing)."""
    t, s, h, r = part.shape
    out_view, bf16_bits = store_view(out)
    _merge_splits_kernel[(t, h)](
        part,
        lse,
        out_view,
        h,
        s,
        out.stride(0),
        out.stride(1),
        R=r,
        BLOCK_S=triton.next_power_of_2(s),
        BLOCK_R=triton.next_power_of_2(r),
        BF16_BITS=bf16_bits,
    )
    return out
