"""The TileLang program of the m-grouped contiguous FP8 GEMM (imported only when a kernel is first compiled).

One thread block computes a ``block_m`` x ``block_n`` output tile of the rows of one expert: per 128-wide K
step it loads the A tile, the expert's B tile (and, for SwiGLU, the up weight's B tile under it) and the A
rows' activation scales with TMA, runs the FP8 wgmma GEMM into a fresh fp32 accumulator (as two 128-wide
halves for a 128 x 256 tile, which leaves room in the registers for the total), and adds that partial
times ``a_scale[row] * b_scale[expert, n block]`` into a second fp32 accumulator: the scales change every K
step, so they cannot be applied once at the end, and folding them into the MMA operands would need a second
quantization. TileLang's automatic warp specialization gives the loads a producer warpgroup and overlaps them
with the MMAs of the consumer warpgroups through a ``num_stages``-deep ring of shared buffers.

Epilogue (every output rounded to the output dtype, x's, as the reference rounds each linear's output):
plain GEMM: the rounded tile is stored with TMA. SwiGLU: gate and up are rounded, ``silu(gate) * up`` is
rounded again and stored; the per-1x128 quantization of h for the down GEMM is a separate pass.

Numerics are DeepGEMM's: the tensor core sums the four 32-deep FP8 products of a K step in its own reduced
precision before the fp32 promotion (dsv's Triton kernel promotes after every 32-deep product). Each GEMM
stays within 2e-3 of max |out| of the exact fp32 math (:func:`dsv_cuda.tilelang_moe.moe.emulate_gemm`,
H200); the whole op within ~1% of max |ref| of the reference, because a product that lands an e4m3
requantization of h one step away (2^-3 of that element) shows in the down GEMM's output.
"""

# No ``from __future__ import annotations`` here: TileLang evaluates the T.Tensor annotations of the
# prim_func, which refer to this builder's local variables (string annotations would not resolve).
import concurrent.futures
import threading
from typing import Any

import tilelang
import tilelang.language as T

from dsv_cuda.tilelang_moe.plan import SCALE_BLOCK, GemmKey, key_unsupported, tile_coords

FP8 = "float8_e4m3fn"
ACC = "float32"


def _dynamic(name: str, dtype: str = "int32") -> Any:
    # T.dynamic replaced T.symbolic in newer TileLang releases; accept both.
    make = getattr(T, "dynamic", None) or T.symbolic
    return make(name, dtype)


def tile_of(tile_map: Any, t: Any, n_tiles: int) -> tuple[Any, Any]:
    """(M tile, N tile) of the ``t``-th tile: :func:`~dsv_cuda.tilelang_moe.plan.tile_coords` over a TileMap
    buffer [3, tiles] (both programs run their tiles in this order)."""
    return tile_coords(t, n_tiles, lambda q: tile_map[1, q], lambda q: tile_map[2, q])


