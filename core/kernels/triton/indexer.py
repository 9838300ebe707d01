"""Lightning-indexer logits over the paged key cache, then top-k (Triton radix or multiblock select, torch.topk).

score(t, s) = sum_j w[t, j] * ReLU(q[t, j] · k[s]) for every key position s of the token's sequence, keys
gathered through the block table and dequantized (e4m3 x per-token power-of-two scale) or read as floats;
positions s > positions[t] are -inf. Then top-k: a radix select per row, a multi-program filtered select for
long rows, or torch.topk.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv.kernels.triton.common import dot_dtype
from dsv.kernels.triton.topk import topk_indices
from dsv.kernels.triton.topk_multiblock import topk_indices_filtered
from dsv.ops.indexer import topk_positions
from dsv.ops.kv_cache import IndexKCacheLayer
from dsv.ops.metadata import AttentionMetadata

# "auto" top-k: the one-program radix select up to this many keys per row, the multiblock select beyond. H200,
# batch 64, top-2048 (top-k alone, CUDA graph): radix 21 us at 4K, 140 us at 32K; multiblock 38 us at 4K,
# 44 us at 32K, 62 us at 128K, so they cross near 8K.
_RADIX_MAX_LEN = 8192
# ... and for at most this many rows: more rows fill the GPU one program per row, and the multiblock select's
# candidate buffers (64 KB + 64 KB per row) would grow a long prefill's memory.
_MULTIBLOCK_MAX_ROWS = 1024
_FP8 = (torch.float8_e4m3fn, torch.float8_e4m3fnuz, torch.float8_e5m2, torch.float8_e5m2fnuz)


@triton.jit
def _indexer_logits_kernel(
    q_ptr,
    w_ptr,
    key_ptr,
    scale_ptr,
    bt_ptr,
    pos_ptr,
    seq_ptr,
    out_ptr,
    gmax_ptr,
    L,
    stride_qt,
    stride_qh,
    stride_wt,
    stride_bt,
    stride_ot,
    stride_gt,
    H: tl.constexpr,
    D: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
    ITERS: tl.constexpr,
    QUANT: tl.constexpr,
    COMPUTE: tl.constexpr,
    GROUP_MAX: tl.constexpr,
    STAGES: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    pos = tl.load(pos_ptr + t)
    seq = tl.load(seq_ptr + t).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    lane = tl.arange(0, BLOCK_S)
    hmask = offs_h < H
    dmask = offs_d < D
    q = tl.load(
        q_ptr + t * stride_qt + offs_h[:, None] * stride_qh + offs_d[None, :],
        mask=hmask[:, None] & dmask[None, :],
        other=0.0,
    ).to(COMPUTE)
    w = tl.load(w_ptr + t * stride_wt + offs_h, mask=hmask, other=0.0).to(tl.float32)
    start = chunk * (ITERS * BLOCK_S)
    live = tl.cdiv(
        tl.minimum(tl.maximum(pos + 1 - start, 0), ITERS * BLOCK_S), BLOCK_S
    )  # blocks with a visible key
    out_row = out_ptr + t * stride_ot
    gmax = tl.full([BLOCK_S], float("-inf"), tl.float32)
    for i in tl.range(0, live, num_stages=STAGES):  # one q load serves ITERS blocks of keys
        offs_s = start + i * BLOCK_S + lane
        visible = offs_s <= pos
        page = tl.load(bt_ptr + seq * stride_bt + offs_s // PAGE, mask=visible, other=0).to(tl.int64)
        off = offs_s % PAGE
        kmask = visible[:, None] & dmask[None, :]
        if QUANT:
            # Page layout: PAGE * D e4m3 bytes, then PAGE fp32 scales.
            k_offs = page[:, None] * (PAGE * (D + 4)) + off[:, None] * D + offs_d[None, :]
            k = tl.load(key_ptr + k_offs, mask=kmask, other=0.0)
            k_scale = tl.load(scale_ptr + page * (PAGE * (D + 4) // 4) + PAGE * D // 4 + off, mask=visible)
        else:
            k_offs = (page[:, None] * PAGE + off[:, None]) * D + offs_d[None, :]
            k = tl.load(key_ptr + k_offs, mask=kmask, other=0.0)
        # Keys as the M side ([BLOCK_S, BLOCK_H]): the head sum then stays inside a warp (no cross-warp reduce).
        dots = tl.dot(k.to(COMPUTE), tl.trans(q), input_precision="ieee")
        score = tl.sum(tl.maximum(dots, 0.0) * w[None, :], axis=1)
        if QUANT:
            # The scale is positive (a power of two), so it commutes with ReLU and the head sum.
            score = score * k_scale
        score = tl.where(visible, score, float("-inf"))
        tl.store(out_row + offs_s, score, mask=offs_s < L)
        gmax = tl.maximum(gmax, score)
    for i in range(live, ITERS):  # blocks past the token's position: -inf, no key reads
        offs_s = start + i * BLOCK_S + lane
        tl.store(out_row + offs_s, tl.full([BLOCK_S], float("-inf"), tl.float32), mask=offs_s < L)
    if GROUP_MAX:
        # Lane j's maximum over the ITERS blocks: a group of keys BLOCK_S apart (see topk_multiblock).
        tl.store(gmax_ptr + t * stride_gt + chunk * BLOCK_S + lane, gmax)


def default_iters(length: int, block_s: int) -> int:
    """Key blocks per program: 32 programs per row up to 32 blocks each (H200: 8 to 32 blocks ran the same),
    i.e. at most 32 * block_s group maxima per row for the top-k filter (4096 for the default 128)."""
    return max(1, min(32, length // (block_s * 32)))


def indexer_logits(
    q: torch.Tensor,
    weights: torch.Tensor,
    cache: IndexKCacheLayer,
    meta: AttentionMetadata,
    *,
    block_s: int | None = None,
    iters: int | None = None,
    num_warps: int = 4,
    num_stages: int = 3,
    group_max: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of :func:`dsv.ops.indexer.indexer_logits`: [T, max_seq_len] fp32, -inf where invisible.

    With an FP8 ``q`` and a quantized cache the dot runs in FP8 (exact products; Hopper's FP8 MMA keeps fewer
    accumulator bits than fp32, about 1e-4 of the largest score at 64 x 128); bf16 ``q``
    runs in bf16 (FP8 keys widen exactly); fp32 ``q`` in fp32. ``group_max=True`` also returns the maxima
    [T, chunks * block_s] of strided key groups that :func:`topk_indices_filtered` filters with.
    """
    t, h, d = q.shape
    length = meta.max_seq_len
    cuda = q.device.type == "cuda"
    block_s = block_s or (128 if cuda else 16)
    if iters is None:
        iters = default_iters(length, block_s) if cuda else 2
    chunks = max(1, triton.cdiv(length, block_s * iters))
    out = torch.empty(t, length, dtype=torch.float32, device=q.device)
    gmax = torch.empty(t, chunks * block_s, dtype=torch.float32, device=q.device) if group_max else out
    if t == 0 or length == 0:
        return (out, gmax) if group_max else out
    q = q if q.stride(-1) == 1 else q.contiguous()
    weights = weights if weights.stride(-1) == 1 else weights.contiguous()
    storage = cache.storage
    if cache.quantized:
        keys, scales = storage.view(torch.float8_e4m3fn), storage.view(torch.float32)
        if q.dtype in _FP8:
            compute = tl.float8e4nv if q.dtype == torch.float8_e4m3fn else None
            if compute is None:
                raise NotImplementedError(f"indexer q in {q.dtype} with an e4m3fn key cache")
        else:
            compute = dot_dtype(q.dtype, torch.bfloat16)  # e4m3 keys are exact in bf16
    else:
        keys = scales = storage
        if q.dtype in _FP8:
            q = q.to(cache.dtype)
        compute = dot_dtype(q.dtype, cache.dtype)
    block_table = meta.block_table
    _indexer_logits_kernel[(t, chunks)](
        q,
        weights,
        keys,
        scales,
        block_table,
        meta.positions,
        meta.token_seq,
        out,
        gmax,
        length,
        q.stride(0),
        q.stride(1),
        weights.stride(0),
        block_table.stride(0),
        out.stride(0),
        gmax.stride(0),
        H=h,
        D=d,
        PAGE=cache.page_size,
        BLOCK_H=max(16, triton.next_power_of_2(h)),
        BLOCK_D=max(16, triton.next_power_of_2(d)),
        BLOCK_S=block_s,
        ITERS=iters,
        QUANT=cache.quantized,
        COMPUTE=compute,
        GROUP_MAX=group_max,
        STAGES=num_stages,
        num_warps=num_warps,
    )
    return (out, gmax) if group_max else out


