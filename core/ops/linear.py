"""Reference linear layer for float and block-FP8 weights."""

from __future__ import annotations

import os
import weakref

import torch

from dsv.ops.quant import quant_roundtrip, weight_dequant

# Dequantized copies of FP8 weights, so the reference does not dequantize every weight on every call
# (that alone was ~40% of a CPU decode step). Keyed by the weight object (checked through a weak reference, so a
# freed weight's address can never alias) and its version counter (in-place updates invalidate the copy).
# Bounded: past DSV_DEQUANT_CACHE_MB (default 1024) weights are dequantized per call again.
_CACHE: dict[int, tuple[weakref.ref, int, torch.Tensor]] = {}
_CACHE_LIMIT = int(os.environ.get("DSV_DEQUANT_CACHE_MB", "1024")) << 20
_cache_bytes = 0


def _forget(key: int, nbytes: int) -> None:
    global _cache_bytes
    if _CACHE.pop(key, None) is not None:
        _cache_bytes -= nbytes


def dequantized_weight(
    weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int], *, cached_only: bool = False
) -> torch.Tensor | None:
    """fp32 copy of a block-FP8 weight [..., out, in], cached while the weight lives and is unchanged.

    With ``cached_only`` the copy is made only if the cache can keep it; otherwise None (the caller then
    dequantizes smaller pieces, e.g. only the routed experts).
    """
    global _cache_bytes
    key = id(weight)
    version = weight._version + scale_inv._version
    hit = _CACHE.get(key)
    if hit is not None and hit[0]() is weight and hit[1] == version:
        return hit[2]
    old = hit[2].numel() * hit[2].element_size() if hit is not None else 0
    nbytes = weight.numel() * 4
    fits = _cache_bytes - old + nbytes <= _CACHE_LIMIT
    if cached_only and not fits:
        return None
    w = weight_dequant(weight, scale_inv, block, torch.float32)
    if hit is not None:
        _forget(key, old)
    if fits:
        _CACHE[key] = (weakref.ref(weight, lambda _, k=key, n=nbytes: _forget(k, n)), version, w)
        _cache_bytes += nbytes
    return w


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
    return dequantized_linear(x, dequantized_weight(weight, scale_inv, block), block[1], act_scale_fmt)


def dequantized_linear(
    x: torch.Tensor, weight_fp32: torch.Tensor, group: int, act_scale_fmt: str | None
) -> torch.Tensor:
    """The FP8 product of :func:`linear` from the weight's fp32 dequantized copy: x quantized per 1 x
    ``group``, the product in fp32, the result in x's dtype."""
    xq = quant_roundtrip(x, group, act_scale_fmt, torch.float32)
    return torch.nn.functional.linear(xq, weight_fp32).to(x.dtype)
