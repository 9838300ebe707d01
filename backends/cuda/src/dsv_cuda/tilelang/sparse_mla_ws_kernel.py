"""The warp-specialized TileLang program of absorbed sparse MLA (imported only when a kernel is compiled).

Same arguments and results as :mod:`dsv_cuda.tilelang.sparse_mla_kernel` (the "simple" program), laid out
the way FlashMLA's sm90 sparse prefill kernel is: 384 threads in three warpgroups that never wait on each
other except through shared-memory mbarriers.

* Producer (warpgroup 2, 80 registers): reads the top-k indices of the next 64-row block and gathers those
  KV rows (bf16 rows; FP8 rows below) with 16-byte ``cp.async`` copies into one of two shared buffers, split into the left and right
  halves of the latent columns and the rope columns. A negative index zero-fills its row instead of reading
  memory and clears the row's bit in the validity mask. The copies arrive on the buffer's "full" barrier
  when they land (``cp.async.mbarrier.arrive.noinc``); a plain arrive after the mask stores publishes the
  mask on the same barrier (its release orders those stores, which the cp.async arrive alone does not).
* Consumer 0 (warpgroup 0, 240 registers): S = Q K^T over both latent halves and the rope part, the online
  softmax in the log2 domain, P (bf16) and the per-row rescale factor to shared memory, then
  O_left += P V_left.
* Consumer 1 (warpgroup 1, 168 registers): rescales O_right by the factor and adds P V_right.

Two accumulators of [64, 256] fp32 instead of one of [64, 512] is what lets each consumer hold its part of O
in registers without spilling (ptxas: 0 bytes spilled, against the simple program's spills), and the
producer's own warpgroup keeps gathers in flight while both consumers compute. P has a single shared buffer:
consumer 0 writes the next block's P only after consumer 1 has read the previous one (the ``p_free``
barrier), which costs nothing in practice because consumer 0 has the next QK^T product to compute in between.

With ``kv_format == "fp8"`` (FlashMLA's 656-byte rows: 512 e4m3, 4 fp32 scales, 64 bf16) the consumers are
unchanged and the producer stages each block through the bf16 buffer it fills: the 512 e4m3 bytes of row j
go by 16-byte cp.async into row j's own 512-byte footprint in ``kv_r`` (under the 128-byte swizzle a row's
bytes stay inside its 128-byte rows of each 64-column atom), the rope part straight into ``kv_t``, the four
scales into registers (a masked row's are 0). One cp.async group per 16-row pass; each lane then waits for
its pass, ``__syncwarp()`` (a row's 8 lanes are one warp), reads the row's e4m3 values 8c..8c+7 and
64+8c..64+8c+7 of each scale group (lane c of the row; other lanes staged them), ``__syncwarp()`` again (the
row's bf16 values overwrite its staged bytes), and stores bf16(e4m3 * scale) into ``kv_l`` / ``kv_r`` with
16-byte stores. The row's 8 lanes then cover the 8 16-byte chunks of one 128-byte swizzle row: no bank
conflicts, where a lane taking 16 consecutive values put lanes c and c + 4 on the same banks. The
``_FP8_PRELUDE`` helpers do e4m3x2 -> f16x2 in one ``cvt``, the product in fp32 and one bf16 rounding, as
dsv.ops.quant unpacks. Smem stays at 224 KB. The gathers are asynchronous, so the latency
that made the earlier synchronous-load producer 109 TFLOPS now overlaps with the pass-by-pass dequant.

Measured on an H200 (H = 128, top-k 2048, sixth session): decode B64 90.5-91.0 µs in a CUDA graph (401-404
TFLOPS) and B128 182.2-182.8 µs without one (399-401 TFLOPS) on ``benchmarks/kernels.py``'s lists (their last
eighth -1); 115.3 / 218.9 µs (317 / 334 TFLOPS) with full random lists; dsv's Triton kernel 210 / 400 µs.
Still producer-bound: per 64-row block about 3.6 µs against the bf16 program's 2.4. Slower, each measured
in the same way (docs/benchmarks.md): two-CTA clusters whose producers split each block and store into both
CTAs (FlashMLA's sm90 layout; 121-131 µs), dequantizing a block one iteration after its copies (146 µs),
four buffers of 32 rows (130 µs). Errors within 0.67 of the check's tolerance
(backends/cuda/scripts/tilelang_check.py --fp8-only).

TileLang's ``T.ptx_wait_group`` is not used: the barrier TileLang puts after it got consumer 0's named
barrier id (3) in the producer's branch, and the two warpgroups meeting on one named barrier deadlocked
decode B16 / B64 (the wait is inside the helper instead; TileLang's own syncs there use the producer's id 5).

Three build-time switches at the top of this module take work off consumer 0's critical path. Measured on
the H200 side by side in one run (CUDA-graph medians, the kernels.py cases: top-k 2048 whose last 256 entries
are -1), against c172200's program: :data:`FAST_EXP2` with :data:`RESCALE_LOG2` (lazy rescaling of O) take
decode B64 from 79.0-79.5 to 74.4 µs (81.2 to 75.3-76.3 µs with no -1 tail), B128 from 163-165 to 149-152
µs and prefill 4K from 489-495 to 533-537 TFLOPS; :data:`SKIP_DEAD_TAIL` then takes B64 to 68.0-68.1 µs,
B128 to 138-139 µs and prefill 4K to 581 TFLOPS (counted over the whole top-k list) on these padded lists,
at no measurable cost without a tail (75.8-76.9 µs). FAST_EXP2 alone was worth about 0.5%.

Block ``n`` of a split uses buffer ``n % 2``, so any number of 64-row blocks per split works, odd ones too
(the caller pads the top-k list with -1 to whole blocks of every split, as for the simple program). Barrier
phases follow from the block number: buffer ``b``'s "full" and "free" barriers complete once per use of the
buffer, so block ``n`` waits for parity ``(n // 2) & 1``; the producer's first wait on a "free" barrier asks
for parity 1 of a fresh barrier, which counts as complete, so no prologue arrives are needed. ``p_ready`` and
``p_free`` complete once per block: parity ``n & 1`` and its complement.
"""

