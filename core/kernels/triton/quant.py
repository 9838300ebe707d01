"""FP8 helpers shared by the Triton kernels: exact e4m3fn encoding, ue8m0 rounding, 1xG activation quantization.

Triton's own float->fp8 cast rounds differently across backends (and in the interpreter), so cache writes and
activation quantization encode e4m3fn bytes with integer arithmetic. That reproduces torch's conversion
(round-to-nearest-even after clamping to +-448) bit for bit on every target.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv.ops.quant import AMAX_FLOOR, fp8_dtype_max

_AMAX_FLOOR = tl.constexpr(AMAX_FLOOR)


@triton.jit
def e4m3fn_bits(x):
    """fp32 values already clamped to [-448, 448] -> e4m3fn bit patterns (int32 in 0..255), RNE rounding."""
    bits = x.to(tl.int32, bitcast=True)
    sign = (bits >> 24) & 0x80
    abits = bits & 0x7FFFFFFF
    # Normal range (|x| >= 2^-6): drop 20 mantissa bits with round-half-even; a carry bumps the exponent.
    rounded = (abits + 0x7FFFF + ((abits >> 20) & 1)) >> 20
    normal = rounded - (120 << 3)  # rebias the exponent from 127 to 7
    # Subnormals are multiples of 2^-9: the float add of 2^23 rounds |x| * 512 to an integer (half-even).
    y = tl.abs(x) * 512.0
    sub = ((y + 8388608.0) - 8388608.0).to(tl.int32)
    return tl.where(abits >= 0x3C800000, normal, sub) | sign


@triton.jit
def bf16_bits(x):
    """fp32 -> bfloat16 bit patterns (int32 in 0..65535), round-to-nearest-even like torch (finite inputs).

    Stored through an int16 view: the interpreter's own fp32->bf16 cast does not round to nearest even.
    """
    bits = x.to(tl.float32).to(tl.int32, bitcast=True)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) & 0xFFFF


@triton.jit
def round_to(x, dtype: tl.constexpr, interpret: tl.constexpr):
    """Round fp32 ``x`` to ``dtype``'s precision (values may stay fp32 under the interpreter).

    The interpreter's fp32->bf16 cast truncates wrongly, so there the rounding is done on the bits.
    """
    if interpret and dtype == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.int32, bitcast=True)
        return ((bits + 0x7FFF + ((bits >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)
    else:
        return x.to(dtype)


@triton.jit
def store_cast(ptr, x, mask, BF16_BITS: tl.constexpr):
    """Store ``x`` into ``ptr``'s dtype; with BF16_BITS ``ptr`` is an int16 view of bfloat16 storage."""
    if BF16_BITS:
        tl.store(ptr, bf16_bits(x).to(tl.int16), mask=mask)
    else:
        tl.store(ptr, x.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def ue8m0_round(scale):
    """Round positive fp32 scales up to a power of two (exactly, on the exponent bits)."""
    bits = scale.to(tl.int32, bitcast=True)
    exponent = ((bits >> 23) & 0xFF) + ((bits & 0x7FFFFF) != 0).to(tl.int32)
    return (exponent << 23).to(tl.float32, bitcast=True)


@triton.jit
def quant_group_scale(amax, FP8_MAX: tl.constexpr, UE8M0: tl.constexpr):
    """amax [...] -> scale = max(amax, 1e-4) / fp8_max (correctly rounded), power of two with UE8M0."""
    scale = tl.math.div_rn(tl.maximum(amax, _AMAX_FLOOR), FP8_MAX)
    if UE8M0:
        scale = ue8m0_round(scale)
    return scale


@triton.jit
def _act_quant_kernel(
    x_ptr,
    q_ptr,
    s_ptr,
    M,
    N,
    stride_xm,
    stride_qm,
    stride_sm,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    FP8_MAX: tl.constexpr,
    UE8M0: tl.constexpr,
    EXACT_E4M3FN: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    g = tl.program_id(1)
    cols = g * GROUP + tl.arange(0, GROUP)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    scale = quant_group_scale(tl.max(tl.abs(x), axis=1), FP8_MAX, UE8M0)
    y = tl.math.div_rn(x, scale[:, None])
    y = tl.minimum(tl.maximum(y, -FP8_MAX), FP8_MAX)
    q_offs = q_ptr + rows[:, None] * stride_qm + cols[None, :]
    if EXACT_E4M3FN:
        tl.store(q_offs, e4m3fn_bits(y).to(tl.uint8), mask=mask)
    else:  # other fp8 flavours (e4m3fnuz on gfx942): the backend's native cast
        tl.store(q_offs, y.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + rows * stride_sm + g, scale, mask=rows < M)


def act_quant(
    x: torch.Tensor,
    block: int = 128,
    scale_fmt: str | None = None,
    fp8: torch.dtype = torch.float8_e4m3fn,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of :func:`dsv.ops.quant.act_quant`: fp8 values [..., N] and fp32 scales [..., ceil(N/block)].

    Byte-identical to the reference for e4m3fn (``block`` must be a power of two >= 16).
    """
    if block < 16 or block & (block - 1):
        raise ValueError(f"act_quant group size must be a power of two >= 16, got {block}")
    n = x.shape[-1]
    x2 = x.reshape(-1, n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    groups = triton.cdiv(n, block)
    q = torch.empty(m, n, dtype=fp8, device=x.device)
    s = torch.empty(m, groups, dtype=torch.float32, device=x.device)
    exact = fp8 == torch.float8_e4m3fn
    block_m = max(1, min(16, 4096 // block))
    if m and groups:
        _act_quant_kernel[(triton.cdiv(m, block_m), groups)](
            x2,
            q.view(torch.uint8) if exact else q,
            s,
            m,
            n,
            x2.stride(0),
            q.stride(0),
            s.stride(0),
            GROUP=block,
            BLOCK_M=block_m,
            FP8_MAX=fp8_dtype_max(fp8),
            UE8M0=scale_fmt == "ue8m0",
            EXACT_E4M3FN=exact,
        )
    return q.view(*x.shape[:-1], n), s.view(*x.shape[:-1], groups)


def store_view(t: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(tensor to pass as a store pointer, BF16_BITS flag) for :func:`store_cast`."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16), True
    return t, False
