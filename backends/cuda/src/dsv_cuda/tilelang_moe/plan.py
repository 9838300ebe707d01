"""What a compiled grouped GEMM is specialized for, which tiles a call uses, and what the kernel refuses.

Pure Python (no torch, no tilelang): the torch side (:mod:`dsv_cuda.tilelang_moe.moe`), the TileLang program
(:mod:`dsv_cuda.tilelang_moe.kernel`) and the CPU tests all build keys and make the tile choice here.

Layout ("m-grouped contiguous", as DeepGEMM calls it): the routed rows are sorted by expert and each expert's
run is padded to a multiple of ``block_m``, so that every ``block_m``-row tile of A belongs to one expert, named
by a per-tile expert id (-1: an unused tile past the last expert's run, skipped by the kernel). A and B tiles
are then plain rectangles of contiguous tensors, which TileLang loads with TMA in a warp-specialized pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass

#: FP8 block scaling: weights carry one fp32 scale per 128x128 block, activations one per 1x128 group. The
#: kernel's K step is one scale block, so each step's partial product is scaled once (DeepGEMM's "2xAcc").
SCALE_BLOCK = 128
#: Rows of one wgmma (one warpgroup's share of a tile's rows).
WGMMA_M = 64
#: Threads of one warpgroup.
WARPGROUP = 128
#: TileLang names of the output dtypes (x's dtype).
OUT_DTYPES = ("bfloat16", "float16", "float32")


@dataclass(frozen=True)
class Tiles:
    """Tile configuration of the two grouped GEMMs.

    Attributes:
        block_m: rows per tile (and the padding of each expert's run): 64 or 128.
        block_n: output columns per tile of the down GEMM (a divisor of 128, or 256).
        gate_up_block_n: h columns per tile of the gate/up GEMM (a divisor of 128); the tile holds that many
            gate and as many up columns, side by side in one accumulator.
        num_stages: shared-memory pipeline depth (TMA loads in flight ahead of the MMAs).
        threads: consumer threads per block, 128 or 256 (one or two warpgroups; they split the tile's rows
            when it has 64 per warpgroup, else its columns); TileLang's warp specialization adds one producer
            warpgroup.

    The defaults (128 x 256 tiles, 4 stages) were the fastest at 32K and 65K routed rows on an H200 (issue #7's
    V3.2 shapes); see :func:`tiles_for`.
    """

    block_m: int = 128
    block_n: int = 256
    gate_up_block_n: int = 128
    num_stages: int = 4
    threads: int = 256


DEFAULT_TILES = Tiles()


@dataclass(frozen=True)
class GemmKey:
    """Everything one compiled grouped GEMM is specialized for (row and expert counts stay dynamic).

    ``swiglu``: B is the gate weight and B2 the up weight; each tile computes ``block_n`` gate and ``block_n``
    up columns and writes ``silu(gate) * up`` ([rows, n]); otherwise the tile writes ``A @ B[e]^T``.
    """

    n: int  # output features of one weight (inter for gate/up, hidden for down)
    k: int  # reduction width
    swiglu: bool
    out_dtype: str  # "bfloat16" / "float16" / "float32": x's dtype, the rounding of every output
    block_m: int = 128
    block_n: int = 128
    num_stages: int = 4
    threads: int = 256

    @property
    def width(self) -> int:
        """Columns of the tile's accumulator (gate and up side by side for SwiGLU)."""
        return 2 * self.block_n if self.swiglu else self.block_n

    @property
    def chunk(self) -> int:
        """Columns per MMA into the partial accumulator: 128-wide halves of a 256-wide tile whose warpgroups
        split the rows (a whole 256-wide partial would not fit in registers beside the total), else the tile."""
        return SCALE_BLOCK if self.split_rows and self.width > SCALE_BLOCK else self.width

    @property
    def split_rows(self) -> bool:
        """Whether the consumer warpgroups split the tile's rows (64 each) rather than its columns."""
        return self.block_m >= WGMMA_M * (self.threads // WARPGROUP)


def gemm_key(n: int, k: int, swiglu: bool, out_dtype: str, tiles: Tiles = DEFAULT_TILES) -> GemmKey:
    """The :class:`GemmKey` of one of the two GEMMs of a call with ``tiles``."""
    return GemmKey(
        n=n,
        k=k,
        swiglu=swiglu,
        out_dtype=out_dtype,
        block_m=tiles.block_m,
        block_n=tiles.gate_up_block_n if swiglu else tiles.block_n,
        num_stages=tiles.num_stages,
        threads=tiles.threads,
    )


def key_unsupported(key: GemmKey) -> str:
    """Why the program cannot be built for ``key`` ("" when it can)."""
    if key.out_dtype not in OUT_DTYPES:
        return f"output dtype must be one of {OUT_DTYPES}, got {key.out_dtype}"
    if key.k % SCALE_BLOCK or key.n % SCALE_BLOCK:
        return f"N and K must be multiples of {SCALE_BLOCK} (whole scale blocks), got N={key.n}, K={key.k}"
    if key.block_m not in (64, 128):
        return f"block_m must be 64 or 128, got {key.block_m}"
    if key.threads % WARPGROUP or not 1 <= key.threads // WARPGROUP <= 2:
        return f"threads must be 128 or 256 (one or two consumer warpgroups), got {key.threads}"
    if key.block_n not in (16, 32, 64, 128) and not (key.block_n == 256 and not key.swiglu):
        # A tile must lie in one 128-wide weight-scale block (or span exactly two for 256-wide down tiles).
        return f"block_n must divide {SCALE_BLOCK} (or be 256 for the down GEMM), got {key.block_n}"
    if key.n % key.block_n:
        return f"N={key.n} must be a multiple of block_n={key.block_n}"
    groups = key.threads // WARPGROUP
    if not key.split_rows and key.width % (groups * 8):
        return f"a {key.width}-column tile does not split over {groups} warpgroups"
    if key.num_stages < 1:
        return f"num_stages must be >= 1, got {key.num_stages}"
    return ""


#: From this many routed rows on, 128-row tiles: their 128 x 256 tiles read 175 FLOP per byte of shared-memory
#: fill against 105 for 64 x 256, which beats the extra padding (about 64 rows per expert against 32) once
#: experts average 128 rows or more. H200, V3.2 shapes (TFLOPS of the whole op, 64-row / 128-row tiles):
#: 370 / 345 at 16K rows, 484 / 500 at 32K, 566 / 603 at 65K.
LARGE_ROWS = 24576


def tiles_for(routed_rows: int, hidden: int = 7168) -> Tiles:
    """Default tiles for ``routed_rows`` (tokens x top-k) and the model width ``hidden`` (the down GEMM's N):
    128-row tiles from :data:`LARGE_ROWS` rows, 64-row tiles below (less padding per expert); 256-wide down
    tiles where ``hidden`` allows, else 128."""
    block_n = 256 if hidden % 256 == 0 else SCALE_BLOCK
    block_m = 128 if routed_rows >= LARGE_ROWS else 64
    return Tiles(block_m=block_m, block_n=block_n, gate_up_block_n=SCALE_BLOCK, num_stages=4, threads=256)


def padded_rows(routed_rows: int, experts: int, block_m: int) -> int:
    """Rows of the padded layout: a static bound on ``sum(ceil(count_e / block_m) * block_m)`` (the same as
    :func:`dsv.ops.moe.sort_by_expert` returns), so no host sync is needed to size the buffers."""
    return -(-(routed_rows + experts * (block_m - 1)) // block_m) * block_m


def flops(routed_rows: int, inter: int, hidden: int) -> int:
    """Useful FLOPs of the routed experts (three GEMMs of routed_rows x inter x hidden): padding not counted."""
    return 2 * routed_rows * 3 * inter * hidden
