"""Multi-program top-k for long rows: a threshold from group maxima, a deterministic compaction, a small select.

One program per row (:mod:`dsv.kernels.triton.topk`) reads a 128K-key row alone, so 64 rows leave half of an H200
idle. Here the row is first cut down to a few thousand candidates by many programs:

1. The logits kernel also emits group maxima: lane j of a program's ``ITERS`` key blocks keeps the largest score
   it saw, so each group holds ``ITERS`` keys ``BLOCK_S`` apart (strided, so a run of high neighbouring scores is
   spread over many groups). If at least k groups are finite, the k-th largest group maximum ``g`` has at least k
   keys >= g (each of those groups holds one), so ``tau <= g`` is a lower bound of the k-th largest score.
2. ``_threshold_kernel`` (one program per row): two 8-bit radix passes over the group maxima give the top 16 bits
   of ``g``; ``tau`` is that prefix with the low bits cleared (a little lower than g, still a bound). A row with
   fewer than k finite groups (much shorter than the batch's longest row, for which the groups were sized) is
   read whole instead, and the prefix is that of its own k-th largest score. Rows with at most k visible keys
   (or fewer than k finite scores) take every finite score.
3. ``_count_kernel`` / ``_compact_kernel`` (one program per row and chunk): count the scores >= tau per chunk,
   then write them (value and position) at offsets from the earlier chunks' counts: increasing positions, the
   same every run (no atomics).
4. The radix select runs over each row's list (~2.8k for iid scores with 4096 groups of 32 keys) with
   k = min(topk, finite keys); ties at the threshold go to the lowest positions as in
   :func:`dsv.kernels.triton.topk.topk_indices`. A list that would overflow its ``cap`` slots (scores that mostly
   tie, or sorted runs longer than BLOCK_S) falls back to the whole row: slower, still exact.

H200, batch 64, 128K keys, top-2048 (CUDA graph): threshold 9 us, count 8-11 us, compact 26-30 us, select 22-25 us,
about 65 us in all against 160 us for torch.topk and 570 us for the one-program radix select.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv.kernels.triton.topk import _radix_topk_kernel, _sort_key, row_length

# The smallest key of a finite float (-FLT_MAX); -inf maps to 0x007FFFFF.
_ALL_FINITE: tl.constexpr = tl.constexpr(0x00800000)


@triton.jit
def _threshold_kernel(
    g_ptr,
    x_ptr,
    len_ptr,
    thr_ptr,
    n_groups,
    stride_g,
    stride_x,
    L,
    FROM_POS: tl.constexpr,
    TOPK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    n = row_length(len_ptr, row, L, FROM_POS)
    bins = tl.arange(0, 256)
    lane = tl.arange(0, BLOCK)
    # Groups are sized for the launch's longest row: a much shorter row of the batch has fewer than k finite
    # group maxima, which bound nothing. Such a row (at most ~k * keys-per-group keys) is read whole instead:
    # its own scores give the exact prefix of its k-th largest.
    finite = 0
    for start in range(0, n_groups, BLOCK):
        offs = start + lane
        g = tl.load(g_ptr + row * stride_g + offs, mask=offs < n_groups, other=float("-inf"))
        finite += tl.sum((g != float("-inf")).to(tl.int32), axis=0)
    from_row = finite < TOPK
    base = tl.where(from_row, x_ptr + row * stride_x, g_ptr + row * stride_g)
    count = tl.where(from_row, n, n_groups)
    prefix = tl.zeros([1], tl.uint32)
    k_rem = tl.full([1], TOPK, tl.int32)
    total = tl.zeros([1], tl.int32)
    for p in tl.static_range(2):  # bits 31..24, then 23..16 of the k-th largest group maximum (or score)
        hi = 32 - 8 * p
        hist = tl.zeros([256], tl.int32)
        for start in range(0, count, BLOCK):
            offs = start + lane
            x = tl.load(base + offs, mask=offs < count, other=float("-inf"))
            key = _sort_key(x)
            match = x != float("-inf")
            if p > 0:
                match = match & ((key >> hi) == prefix)
            digit = tl.where(match, (key >> (hi - 8)) & 255, 0).to(tl.int32)
            dropped = BLOCK - tl.sum(match.to(tl.int32), axis=0)  # non-matching lanes landed in bin 0
            hist += tl.histogram(digit, 256) - tl.where(bins == 0, dropped, 0)
        if p == 0:
            total += tl.sum(hist, axis=0)
        suffix = tl.sum(hist, axis=0) - tl.cumsum(hist, axis=0) + hist
        b = tl.max(tl.where(suffix >= k_rem, bins, 0), axis=0)
        k_rem = k_rem - tl.sum(tl.where(bins > b, hist, 0), axis=0)
        prefix = (prefix << 8) | b.to(tl.uint32)
    bounded = (total >= TOPK) & (n > TOPK)
    thr = tl.where(bounded, prefix << 16, _ALL_FINITE)
    tl.store(thr_ptr + row + tl.arange(0, 1), thr)


@triton.jit
def _candidates(
    x_ptr,
    len_ptr,
    thr_ptr,
    row,
    chunk,
    stride_x,
    L,
    FROM_POS: tl.constexpr,
    CHUNK: tl.constexpr,
    LANES: tl.constexpr,
):
    """Positions [CHUNK // LANES, LANES] of one chunk of a row, their scores, and which are candidates (finite,
    key >= tau). Rows of LANES keep the compaction's scan inside a warp."""
    n = row_length(len_ptr, row, L, FROM_POS)
    thr = tl.load(thr_ptr + row).to(tl.uint32, bitcast=True)
    offs = chunk * CHUNK + tl.arange(0, CHUNK // LANES)[:, None] * LANES + tl.arange(0, LANES)[None, :]
    x = tl.load(x_ptr + row * stride_x + offs, mask=offs < n, other=float("-inf"))
    return offs, x, (x != float("-inf")) & (_sort_key(x) >= thr)


@triton.jit
def _count_kernel(
    x_ptr,
    len_ptr,
    thr_ptr,
    cnt_ptr,
    stride_x,
    L,
    n_chunks,
    FROM_POS: tl.constexpr,
    CHUNK: tl.constexpr,
    LANES: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    _, _, sel = _candidates(x_ptr, len_ptr, thr_ptr, row, chunk, stride_x, L, FROM_POS, CHUNK, LANES)
    tl.store(cnt_ptr + row * n_chunks + chunk, tl.sum(tl.sum(sel.to(tl.int32), axis=1), axis=0))


@triton.jit
def _compact_kernel(
    x_ptr,
    len_ptr,
    thr_ptr,
    cnt_ptr,
    val_ptr,
    idx_ptr,
    stride_x,
    L,
    n_chunks,
    FROM_POS: tl.constexpr,
    CAP: tl.constexpr,
    CHUNK: tl.constexpr,
    CHUNKS: tl.constexpr,
    LANES: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    offs, x, sel = _candidates(x_ptr, len_ptr, thr_ptr, row, chunk, stride_x, L, FROM_POS, CHUNK, LANES)
    cb = tl.arange(0, CHUNKS)
    before = tl.sum(tl.load(cnt_ptr + row * n_chunks + cb, mask=cb < chunk, other=0), axis=0)
    sel = sel.to(tl.int32)
    per_row = tl.sum(sel, axis=1)
    # Offset = earlier chunks + earlier lane rows of this chunk + earlier lanes of this row.
    at = before + (tl.cumsum(per_row, axis=0) - per_row)[:, None] + tl.cumsum(sel, axis=1) - 1
    sel = sel != 0
    keep = sel & (at < CAP)  # past CAP the select reads the whole row instead
    tl.store(val_ptr + row * CAP + at, x, mask=keep)
    tl.store(idx_ptr + row * CAP + at, offs, mask=keep)


def topk_indices_filtered(
    scores: torch.Tensor,
    lengths: torch.Tensor,
    group_max: torch.Tensor,
    topk: int,
    *,
    cap: int | None = None,
    chunk: int = 2048,
    block: int = 4096,
    num_warps: int = 16,
    chunk_warps: int = 4,
    threshold_warps: int = 16,
    radix_bits: int = 8,
    lanes: int = 32,
    from_positions: bool = False,
) -> torch.Tensor:
    """:func:`dsv.kernels.triton.topk.topk_indices` (same selection, ties to lower indices, -1 padding), with
    each row first filtered by a threshold from ``group_max`` [T, G] (maxima of disjoint groups of the row's
    scores, -inf for empty groups; any grouping is exact, strided ones filter best). Every group maximum must
    come from visible scores only (-inf past each row's length): a maximum taken over padding would raise the
    threshold above the row's k-th score and the row would get fewer than k entries.

    ``cap`` candidate slots per row (default 8 * topk) bound the extra memory at [T, cap] (fp32 + int32).
    ``from_positions``: ``lengths`` holds each row's last visible position (lengths = min(pos + 1, row size)).
    """
    t, length = scores.shape
    out = torch.empty((t, topk), dtype=torch.int32, device=scores.device)
    if t == 0 or topk == 0 or length == 0:
        return out.fill_(-1)
    scores = scores if scores.stride(-1) == 1 else scores.contiguous()
    group_max = group_max if group_max.stride(-1) == 1 else group_max.contiguous()
    lengths = lengths.contiguous()
    cap = min(length, cap or 8 * topk)
    chunk = min(chunk, triton.next_power_of_2(length))
    lanes = min(lanes, chunk)
    n_chunks = triton.cdiv(length, chunk)
    chunks_p2 = max(16, triton.next_power_of_2(n_chunks))
    thr = torch.empty(t, dtype=torch.int32, device=scores.device)
    counts = torch.empty(t, n_chunks, dtype=torch.int32, device=scores.device)
    vals = torch.empty(t, cap, dtype=torch.float32, device=scores.device)
    idx = torch.empty(t, cap, dtype=torch.int32, device=scores.device)
    n_groups = group_max.shape[1]
    _threshold_kernel[(t,)](
        group_max,
        scores,
        lengths,
        thr,
        n_groups,
        group_max.stride(0),
        scores.stride(0),
        length,
        FROM_POS=from_positions,
        TOPK=topk,
        BLOCK=min(block, max(16, triton.next_power_of_2(n_groups))),
        num_warps=threshold_warps,
    )
    pos = from_positions
    grid = (t, n_chunks)
    stride = scores.stride(0)
    _count_kernel[grid](
        scores,
        lengths,
        thr,
        counts,
        stride,
        length,
        n_chunks,
        FROM_POS=pos,
        CHUNK=chunk,
        LANES=lanes,
        num_warps=chunk_warps,
    )
    _compact_kernel[(t, n_chunks)](
        scores,
        lengths,
        thr,
        counts,
        vals,
        idx,
        stride,
        length,
        n_chunks,
        FROM_POS=pos,
        CAP=cap,
        CHUNK=chunk,
        CHUNKS=chunks_p2,
        LANES=lanes,
        num_warps=chunk_warps,
    )
    _radix_topk_kernel[(t,)](
        scores,
        lengths,
        out,
        scores.stride(0),
        out.stride(0),
        length,
        vals,
        idx,
        counts,
        n_chunks,
        FROM_POS=pos,
        CAP=cap,
        TOPK=topk,
        BLOCK=min(block, max(16, triton.next_power_of_2(cap))),
        BITS=radix_bits,
        LIST=True,
        CHUNKS=chunks_p2,
        num_warps=num_warps,
    )
    return out
