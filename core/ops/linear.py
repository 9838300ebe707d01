"""Reference linear layer for float and block-FP8 weights."""

from __future__ import annotations

import torch

from dsv.ops.quant import quant_roundtrip, weight_dequant


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale_inv: torch.Tensor | None = None,
    block: tuple[int, int] = (128, 128),
    act_scale_fmt: str | None = None,
) -> torch.Tensor:
    """y = x · Wᵀ in x's dtype.

    For an FP8 weight (``scale_inv`` given) the activation is quantized per 1×128 group first, as DeepSeek's
    ``act_quant`` + ``fp8_gemm`` do (power-of-two scales with ``act_scale_fmt="ue8m0"``), and the product is
    accumulated in fp32.
    """
    if scale_inv is None:
        return torch.nn.functional.linear(x, weight.to(x.dtype))
    xq = quant_roundtrip(x, block[1], act_scale_fmt).float()
    w = weight_dequant(weight, scale_inv, block, torch.float32)
    return torch.nn.functional.linear(xq, w).to(x.dtype)
