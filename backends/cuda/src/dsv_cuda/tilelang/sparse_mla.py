"""``sparse_mla_decode`` / ``sparse_mla_prefill`` through dsv's TileLang kernels.

Same arguments and result as :func:`dsv.ops.attention.sparse_mla`. The torch side here does what the
kernels leave to their caller: argument checks, the choice of layout (the bf16/fp16 "float" one; FlashMLA's
FP8 rows on the "ws" kernel, for decode and explicit ``Tiles(variant="ws")``, see :func:`check_args` and
:func:`sparse_mla_decode`), the kernel variant
(:func:`choose_variant`), padding heads to the head block and the top-k list to the index block (-1 entries,
masked in the kernel), the split-KV choice for small batches, and the merge of the splits (one launch of
dsv's Triton merge kernel; :func:`merge_splits` states the same math in torch). Everything here except
:func:`_run_kernel` runs on the CPU, where the tests cover it.

Measured on an H200 (H = 128, top-k 2048, bf16 KV; backends/cuda/scripts/tilelang_check.py, three runs):
"ws" (the default wherever a split has >= 4 blocks) decode B64 86-88 µs in a CUDA graph (simple 123 µs),
B128 163-168 µs (simple 235 µs), B16 44 µs (simple 52 µs), prefill 4K / 16K tokens 410-442 / 432-447 TFLOPS
(simple 325-337 / 320-331). Decode B1 (16 splits of 2 blocks) stays on "simple": 24 µs in a graph vs 26 µs.
Later "ws" figures (benchmarks/kernels.py --graphs, whose top-k lists end in 256 -1 entries; the program's
docstring has the side-by-side comparison): B1 18.0 µs (simple), B16 34.7 µs, B64 67.7 µs, B128 136 µs.
A "seesaw" schedule (the consumers computing the scores of alternate blocks, FlashMLA's) was slower than "ws"
everywhere (B64 107 µs, prefill 416 TFLOPS) and was removed (commit 948bfd0 has it).

FP8 cache (FlashMLA's 656-byte rows), decode, same shapes, 1/8 of the list -1, CUDA graph: "ws" B16 / B64 /
B128 49.6 / 128.0 / 244.1 µs (184 / 285 / 299 TFLOPS) against dsv's Triton kernel's 75.0 / 217.4 / 407.7 µs
in the same run, so the registered decode op runs FP8 rows on "ws"; the calls "auto" keeps off "ws" (splits
of < 4 blocks: batch <= 4 at H = 128, 132 SMs) and a non-bf16/fp16 read-back dtype go to the Triton kernel.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from dsv.backend.interface import KernelUnavailable
from dsv.ops.kv_cache import MLACacheLayer
from dsv_cuda.tilelang.kernel_key import KernelKey, ws_unsupported

HALF = {torch.bfloat16: "bfloat16", torch.float16: "float16"}
BLOCK_H = 64  # heads per thread block: wgmma tiles are 64 rows
BLOCK_I = 64  # gathered KV rows per pipeline step
#: Split-KV factors used (few, so that few kernels get compiled): the largest one that fits is chosen.
#: 2 and 8 serve batches 17-32 and 5-8 at H = 128, whose (token, head block) programs would otherwise fill
#: less than half of an H200's 132 SMs (backends/cuda/scripts/tilelang_splits.py times every factor).
SPLIT_CHOICES = (1, 2, 4, 8, 16)


#: Kernel variants. "simple" (sparse_mla_kernel): one [64, R] accumulator per 256-thread block, TileLang's
#: software pipeline. "ws" (sparse_mla_ws_kernel): a producer warpgroup gathers KV rows for two consumer
#: warpgroups, consumer 0 computing the scores and softmax. "auto" takes the first of
#: :data:`AUTO_ORDER` that can run the shape (see :func:`choose_variant`).
VARIANTS = ("simple", "ws")
AUTO_ORDER = ("ws", "simple")


@dataclass(frozen=True)
class Tiles:
    """Tile configuration of the kernel: KV rows per pipeline step, pipeline depth, threads per block, heads
    per block, and the kernel variant. The simple kernel's defaults were the fastest of a sweep on an H200
    (32-row steps with 2-4 stages, or 1 stage, were 25-40% slower); most 512-thread configurations asked for
    more than the 227 KB of shared memory an sm_90 block can have and failed at launch. The "ws" variant
    uses ``block_i`` and ``block_h`` only (384 threads and its double buffer are fixed)."""

    block_i: int = BLOCK_I
    num_stages: int = 2
    threads: int = 256
    block_h: int = BLOCK_H
    variant: str = "auto"


DEFAULT_TILES = Tiles()


@dataclass(frozen=True)
class Plan:
    """How one call is laid out on the GPU.

    Attributes:
        heads: query heads after padding (a multiple of the head block).
        topk: top-k length after padding with -1 (a multiple of the index block times ``splits``).
        splits: parts the top-k list is split into (split-KV; merged by :func:`merge_splits_cuda`).
        variant: the kernel that runs it (one of :data:`VARIANTS`).
    """

    heads: int
    topk: int
    splits: int
    variant: str = "simple"


#: Q and Out offsets are int32 in the kernel.
_INT32_ELEMENTS = 2**31 - 1


def check_args(q: torch.Tensor, cache: MLACacheLayer, indices: torch.Tensor, fp8_ok: bool = False) -> None:
    """Refuse what the kernel does not do, with the reason and what would work instead. ``fp8_ok``: the
    caller can run the "ws" variant, whose producer also dequantizes FlashMLA's FP8 rows (decode, and an
    explicit ``Tiles(variant="ws")``; the registered prefill op keeps the bf16 layout only)."""
    if cache.layout != "float" and not fp8_ok:
        raise KernelUnavailable(
            "tilelang sparse MLA reads FlashMLA's FP8 656-byte layout for decode only (its 'ws' variant); "
            "for this call use --kv-cache-dtype bf16, or the triton (or flashmla_prefill) kernel"
        )
    # The FP8 layout's rows are bytes, dequantized to the cache's read-back dtype.
    kv_dtype = cache.dtype if cache.layout == "fp8" else cache.storage.dtype
    if kv_dtype not in HALF:
        raise KernelUnavailable(
            f"tilelang sparse MLA reads a bf16/fp16 KV cache; this one holds {kv_dtype} "
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


def variant_unsupported(
    variant: str, r: int, dr: int, block_h: int, block_i: int, kv_format: str = "half"
) -> str:
    """Why ``variant`` cannot run these widths, tiles and KV rows ("" when it can; "simple" takes every bf16
    shape). Only the "ws" producer dequantizes FP8 rows."""
    if variant == "ws":
        return ws_unsupported(r, dr, block_h, block_i, kv_format)
    if kv_format != "half":
        return f"only the 'ws' variant reads the FP8 layout, not {variant!r}"
    return ""


def fp8_auto_unsupported(r: int, dr: int, block_h: int, block_i: int, blocks_per_split: int | None) -> str:
    """Why "auto" cannot serve FlashMLA's FP8 rows here ("" when it runs them on "ws"): only the "ws" producer
    dequantizes them, and "auto" runs "ws" on splits of at least :data:`WS_MIN_BLOCKS` blocks only (decode
    at batch <= 4 and H = 128 on 132 SMs gets 16 splits of 2 blocks; dsv's Triton kernel serves those)."""
    why = ws_unsupported(r, dr, block_h, block_i, "fp8")
    if why:
        return why
    if blocks_per_split is not None and blocks_per_split < WS_MIN_BLOCKS:
        return f"the FP8 rows go through the 'ws' variant, which needs >= {WS_MIN_BLOCKS} blocks per split"
    return ""


#: "auto" runs the simple kernel when a split has fewer 64-row blocks than this: the warp-specialized kernel
#: needs a few blocks to fill its two-buffer pipeline (H200, H = 128, top-k 2048, CUDA graph replay: decode B1
#: = 16 splits of 2 blocks, simple 24 us vs ws 26 us; B16 = 4 splits of 8 blocks, simple 52 us vs ws 44 us).
WS_MIN_BLOCKS = 4


def choose_variant(
    tiles: Tiles, r: int, dr: int, blocks_per_split: int | None = None, kv_format: str = "half"
) -> str:
    """The kernel for ``tiles.variant``. "auto" takes the first of :data:`AUTO_ORDER` that can run these
    widths and tiles, except that splits of fewer than :data:`WS_MIN_BLOCKS` blocks (``blocks_per_split``,
    when given) go to "simple" (a measured, shape-based choice between dsv kernels, not a fallback from a
    failure). FP8 rows (``kv_format == "fp8"``) only go to "ws": "auto" raises where it cannot take them
    (:func:`fp8_auto_unsupported`). Asking for a variant where it cannot run raises
    :class:`KernelUnavailable` with the reason.

    Every variant serves every split factor: each split is a contiguous range of the top-k list and the
    Part / Lse partials are the same. "ws" takes any number of 64-row blocks per split (its buffer index and
    barrier phases follow the block number)."""
    if tiles.variant not in (*VARIANTS, "auto"):
        raise ValueError(f"unknown kernel variant {tiles.variant!r}; use one of {VARIANTS} or 'auto'")
    if tiles.variant != "auto":
        why = variant_unsupported(tiles.variant, r, dr, tiles.block_h, tiles.block_i, kv_format)
        if why:
            raise KernelUnavailable(f"tilelang sparse MLA variant {tiles.variant!r} cannot run here: {why}")
        return tiles.variant
    if kv_format == "fp8":
        why = fp8_auto_unsupported(r, dr, tiles.block_h, tiles.block_i, blocks_per_split)
        if why:
            raise KernelUnavailable(f"tilelang sparse MLA cannot read this FP8 cache here: {why}")
        return "ws"
    if blocks_per_split is not None and blocks_per_split < WS_MIN_BLOCKS:
        return "simple"
    return next(v for v in AUTO_ORDER if not variant_unsupported(v, r, dr, tiles.block_h, tiles.block_i))


def plan(
    tokens: int,
    heads: int,
    topk: int,
    sm_count: int,
    splits: int | None = None,
    block_i: int = BLOCK_I,
    block_h: int = BLOCK_H,
    variant: str = "simple",
) -> Plan:
    """Pad heads and top-k to the kernel's blocks and pick the split-KV factor.

    Splits are used only when the (token, head-block) programs fill less than one wave of the GPU's SMs:
    each split re-reads its queries and writes a [H, R] fp32 partial, a cost that pays off only when SMs
    would otherwise idle. The top-k list is padded with -1 to a multiple of ``block_i * splits``.
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
    return Plan(heads=heads_p, topk=math.ceil(blocks * block_i / step) * step, splits=splits, variant=variant)


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


def kernel_key(
    p: Plan,
    tiles: Tiles,
    r: int,
    dr: int,
    sm_scale: float,
    dtype: str,
    kv_elements: int,
    kv_format: str = "half",
) -> KernelKey:
    """The compiled kernel's :class:`KernelKey` for a plan. Fields the chosen variant does not use are
    normalized, so that they do not multiply its compilations: the "ws" kernel fixes its thread count and
    pipeline. ``kv_elements`` (the cache's) decides 32- or 64-bit row offsets; ``dtype`` is that of
    q and the output (for FP8 rows, the dtype they are dequantized to)."""
    ws = p.variant == "ws"
    return KernelKey(
        heads=p.heads,
        dim=r,
        tail=dr,
        topk=p.topk,
        splits=p.splits,
        sm_scale=sm_scale,
        dtype=dtype,
        block_h=tiles.block_h,
        block_i=tiles.block_i,
        num_stages=0 if ws else tiles.num_stages,
        threads=384 if ws else tiles.threads,
        index_dtype="int64" if kv_elements >= 2**31 else "int32",
        variant=p.variant,
        kv_format=kv_format,
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
    from dsv_cuda.tilelang.sparse_mla_kernel import compiled

    fp8 = cache.layout == "fp8"
    dtype = cache.dtype if fp8 else cache.storage.dtype
    r, dr = cache.kv_lora_rank, cache.rope_dim
    kv = cache.flat.view(torch.float8_e4m3fn) if fp8 else cache.flat
    key = kernel_key(p, tiles, r, dr, float(sm_scale), HALF[dtype], kv.numel(), "fp8" if fp8 else "half")
    kernel = compiled(key)
    t = q.shape[0]
    qp = pad_queries(q, p.heads, dtype)
    idx = pad_indices(indices, p.topk)
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
        cache: MLA cache in the "float" layout with bf16/fp16 rows, or FlashMLA's FP8 layout read back as
            bf16/fp16 (the "ws" variant only: "auto" raises where it would not run "ws").
        indices: [T, K] int global slots, -1 = unused.
        sm_scale: softmax scale.
        splits: split-KV factor (None: chosen from the SM count; see :func:`plan`).
        tiles: tile configuration (None: :data:`DEFAULT_TILES`).

    Returns:
        [T, H, R] in q's dtype; a row without a valid index gives 0.
    """
    tiles = tiles or DEFAULT_TILES
    kv_format = "fp8" if cache.layout == "fp8" else "half"
    check_args(q, cache, indices, fp8_ok=tiles.variant in ("ws", "auto"))
    t, h, _ = q.shape
    r = cache.kv_lora_rank
    if t == 0 or indices.shape[1] == 0:
        return torch.zeros(t, h, r, dtype=q.dtype, device=q.device)
    index = q.device.index if q.device.index is not None else torch.cuda.current_device()
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
    sms = _sm_count(index)
    p = plan(t, h, indices.shape[1], sms, splits, tiles.block_i, tiles.block_h)
    variant = choose_variant(tiles, r, cache.rope_dim, p.topk // (tiles.block_i * p.splits), kv_format)
    if variant != p.variant:
        p = plan(t, h, indices.shape[1], sms, splits, tiles.block_i, tiles.block_h, variant)
    out = _run_kernel(q, cache, indices, sm_scale, p, tiles)
    return out[:, :h].to(q.dtype)


def ws_reads_fp8(q: torch.Tensor, cache: MLACacheLayer, indices: torch.Tensor) -> bool:
    """Whether the default tiles run this FP8-cache call on the "ws" kernel (the plan :func:`sparse_mla`
    would make): a bf16/fp16 read-back dtype and splits of at least :data:`WS_MIN_BLOCKS` blocks."""
    if cache.dtype not in HALF:
        return False
    t, h, _ = q.shape
    if t == 0 or indices.shape[1] == 0:
        return True  # zeros, no kernel
    index = q.device.index if q.device.index is not None else torch.cuda.current_device()
    p = plan(t, h, indices.shape[1], _sm_count(index), None, BLOCK_I, BLOCK_H)
    blocks = p.topk // (BLOCK_I * p.splits)
    return not fp8_auto_unsupported(cache.kv_lora_rank, cache.rope_dim, BLOCK_H, BLOCK_I, blocks)


def sparse_mla_decode(
    q: torch.Tensor, cache: MLACacheLayer, indices: torch.Tensor, sm_scale: float
) -> torch.Tensor:
    """``sparse_mla_decode``: one (or a few, for speculative verify) query rows per sequence; split-KV on.

    FlashMLA's FP8 cache goes to the "ws" kernel, whose producer dequantizes the rows (H200, H = 128, top-k
    2048, CUDA graph: see the module docstring); the calls it does not take (splits of < 4 blocks: batch
    <= 4 at H = 128 on 132 SMs) run dsv's Triton kernel, which reads the same rows."""
    if cache.layout == "fp8" and q.is_cuda and not ws_reads_fp8(q, cache, indices):
        from dsv.kernels.triton.sparse_mla import sparse_mla as triton_sparse_mla

        return triton_sparse_mla(q, cache, indices, sm_scale)
    return sparse_mla(q, cache, indices, sm_scale)


def sparse_mla_prefill(
    q: torch.Tensor, cache: MLACacheLayer, indices: torch.Tensor, sm_scale: float
) -> torch.Tensor:
    """``sparse_mla_prefill``: the same math over many query rows (the plan picks no splits there). The
    registered prefill op reads the bf16 layout only (the FP8 rows were not measured against the prefill
    kernels)."""
    check_args(q, cache, indices)
    return sparse_mla(q, cache, indices, sm_scale)