def build_program(key: GemmKey) -> Any:
    """The ``T.prim_func`` for ``key``.

    Arguments: A [rows, K] e4m3 (rows sorted by expert, runs padded to ``block_m``); SA [K/128, rows] fp32
    activation scales, K-block major so one step's scales of a tile are contiguous (one TMA load); B and B2
    [E, N, K] e4m3 with SB and SB2 [E, N/128, K/128] fp32 (B2/SB2 are the up weight for SwiGLU, unused
    otherwise); TileMap [3, tiles] int32, per ``block_m``-row tile its expert (-1: unused tile, skipped), the
    first tile and the length of its expert's run (:func:`dsv_cuda.tilelang_moe.plan.tile_coords`);
    C [rows, N] in the output dtype.
    """
    why = key_unsupported(key)
    if why:
        raise ValueError(f"cannot build the grouped GEMM for {key}: {why}")
    rows = _dynamic("rows")
    tiles = _dynamic("tiles")
    E = _dynamic("experts")  # dynamic: one compiled kernel serves every expert count
    BM, BN, BK = key.block_m, key.block_n, SCALE_BLOCK
    N, K = key.n, key.k
    W = key.width
    KB, NB = K // BK, N // SCALE_BLOCK
    NT = N // BN
    out = key.out_dtype
    swiglu = key.swiglu
    # Columns [0, 128) and [128, 256) of a 256-wide plain tile use two weight-scale blocks; a SwiGLU tile's
    # gate half uses SB and its up half SB2; every other tile lies in one scale block.
    split = BN if swiglu else SCALE_BLOCK
    policy = T.GemmWarpPolicy.FullRow if key.split_rows else T.GemmWarpPolicy.FullCol
    # A 256-wide tile whose warpgroups split its rows is multiplied as two 128-wide halves into one partial
    # accumulator: each warpgroup then holds 64 registers of partial and 128 of total per thread (a single
    # 256-wide partial would need 256). Each half lies in one weight-scale block.
    PN = key.chunk
    halves = W // PN

    @T.prim_func
    def grouped_gemm(
        A: T.Tensor((rows, K), FP8),  # type: ignore[valid-type]
        SA: T.Tensor((KB, rows), ACC),  # type: ignore[valid-type]
        B: T.Tensor((E, N, K), FP8),  # type: ignore[valid-type]
        SB: T.Tensor((E, NB, KB), ACC),  # type: ignore[valid-type]
        B2: T.Tensor((E, N, K), FP8),  # type: ignore[valid-type]
        SB2: T.Tensor((E, NB, KB), ACC),  # type: ignore[valid-type]
        TileMap: T.Tensor((3, tiles), "int32"),  # type: ignore[valid-type]
        C: T.Tensor((rows, N), out),  # type: ignore[valid-type]
    ):
        with T.Kernel(N // BN, T.ceildiv(rows, BM), threads=key.threads) as (bx, by):
            a_s = T.alloc_shared((BM, BK), FP8)
            b_s = T.alloc_shared((W, BK), FP8)
            sa_s = T.alloc_shared((BM,), ACC)
            c_s = T.alloc_shared((BM, W), out)
            part = T.alloc_fragment((BM, PN), ACC)
            # The total of a two-half tile is two fragments of the partial's shape, so that each one gets the
            # partial's (wgmma) layout; one [BM, 256] fragment would need a layout of its own.
            total = T.alloc_fragment((BM, PN), ACC)
            if halves == 2:
                total_hi = T.alloc_fragment((BM, PN), ACC)
                T.clear(total_hi)

            # Block (bx, by) runs the (by * NT + bx)-th tile of plan.tile_coords' order.
            mt, nt = tile_of(TileMap, by * NT + bx, NT)
            e = TileMap[0, mt]
            m0 = mt * BM
            n0 = nt * BN
            T.clear(part)
            T.clear(total)
            # An unused tile (past the last expert's padded run) runs no K step and stores only zeros into
            # padding rows, which nothing reads: the grid is sized by a static bound on the padded rows.
            steps = T.if_then_else(e >= 0, KB, 0)
            for k in T.Pipelined(steps, num_stages=key.num_stages):
                T.copy(A[m0 : m0 + BM, k * BK : (k + 1) * BK], a_s)
                if swiglu:
                    T.copy(B[e, n0 : n0 + BN, k * BK : (k + 1) * BK], b_s[0:BN, :])
                    T.copy(B2[e, n0 : n0 + BN, k * BK : (k + 1) * BK], b_s[BN : 2 * BN, :])
                else:
                    T.copy(B[e, n0 : n0 + BN, k * BK : (k + 1) * BK], b_s)
                T.copy(SA[k, m0 : m0 + BM], sa_s)
                if swiglu:
                    s_lo = SB[e, n0 // SCALE_BLOCK, k]
                    s_hi = SB2[e, n0 // SCALE_BLOCK, k]
                else:
                    s_lo = SB[e, n0 // SCALE_BLOCK, k]
                    s_hi = SB[e, T.min(n0 // SCALE_BLOCK + 1, NB - 1), k]
                if halves == 1:
                    T.gemm(a_s, b_s, part, transpose_B=True, clear_accum=True, policy=policy)
                    # One FFMA per element: the row and column scales are multiplied first.
                    for i, j in T.Parallel(BM, W):
                        total[i, j] += part[i, j] * (sa_s[i] * T.if_then_else(j < split, s_lo, s_hi))
                else:
                    T.gemm(a_s, b_s[0:PN, :], part, transpose_B=True, clear_accum=True, policy=policy)
                    for i, j in T.Parallel(BM, PN):
                        total[i, j] += part[i, j] * (sa_s[i] * s_lo)
                    T.gemm(a_s, b_s[PN:W, :], part, transpose_B=True, clear_accum=True, policy=policy)
                    for i, j in T.Parallel(BM, PN):
                        total_hi[i, j] += part[i, j] * (sa_s[i] * s_hi)

            # Round to the output dtype through shared memory (also the staging buffer of the TMA store).
            if halves == 1:
                T.copy(total, c_s)
            else:
                T.copy(total, c_s[:, 0:PN])
                T.copy(total_hi, c_s[:, PN:W])
            if swiglu:
                h_s = T.alloc_shared((BM, BN), out)
                for i, j in T.Parallel(BM, BN):
                    g = T.cast(c_s[i, j], ACC)
                    h_s[i, j] = T.cast(g / (1.0 + T.exp(-g)) * T.cast(c_s[i, j + BN], ACC), out)
                T.copy(h_s, C[m0 : m0 + BM, n0 : n0 + BN])
            else:
                T.copy(c_s, C[m0 : m0 + BM, n0 : n0 + BN])

    return grouped_gemm


_COMPILED: dict[GemmKey, Any] = {}
_LOCK = threading.Lock()


def compiled(key: GemmKey) -> Any:
    """The compiled kernel for ``key`` (compiled once per process and key; TileLang also caches on disk)."""
    kernel = _COMPILED.get(key)
    if kernel is None:
        if key.schedule == "persistent":
            from dsv_cuda.tilelang_moe import persistent_kernel

            program, configs = persistent_kernel.build_program(key), persistent_kernel.PASS_CONFIGS
        else:
            program, configs = build_program(key), None
        kernel = tilelang.compile(program, target="cuda", pass_configs=configs)
        with _LOCK:
            kernel = _COMPILED.setdefault(key, kernel)
    return kernel


def precompile(keys: list[GemmKey], workers: int = 8) -> dict[GemmKey, str]:
    """Compile ``keys`` in threads (TileLang's lowering releases the GIL and nvcc runs as a subprocess: a first
    call that needs both GEMMs of several tile configs waits for the slowest compile, not for their sum).

    Returns the error of each key that failed ("" for the others)."""
    todo = [k for k in dict.fromkeys(keys) if k not in _COMPILED]

    def one(key: GemmKey) -> str:
        try:
            compiled(key)
        except Exception as exc:  # reported per key: one bad tile config must not hide the others
            return f"{type(exc).__name__}: {exc}"
        return ""

    errors = {k: "" for k in keys}
    if todo:
        with concurrent.futures.ThreadPoolExecutor(min(workers, len(todo))) as pool:
            errors.update(zip(todo, pool.map(one, todo)))
    return errors
