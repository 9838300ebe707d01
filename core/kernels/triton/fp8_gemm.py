"""Block-scaled FP8 linear: per-1x128 activation quantization, then an FP8 GEMM with per-K-block scaling.

Each K block of 128 contributes ``dot(a8, b8) * a_scale[m] * b_scale[n // 128]`` to an fp32 accumulator,
which is the reference's ``dequant(a) @ dequant(w).T`` up to summation order (fp8 products are exact in fp32).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv.kernels.triton.common import sm_count
from dsv.kernels.triton.quant import act_quant, store_cast, store_view

_FP8 = (torch.float8_e4m3fn, torch.float8_e4m3fnuz, torch.float8_e5m2, torch.float8_e5m2fnuz)


@triton.jit
def _fp8_gemm_kernel(
    a_ptr,
    as_ptr,
    b_ptr,
    bs_ptr,
    c_ptr,
    M,
    N,
    K,
    stride_am,
    stride_asm,
    stride_bn,
    stride_bsn,
    stride_cm,
    stride_cs,
    K_BLOCKS_PER_SPLIT,
    BLOCK_OUT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    BF16_BITS: tl.constexpr,
):
    # Grouped program order: GROUP_M row tiles share each weight column tile while it is in L2.
    pid = tl.program_id(0)
    split = tl.program_id(1)  # split-K: this program's share of the K blocks, into its own partial plane
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * tiles_n)
    first_m = group * GROUP_M
    size_m = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * tiles_n)) % size_m
    pid_n = (pid % (GROUP_M * tiles_n)) // size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mmask = offs_m < M
    nmask = offs_n < N
    a_rows = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am
    b_rows = b_ptr + offs_n.to(tl.int64)[:, None] * stride_bn
    b_scale_rows = bs_ptr + (offs_n // BLOCK_OUT) * stride_bsn
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    kb_start = split * K_BLOCKS_PER_SPLIT
    kb_end = tl.minimum(kb_start + K_BLOCKS_PER_SPLIT, tl.cdiv(K, BLOCK_K))
    for kb in range(kb_start, kb_end):
        k = kb * BLOCK_K + offs_k
        a = tl.load(a_rows + k[None, :], mask=mmask[:, None] & (k[None, :] < K), other=0.0)
        b = tl.load(b_rows + k[None, :], mask=nmask[:, None] & (k[None, :] < K), other=0.0)
        a_s = tl.load(as_ptr + offs_m * stride_asm + kb, mask=mmask, other=0.0)
        b_s = tl.load(b_scale_rows + kb, mask=nmask, other=0.0)
        acc += tl.dot(a, tl.trans(b)) * a_s[:, None] * b_s[None, :]
    c_ptrs = (
        c_ptr + split.to(tl.int64) * stride_cs + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
    )
    store_cast(c_ptrs, acc, mmask[:, None] & nmask[None, :], BF16_BITS)


@triton.jit
def _sum_splits_kernel(part_ptr, out_ptr, S, MN, BLOCK: tl.constexpr, BF16_BITS: tl.constexpr):
    """out = sum over s of part[s] (fp32, s in order), cast to out's dtype: one launch instead of sum + copy."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.zeros([BLOCK], tl.float32)
    for s in range(0, S):
        acc += tl.load(part_ptr + s * MN + offs, mask=mask, other=0.0)
    store_cast(out_ptr + offs, acc, mask, BF16_BITS)


#: Split-K aims at this many programs per SM when the output tiles alone are fewer than the SMs: at decode
#: sizes (M <= 64) a [M, N] output has a few dozen 64-wide column tiles, each streaming all of K, so without
#: splitting most SMs would idle while the weights are read.
SPLIT_K_PROGRAMS_PER_SM = 2