# No ``from __future__ import annotations`` here: TileLang evaluates the T.Tensor annotations of the
# prim_func, which refer to this builder's local variables (string annotations would not resolve).
from typing import Any

import tilelang.language as T

from dsv_cuda.tilelang.kernel_key import FP8_GROUP as _FP8_GROUP
from dsv_cuda.tilelang.kernel_key import FP8_GROUPS as _FP8_GROUPS
from dsv_cuda.tilelang.kernel_key import WS_LANES_PER_ROW as _LANES_PER_ROW
from dsv_cuda.tilelang.kernel_key import WS_ROWS_PER_PASS as _ROWS_PER_PASS
from dsv_cuda.tilelang.kernel_key import WS_VEC as _VEC
from dsv_cuda.tilelang.kernel_key import KernelKey, ws_unsupported
from dsv_cuda.tilelang.sparse_mla_kernel import _LOG2E, _NEG_INIT, _dynamic

#: bf16 columns of kv_r a row's staged group of e4m3 bytes occupies (128 bytes = 64 bf16).
_FP8_SLOT = _FP8_GROUP // 2
#: Threads per block: two consumer warpgroups and one producer warpgroup.
THREADS = 384
#: Registers per thread of each warpgroup after ``setmaxnreg`` (multiples of 8; 2 * 240 + 168 would exceed
#: the 64K register file, 240 + 168 + 80 = 488 x 128 threads fits it).
NREG_CONSUMER0 = 240
NREG_CONSUMER1 = 168
NREG_PRODUCER = 80

