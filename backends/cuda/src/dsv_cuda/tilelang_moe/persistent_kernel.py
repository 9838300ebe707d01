"""The persistent, hand warp-specialized TileLang program of the m-grouped FP8 GEMM (``GemmKey.schedule ==
"persistent"``; imported only when a kernel is first compiled).

Same arguments and results as :mod:`dsv_cuda.tilelang_moe.kernel`'s program; what differs is the schedule:

* One block per SM loops over the output tiles (tile ``t`` of block ``b`` for ``t = b, b + G, ...``, in the
  order of :func:`dsv_cuda.tilelang_moe.plan.tile_coords`: an expert's M tiles side by side, so the blocks in
  flight share each weight tile in L2).
  The producer runs ahead into the next tile while the consumers finish the last one, so the pipeline never
  drains between tiles.
* 384 threads: warpgroup 2 is the producer (24 registers), which issues each K step's TMA loads (A tile, B
  tile(s), the A rows' scales) onto the stage's "full" mbarrier; warpgroups 0 and 1 are consumers (240
  registers) and take rows 0-63 and 64-127 of the 128-row tile.
* Each consumer keeps two partial accumulators: it issues step k's wgmma into one and, while the tensor core
  runs it, scales step k - 1's partial by ``a_scale[row] * b_scale`` into the fp32 total and releases that
  step's stage. The promotion that DeepGEMM's numerics need per 128-wide K step thus overlaps the MMAs instead
  of following them (the automatic pipeline of :mod:`kernel` waits for each wgmma before promoting).

Tiles are 128 x 128: a consumer holds 64 (total) + 2 x 64 (partials) fp32 registers per thread. For SwiGLU
the 128 columns are 64 gate and 64 up columns (``block_n`` 64 of h). Numerics are those of :mod:`kernel`:
the outputs are bit-identical to its (checked on the H200 at 65K rows).

ptxas serializes every wgmma of a kernel (warning C7514) when a wgmma is still in flight across a loop's back
edge, so the consumers' K loop is unrolled :func:`~dsv_cuda.tilelang_moe.plan.unroll_steps` steps at a time
and each iteration drains its last step (one promotion in 14 or 16 waits for its own wgmma).

Measured on the H200 (V3.2's experts at 65K routed rows, backends/cuda/scripts/tilelang_moe_ab.py, rounds
alternating in one process; the GPU sits at its power cap, 600-670 W and 1.26-1.9 GHz, so single runs vary by
up to 15%): the gate/up GEMM within noise of :mod:`kernel`'s 128 x 256 tiles (716-766 against 700-756 TFLOPS
in four leases), the down GEMM slower (613-643 against 664-686); the whole op with this gate/up GEMM 658
against 641 (see :data:`~dsv_cuda.tilelang_moe.plan.PERSISTENT_GATE_UP_ROWS`, from which it serves the
gate/up GEMM). Under Nsight Compute's locked clocks its gate/up GEMM took 4.96 ms against 5.81, at 82% of L2
bandwidth. Tried and dropped: a consumer whose 64 rows
of a tile are all padding skipping its MMAs (the last tile of about half the experts) made the gate/up GEMM
slower, 558-612 TFLOPS against 716-766, whether the skipping warpgroup ran ahead or waited for its partner
at every step.
"""

# No ``from __future__ import annotations`` here: TileLang evaluates the T.Tensor annotations of the
# prim_func, which refer to this builder's local variables (string annotations would not resolve).
from typing import Any, NamedTuple

import tilelang
import tilelang.language as T
from tilelang.layout import make_swizzled_layout

from dsv_cuda.tilelang_moe.kernel import ACC, FP8, _dynamic, tile_of
from dsv_cuda.tilelang_moe.plan import SCALE_BLOCK, GemmKey, key_unsupported, unroll_steps

PASS_CONFIGS = {tilelang.PassConfigKey.TL_DISABLE_WARP_SPECIALIZED: True}
#: Registers per thread after ``setmaxnreg``: 2 x 128 x 240 + 128 x 24 fits the 64K register file.
NREG_CONSUMER, NREG_PRODUCER = 240, 24
#: Rows of one consumer warpgroup's share of a tile (one wgmma's M).
ROWS = 64
#: The epilogue's stores: plain 16-byte stores of each warpgroup's own 64 rows (a TMA store needs the
#: whole swizzled tile).
_NO_TMA = {"disable_tma": True}


class _Block(NamedTuple):
    """What the consumer macros share within one block: its index, shared buffers, barriers, per-thread
    registers and the kernel's tensors (one argument instead of fifteen)."""

    bid: Any
    a_s: Any
    b_s: Any
    sa_s: Any
    c_s: Any
    h_s: Any
    full: Any
    empty: Any
    cnt: Any
    ev: Any
    scl: Any
    C: Any
    TileMap: Any
    SB: Any
    SB2: Any


