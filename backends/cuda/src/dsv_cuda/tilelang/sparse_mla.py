"""``sparse_mla_decode`` / ``sparse_mla_prefill`` through dsv's TileLang kernel.

Same arguments and result as :func:`dsv.ops.attention.sparse_mla`. The torch side here does what the
kernel leaves to its caller: argument checks, the choice of layout (only the bf16/fp16 "float" one), padding
heads to the head block and the top-k list to the index block (-1 entries, masked in the kernel), the
split-KV choice for small batches, and the merge of the splits (one launch of dsv's Triton merge kernel;
:func:`merge_splits` states the same math in torch). Everything here except :func:`_run_kernel` runs on the
CPU, where the tests cover it.

Measured on an H200 (H = 128, top-k 2048, bf16 KV; backends/cuda/scripts/tilelang_check.py): decode B64
123 µs (CUDA graph 123 µs), B1 88 µs eager / 25 µs in a graph, prefill 4K-16K tokens ~337 TFLOPS.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from dsv.backend.interface import KernelUnavailable
from dsv.ops.kv_cache import MLACacheLayer

HALF = {torch.bfloat16: "bfloat16", torch.float16: "float16"}
BLOCK_H = 64  # heads per thread block: wgmma tiles are 64 rows
BLOCK_I = 64  # gathered KV rows per pipeline step
#: Split-KV factors used (few, so that few kernels get compiled): the largest one that fits is chosen.
SPLIT_CHOICES = (1, 4, 16)


@dataclass(frozen=True)
class Tiles:
    """Tile configuration of the kernel: KV rows per pipeline step, pipeline depth, threads per block, heads
    per block. The default was the fastest of a sweep on an H200 (32-row steps with 2-4 stages, or 1 stage,
    were 25-40% slower); most 512-thread configurations asked for more than the 227 KB of shared memory an
    sm_90 block can have and failed at launch."""

    block_i: int = BLOCK_I
    num_stages: int = 2
    threads: int = 256
    block_h: int = BLOCK_H


DEFAULT_TILES = Tiles()


@dataclass(frozen=True)
class Plan:
    """How one call is laid out on the GPU.

    Attributes:
        heads: query heads after padding (a multiple of the head block).
        topk: top-k length after padding with -1 (a multiple of the index block times ``splits``).
        splits: parts the top-k list is split into (split-KV; merged by :func:`merge_splits_cuda`).
    """

    heads: int
    topk: int
    splits: int


#: Q and Out offsets are int32 in the kernel.
_INT32_ELEMENTS = 2**31 - 1


def check_args(q: torch.Tensor, cache: MLACacheLayer, indices: torch.Tensor) -> None:
    """Refuse what the kernel does not do, with the reason and what would work instead."""
    if cache.layout != "float":
        raise KernelUnavailable(
            "tilelang sparse MLA reads the bf16 KV layout only; this cache is FlashMLA's FP8 656-byte layout. "
            "Use --kv-cache-dtype bf16, or the triton kernel (or flashmla_decode for decode) for the FP8 cache"
        )
    if cache.storage.dtype not in HALF:
        raise KernelUnavailable(
            f"tilelang sparse MLA reads a bf16/fp16 KV cache; this one holds {cache.storage.dtype} "
            "(use --dtype bfloat16 or the triton kernel)"
        )
    r, dr = cache.kv_lora_rank, cache.rope_dim
    if q.dim() != 3 or q.shape[-1] != r + dr:
        raise ValueError(f"q must be [T, H, {r} + {dr}], got {tuple(q.shape)}")
    if indices.dim() != 2 or indices.shape[0] != q.shape[0]:
        raise ValueError(f"indices must be [T={q.shape[0]}, K], got {tuple(indices.shape)}")
    if r % 64 or dr % 16:
        # T.gemm tiles: the latent width is split across warps in 64-wide pieces, the rope width is one K tile.
        raise KernelUnavailable(
            f"tilelang sparse MLA needs kv_lora_rank % 64 == 0 and rope_dim % 16 == 0, got {r}, {dr}"
        )
    if q.device.type != "cuda":
        raise KernelUnavailable(f"tilelang sparse MLA runs on CUDA tensors, got {q.device}")
    if indices.device != q.device or cache.storage.device != q.device:
        raise ValueError(
            f"q ({q.device}), indices ({indices.device}) and the cache ({cache.storage.device}) must share a device"
        )


def plan(
    tokens: int,
    heads: int,
    topk: int,
    sm_count: int,
    splits: int | None = None,
    block_i: int = BLOCK_I,
    block_h: int = BLOCK_H,
) -> Plan:
    """Pad heads and top-k to the kernel's blocks and pick the split-KV factor.

    Splits are used only when the (token, head-block) programs fill less than one wave of the GPU's SMs:
    each split re-reads its queries and writes a [H, R] fp32 partial, a cost that pays off only when SMs
    would otherwise idle. The top-k list is padded to a multiple of ``BLOCK_I * splits``.
    """
    heads_p = math.ceil(max(heads, 1) / block_h) * block_h
    blocks = max(1, math.ceil(topk / block_i))
    if splits is None:
        programs = max(1, tokens * (heads_p // block_h))
        want = sm_count // programs if programs < sm_count else 1
        # Keep at least 2 blocks per split: one block per program cannot hide its gather latency.
        limit = min(want, blocks // 2)
        splits = max(s for s in SPLIT_CHOICES if s <= max(1, limit))
    elif splits < 1:
        raise ValueError(f"splits must be >= 1, got {splits}")
    step = block_i * splits
    return Plan(heads=heads_p, topk=math.ceil(blocks * block_i / step) * step, splits=splits)


def pad_queries(q: torch.Tensor, heads: int, dtype: torch.dtype) -> torch.Tensor:
    """q in the KV dtype, contiguous, with zero heads appended up to ``heads`` (their outputs are dropped)."""
    q = q.to(dtype)
    if q.shape[1] != heads:
        q = torch.nn.functional.pad(q, (0, 0, 0, heads - q.shape[1]))
    return q.contiguous()


def pad_indices(indices: torch.Tensor, topk: int) -> torch.Tensor:
    """int32 [T, topk]: ``indices`` with -1 appended (the kernel treats every negative entry as unused)."""
    idx = indices if indices.dtype == torch.int32 else indices.to(torch.int32)
    if idx.shape[1] != topk:
        idx = torch.nn.functional.pad(idx, (0, topk - idx.shape[1]), value=-1)
    return idx.contiguous()


def merge_splits(part: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """Merge split-KV partials: ``part`` [T, S, H, R] normalized fp32 outputs, ``lse`` [T, S, H] log2-sum-exp
    (-inf for a split without a valid key). Returns fp32 [T, H, R]; rows without any valid key give 0.

    The torch statement of what :func:`merge_splits_cuda` computes (the tests hold one against the other and
    this one against attention over the whole list)."""
    m = lse.amax(dim=1, keepdim=True)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)  # all splits empty: avoid -inf - -inf
    w = torch.exp2(lse - m)  # [T, S, H]; 0 for empty splits
    total = w.sum(dim=1)  # [T, H]
    out = torch.einsum("tsh,tshr->thr", w, part)
    return out / torch.where(total > 0, total, torch.ones_like(total))[..., None]


def merge_splits_cuda(part: torch.Tensor, lse: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """:func:`merge_splits` into ``out`` [T, H, R] (bf16/fp16) in one launch of dsv's Triton merge kernel (the
    same partial layout as dsv's Triton sparse MLA); eight torch launches cost more host time than the
    attention kernel itself at batch 1."""
    from dsv.kernels.triton.sparse_mla import merge_splits as triton_merge

    return triton_merge(part, lse, out)


@functools.lru_cache(maxsize=8)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _dummy(device: torch.device, heads: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    return (
        torch.empty(1, 1, heads, dim, dtype=torch.float32, device=device),
        torch.empty(1, 1, heads, dtype=torch.float32, device=device),
    )


def _run_kernel(
    q: torch.Tensor,
    cache: MLACacheLayer,
    indices: torch.Tensor,
    sm_scale: float,
    p: Plan,
    tiles: Tiles,
) -> torch.Tensor:
    """Launch the compiled kernel (compiling it on first use). Returns [T, heads_p, R] in the KV dtype."""
    from dsv_cuda.tilelang.sparse_mla_kernel import KernelKey, compiled

    dtype = cache.storage.dtype
    r, dr = cache.kv_lora_rank, cache.rope_dim
    key = KernelKey(
        heads=p.heads,
        dim=r,
        tail=dr,
        topk=p.topk,
        splits=p.splits,
        sm_scale=float(sm_scale),
        dtype=HALF[dtype],
        block_h=tiles.block_h,
        block_i=tiles.block_i,
        num_stages=tiles.num_stages,
        threads=tiles.threads,
        index_dtype="int64" if cache.flat.numel() >= 2**31 else "int32",
    )
    kernel = compiled(key)
    t = q.shape[0]
    qp = pad_queries(q, p.heads, dtype)
    idx = pad_indices(indices, p.topk)
    kv = cache.flat
    out = torch.empty(t, p.heads, r, dtype=dtype, device=q.device)
    if p.splits == 1:
        part, lse = _dummy(q.device, p.heads, r)
        kernel(qp, kv, idx, out, part, lse)
        return out
    part = torch.empty(t, p.splits, p.heads, r, dtype=torch.float32, device=q.device)
    lse = torch.empty(t, p.splits, p.heads, dtype=torch.float32, device=q.device)
    kernel(qp, kv, idx, out, part, lse)
    return merge_splits_cuda(part, lse, out)


def sparse_mla(
    q: torch.Tensor,
    cache: MLACacheLayer,
    indices: torch.Tensor,
    sm_scale: float,
    *,
    splits: int | None = None,
    tiles: Tiles | None = None,
) -> torch.Tensor:
    """TileLang twin of :func:`dsv.ops.attention.sparse_mla` (bf16/fp16 "float" KV layout).

    Args:
        q: [T, H, R + Dr] absorbed queries (cast to the KV dtype, as FA3 and FlashMLA take them).
        cache: MLA cache in the "float" layout with bf16/fp16 rows.
        indices: [T, K] int global slots, -1 = unused.
        sm_scale: softmax scale.
        splits: split-KV factor (None: chosen from the SM count; see :func:`plan`).
        tiles: tile configuration (None: :data:`DEFAULT_TILES`).

    Returns:
        [T, H, R] in q's dtype; a row without a valid index gives 0.
    """
    check_args(q, cache, indices)
    t, h, _ = q.shape
    r = cache.kv_lora_rank
    if t == 0 or indices.shape[1] == 0:
        return torch.zeros(t, h, r, dtype=q.dtype, device=q.device)
    index = q.device.index if q.device.index is not None else torch.cuda.current_device()
    tiles = tiles or DEFAULT_TILES
    # Q and Out are addressed with int32 offsets (token * heads * width): very long prefill chunks run in
    # pieces that stay below 2^31 elements.
    heads = -(-h // tiles.block_h) * tiles.block_h
    most = _INT32_ELEMENTS // (heads * q.shape[-1])
    if t > most:
        return torch.cat(
            [
                sparse_mla(
                    q[s : s + most], cache, indices[s : s + most], sm_scale, splits=splits, tiles=tiles
                )
                for s in range(0, t, most)
            ]
        )
    p = plan(t, h, indices.shape[1], _sm_count(index), splits, tiles.block_i, tiles.block_h)
    out = _run_kernel(q, cache, indices, sm_scale, p, tiles)
    return out[:, :h].to(q.dtype)


def sparse_mla_decode(
    q: torch.Tensor, cache: MLACacheLayer, indices: torch.Tensor, sm_scale: float
) -> torch.Tensor:
    """``sparse_mla_decode``: one (or a few, for speculative verify) query rows per sequence; split-KV on."""
    return sparse_mla(q, cache, indices, sm_scale)


def sparse_mla_prefill(
    q: torch.Tensor, cache: MLACacheLayer, indices: torch.Tensor, sm_scale: float
) -> torch.Tensor:
    """``sparse_mla_prefill``: the same math over many query rows (the plan picks no splits there)."""
    return sparse_mla(q, cache, indices, sm_scale)