#: Exponentials by ``ex2.approx.ftz.f32`` (one MUFU instruction) instead of ``exp2f``, which without fast math
#: spends a compare and two predicated multiplies per value on subnormal results. Those become 0 here: they
#: are probabilities far below what the bf16 P and the fp32 sums can resolve.
FAST_EXP2 = True
#: Stop each split after its last 64-row block that holds a valid index: the -1 tail of a sequence shorter
#: than the top-k list (in decode, every sequence of fewer than top-k tokens) then costs nothing. The producer
#: counts the live blocks before its first gather (:data:`_PRELUDE`'s ``dsv_live_blocks``: its index loads
#: are the ones it needs anyway) and publishes the count with block 0's "full" barrier, which it completes
#: even when there is nothing to gather; the consumers read it after their queries are loaded. All three
#: loops then run the same number of blocks, with no branch inside them (a branch around the wgmma code makes
#: ptxas serialize the wgmma instructions). Dead blocks before the last live one still run, masked.
SKIP_DEAD_TAIL = True
#: Named barrier of the producer's live-block count (TileLang's own code uses the low ids).
_LIVE_BARRIER = 8
#: Lazy rescaling (FlashAttention-4's): a row's running maximum moves only when a block's maximum exceeds it
#: by more than 2^RESCALE_LOG2 in the exp2 domain, so after the first blocks the rescale factor is exactly 1
#: and each warp of both consumers skips its 128-register rescale of O (a branch on a warp vote: ptxas keeps
#: the wgmma pipeline only for a provably warp-uniform branch). Probabilities then reach up to 2^RESCALE_LOG2
#: (256): exact in fp32, and the bf16 P keeps its relative precision. None: rescale at every block.
RESCALE_LOG2: float | None = 8.0
#: The FP8 producer loads a block's top-k entries while the previous block is dequantized, not after the
#: buffer frees: the FP8 producer is the bound, and with the buffer already free that load's latency was part
#: of every block's critical path (H200, full lists: decode B64 119.8 -> 117.0 µs, B128 228.0 -> 219.8 µs,
#: same run). The bf16 producer keeps its order: it does not wait for its own copies.
FP8_PREFETCH_ROWS = True

_PRELUDE = """
__device__ __forceinline__ float dsv_ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// 1 + the last block of `block` entries of idx[0:n) that holds a non-negative entry (0 when none). Called by
// the 128 threads of one warpgroup (lane 0..127), with that warpgroup's own named barrier and four ints of
// shared scratch.
__device__ __forceinline__ int dsv_live_blocks(const int* idx, int n, int block, int lane, int bar_id,
                                               int* scratch) {
  int last = -1;
  #pragma unroll 16
  for (int e = lane; e < n; e += 128) {
    if (idx[e] >= 0) last = e;
  }
  last = __reduce_max_sync(0xffffffffu, last);
  if ((lane & 31) == 0) scratch[lane >> 5] = last;
  asm volatile("bar.sync %0, 128;" : : "r"(bar_id) : "memory");
  last = max(max(scratch[0], scratch[1]), max(scratch[2], scratch[3]));
  return last < 0 ? 0 : last / block + 1;
}

// Whether any lane of the warp has a rescale factor below 1 (a warp-uniform value, see RESCALE_LOG2).
__device__ __forceinline__ int dsv_warp_any(float least) {
  return __any_sync(0xffffffffu, least < 1.0f);
}
"""


def _exp2(x: Any) -> Any:
    """2^x: the single-instruction approximation when :data:`FAST_EXP2` (see there), else ``T.exp2``."""
    return T.call_extern("float32", "dsv_ex2", x) if FAST_EXP2 else T.exp2(x)


