"""The "seesaw" warp-specialized TileLang program of absorbed sparse MLA (imported only when compiled).

Same arguments and results as the other two programs, and the same producer warpgroup as
:mod:`dsv_cuda.tilelang.sparse_mla_ws_kernel`, but the two consumer warpgroups share the work evenly, the way
FlashMLA's sm90 sparse prefill kernel schedules it: KV blocks come in pairs, warpgroup 0 computes the scores
of the even block (buffer 0) and warpgroup 1 those of the odd block (buffer 1), at the same time. Each
publishes its rows' local maxima, takes the other's, and both move the running maximum to the same new value;
each then writes its P (bf16) over the rope columns of its own KV buffer (consumed by its QK^T product,
needed by nobody else) and accumulates both blocks' P @ V into its half of the output columns (warpgroup 0
the left 256, warpgroup 1 the right 256). So each warpgroup's softmax runs while the other one's GEMMs keep
the tensor cores busy, where the "ws" program leaves them idle during consumer 0's softmax.

Each warpgroup keeps the softmax denominator of its own blocks; both are rescaled by the same factors, and
their sum (exchanged at the end) normalizes both output halves. P lives in the rope part of each KV buffer,
so the program needs block_h == block_i == rope width == 64, and an even number of 64-row blocks per split
(the caller pads the top-k list with -1 to a multiple of ``2 * block_i * splits``).

Barrier phases: every barrier completes once per pair of blocks, so pair ``i`` waits for parity ``i & 1``;
the producer's first wait on a "free" barrier asks for parity 1 of a fresh barrier, which counts as complete.
"""

# No ``from __future__ import annotations`` here: TileLang evaluates the T.Tensor annotations of the
# prim_func, which refer to this builder's local variables (string annotations would not resolve).
from typing import Any

import tilelang.language as T

from dsv_cuda.tilelang.kernel_key import WS_LANES_PER_ROW as _LANES_PER_ROW
from dsv_cuda.tilelang.kernel_key import WS_ROWS_PER_PASS as _ROWS_PER_PASS
from dsv_cuda.tilelang.kernel_key import WS_VEC as _VEC
from dsv_cuda.tilelang.kernel_key import KernelKey, seesaw_unsupported
from dsv_cuda.tilelang.sparse_mla_kernel import _LOG2E, _NEG_INIT, _dynamic

#: Threads per block: two consumer warpgroups and one producer warpgroup.
THREADS = 384
#: Registers per thread after ``setmaxnreg``: 2 x 216 + 72 = 504 x 128 threads fits the 64K register file.
NREG_CONSUMER = 216
NREG_PRODUCER = 72


