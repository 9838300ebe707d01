"""``linear`` through ``torch._scaled_mm`` with DeepSeek's block scales (cuBLASLt, Hopper, torch >= 2.9).

torch's (BlockWise1x128, BlockWise128x128) recipe, as checked in ATen's ``_scaled_mm_out_cuda``:

- ``mat1`` [M, K] e4m3, row-major; ``mat2`` [K, N] e4m3, column-major (the [N, K] weight transposed);
- ``scale_a`` [M, ceil(K/128)] fp32, outer-dim-major: strides (1, M);
- ``scale_b`` [ceil(K/128), ceil(N/128)] fp32 whose transpose is the row-major [N/128, K/128] block-scale
  tensor (the checkpoint's ``weight_scale_inv`` transposed, no copy);
- K and N divisible by 16; SM90 only, cuBLASLt >= 12.9.

Measured on the H200 (torch 2.11 + CUDA 13): cuBLAS also needs the scales' leading dimensions 16-byte
aligned. M % 4 != 0 fails with CUBLAS_STATUS_NOT_SUPPORTED, so activations are zero-padded to a multiple
of 4 rows. With ceil(K/128) % 4 != 0 the v1 call returns WRONG results without an error (its checks forbid
the padded weight-scale stride cuBLAS reads); those shapes go through ``torch.nn.functional.scaled_mm``
(the v2 API), which takes the weight scales padded to [round_up(K/128, 4), N/128]. DeepSeek-V3.2's K
(7168, 1536, 512, 16384, 18432, 2048) are all multiples of 512, so the v1 call serves the model.
Shapes outside the recipe (float weights, other blocks, K or N not multiples of 16) use the reference math.

Decode-sized calls (M <= :data:`TRITON_MAX_M`) go to dsv's Triton FP8 kernel, which splits K across the SMs
(same quantization, fp32 accumulation; within the same conformance tolerance): cuBLASLt's block-scaled
kernels leave most of the GPU idle there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dsv.ops.linear import linear as reference_linear
from dsv_cuda.adapters.common import quantize_activations, triton_linear

BLOCK = (128, 128)
#: Calls with at most this many rows run dsv's Triton split-K kernel. H200, CUDA graph replays with the
#: activation quantization (``benchmarks/kernels.py --only "fp8_gemm M1,fp8_gemm M32,fp8_gemm M64" --graphs``,
#: eighth session): at M 1 / 16 / 32 Triton took 193 / 181 / 198 us over the nine V3.2 projections against 280
#: / 239 / 260 for cuBLASLt (q_a at M 1: 11.5 vs 22.2 us), and won on 26 of 27 shapes in the first run (lost
#: shared_down by <= 2 us); at M 64 each won on some shapes.
TRITON_MAX_M = 32
#: cuBLAS reads fp32 scale columns 16 bytes at a time.
SCALE_ALIGN = 4


def _has_v2() -> bool:
    return hasattr(F, "scaled_mm") and hasattr(F, "ScalingType")


def supported(x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor | None, block) -> bool:
    """Whether cuBLASLt's block-scaled GEMM can take this call."""
    if scale_inv is None or weight.dtype != torch.float8_e4m3fn or tuple(block) != BLOCK:
        return False
    n, k = weight.shape
    if k % 16 or n % 16 or x.shape[-1] != k or not weight.is_contiguous():
        return False
    return -(-k // 128) % SCALE_ALIGN == 0 or _has_v2()


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale_inv: torch.Tensor | None = None,
    block: tuple[int, int] = BLOCK,
    act_scale_fmt: str | None = None,
) -> torch.Tensor:
    """y = x · Wᵀ with x quantized per 1x128 group (as the reference) and W's 128x128 block scales."""
    if not supported(x, weight, scale_inv, block):
        return reference_linear(x, weight, scale_inv, block, act_scale_fmt)
    n, k = weight.shape
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    small = triton_linear() if x.is_cuda and 0 < m <= TRITON_MAX_M else None
    if small is not None:
        return small(x, weight, scale_inv, block, act_scale_fmt)
    if m == 0:
        return x.new_empty(*x.shape[:-1], n)
    if m % SCALE_ALIGN:
        x2 = F.pad(x2, (0, 0, 0, -m % SCALE_ALIGN))  # zero rows: their outputs are sliced away
    xq, xs = quantize_activations(x2, BLOCK[1], act_scale_fmt)
    scale_a = xs.t().contiguous().t()  # [M', K/128] with strides (1, M')
    out_dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
    kb = xs.shape[1]
    if kb % SCALE_ALIGN == 0:
        y = torch._scaled_mm(
            xq, weight.t(), scale_a=scale_a, scale_b=scale_inv.float().contiguous().t(), out_dtype=out_dtype
        )
    else:
        scale_b = F.pad(scale_inv.float(), (0, -kb % SCALE_ALIGN)).t()  # [L4, N/128], strides (1, L4)
        y = F.scaled_mm(
            xq,
            weight.t(),
            scale_a,
            F.ScalingType.BlockWise1x128,
            scale_b,
            F.ScalingType.BlockWise128x128,
            output_dtype=out_dtype,
        )
    return y[:m].to(x.dtype).view(*x.shape[:-1], n)
