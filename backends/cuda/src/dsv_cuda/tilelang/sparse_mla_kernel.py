"""The TileLang program of absorbed sparse MLA (imported only when a kernel is first compiled).

One thread block handles ``block_h`` heads of one query token and one split of its top-k list. Per step it
gathers ``block_i`` KV rows (latent | rope) into shared memory, computes the [block_h, block_i] scores with
two tensor-core GEMMs (latent part and rope part), runs an online softmax in the log2 domain, and accumulates
P @ latent into a [block_h, R] fp32 fragment. Each gathered row serves all ``block_h`` heads, which is what
makes MQA-form MLA compute-bound rather than memory-bound.

With one split the block writes the normalized output in the KV dtype; with several it writes the fp32
partial output and its log2-sum-exp, merged afterwards (:func:`dsv_cuda.tilelang.sparse_mla.merge_splits_cuda`).
"""

# No ``from __future__ import annotations`` here: TileLang evaluates the T.Tensor annotations of the
# prim_func, which refer to this builder's local variables (string annotations would not resolve).
import functools
from typing import Any

import tilelang
import tilelang.language as T

from dsv_cuda.tilelang.kernel_key import KernelKey

_LOG2E = 1.4426950408889634
#: Below any real score times the scale, yet finite: ``m_prev - m_new`` never becomes ``-inf - -inf``.
_NEG_INIT = -(2.0**30)

# Gathers by index cannot use TMA, and the warp-specialized pipeline is written for TMA producers.
PASS_CONFIGS = {
    tilelang.PassConfigKey.TL_DISABLE_TMA_LOWER: True,
    tilelang.PassConfigKey.TL_DISABLE_WARP_SPECIALIZED: True,
}


def _dynamic(name: str, dtype: str = "int32") -> Any:
    # T.dynamic replaced T.symbolic in newer TileLang releases; accept both.
    make = getattr(T, "dynamic", None) or T.symbolic
    return make(name, dtype)