def indexer_topk(
    q: torch.Tensor,
    weights: torch.Tensor,
    cache: IndexKCacheLayer,
    meta: AttentionMetadata,
    topk: int,
    *,
    topk_impl: str = "auto",
    logits_iters: int | None = None,
) -> torch.Tensor:
    """Triton twin of :func:`dsv.ops.indexer.indexer_topk`: [T, topk] int32 positions, -1 padded.

    ``logits_iters``: key blocks per logits program (default :func:`default_iters`).
    ``topk_impl``: ``"triton"`` (radix select, one program per row) and ``"multiblock"`` (the row filtered
    first by many programs, :mod:`dsv.kernels.triton.topk_multiblock`) return each row's selection unsorted,
    ties to lower positions; ``"torch"`` runs torch.topk on the Triton logits (sorted by score). ``"auto"``
    takes the multiblock select for rows longer than ``_RADIX_MAX_LEN`` keys (up to ``_MULTIBLOCK_MAX_ROWS``
    rows), the radix select otherwise. H200, batch 64,
    64 heads, FP8 keys, top-2048 (benchmarks/kernels.py, do_bench / CUDA graph): 4K 0.044 / 0.035 ms (radix),
    32K 0.139 / 0.126 ms and 128K 0.381 / 0.367 ms (multiblock), of which the logits 0.022, 0.088, 0.302 ms.
    """
    if topk_impl not in ("auto", "triton", "multiblock", "torch"):
        raise ValueError(f"topk_impl must be 'auto', 'triton', 'multiblock' or 'torch', got {topk_impl!r}")
    if topk_impl == "auto":
        long_rows = meta.max_seq_len > _RADIX_MAX_LEN and meta.num_tokens <= _MULTIBLOCK_MAX_ROWS
        topk_impl = "multiblock" if long_rows else "triton"
    if topk_impl == "torch":
        return topk_positions(indexer_logits(q, weights, cache, meta, iters=logits_iters), topk)
    pos = meta.positions  # the kernels take min(pos + 1, max_seq_len) keys per row (no extra launches)
    if topk_impl == "triton":
        logits = indexer_logits(q, weights, cache, meta, iters=logits_iters)
        return topk_indices(logits, pos, topk, from_positions=True)
    logits, gmax = indexer_logits(q, weights, cache, meta, iters=logits_iters, group_max=True)
    return topk_indices_filtered(logits, pos, gmax, topk, from_positions=True)
