"""What a compiled grouped GEMM is specialized for, which tiles a call uses, and what the kernel refuses.

Pure Python (no torch, no tilelang): the torch side (:mod:`dsv_cuda.tilelang_moe.moe`), the TileLang program
(:mod:`dsv_cuda.tilelang_moe.kernel`) and the CPU tests all build keys and make the tile choice here.

Layout ("m-grouped contiguous", as DeepGEMM calls it): the routed rows are sorted by expert and each expert's
run is padded to a multiple of ``block_m``, so that every ``block_m``-row tile of A belongs to one expert, named
by a tile map (per tile: the expert, -1 for an unused tile past the last expert's run, skipped by the kernel;
the first tile and length of the expert's run, which set the order the kernels run tiles in, see
:func:`tile_coords`). A and B tiles are then plain rectangles of contiguous tensors, which TileLang loads with
TMA in a warp-specialized pipeline.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

#: FP8 block scaling: weights carry one fp32 scale per 128x128 block, activations one per 1x128 group. The
#: kernel's K step is one scale block, so each step's partial product is scaled once (DeepGEMM's "2xAcc").
SCALE_BLOCK = 128
#: Rows of one wgmma (one warpgroup's share of a tile's rows).
WGMMA_M = 64
#: Threads of one warpgroup.
WARPGROUP = 128
#: Shared memory one sm_90 block may use (227 KB), less 1 KB for the pipeline's barriers.
SMEM_BYTES = 226 * 1024
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
        gate_up_schedule, down_schedule: each GEMM's "auto" (TileLang's automatic pipeline, one tile per
            block) or "persistent" (one block per SM looping over 128 x 128 tiles, promotion overlapping the
            MMAs; see :class:`GemmKey`).

    The defaults (128 x 256 tiles, 4 stages, automatic schedule) were the fastest at 32K routed rows on an H200
    (issue #7's V3.2 shapes); from 48K rows the gate/up GEMM runs the persistent schedule (bf16 / fp16
    outputs); see :func:`tiles_for`.
    """

    block_m: int = 128
    block_n: int = 256
    gate_up_block_n: int = 128
    num_stages: int = 4
    threads: int = 256
    gate_up_schedule: str = "auto"
    down_schedule: str = "auto"


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
    #: "auto": TileLang's automatic warp specialization, one tile per block (:mod:`kernel`); "persistent": one
    #: block per SM looping over tiles, hand-specialized, promotion overlapping the MMAs (:mod:`persistent_kernel`).
    schedule: str = "auto"
    #: Blocks of a persistent launch (the GPU's SM count); 0 for "auto".
    blocks: int = 0

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