def build_program(key: KernelKey) -> Any:
    """The ``T.prim_func`` for ``key``.

    Arguments of the program: Q [tokens, heads, dim + tail], KV [slots, dim + tail], Idx [tokens, topk] int32
    (-1 = unused; topk a multiple of block_i * splits), Out [tokens, heads, dim] (written when splits == 1), Part [part_tokens, splits, heads, dim]
    fp32 and Lse [part_tokens, splits, heads] fp32 (written when splits > 1; tiny dummies otherwise).
    """
    tokens = _dynamic("tokens")
    wide = key.index_dtype == "int64"
    slots = _dynamic("slots", key.index_dtype)
    part_tokens = _dynamic("part_tokens")
    H, D, DT, K, S = key.heads, key.dim, key.tail, key.topk, key.splits
    BH, BI = key.block_h, key.block_i
    dtype, acc = key.dtype, "float32"
    rep = H // BH  # head blocks per token
    steps = K // (BI * S)  # KV blocks per split
    scale = key.sm_scale * _LOG2E  # exp2 domain
    split_out = S > 1
    assert H % BH == 0 and K % (BI * S) == 0, key

    @T.prim_func
    def sparse_mla(
        Q: T.Tensor((tokens, H, D + DT), dtype),  # type: ignore[valid-type]
        KV: T.Tensor((slots, D + DT), dtype),  # type: ignore[valid-type]
        Idx: T.Tensor((tokens, K), "int32"),  # type: ignore[valid-type]
        Out: T.Tensor((tokens, H, D), dtype),  # type: ignore[valid-type]
        Part: T.Tensor((part_tokens, S, H, D), acc),  # type: ignore[valid-type]
        Lse: T.Tensor((part_tokens, S, H), acc),  # type: ignore[valid-type]
    ):
        with T.Kernel(tokens * rep, S, threads=key.threads) as (bx, by):
            q_s = T.alloc_shared((BH, D), dtype)
            qt_s = T.alloc_shared((BH, DT), dtype)
            kv_s = T.alloc_shared((BI, D), dtype)
            kt_s = T.alloc_shared((BI, DT), dtype)
            p_s = T.alloc_shared((BH, BI), dtype)
            valid = T.alloc_fragment((BI,), "bool")
            acc_o = T.alloc_fragment((BH, D), acc)
            acc_s = T.alloc_fragment((BH, BI), acc)
            m_i = T.alloc_fragment((BH,), acc)
            m_prev = T.alloc_fragment((BH,), acc)
            alpha = T.alloc_fragment((BH,), acc)
            l_i = T.alloc_fragment((BH,), acc)
            l_blk = T.alloc_fragment((BH,), acc)

            t = bx // rep
            h0 = (bx % rep) * BH
            k0 = by * (steps * BI)
            T.fill(acc_o, 0)
            T.fill(l_i, 0)
            T.fill(m_i, _NEG_INIT)
            T.copy(Q[t, h0 : h0 + BH, 0:D], q_s)
            T.copy(Q[t, h0 : h0 + BH, D : D + DT], qt_s)

            for step in T.Pipelined(steps, num_stages=key.num_stages):
                base = k0 + step * BI
                for j in T.Parallel(BI):
                    valid[j] = Idx[t, base + j] >= 0
                # -1 entries read row 0 (always allocated) and are masked out of the softmax below.
                if wide:
                    # Row offsets of caches past 2^31 elements need 64-bit arithmetic.
                    for j, d in T.Parallel(BI, D):
                        kv_s[j, d] = KV[T.cast(T.max(Idx[t, base + j], 0), "int64"), d]
                    for j, d in T.Parallel(BI, DT):
                        kt_s[j, d] = KV[T.cast(T.max(Idx[t, base + j], 0), "int64"), D + d]
                else:
                    for j, d in T.Parallel(BI, D):
                        kv_s[j, d] = KV[T.max(Idx[t, base + j], 0), d]
                    for j, d in T.Parallel(BI, DT):
                        kt_s[j, d] = KV[T.max(Idx[t, base + j], 0), D + d]
                # Masked columns start at -inf; the GEMMs accumulate onto this initial value.
                for h, j in T.Parallel(BH, BI):
                    acc_s[h, j] = T.if_then_else(valid[j], 0, -T.infinity(acc))
                T.gemm(q_s, kv_s, acc_s, transpose_B=True, policy=T.GemmWarpPolicy.FullCol)
                T.gemm(qt_s, kt_s, acc_s, transpose_B=True, policy=T.GemmWarpPolicy.FullCol)
                T.copy(m_i, m_prev)
                T.reduce_max(acc_s, m_i, dim=1, clear=False)
                for h in T.Parallel(BH):
                    alpha[h] = T.exp2((m_prev[h] - m_i[h]) * scale)
                for h, j in T.Parallel(BH, BI):
                    acc_s[h, j] = T.exp2(acc_s[h, j] * scale - m_i[h] * scale)
                T.reduce_sum(acc_s, l_blk, dim=1)
                for h in T.Parallel(BH):
                    l_i[h] = l_i[h] * alpha[h] + l_blk[h]
                for h, d in T.Parallel(BH, D):
                    acc_o[h, d] = acc_o[h, d] * alpha[h]
                T.copy(acc_s, p_s)
                T.gemm(p_s, kv_s, acc_o, policy=T.GemmWarpPolicy.FullCol)

            # A head with no valid key in this range has l_i == 0: its output is 0 (and its lse -inf).
            for h, d in T.Parallel(BH, D):
                acc_o[h, d] = T.if_then_else(l_i[h] > 0, acc_o[h, d] / l_i[h], 0)
            if split_out:
                T.copy(acc_o, Part[t, by, h0 : h0 + BH, :])
                for h in T.Parallel(BH):
                    Lse[t, by, h0 + h] = T.if_then_else(
                        l_i[h] > 0, T.log2(l_i[h]) + m_i[h] * scale, -T.infinity(acc)
                    )
            else:
                # Through shared memory (q_s is free now) for coalesced 16-byte stores.
                T.copy(acc_o, q_s)
                T.copy(q_s, Out[t, h0 : h0 + BH, :])

    return sparse_mla


@functools.lru_cache(maxsize=64)
def compiled(key: KernelKey) -> Any:
    """The compiled kernel for ``key`` (compiled once per process and key; TileLang also caches on disk)."""
    if key.variant == "ws":
        from dsv_cuda.tilelang.sparse_mla_ws_kernel import build_program as build_ws

        return tilelang.compile(build_ws(key), target="cuda", pass_configs=PASS_CONFIGS)
    if key.variant != "simple":
        raise ValueError(f"unknown sparse MLA kernel variant {key.variant!r} (simple / ws)")
    return tilelang.compile(build_program(key), target="cuda", pass_configs=PASS_CONFIGS)