def split_k(tiles: int, k_blocks: int, sms: int) -> tuple[int, int]:
    """(splits, K blocks per split) for ``tiles`` output tiles over ``k_blocks`` K blocks on ``sms`` SMs: one
    split when the tiles fill the GPU, else enough splits for about :data:`SPLIT_K_PROGRAMS_PER_SM` programs
    per SM (each split at least one K block; no empty split)."""
    if tiles >= sms or k_blocks <= 1:
        return 1, max(k_blocks, 1)
    want = min(k_blocks, -(-SPLIT_K_PROGRAMS_PER_SM * sms // tiles))
    per = -(-k_blocks // want)
    return -(-k_blocks // per), per


def _config(m: int) -> dict[str, int]:
    """Tile sizes by M: narrow row tiles for decode-sized M, 128x128 for prefill."""
    if m <= 16:
        return {"BLOCK_M": 16, "BLOCK_N": 64, "num_warps": 4, "num_stages": 4}
    if m <= 64:
        return {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 4}
    return {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 4}


def fp8_block_matmul(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    b: torch.Tensor,
    b_scale: torch.Tensor,
    block: tuple[int, int],
    out_dtype: torch.dtype,
    config: dict[str, int] | None = None,
) -> torch.Tensor:
    """C [M, N] = (a * a_scale) @ (b * b_scale).T for a [M, K] fp8 with scales [M, K/bk] and b [N, K] fp8 with
    block scales [N/bn, K/bk]; fp32 accumulation, output in ``out_dtype``.

    When the output tiles are fewer than the GPU's SMs, K is split (:func:`split_k`): each split writes an
    fp32 partial and the partials are summed in a fixed order (deterministic, unlike atomics).
    ``config["SPLIT_K"]`` forces a split count.
    """
    m, k = a.shape
    n = b.shape[0]
    bn, bk = block
    if bk < 16 or bk & (bk - 1):
        raise ValueError(f"the K block must be a power of two >= 16, got {bk}")
    out = torch.empty(m, n, dtype=out_dtype, device=a.device)
    if m == 0 or n == 0:
        return out
    b = b if b.stride(-1) == 1 else b.contiguous()
    b_scale = b_scale.float().contiguous()
    cfg = dict(config or _config(m))
    tiles = triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"])
    k_blocks = triton.cdiv(k, bk)
    forced = cfg.pop("SPLIT_K", None)
    if forced is not None:
        per = -(-k_blocks // max(1, forced))
        splits = -(-k_blocks // per)
    else:
        splits, per = split_k(tiles, k_blocks, _sm_count(a.device))
    target = out if splits == 1 else torch.empty(splits, m, n, dtype=torch.float32, device=a.device)
    out_view, bf16_bits = store_view(target)
    _fp8_gemm_kernel[(tiles, splits)](
        a,
        a_scale,
        b,
        b_scale,
        out_view,
        m,
        n,
        k,
        a.stride(0),
        a_scale.stride(0),
        b.stride(0),
        b_scale.stride(0),
        target.stride(-2),
        m * n,
        per,
        BLOCK_OUT=bn,
        BLOCK_K=bk,
        GROUP_M=8,
        BF16_BITS=bf16_bits,
        **cfg,
    )
    if splits > 1:
        final_view, final_bits = store_view(out)
        block = 1024
        _sum_splits_kernel[(triton.cdiv(m * n, block),)](
            target, final_view, splits, m * n, BLOCK=block, BF16_BITS=final_bits
        )
    return out


def _sm_count(device: torch.device) -> int:
    """SMs (CUs) of a GPU; under the interpreter (CPU tensors) a nominal 8, so that tests exercise split-K."""
    return sm_count(device) if device.type == "cuda" else 8


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale_inv: torch.Tensor | None = None,
    block: tuple[int, int] = (128, 128),
    act_scale_fmt: str | None = None,
    *,
    config: dict[str, int] | None = None,
) -> torch.Tensor:
    """Triton twin of :func:`dsv.ops.linear.linear`: y = x · Wᵀ in x's dtype.

    FP8 block weights: x is quantized per 1x``block[1]`` group into the weight's fp8 dtype (ue8m0 scales with
    ``act_scale_fmt="ue8m0"``) and multiplied by the block-scaled GEMM. Float weights use torch's matmul, which
    is the right kernel for them (cuBLAS / hipBLASLt).
    """
    if scale_inv is None:
        return torch.nn.functional.linear(x, weight.to(x.dtype))
    if weight.dtype not in _FP8:
        raise NotImplementedError(f"block-scaled linear needs an fp8 weight, got {weight.dtype}")
    lead, k = x.shape[:-1], x.shape[-1]
    xq, xs = act_quant(x.reshape(-1, k), block[1], act_scale_fmt, weight.dtype)
    y = fp8_block_matmul(xq, xs, weight, scale_inv, block, x.dtype, config)
    return y.view(*lead, weight.shape[0])
