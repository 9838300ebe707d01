"""RMSNorm in one launch (the torch reference takes six: cast, square, mean, rsqrt, two products, cast).

A decode step calls it five times per layer on [batch, width] rows; at small batches each launch costs more
than its arithmetic, so one kernel per call is what matters, not its bandwidth.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv.kernels.triton.quant import store_cast, store_view


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    w_ptr,
    out_ptr,
    N,
    stride_x,
    stride_out,
    eps,
    BLOCK_N: tl.constexpr,
    BF16_BITS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    # The reference's order: x * rsqrt(mean(x^2) + eps), then weight * that, all in fp32.
    inv = 1.0 / tl.sqrt_rn(tl.sum(x * x, axis=0) / N + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    store_cast(out_ptr + row * stride_out + cols, w * (x * inv), mask, BF16_BITS)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Triton twin of :func:`dsv.ops.norm.rms_norm` (fp32 math, result in x's dtype).

    Equal to the reference up to the order of the fp32 sum of squares (a few fp32 ulps before the final
    cast; the conformance tolerances NORM_BF16 / NORM_FP32 state what is allowed).
    """
    n = x.shape[-1]
    if weight.shape != (n,):
        raise ValueError(f"rms_norm weight shape {tuple(weight.shape)} does not match width {n}")
    x2 = x.reshape(-1, n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    rows = x2.shape[0]
    if rows and n:
        block = triton.next_power_of_2(n)
        target, bf16_bits = store_view(out)
        _rms_norm_kernel[(rows,)](
            x2,
            weight.contiguous(),
            target,
            n,
            x2.stride(0),
            out.stride(0),
            float(eps),
            BLOCK_N=block,
            BF16_BITS=bf16_bits,
            num_warps=8 if block >= 4096 else 4,
        )
    return out.view(x.shape)
