"""The weighted top-k sum after the down GEMM, as one Triton pass (imported only on the GPU path).

The down GEMM writes each routed row's expert output, rounded to x's dtype, in the expert-sorted layout; each
token gathers its top-k rows, scales them by the routing weights and sums in fp32, as the reference's
``index_add_`` of ``y.to(x.dtype).float() * weight`` does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

#: Columns per program: 16-byte loads of bf16 rows with 4 warps.
BLOCK_D = 1024


@triton.jit
def _combine_kernel(
    y_ptr,
    dest_ptr,
    w_ptr,
    out_ptr,
    D,
    stride_y,
    stride_o,
    TOPK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    t = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < D
    acc = tl.zeros([BLOCK], tl.float32)
    for j in tl.static_range(TOPK):
        row = tl.load(dest_ptr + t * TOPK + j).to(tl.int64)
        w = tl.load(w_ptr + t * TOPK + j)
        acc += tl.load(y_ptr + row * stride_y + cols, mask=mask, other=0.0).to(tl.float32) * w
    tl.store(out_ptr + t.to(tl.int64) * stride_o + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


def combine_rows(
    y: torch.Tensor, dest: torch.Tensor, weights: torch.Tensor, out_dtype: torch.dtype
) -> torch.Tensor:
    """out [T, D] = sum_j weights[t, j] * y[dest[t * top_k + j]] (fp32 sum, ``out_dtype`` result)."""
    t, top_k = weights.shape
    d = y.shape[1]
    out = torch.empty(t, d, dtype=out_dtype, device=y.device)
    if t:
        w = weights.reshape(-1).float().contiguous()
        grid = (t, triton.cdiv(d, BLOCK_D))
        _combine_kernel[grid](
            y, dest.contiguous(), w, out, d, y.stride(0), out.stride(0), TOPK=top_k, BLOCK=BLOCK_D
        )
    return out