#: CUDA helpers of the FP8 producer (TileLang's ``prelude``: inlined device functions). One call waits for the
#: lane's cp.async group of the pass (``pending`` later groups may still be in flight), syncs the row's 8
#: lanes (one warp), then dequantizes the lane's eight 8-byte pieces of the row (8 e4m3 values of each half
#: scale group, staged by other lanes): it reads all eight into registers first, then ``__syncwarp()``
#: again, because the bf16 results overwrite the staged bytes of the whole row. e4m3x2 -> f16x2 is one
#: ``cvt`` on sm_89+, exact; the product with the scale is taken in fp32 and rounded once to bf16, as
#: dsv.ops.quant's unpacking does.
_FP8_PRELUDE = r"""
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
__device__ __forceinline__ unsigned dsv_e4m3x2_bf16x2(unsigned pair, float s) {
  __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(pair & 0xffffu), __NV_E4M3);
  float2 f = __half22float2(*reinterpret_cast<__half2*>(&h));
  __nv_bfloat162 r = __floats2bfloat162_rn(f.x * s, f.y * s);
  return *reinterpret_cast<unsigned*>(&r);
}
__device__ __forceinline__ uint4 dsv_e4m3x8_bf16x8(unsigned lo, unsigned hi, float s) {
  return make_uint4(dsv_e4m3x2_bf16x2(lo, s), dsv_e4m3x2_bf16x2(lo >> 16, s),
                    dsv_e4m3x2_bf16x2(hi, s), dsv_e4m3x2_bf16x2(hi >> 16, s));
}
__device__ __forceinline__ void dsv_cp_async_wait(int pending) {
  // Constant after inlining: cp.async.wait_group takes an immediate.
  switch (pending) {
    case 0: asm volatile("cp.async.wait_group 0;\n" ::: "memory"); break;
    case 1: asm volatile("cp.async.wait_group 1;\n" ::: "memory"); break;
    case 2: asm volatile("cp.async.wait_group 2;\n" ::: "memory"); break;
    case 3: asm volatile("cp.async.wait_group 3;\n" ::: "memory"); break;
    default: asm volatile("cp.async.wait_group 0;\n" ::: "memory"); break;
  }
}
__device__ __forceinline__ void dsv_fp8_dequant_row_piece(
    int pending, const void* s0, const void* s1, const void* s2, const void* s3, const void* s4,
    const void* s5, const void* s6, const void* s7,
    void* d0, void* d1, void* d2, void* d3, void* d4, void* d5, void* d6, void* d7,
    float k0, float k1, float k2, float k3) {
  dsv_cp_async_wait(pending);  // this lane's copies of the pass have landed
  __syncwarp();  // ... and so have the other lanes' of the row (one warp): the pieces below are theirs
  const uint2 a0 = *static_cast<const uint2*>(s0);
  const uint2 a1 = *static_cast<const uint2*>(s1);
  const uint2 a2 = *static_cast<const uint2*>(s2);
  const uint2 a3 = *static_cast<const uint2*>(s3);
  const uint2 a4 = *static_cast<const uint2*>(s4);
  const uint2 a5 = *static_cast<const uint2*>(s5);
  const uint2 a6 = *static_cast<const uint2*>(s6);
  const uint2 a7 = *static_cast<const uint2*>(s7);
  __syncwarp();  // every lane has read its pieces before any bf16 result overwrites the staged bytes
  *static_cast<uint4*>(d0) = dsv_e4m3x8_bf16x8(a0.x, a0.y, k0);
  *static_cast<uint4*>(d1) = dsv_e4m3x8_bf16x8(a1.x, a1.y, k0);
  *static_cast<uint4*>(d2) = dsv_e4m3x8_bf16x8(a2.x, a2.y, k1);
  *static_cast<uint4*>(d3) = dsv_e4m3x8_bf16x8(a3.x, a3.y, k1);
  *static_cast<uint4*>(d4) = dsv_e4m3x8_bf16x8(a4.x, a4.y, k2);
  *static_cast<uint4*>(d5) = dsv_e4m3x8_bf16x8(a5.x, a5.y, k2);
  *static_cast<uint4*>(d6) = dsv_e4m3x8_bf16x8(a6.x, a6.y, k3);
  *static_cast<uint4*>(d7) = dsv_e4m3x8_bf16x8(a7.x, a7.y, k3);
}
"""


