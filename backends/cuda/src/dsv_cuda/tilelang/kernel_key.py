"""What a compiled sparse MLA kernel is specialized for, and which shapes the warp-specialized program takes.

Kept apart from the TileLang programs so that the torch side (:mod:`dsv_cuda.tilelang.sparse_mla`) and the
CPU tests can build keys and make the variant choice without importing ``tilelang``.
"""

from __future__ import annotations

from dataclasses import dataclass

#: The warp-specialized program's producer copies each KV row as 16-byte pieces (8 bf16), 8 threads to a row,
#: so 128 producer threads cover 16 rows per pass.
WS_LANES_PER_ROW = 8
WS_VEC = 8
WS_ROWS_PER_PASS = 128 // WS_LANES_PER_ROW
#: Values per fp32 scale in FlashMLA's FP8 cache rows (dsv.ops.quant.pack_fp8_kv).
FP8_GROUP = 128
#: Scale groups per FP8 row: the producer's dequantizing helper takes one lane's piece of each of the four.
FP8_GROUPS = 4


@dataclass(frozen=True)
class KernelKey:
    """Everything a compiled kernel is specialized for (token and slot counts stay dynamic). The top-k length
    is static: TileLang 0.1.15's software pipeline cannot be generated for a loop of dynamic length (its
    cp.async wait counts must be constants)."""

    heads: int  # padded: a multiple of block_h
    dim: int  # R, the latent width (the output width)
    tail: int  # Dr, the rope width
    topk: int  # padded: a multiple of block_i * splits
    splits: int
    sm_scale: float
    dtype: str  # "bfloat16" / "float16": q and KV
    block_h: int = 64
    block_i: int = 64
    num_stages: int = 2
    threads: int = 256
    #: KV row addressing: "int32" (slot * width < 2^31, the fast common case) or "int64" for larger caches.
    index_dtype: str = "int32"
    #: "simple" (sparse_mla_kernel's program) or "ws" (the warp-specialized program of sparse_mla_ws_kernel:
    #: 384 threads, two KV buffers as its pipeline, no ``num_stages``).
    variant: str = "simple"
    #: KV rows: "half" (the cache's bf16/fp16 "float" layout, ``dtype``) or "fp8" (FlashMLA's 656-byte rows,
    #: dequantized to ``dtype`` by the "ws" producer).
    kv_format: str = "half"


def ws_unsupported(dim: int, tail: int, block_h: int, block_i: int, kv_format: str = "half") -> str:
    """Why the warp-specialized program cannot be built for these widths and tiles ("" when it can).

    Its producer splits the latent columns into two halves of 64-column pieces (one per consumer
    warpgroup's P @ V), copies the rope columns in 64-column pieces, and covers ``block_i`` rows in passes of
    16; one consumer warpgroup holds the scores of 64 heads (the wgmma M). FP8 rows are dequantized a whole
    128-value scale group per 8 lanes, four groups to a row (FlashMLA's 512-value rows)."""
    piece = WS_LANES_PER_ROW * WS_VEC
    if dim % (2 * piece):
        return f"kv_lora_rank must split into two halves of {piece}-column pieces (% {2 * piece}), got {dim}"
    if tail % piece:
        return f"rope_dim must be a multiple of {piece}, got {tail}"
    if block_h != 64:
        return f"block_h must be 64 (one warpgroup's wgmma rows), got {block_h}"
    if block_i % WS_ROWS_PER_PASS:
        return f"block_i must be a multiple of {WS_ROWS_PER_PASS} (rows per producer pass), got {block_i}"
    if kv_format == "fp8" and dim != FP8_GROUPS * FP8_GROUP:
        return (
            f"the FP8 rows must hold {FP8_GROUPS} scale groups of {FP8_GROUP} values (FlashMLA's layout: "
            f"kv_lora_rank {FP8_GROUPS * FP8_GROUP}), got {dim}"
        )
    if kv_format not in ("half", "fp8"):
        return f"unknown KV row format {kv_format!r}"
    return ""