def build_program(key: KernelKey) -> Any:
    """The seesaw ``T.prim_func`` for ``key`` (same arguments as the simple program; topk a multiple of
    2 * block_i * splits)."""
    why = seesaw_unsupported(key.dim, key.tail, key.block_h, key.block_i)
    assert not why, why
    tokens = _dynamic("tokens")
    wide = key.index_dtype == "int64"
    slots = _dynamic("slots", key.index_dtype)
    part_tokens = _dynamic("part_tokens")
    H, D, DT, K, S = key.heads, key.dim, key.tail, key.topk, key.splits
    BH, BI = key.block_h, key.block_i
    D2 = D // 2
    dtype, acc = key.dtype, "float32"
    rep = H // BH  # head blocks per token
    steps = K // (BI * S)  # KV blocks per split
    pairs = steps // 2
    scale = key.sm_scale * _LOG2E  # exp2 domain
    split_out = S > 1
    passes = BI // _ROWS_PER_PASS  # producer passes per block
    chunks = D2 // (_LANES_PER_ROW * _VEC)  # 16-byte copies per thread and row, per latent half
    tail_chunks = DT // (_LANES_PER_ROW * _VEC)
    assert H % BH == 0 and K % (2 * BI * S) == 0, key

    @T.macro
    def consumer(
        w,  # this warpgroup: 0 or 1 (a Python int: buffers and output half are chosen at trace time)
        q_l,
        q_r,
        q_t,
        kv_l,
        kv_r,
        kv_t,
        v_half,  # kv_l for warpgroup 0, kv_r for warpgroup 1: the V columns of its output half
        valid,
        m_x,
        l_x,
        full,
        free,
        stats,
        p_ready,
        l_ready,
        acc_o,
        acc_s,
        m_run,
        m_loc,
        m_peer,
        alpha,
        l_i,
        l_blk,
        o_stage,
        Out,
        Part,
        Lse,
        t,
        h0,
        by,
    ):
        T.fill(acc_o, 0)
        T.fill(l_i, 0)
        T.fill(m_run, _NEG_INIT)
        for i in T.serial(pairs):
            T.barrier_wait(full[w], i % 2)
            # The producer's cp.async stores are generic-proxy writes that wgmma reads through the async
            # proxy; this warpgroup has acquired them through the barrier, the fence orders the proxies.
            T.fence_proxy_async()
            # Masked columns start at -inf; the GEMMs accumulate onto this initial value.
            for h, j in T.Parallel(BH, BI):
                acc_s[h, j] = T.if_then_else(valid[w, j], 0, -T.infinity(acc))
            T.wgmma_gemm(q_l, kv_l[w, :, :], acc_s, transpose_B=True)
            T.wgmma_gemm(q_r, kv_r[w, :, :], acc_s, transpose_B=True)
            T.wgmma_gemm(q_t, kv_t[w, :, :], acc_s, transpose_B=True)
            T.wait_wgmma(0)
            # Exchange the rows' block maxima: both warpgroups then take the same new running maximum.
            T.reduce_max(acc_s, m_loc, dim=1, clear=True)
            for h in T.Parallel(BH):
                m_x[w, h] = m_loc[h]
            T.barrier_arrive(stats[w])
            T.barrier_wait(stats[1 - w], i % 2)
            for h in T.Parallel(BH):
                m_peer[h] = m_x[1 - w, h]
            for h in T.Parallel(BH):
                alpha[h] = m_run[h]
            for h in T.Parallel(BH):
                m_run[h] = T.max(T.max(m_run[h], m_loc[h]), m_peer[h])
            for h in T.Parallel(BH):
                alpha[h] = T.exp2((alpha[h] - m_run[h]) * scale)
            for h, d in T.Parallel(BH, D2):
                acc_o[h, d] = acc_o[h, d] * alpha[h]
            for h, j in T.Parallel(BH, BI):
                acc_s[h, j] = T.exp2(acc_s[h, j] * scale - m_run[h] * scale)
            T.reduce_sum(acc_s, l_blk, dim=1)
            for h in T.Parallel(BH):
                l_i[h] = l_i[h] * alpha[h] + l_blk[h]
            # P over this buffer's rope columns (only this warpgroup's QK^T read them, and it is done).
            T.copy(acc_s, kv_t[w, :, :])
            # Both warpgroups' wgmma read P through the async proxy: order the generic stores first.
            T.fence_proxy_async()
            T.barrier_arrive(p_ready[w])
            T.wgmma_gemm(kv_t[w, :, :], v_half[w, :, :], acc_o)
            T.barrier_wait(p_ready[1 - w], i % 2)
            T.wgmma_gemm(kv_t[1 - w, :, :], v_half[1 - w, :, :], acc_o)
            T.wait_wgmma(0)
            T.barrier_arrive(free[0])
            T.barrier_arrive(free[1])
        # The denominator is the sum of both warpgroups' (each rescaled by the same factors).
        for h in T.Parallel(BH):
            l_x[w, h] = l_i[h]
        T.barrier_arrive(l_ready)
        T.barrier_wait(l_ready, 0)
        for h in T.Parallel(BH):
            l_i[h] = l_i[h] + l_x[1 - w, h]
        # A head with no valid key in this range has l_i == 0: its output is 0 (and its lse -inf).
        for h, d in T.Parallel(BH, D2):
            acc_o[h, d] = T.if_then_else(l_i[h] > 0, acc_o[h, d] / l_i[h], 0)
        if split_out:
            T.copy(acc_o, Part[t, by, h0 : h0 + BH, w * D2 : w * D2 + D2])
            if w == 0:
                for h in T.Parallel(BH):
                    Lse[t, by, h0 + h] = T.if_then_else(
                        l_i[h] > 0, T.log2(l_i[h]) + m_run[h] * scale, -T.infinity(acc)
                    )
        else:
            # Through this warpgroup's half of the query buffer (both finished their QK^T products before
            # l_ready) for coalesced 16-byte stores.
            T.copy(acc_o, o_stage)
            T.copy(o_stage, Out[t, h0 : h0 + BH, w * D2 : w * D2 + D2])

    @T.prim_func
    def sparse_mla_seesaw(
        Q: T.Tensor((tokens, H, D + DT), dtype),  # type: ignore[valid-type]
        KV: T.Tensor((slots, D + DT), dtype),  # type: ignore[valid-type]
        Idx: T.Tensor((tokens, K), "int32"),  # type: ignore[valid-type]
        Out: T.Tensor((tokens, H, D), dtype),  # type: ignore[valid-type]
        Part: T.Tensor((part_tokens, S, H, D), acc),  # type: ignore[valid-type]
        Lse: T.Tensor((part_tokens, S, H), acc),  # type: ignore[valid-type]
    ):
        with T.Kernel(tokens * rep, S, threads=THREADS) as (bx, by):
            # 72 KB of queries and 2 x 72 KB of KV (P reuses the rope columns): 216 KB.
            q_l = T.alloc_shared((BH, D2), dtype)
            q_r = T.alloc_shared((BH, D2), dtype)
            q_t = T.alloc_shared((BH, DT), dtype)
            kv_l = T.alloc_shared((2, BI, D2), dtype)
            kv_r = T.alloc_shared((2, BI, D2), dtype)
            kv_t = T.alloc_shared((2, BI, DT), dtype)
            valid = T.alloc_shared((2, BI), "bool", scope="shared")
            m_x = T.alloc_shared((2, BH), acc, scope="shared")  # each warpgroup's block maxima
            l_x = T.alloc_shared((2, BH), acc, scope="shared")  # each warpgroup's denominators

            acc_o_0 = T.alloc_fragment((BH, D2), acc)
            acc_s_0 = T.alloc_fragment((BH, BI), acc)
            m_run_0 = T.alloc_fragment((BH,), acc)
            m_loc_0 = T.alloc_fragment((BH,), acc)
            m_peer_0 = T.alloc_fragment((BH,), acc)
            alpha_0 = T.alloc_fragment((BH,), acc)
            l_i_0 = T.alloc_fragment((BH,), acc)
            l_blk_0 = T.alloc_fragment((BH,), acc)
            acc_o_1 = T.alloc_fragment((BH, D2), acc)
            acc_s_1 = T.alloc_fragment((BH, BI), acc)
            m_run_1 = T.alloc_fragment((BH,), acc)
            m_loc_1 = T.alloc_fragment((BH,), acc)
            m_peer_1 = T.alloc_fragment((BH,), acc)
            alpha_1 = T.alloc_fragment((BH,), acc)
            l_i_1 = T.alloc_fragment((BH,), acc)
            l_blk_1 = T.alloc_fragment((BH,), acc)
            rows = T.alloc_local((passes,), "int32")

            # q_ready: both consumers' shares of the query copy. full: cp.async arrivals (noinc) plus the
            # producer's plain arrive after the mask. free: both consumers done with a buffer. stats /
            # p_ready: one warpgroup's block maxima / P are in shared memory. l_ready: both denominators.
            q_ready = T.alloc_barrier(256)
            full = T.alloc_barrier([256, 256])
            free = T.alloc_barrier([256, 256])
            stats = T.alloc_barrier([128, 128])
            p_ready = T.alloc_barrier([128, 128])
            l_ready = T.alloc_barrier(256)

            t = bx // rep
            h0 = (bx % rep) * BH
            k0 = by * (steps * BI)
            tx = T.get_thread_binding()

            if tx < 128:
                T.set_max_nreg(NREG_CONSUMER, 1)
                T.copy(Q[t, h0 : h0 + BH, 0:D2], q_l)
                T.copy(Q[t, h0 : h0 + BH, D : D + DT], q_t)
                # The other warpgroup's wgmma reads these stores through the async proxy.
                T.fence_proxy_async()
                T.barrier_arrive(q_ready)
                T.barrier_wait(q_ready, 0)
                consumer(
                    0, q_l, q_r, q_t, kv_l, kv_r, kv_t, kv_l, valid, m_x, l_x, full, free, stats, p_ready,
                    l_ready, acc_o_0, acc_s_0, m_run_0, m_loc_0, m_peer_0, alpha_0, l_i_0, l_blk_0, q_l,
                    Out, Part, Lse, t, h0, by,
                )  # fmt: skip
            elif tx < 256:
                T.set_max_nreg(NREG_CONSUMER, 1)
                T.copy(Q[t, h0 : h0 + BH, D2:D], q_r)
                T.fence_proxy_async()
                T.barrier_arrive(q_ready)
                T.barrier_wait(q_ready, 0)
                consumer(
                    1, q_l, q_r, q_t, kv_l, kv_r, kv_t, kv_r, valid, m_x, l_x, full, free, stats, p_ready,
                    l_ready, acc_o_1, acc_s_1, m_run_1, m_loc_1, m_peer_1, alpha_1, l_i_1, l_blk_1, q_r,
                    Out, Part, Lse, t, h0, by,
                )  # fmt: skip
            else:
                T.set_max_nreg(NREG_PRODUCER, 0)
                lane = tx - 256
                r0 = lane // _LANES_PER_ROW
                c0 = (lane % _LANES_PER_ROW) * _VEC
                for n in T.serial(steps):
                    b = n % 2
                    base = k0 + n * BI
                    # Index loads first: their latency overlaps the wait for the buffer.
                    for p in T.unroll(passes):
                        rows[p] = Idx[t, base + p * _ROWS_PER_PASS + r0]
                    T.barrier_wait(free[b], (n // 2) % 2 ^ 1)
                    for p in T.unroll(passes):
                        j = p * _ROWS_PER_PASS + r0
                        valid[b, j] = rows[p] >= 0
                        # A negative index: the copy is predicated off (cp.async zero-fills the row).
                        # (A statement, not a conditional expression: TileLang's frontend traces the
                        # branch on this Python bool and emits only the taken one.)
                        if wide:  # noqa: SIM108
                            src = T.cast(T.max(rows[p], 0), "int64")
                        else:
                            src = T.max(rows[p], 0)
                        for u in T.unroll(chunks):
                            col = u * (_LANES_PER_ROW * _VEC) + c0
                            T.ptx_cp_async(
                                T.access_ptr(kv_l[b, j, col], "w", _VEC),
                                T.access_ptr(KV[src, col], "r", _VEC),
                                _VEC,
                                predicate=rows[p] >= 0,
                            )
                            T.ptx_cp_async(
                                T.access_ptr(kv_r[b, j, col], "w", _VEC),
                                T.access_ptr(KV[src, D2 + col], "r", _VEC),
                                _VEC,
                                predicate=rows[p] >= 0,
                            )
                        for u in T.unroll(tail_chunks):
                            col = u * (_LANES_PER_ROW * _VEC) + c0
                            T.ptx_cp_async(
                                T.access_ptr(kv_t[b, j, col], "w", _VEC),
                                T.access_ptr(KV[src, D + col], "r", _VEC),
                                _VEC,
                                predicate=rows[p] >= 0,
                            )
                    T.cp_async_barrier_noinc(full[b])
                    T.barrier_arrive(full[b])

    return sparse_mla_seesaw