def build_program(key: KernelKey) -> Any:
    """The warp-specialized ``T.prim_func`` for ``key`` (same arguments as the simple program).

    Q [tokens, heads, dim + tail], KV [slots, dim + tail], Idx [tokens, topk] int32 (negative = unused; topk a
    multiple of block_i * splits), Out [tokens, heads, dim] (written when splits == 1), Part [part_tokens,
    splits, heads, dim] fp32 and Lse [part_tokens, splits, heads] fp32 (written when splits > 1).
    """
    why = ws_unsupported(key.dim, key.tail, key.block_h, key.block_i, key.kv_format)
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
    scale = key.sm_scale * _LOG2E  # exp2 domain
    split_out = S > 1
    passes = BI // _ROWS_PER_PASS  # producer passes per block
    chunks = D2 // (_LANES_PER_ROW * _VEC)  # 16-byte copies per thread and row, per latent half
    tail_chunks = DT // (_LANES_PER_ROW * _VEC)
    assert H % BH == 0 and K % (BI * S) == 0, key
    fp8 = key.kv_format == "fp8"
    # FP8 rows: D e4m3 bytes | D / 128 fp32 scales | DT bf16; KV is then their bytes as float8_e4m3fn.
    kv_cols = D + (D // _FP8_GROUP) * 4 + DT * 2 if fp8 else D + DT
    kv_dtype = "float8_e4m3fn" if fp8 else dtype
    scale_col = D // 4  # first scale, in fp32 units of the row
    rope_col = (D + (D // _FP8_GROUP) * 4) // 2  # first rope value, in bf16 units of the row
    groups_half = D2 // _FP8_GROUP  # scale groups per latent half
    skip_tail = SKIP_DEAD_TAIL
    span = steps * BI  # indices per split

    @T.macro
    def consumer_live_blocks(live, full, live_s):
        """The blocks a consumer runs: the producer's count (published by block 0's "full" barrier) with
        SKIP_DEAD_TAIL, else the whole split. (Python branches on build-time flags: the frontend emits only the
        taken one.)"""
        if skip_tail:
            T.barrier_wait(full[0], 0)
            live[0] = live_s[0]
        else:
            live[0] = steps

    @T.macro
    def rescale(acc_o, factors, least):
        """acc_o[h, :] *= factors[h], one consumer's half of O. With lazy rescaling (RESCALE_LOG2) only in
        warps where some factor is below 1: ``least`` holds this thread's smallest factor for the warp vote."""
        if RESCALE_LOG2 is not None:
            least[0] = 1.0
            for h in T.Parallel(BH):
                least[0] = T.min(least[0], factors[h])
            if T.call_extern("int32", "dsv_warp_any", least[0]) != 0:
                for h, d in T.Parallel(BH, D2):
                    acc_o[h, d] = acc_o[h, d] * factors[h]
        else:
            for h, d in T.Parallel(BH, D2):
                acc_o[h, d] = acc_o[h, d] * factors[h]

    @T.prim_func
    def sparse_mla_ws(
        Q: T.Tensor((tokens, H, D + DT), dtype),  # type: ignore[valid-type]
        KV: T.Tensor((slots, kv_cols), kv_dtype),  # type: ignore[valid-type]
        Idx: T.Tensor((tokens, K), "int32"),  # type: ignore[valid-type]
        Out: T.Tensor((tokens, H, D), dtype),  # type: ignore[valid-type]
        Part: T.Tensor((part_tokens, S, H, D), acc),  # type: ignore[valid-type]
        Lse: T.Tensor((part_tokens, S, H), acc),  # type: ignore[valid-type]
    ):
        if fp8:
            # The same 656-byte rows seen as fp32 (the scales) and as bf16 (the rope part).
            KVs = T.view(KV, (slots, kv_cols // 4), acc)
            KVr = T.view(KV, (slots, kv_cols // 2), dtype)
        prelude = (_FP8_PRELUDE if fp8 else "") + _PRELUDE
        with T.Kernel(tokens * rep, S, threads=THREADS, prelude=prelude) as (bx, by):
            # 64 + 8 KB of queries, 2 x (64 + 8) KB of KV, 8 KB of P: 224 KB of the 227 KB an sm_90 block
            # may have. The output goes out through the query buffers (each consumer its own half).
            q_l = T.alloc_shared((BH, D2), dtype)
            q_r = T.alloc_shared((BH, D2), dtype)
            q_t = T.alloc_shared((BH, DT), dtype)
            kv_l = T.alloc_shared((2, BI, D2), dtype)
            kv_r = T.alloc_shared((2, BI, D2), dtype)
            kv_t = T.alloc_shared((2, BI, DT), dtype)
            p_s = T.alloc_shared((BH, BI), dtype)
            # One mask per buffer: the producer fills buffer 1's while consumer 0 still reads buffer 0's.
            valid = T.alloc_shared((2, BI), "bool", scope="shared")
            alpha_s = T.alloc_shared((BH,), acc, scope="shared")
            l_s = T.alloc_shared((BH,), acc, scope="shared")
            # The producer's live-block count: its scratch, and the count for the consumers (published by
            # block 0's "full" barrier).
            live_red = T.alloc_shared((4,), "int32", scope="shared")
            live_s = T.alloc_shared((1,), "int32", scope="shared")

            acc_o_l = T.alloc_fragment((BH, D2), acc)
            acc_o_r = T.alloc_fragment((BH, D2), acc)
            acc_s = T.alloc_fragment((BH, BI), acc)
            m_i = T.alloc_fragment((BH,), acc)
            m_prev = T.alloc_fragment((BH,), acc)
            m_blk = T.alloc_fragment((BH,), acc)
            alpha_r = T.alloc_fragment((BH,), acc)  # consumer 1's rescale factors, in its rows' layout
            alpha = T.alloc_fragment((BH,), acc)
            l_i = T.alloc_fragment((BH,), acc)
            l_blk = T.alloc_fragment((BH,), acc)
            rows = T.alloc_local((passes,), "int32")
            live = T.alloc_local((1,), "int32")  # blocks this split runs: up to its last live one
            least = T.alloc_local((1,), acc)  # the smallest rescale factor of this thread's rows
            if fp8:
                scl = T.alloc_local((passes * _FP8_GROUPS,), acc)  # each pass's row scales

            # q_ready: both consumers' shares of the query copy. full: cp.async arrivals (noinc) plus the
            # producer's plain arrive after the mask. free: both consumers done with a buffer.
            q_ready = T.alloc_barrier(256)
            full = T.alloc_barrier([256, 256])
            free = T.alloc_barrier([256, 256])
            p_ready = T.alloc_barrier(128)  # consumer 0 wrote P and the rescale factors
            p_free = T.alloc_barrier(128)  # consumer 1 finished reading them
            l_ready = T.alloc_barrier(128)  # consumer 0 wrote the softmax denominators

            t = bx // rep
            h0 = (bx % rep) * BH
            k0 = by * (steps * BI)
            tx = T.get_thread_binding()

            if tx < 128:
                T.set_max_nreg(NREG_CONSUMER0, 1)
                T.fill(acc_o_l, 0)
                T.fill(l_i, 0)
                T.fill(m_i, _NEG_INIT)
                # The consumers load the queries (consumer 1 the right half) while the producer already
                # gathers: 128 threads copy in whole 16-byte vectors, 384 would not divide the tile.
                T.copy(Q[t, h0 : h0 + BH, 0:D2], q_l)
                T.copy(Q[t, h0 : h0 + BH, D : D + DT], q_t)
                T.barrier_arrive(q_ready)
                T.barrier_wait(q_ready, 0)
                consumer_live_blocks(live, full, live_s)
                for n in T.serial(live[0]):
                    b = n % 2
                    T.barrier_wait(full[b], (n // 2) % 2)
                    # Masked columns start at -inf; the GEMMs accumulate onto this initial value.
                    for h, j in T.Parallel(BH, BI):
                        acc_s[h, j] = T.if_then_else(valid[b, j], 0, -T.infinity(acc))
                    T.wgmma_gemm(q_l, kv_l[b, :, :], acc_s, transpose_B=True)
                    T.wgmma_gemm(q_r, kv_r[b, :, :], acc_s, transpose_B=True)
                    T.wgmma_gemm(q_t, kv_t[b, :, :], acc_s, transpose_B=True)
                    T.wait_wgmma(0)
                    T.copy(m_i, m_prev)
                    if RESCALE_LOG2 is not None:
                        T.reduce_max(acc_s, m_blk, dim=1, clear=True)
                        for h in T.Parallel(BH):
                            m_i[h] = T.if_then_else(
                                (m_blk[h] - m_prev[h]) * scale > RESCALE_LOG2, m_blk[h], m_prev[h]
                            )
                    else:
                        T.reduce_max(acc_s, m_i, dim=1, clear=False)
                    for h in T.Parallel(BH):
                        # Exactly 1 when the maximum stays (the lazy rescale's test).
                        alpha[h] = T.if_then_else(
                            m_i[h] == m_prev[h], 1.0, _exp2((m_prev[h] - m_i[h]) * scale)
                        )
                    for h, j in T.Parallel(BH, BI):
                        acc_s[h, j] = _exp2(acc_s[h, j] * scale - m_i[h] * scale)
                    T.reduce_sum(acc_s, l_blk, dim=1)
                    for h in T.Parallel(BH):
                        l_i[h] = l_i[h] * alpha[h] + l_blk[h]
                    rescale(acc_o_l, alpha, least)
                    # P and alpha_s are single buffers: wait until consumer 1 has used the previous block's.
                    T.barrier_wait(p_free, 1 - b)
                    for h in T.Parallel(BH):
                        alpha_s[h] = alpha[h]
                    T.copy(acc_s, p_s)
                    # Both consumers' wgmma read P through the async proxy: order the generic stores first.
                    T.fence_proxy_async()
                    T.barrier_arrive(p_ready)
                    T.wgmma_gemm(p_s, kv_l[b, :, :], acc_o_l)
                    # Waiting here, not after the next QK^T, hands the buffer back one QK^T earlier: the
                    # producer's gather of block n + 2 then has a whole block's compute to hide behind
                    # (measured on the H200: deferring the wait was 5-10% slower at decode B64 / B128).
                    T.wait_wgmma(0)
                    T.barrier_arrive(free[b])
                for h in T.Parallel(BH):
                    l_s[h] = l_i[h]
                T.barrier_arrive(l_ready)
                # A head with no valid key in this range has l_i == 0: its output is 0 (and its lse -inf).
                for h, d in T.Parallel(BH, D2):
                    acc_o_l[h, d] = T.if_then_else(l_i[h] > 0, acc_o_l[h, d] / l_i[h], 0)
                if split_out:
                    T.copy(acc_o_l, Part[t, by, h0 : h0 + BH, 0:D2])
                    for h in T.Parallel(BH):
                        Lse[t, by, h0 + h] = T.if_then_else(
                            l_i[h] > 0, T.log2(l_i[h]) + m_i[h] * scale, -T.infinity(acc)
                        )
                else:
                    # Through shared memory (q_l is free: the last QK^T product has completed) for
                    # coalesced 16-byte stores.
                    T.copy(acc_o_l, q_l)
                    T.copy(q_l, Out[t, h0 : h0 + BH, 0:D2])
            elif tx < 256:
                T.set_max_nreg(NREG_CONSUMER1, 1)
                T.fill(acc_o_r, 0)
                T.copy(Q[t, h0 : h0 + BH, D2:D], q_r)
                # Consumer 0's wgmma reads these stores through the async proxy.
                T.fence_proxy_async()
                T.barrier_arrive(q_ready)
                consumer_live_blocks(live, full, live_s)
                for n in T.serial(live[0]):
                    b = n % 2
                    T.barrier_wait(p_ready, b)
                    for h in T.Parallel(BH):
                        alpha_r[h] = alpha_s[h]
                    rescale(acc_o_r, alpha_r, least)
                    T.wgmma_gemm(p_s, kv_r[b, :, :], acc_o_r)
                    T.wait_wgmma(0)
                    T.barrier_arrive(p_free)
                    T.barrier_arrive(free[b])
                T.barrier_wait(l_ready, 0)
                for h, d in T.Parallel(BH, D2):
                    acc_o_r[h, d] = T.if_then_else(l_s[h] > 0, acc_o_r[h, d] / l_s[h], 0)
                if split_out:
                    T.copy(acc_o_r, Part[t, by, h0 : h0 + BH, D2:D])
                else:
                    # q_r is free: consumer 0 finished its last QK^T before it published the last P.
                    T.copy(acc_o_r, q_r)
                    T.copy(q_r, Out[t, h0 : h0 + BH, D2:D])
            else:
                T.set_max_nreg(NREG_PRODUCER, 0)
                lane = tx - 256
                r0 = lane // _LANES_PER_ROW
                c0 = (lane % _LANES_PER_ROW) * _VEC
                if skip_tail:
                    live[0] = T.call_extern(
                        "int32",
                        "dsv_live_blocks",
                        T.access_ptr(Idx[t, k0], "r", span),
                        span,
                        BI,
                        lane,
                        _LIVE_BARRIER,
                        T.access_ptr(live_red[0], "rw", 4),
                    )
                    # Every producer thread stores the same count; its arrive on block 0's "full" barrier
                    # publishes it. With no block to gather, that barrier's phase completes all the same.
                    live_s[0] = live[0]
                    if live[0] == 0:
                        T.cp_async_barrier_noinc(full[0])
                        T.barrier_arrive(full[0])
                else:
                    live[0] = steps
                prefetch_rows = fp8 and FP8_PREFETCH_ROWS
                if prefetch_rows and live[0] > 0:  # the FP8 producer loads top-k entries one block ahead
                    for p in T.unroll(passes):
                        rows[p] = Idx[t, k0 + p * _ROWS_PER_PASS + r0]
                for n in T.serial(live[0]):
                    b = n % 2
                    base = k0 + n * BI
                    if not prefetch_rows:
                        # Index loads first: their latency overlaps the wait for the buffer.
                        for p in T.unroll(passes):
                            rows[p] = Idx[t, base + p * _ROWS_PER_PASS + r0]
                    T.barrier_wait(free[b], (n // 2) % 2 ^ 1)
                    for p in T.unroll(passes):
                        j = p * _ROWS_PER_PASS + r0
                        valid[b, j] = rows[p] >= 0
                        # A negative index reads row 0 (always allocated) with the copy predicated off:
                        # cp.async then zero-fills, so the masked row's P = 0 multiplies zeros, never
                        # stale bits.
                        # (A statement, not a conditional expression: TileLang's frontend traces the
                        # branch on this Python bool and emits only the taken one.)
                        if wide:  # noqa: SIM108
                            src = T.cast(T.max(rows[p], 0), "int64")
                        else:
                            src = T.max(rows[p], 0)
                        if fp8:
                            # FlashMLA's FP8 rows: the raw e4m3 bytes go by cp.async into this row's own
                            # footprint of kv_r[b] (lane l's 16 bytes of scale group g at bf16 columns
                            # g * 64 + 8 l), dequantized in place below; the four scales go to registers and
                            # the rope part straight to kv_t. A masked row's copies zero-fill, its scales are 0.
                            for g in T.unroll(_FP8_GROUPS):
                                T.ptx_cp_async(
                                    T.access_ptr(kv_r[b, j, g * _FP8_SLOT + c0], "w", _VEC),
                                    # KVr: the same bytes in bf16 units (cp.async sizes both sides alike).
                                    T.access_ptr(KVr[src, g * _FP8_SLOT + c0], "r", _VEC),
                                    _VEC,
                                    predicate=rows[p] >= 0,
                                )
                            for v in T.vectorized(_FP8_GROUPS):
                                scl[p * _FP8_GROUPS + v] = T.if_then_else(
                                    rows[p] >= 0, KVs[src, scale_col + v], 0
                                )
                            for u in T.unroll(tail_chunks):
                                col = u * (_LANES_PER_ROW * _VEC) + c0
                                T.ptx_cp_async(
                                    T.access_ptr(kv_t[b, j, col], "w", _VEC),
                                    T.access_ptr(KVr[src, rope_col + col], "r", _VEC),
                                    _VEC,
                                    predicate=rows[p] >= 0,
                                )
                            # One cp.async group per pass: the dequantization of pass p waits for its own
                            # group only, while the later passes' bytes are still on their way.
                            T.ptx_commit_group()
                        else:
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
                    if fp8:
                        # The next block's top-k entries (this block's copies are issued): their load
                        # latency passes during this block's dequantization, not after the buffer frees
                        # (where, with the buffer already free, it was part of every block's critical path).
                        if prefetch_rows and n + 1 < live[0]:
                            for p in T.unroll(passes):
                                rows[p] = Idx[t, base + BI + p * _ROWS_PER_PASS + r0]
                        # Unrolled in the IR: cp.async.wait_group takes a constant.
                        for p in T.unroll(passes, explicit=True):
                            j = p * _ROWS_PER_PASS + r0
                            # The wait is the helper's (T.ptx_wait_group would be followed by a barrier
                            # TileLang names with consumer 0's id: mixed with its warps, it deadlocked).
                            # The row's 8 lanes (one warp) sync, each reads its 64 e4m3 values (8 of each
                            # half group), they sync again, then each writes them as bf16 over the row's
                            # staged bytes.
                            # T.address_of, not T.access_ptr: TileLang then puts no producer-wide barrier
                            # before every pass (the hazards are within a warp, which the helper syncs).
                            T.call_extern(
                                "handle",
                                "dsv_fp8_dequant_row_piece",
                                passes - 1 - p,
                                *[
                                    T.address_of(kv_r[b, j, g * _FP8_SLOT + h * _FP8_SLOT // 2 + c0 // 2])
                                    for g in range(_FP8_GROUPS)
                                    for h in range(2)
                                ],
                                *[
                                    T.address_of(
                                        (kv_l if g < groups_half else kv_r)[
                                            b, j, (g % groups_half) * _FP8_GROUP + h * _FP8_GROUP // 2 + c0
                                        ]
                                    )
                                    for g in range(_FP8_GROUPS)
                                    for h in range(2)
                                ],
                                *[scl[p * _FP8_GROUPS + g] for g in range(_FP8_GROUPS)],
                            )
                        # The dequantized stores are generic-proxy writes read by wgmma (async proxy).
                        T.fence_proxy_async()
                    T.cp_async_barrier_noinc(full[b])
                    T.barrier_arrive(full[b])

    return sparse_mla_ws
