"""Per-row top-k selection by radix select (unsorted output), for the indexer's top-2048 over long contexts.

Each program owns one row: histogram passes (four of 8 bits by default) over order-preserving uint32 keys find the
k-th largest value exactly, then one pass writes the indices of every larger element and of the first equal ones.
-inf marks an invisible key and is never selected; rows with fewer visible keys than k are padded with -1.

The kernel also runs over a row's candidate list (``LIST``: values and positions in increasing position order, as
:mod:`dsv.kernels.triton.topk_multiblock` compacts them), falling back to the whole row when the list overflowed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _sort_key(x):
    """fp32 -> uint32 whose unsigned order is the float order."""
    bits = x.to(tl.uint32, bitcast=True)
    return tl.where((bits >> 31) == 1, ~bits, bits | 0x80000000)


@triton.jit
def row_length(len_ptr, row, L, FROM_POS: tl.constexpr):
    """Keys in the row: ``lengths[row]``, or ``min(positions[row] + 1, L)`` with ``FROM_POS``."""
    n = tl.load(len_ptr + row).to(tl.int32)
    if FROM_POS:
        n = tl.minimum(n + 1, L)
    return n


@triton.jit
def _load_scores(base, vbase, offs, mask, use_list, LIST: tl.constexpr):
    """Scores at ``offs`` of the row, or of the candidate list when ``LIST`` and ``use_list``; -inf outside."""
    if LIST:
        if use_list:
            x = tl.load(vbase + offs, mask=mask, other=float("-inf"))
        else:
            x = tl.load(base + offs, mask=mask, other=float("-inf"))
    else:
        x = tl.load(base + offs, mask=mask, other=float("-inf"))
    return x


@triton.jit
def _radix_topk_kernel(
    x_ptr,
    len_ptr,
    out_ptr,
    stride_x,
    stride_o,
    L,
    val_ptr,
    idx_ptr,
    cnt_ptr,
    n_chunks,
    FROM_POS: tl.constexpr,
    CAP: tl.constexpr,
    TOPK: tl.constexpr,
    BLOCK: tl.constexpr,
    BITS: tl.constexpr,
    LIST: tl.constexpr,
    CHUNKS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = x_ptr + row * stride_x
    out_row = out_ptr + row * stride_o
    n = row_length(len_ptr, row, L, FROM_POS)
    use_list = n < 0  # LIST: read the candidate list unless it overflowed its CAP slots
    vbase = base
    ibase = len_ptr
    if LIST:
        cb = tl.arange(0, CHUNKS)
        n_cand = tl.sum(tl.load(cnt_ptr + row * n_chunks + cb, mask=cb < n_chunks, other=0), axis=0)
        use_list = n_cand <= CAP
        n = tl.where(use_list, n_cand, n)
        vbase = val_ptr + row * CAP
        ibase = idx_ptr + row * CAP
    small = n <= TOPK  # every visible key is selected: skip the histogram passes
    n_scan = tl.where(small, 0, n)
    bins = tl.arange(0, 1 << BITS)
    lane = tl.arange(0, BLOCK)
    prefix = tl.zeros([1], tl.uint32)
    k_total = tl.zeros([1], tl.int32)
    for p in tl.static_range((32 + BITS - 1) // BITS):
        # Compile-time digit position: bits [shift, hi) of the key; the bits above hi are fixed by prefix.
        hi = 32 - BITS * p
        shift = hi - BITS
        if shift < 0:
            shift = 0
        hist = tl.zeros([1 << BITS], tl.int32)
        for start in range(0, n_scan, BLOCK):
            offs = start + lane
            x = _load_scores(base, vbase, offs, offs < n_scan, use_list, LIST)
            key = _sort_key(x)
            match = x != float("-inf")
            if p > 0:
                match = match & ((key >> hi) == prefix)
            digit = tl.where(match, (key >> shift) & ((1 << (hi - shift)) - 1), 0).to(tl.int32)
            # Non-matching lanes were counted in bin 0; take them out again (no histogram mask before 3.5).
            dropped = BLOCK - tl.sum(match.to(tl.int32), axis=0)
            hist += tl.histogram(digit, 1 << BITS) - tl.where(bins == 0, dropped, 0)
        if p == 0:
            k_total += tl.minimum(tl.sum(hist, axis=0), TOPK)  # k = min(topk, visible keys)
            k_rem = k_total
        # Bin of the k-th largest: the highest bin whose suffix count (elements in bins >= b) reaches k_rem.
        suffix = tl.sum(hist, axis=0) - tl.cumsum(hist, axis=0) + hist
        b = tl.max(tl.where(suffix >= k_rem, bins, 0), axis=0)
        k_rem = k_rem - tl.sum(tl.where(bins > b, hist, 0), axis=0)
        prefix = (prefix << (hi - shift)) | b.to(tl.uint32)
    thr = tl.where(small, tl.zeros_like(prefix), prefix)  # key 0 is below every finite value
    k_rem = tl.where(small, 0, k_rem)  # how many keys equal to the threshold are taken
    n_gt = k_total - k_rem  # they go after the n_gt larger ones
    cnt_gt = tl.zeros([1], tl.int32)
    cnt_eq = tl.zeros([1], tl.int32)
    for start in range(0, n, BLOCK):
        offs = start + lane
        x = _load_scores(base, vbase, offs, offs < n, use_list, LIST)
        key = _sort_key(x)
        valid = x != float("-inf")
        gt = valid & (key > thr)
        eq = valid & (key == thr)
        pos_gt = cnt_gt + tl.cumsum(gt.to(tl.int32), axis=0) - 1
        pos_eq = cnt_eq + tl.cumsum(eq.to(tl.int32), axis=0) - 1
        src = offs
        if LIST:  # noqa: SIM102 (LIST is a compile-time flag, use_list a runtime scalar)
            if use_list:  # list entries carry their row positions (increasing: ties still go to the lowest)
                src = tl.load(ibase + offs, mask=offs < n, other=0)
        tl.store(out_row + pos_gt, src, mask=gt)
        tl.store(out_row + n_gt + pos_eq, src, mask=eq & (pos_eq < k_rem))
        cnt_gt += tl.sum(gt.to(tl.int32), axis=0)
        cnt_eq += tl.sum(eq.to(tl.int32), axis=0)
    written = cnt_gt + tl.minimum(cnt_eq, k_rem)
    for start in range(0, TOPK, BLOCK):  # -1 padding here saves a fill launch
        offs = start + lane
        tl.store(out_row + offs, tl.full([BLOCK], -1, tl.int32), mask=(offs >= written) & (offs < TOPK))


def topk_indices(
    scores: torch.Tensor,
    lengths: torch.Tensor,
    topk: int,
    *,
    block: int = 4096,
    radix_bits: int = 8,
    num_warps: int = 16,
    from_positions: bool = False,
) -> torch.Tensor:
    """Indices [T, topk] int32 of the ``topk`` largest finite values among ``scores[t, :lengths[t]]``.

    Unsorted; -inf entries are never chosen; rows with fewer finite values are padded with -1. Ties at the
    threshold are broken towards lower indices. ``radix_bits`` sets the digit width (ceil(32 / bits) passes);
    the defaults were the fastest of a sweep on an H200 (wider digits lose: tl.histogram's cost grows with bins).
    ``from_positions``: ``lengths`` holds each row's last visible position (lengths = min(pos + 1, row size)).
    """
    t = scores.shape[0]
    out = torch.empty((t, topk), dtype=torch.int32, device=scores.device)
    if t == 0 or topk == 0:
        return out.fill_(-1)
    scores = scores if scores.stride(-1) == 1 else scores.contiguous()
    _radix_topk_kernel[(t,)](
        scores,
        lengths.contiguous(),
        out,
        scores.stride(0),
        out.stride(0),
        scores.shape[1],
        scores,  # no candidate list: placeholders
        out,
        out,
        0,
        FROM_POS=from_positions,
        CAP=1,
        TOPK=topk,
        BLOCK=block,
        BITS=radix_bits,
        LIST=False,
        CHUNKS=1,
        num_warps=num_warps,
    )
    return out