def build_program(key: GemmKey) -> Any:
    """The ``T.prim_func`` for ``key`` (``key.schedule == "persistent"``); arguments as in :mod:`kernel`."""
    why = key_unsupported(key)
    if why:
        raise ValueError(f"cannot build the grouped GEMM for {key}: {why}")
    rows = _dynamic("rows")
    tiles = _dynamic("tiles")
    E = _dynamic("experts")
    BM, BN, BK = key.block_m, key.block_n, SCALE_BLOCK
    N, K = key.n, key.k
    W = key.width  # 128: the plain tile, or 64 gate + 64 up columns
    KB, NB = K // BK, N // SCALE_BLOCK
    NT = N // BN  # tiles per row of tiles
    S = key.num_stages
    G = key.blocks
    out = key.out_dtype
    swiglu = key.swiglu
    split = BN if swiglu else W
    U = unroll_steps(KB)

    @T.macro
    def load_tile(t, ev, TileMap):
        """ev = (expert, M tile, first column) of the t-th tile (:func:`kernel.tile_of`), computed once per
        tile into registers (the runtime divisions would otherwise be repeated at every use)."""
        mt, nt = tile_of(TileMap, t, NT)
        ev[1] = mt
        ev[2] = nt * BN
        ev[0] = TileMap[0, ev[1]]

    @T.macro
    def promote(total, part, sa_s, stage, r0, scl, slot):
        """total += part * (a_scale[row] * b_scale): one finished K step of this warpgroup's rows."""
        for i, j in T.Parallel(ROWS, W):
            total[i, j] += part[i, j] * (
                sa_s[stage, r0 + i] * T.if_then_else(j < split, scl[slot], scl[slot + 1])
            )

    @T.macro
    def mma_step(b, k, prev, part, other, mine, theirs, total, r0):
        """Issue K step k's wgmma into ``part``; if ``prev`` (step k - 1's wgmma, into ``other``, is in flight),
        promote step k - 1 once it has finished and free its stage. ``mine`` / ``theirs``: the slots of the
        two partials' weight scales in ``b.scl``; ``b``: the block's :class:`_Block`."""
        a_s, b_s, sa_s, full, empty, cnt, scl = b.a_s, b.b_s, b.sa_s, b.full, b.empty, b.cnt, b.scl
        e, n0 = b.ev[0], b.ev[2]
        c = cnt[0] + k
        s = c % S
        scl[mine] = b.SB[e, n0 // SCALE_BLOCK, k]
        if swiglu:
            scl[mine + 1] = b.SB2[e, n0 // SCALE_BLOCK, k]
        else:
            scl[mine + 1] = scl[mine]
        T.barrier_wait(full[s], (c // S) % 2)
        T.wgmma_gemm(a_s[s, r0 : r0 + ROWS, :], b_s[s, :, :], part, transpose_B=True, clear_accum=True)
        T.wait_wgmma(1)
        if prev:
            ps = (c + S - 1) % S
            promote(total, other, sa_s, ps, r0, scl, theirs)
            T.barrier_arrive(empty[ps])

    @T.macro
    def consumer(b, r0, total, p0, p1):
        """One consumer warpgroup: rows r0 .. r0 + 63 of every tile of block ``b`` (a :class:`_Block`)."""
        T.set_max_nreg(NREG_CONSUMER, 1)
        total_tiles = T.ceildiv(rows, BM) * NT
        for it in T.serial(T.ceildiv(total_tiles, G)):
            t = b.bid + it * G
            if t < total_tiles:
                load_tile(t, b.ev, b.TileMap)
                e, mt, n0 = b.ev[0], b.ev[1], b.ev[2]
                steps = T.if_then_else(e >= 0, KB, 0)
                T.clear(total)
                # U steps per iteration, unrolled: ptxas serializes every wgmma of the kernel when one is
                # still in flight across a loop's back edge, so each iteration drains its last step.
                for kb in T.serial(steps // U):
                    if U == 1:
                        # An odd number of K steps (U == 1): no overlap, each step waits for its own wgmma.
                        mma_step(b, kb, False, p0, p1, 0, 2, total, r0)
                    else:
                        for j in T.unroll(U // 2, explicit=True):
                            mma_step(b, kb * U + j * 2, j > 0, p0, p1, 0, 2, total, r0)
                            mma_step(b, kb * U + j * 2 + 1, True, p1, p0, 2, 0, total, r0)
                    T.wait_wgmma(0)
                    ls = (b.cnt[0] + kb * U + U - 1) % S
                    promote(total, p0 if U == 1 else p1, b.sa_s, ls, r0, b.scl, 0 if U == 1 else 2)
                    T.barrier_arrive(b.empty[ls])
                b.cnt[0] = b.cnt[0] + steps
                # Epilogue: round through shared memory and store this warpgroup's 64 rows.
                c_s, h_s, C = b.c_s, b.h_s, b.C
                T.copy(total, c_s[r0 : r0 + ROWS, :])
                m0 = mt * BM + r0
                if swiglu:
                    for i, j in T.Parallel(ROWS, BN):
                        g = T.cast(c_s[r0 + i, j], ACC)
                        h_s[r0 + i, j] = T.cast(g / (1.0 + T.exp(-g)) * T.cast(c_s[r0 + i, j + BN], ACC), out)
                    T.copy(h_s[r0 : r0 + ROWS, :], C[m0 : m0 + ROWS, n0 : n0 + BN], annotations=_NO_TMA)
                else:
                    T.copy(c_s[r0 : r0 + ROWS, :], C[m0 : m0 + ROWS, n0 : n0 + BN], annotations=_NO_TMA)

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
        with T.Kernel(G, threads=384) as bid:
            a_s = T.alloc_shared((S, BM, BK), FP8)
            b_s = T.alloc_shared((S, W, BK), FP8)
            sa_s = T.alloc_shared((S, BM), ACC)
            c_s = T.alloc_shared((BM, W), out)
            h_s = T.alloc_shared((BM, BN), out) if swiglu else None
            # full: the producer's 128 threads arrive (one of them with the TMA byte count); empty: both
            # consumers' 256 threads.
            full = T.alloc_barrier([128] * S)
            empty = T.alloc_barrier([256] * S)
            total0 = T.alloc_fragment((ROWS, W), ACC)
            p00 = T.alloc_fragment((ROWS, W), ACC)
            p01 = T.alloc_fragment((ROWS, W), ACC)
            total1 = T.alloc_fragment((ROWS, W), ACC)
            p10 = T.alloc_fragment((ROWS, W), ACC)
            p11 = T.alloc_fragment((ROWS, W), ACC)
            cnt = T.alloc_local((1,), "int32")  # K steps this thread's role has run: stage and parity
            ev = T.alloc_local((3,), "int32")  # the tile's expert, M tile and first column
            scl = T.alloc_local((4,), ACC)  # (gate/lo, up/hi) weight scales of the two partials
            # 128-byte swizzled staging of the outputs: the wgmma fragment's rows then hit distinct banks.
            T.annotate_layout({c_s: make_swizzled_layout(c_s)})
            if swiglu:
                T.annotate_layout({h_s: make_swizzled_layout(h_s)})
            tx = T.get_thread_binding()
            cnt[0] = 0
            blk = _Block(bid, a_s, b_s, sa_s, c_s, h_s, full, empty, cnt, ev, scl, C, TileMap, SB, SB2)
            if tx < 128:
                consumer(blk, 0, total0, p00, p01)
            elif tx < 256:
                consumer(blk, ROWS, total1, p10, p11)
            else:
                T.set_max_nreg(NREG_PRODUCER, 0)
                total_tiles = T.ceildiv(rows, BM) * NT
                for it in T.serial(T.ceildiv(total_tiles, G)):
                    t = bid + it * G
                    if t < total_tiles:
                        load_tile(t, ev, TileMap)
                        e, m0, n0 = ev[0], ev[1] * BM, ev[2]
                        if e >= 0:
                            for k in T.serial(KB):
                                c = cnt[0] + k
                                s = c % S
                                # A fresh barrier counts as having completed the phase before its first.
                                T.barrier_wait(empty[s], (c // S) % 2 ^ 1)
                                T.tma_copy(
                                    A[m0 : m0 + BM, k * BK : (k + 1) * BK], a_s[s, :, :], barrier=full[s]
                                )
                                if swiglu:
                                    T.tma_copy(
                                        B[e, n0 : n0 + BN, k * BK : (k + 1) * BK],
                                        b_s[s, 0:BN, :],
                                        barrier=full[s],
                                    )
                                    T.tma_copy(
                                        B2[e, n0 : n0 + BN, k * BK : (k + 1) * BK],
                                        b_s[s, BN:W, :],
                                        barrier=full[s],
                                    )
                                else:
                                    T.tma_copy(
                                        B[e, n0 : n0 + BN, k * BK : (k + 1) * BK],
                                        b_s[s, :, :],
                                        barrier=full[s],
                                    )
                                T.tma_copy(SA[k, m0 : m0 + BM], sa_s[s, :], barrier=full[s])
                                T.barrier_arrive(full[s])
                            cnt[0] = cnt[0] + KB

    return grouped_gemm