def gemm_key(
    n: int, k: int, swiglu: bool, out_dtype: str, tiles: Tiles = DEFAULT_TILES, sms: int = 0
) -> GemmKey:
    """The :class:`GemmKey` of one of the two GEMMs of a call with ``tiles``; ``sms``: the GPU's SM count (the
    block count of a persistent launch; ignored by the "auto" schedule)."""
    schedule = tiles.gate_up_schedule if swiglu else tiles.down_schedule
    return GemmKey(
        n=n,
        k=k,
        swiglu=swiglu,
        out_dtype=out_dtype,
        block_m=tiles.block_m,
        block_n=tiles.gate_up_block_n if swiglu else tiles.block_n,
        num_stages=tiles.num_stages,
        threads=tiles.threads,
        schedule=schedule,
        blocks=sms if schedule == "persistent" else 0,
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
    if key.schedule == "persistent":
        return _persistent_unsupported(key)
    if key.schedule != "auto":
        return f"schedule must be 'auto' or 'persistent', got {key.schedule!r}"
    return ""


def _persistent_unsupported(key: GemmKey) -> str:
    if (key.block_m, key.threads, key.width) != (128, 256, 128):
        return (
            "the persistent schedule takes 128 x 128 tiles over two consumer warpgroups (block_m 128, threads "
            f"256, block_n 128 or 64 for SwiGLU), got block_m {key.block_m}, threads {key.threads}, "
            f"width {key.width}"
        )
    if key.blocks < 1:
        return f"a persistent launch needs its block count (the SM count), got {key.blocks}"
    if key.num_stages < 2:
        # A consumer waits for step k's data before it frees step k - 1's stage: with one stage that deadlocks.
        return f"the persistent schedule needs num_stages >= 2, got {key.num_stages}"
    out_bytes = 2 if key.out_dtype in ("bfloat16", "float16") else 4
    stage = key.block_m * SCALE_BLOCK + key.width * SCALE_BLOCK + key.block_m * 4  # A, B (fp8), A scales
    staging = key.block_m * key.width * out_bytes + (
        key.block_m * key.block_n * out_bytes if key.swiglu else 0
    )
    smem = key.num_stages * stage + staging
    if smem > SMEM_BYTES:
        return (
            f"{key.num_stages} stages and the {key.out_dtype} output staging need {smem} bytes of shared memory, "
            f"more than the {SMEM_BYTES} an sm_90 block may have"
        )
    return ""


#: From this many routed rows on, 128-row tiles: their 128 x 256 tiles read 175 FLOP per byte of shared-memory
#: fill against 105 for 64 x 256, which beats the extra padding (about 64 rows per expert against 32) once
#: experts average 128 rows or more. H200, V3.2 shapes (TFLOPS of the whole op, 64-row / 128-row tiles):
#: 370 / 345 at 16K rows, 484 / 500 at 32K, 566 / 603 at 65K.
LARGE_ROWS = 24576
#: From this many routed rows on, the gate/up GEMM runs the persistent schedule (bf16 / fp16 outputs only:
#: fp32 ones were not measured, and their staging would fill shared memory to the last byte). H200, 65K rows,
#: medians of rounds alternating in one process (backends/cuda/scripts/tilelang_moe_ab.py): the whole op 658
#: TFLOPS against 641 with the automatic schedule for both GEMMs (faster in each of 4 rounds); the gate/up
#: GEMM alone within noise of the automatic one in four leases (766 / 716 / 763 / 726 against 726 / 700 / 756
#: / 747). At 32K rows the GEMM alone measured 562-573 against 544-597, so not there. The down GEMM stays on
#: the automatic schedule (664-686 against 613-643 persistent).
PERSISTENT_GATE_UP_ROWS = 49152


def tiles_for(routed_rows: int, hidden: int = 7168, out_dtype: str = "bfloat16") -> Tiles:
    """Default tiles for ``routed_rows`` (tokens x top-k), the model width ``hidden`` (the down GEMM's N) and
    the output dtype: 128-row tiles from :data:`LARGE_ROWS` rows, 64-row tiles below (less padding per
    expert); 256-wide down tiles where ``hidden`` allows, else 128; the persistent gate/up GEMM (64 h columns
    per tile) from :data:`PERSISTENT_GATE_UP_ROWS` rows."""
    block_n = 256 if hidden % 256 == 0 else SCALE_BLOCK
    block_m = 128 if routed_rows >= LARGE_ROWS else 64
    if routed_rows >= PERSISTENT_GATE_UP_ROWS and out_dtype in ("bfloat16", "float16"):
        return Tiles(
            block_m, block_n, gate_up_block_n=64, num_stages=4, threads=256, gate_up_schedule="persistent"
        )
    return Tiles(block_m=block_m, block_n=block_n, gate_up_block_n=SCALE_BLOCK, num_stages=4, threads=256)


def unroll_steps(k_blocks: int) -> int:
    """K steps per unrolled iteration of the persistent kernel's consumer loop: the largest even divisor of
    ``k_blocks`` up to 16 (one promotion in U waits for its own wgmma instead of overlapping the next one); 1
    for an odd count."""
    return max((u for u in range(2, 17, 2) if k_blocks % u == 0), default=1)


def tile_coords(
    t: Any, n_tiles: int, run_start: Callable[[Any], Any], run_len: Callable[[Any], Any]
) -> tuple[Any, Any]:
    """(M tile, N tile) of the ``t``-th tile a kernel runs; ``run_start(q)`` / ``run_len(q)`` read rows 1 and 2
    of the tile map at M tile ``q``. Plain arithmetic, so the same function serves Python integers (the tests)
    and TileLang expressions (both programs, through :func:`dsv_cuda.tilelang_moe.kernel.tile_of`).

    The M tiles of one expert's run ``[s, s + c)`` own the linear range ``[s * n_tiles, (s + c) * n_tiles)``;
    inside it the run's M tiles go fastest, so the blocks in flight together read the same weight tile (each
    of B's tiles then comes from DRAM about once, where N-fastest order re-read the weights of the experts
    whose runs straddle two waves of blocks)."""
    q = t // n_tiles
    s = run_start(q)
    local = t - s * n_tiles
    return s + local % run_len(q), local // run_len(q)


def padded_rows(routed_rows: int, experts: int, block_m: int) -> int:
    """Rows of the padded layout: a static bound on ``sum(ceil(count_e / block_m) * block_m)`` (the same as
    :func:`dsv.ops.moe.sort_by_expert` returns), so no host sync is needed to size the buffers."""
    return -(-(routed_rows + experts * (block_m - 1)) // block_m) * block_m


def flops(routed_rows: int, inter: int, hidden: int) -> int:
    """Useful FLOPs of the routed experts (three GEMMs of routed_rows x inter x hidden): padding not counted."""
    return 2 * routed_rows * 3 * inter * hidden
