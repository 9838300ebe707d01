"""Triton sparse MLA (prefill and decode) against the reference op.

Tolerances, as a fraction of max|ref|: fp32 q and rows 1e-4 (fp32 operands, only the summation order differs);
bf16 2e-2 (the output is rounded to bf16, a 2^-8 relative step, and on a GPU the probabilities enter the P·V
product as bf16). FP8 caches compare with the reference reading the same bytes, so quantization error cancels.
"""

from __future__ import annotations

import pytest
import torch

from tests.triton_support import triton_test_device

DEVICE = triton_test_device()

from dsv.kernels.triton.sparse_mla import sparse_mla  # noqa: E402
from dsv.ops.attention import sparse_mla as ref_sparse_mla  # noqa: E402
from dsv.ops.kv_cache import MLACacheLayer  # noqa: E402

TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


def _cache(layout: str, dtype: torch.dtype, page: int, slots: int, r: int, dr: int) -> MLACacheLayer:
    cache = MLACacheLayer(slots // page, page, r, dr, layout, dtype, "cpu")
    gen = torch.Generator().manual_seed(slots + page)
    cache.write(
        torch.arange(slots), torch.randn(slots, r, generator=gen), torch.randn(slots, dr, generator=gen)
    )
    return cache


def _indices(t: int, k: int, slots: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(t * k)
    idx = torch.randint(0, slots, (t, k), generator=gen)
    idx[0, 1] = idx[0, 0]  # a duplicate counts twice, as in the reference
    idx[1, 7:] = -1  # decode-style tail padding
    if t > 2:
        idx[2] = -1  # nothing valid: the row must be 0
    if t > 3:
        idx[3, ::3] = -1  # scattered padding
    return idx


def _check(q: torch.Tensor, cache: MLACacheLayer, idx: torch.Tensor, scale: float, **kw) -> None:
    ref = ref_sparse_mla(q, cache, idx, scale).float()
    pages, page = cache.storage.shape[:2]
    on_dev = MLACacheLayer(pages, page, cache.kv_lora_rank, cache.rope_dim, cache.layout, cache.dtype, DEVICE)
    on_dev.storage.copy_(cache.storage)
    out = sparse_mla(q.to(DEVICE), on_dev, idx.to(DEVICE), scale, **kw).float().cpu()
    assert out.shape == ref.shape
    empty = (idx < 0).all(1)
    assert torch.equal(out[empty], torch.zeros_like(out[empty]))
    err = (out - ref).abs().max().item()
    assert err <= TOL[q.dtype] * ref.abs().max().item(), f"max err {err:.3e}, max |ref| {ref.abs().max():.3e}"


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize(
    "layout,dtype,page",
    [
        ("float", torch.float32, 1),
        ("float", torch.float32, 64),
        ("fp8", torch.float32, 16),
        ("fp8", torch.bfloat16, 64),
        ("float", torch.bfloat16, 1),
    ],
)
def test_sparse_mla_matches_reference(layout: str, dtype: torch.dtype, page: int, splits: int) -> None:
    """20 heads (two head blocks, the second partial), K = 40 (a partial index block), padding and splits."""
    cache = _cache(layout, dtype, page, 128, 256, 64)
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(5, 20, 320, generator=gen).to(dtype)
    _check(q, cache, _indices(5, 40, 128), 320**-0.5, num_splits=splits)


def test_sparse_mla_deepseek_dims_fp8_decode() -> None:
    """V3.2 row geometry (512 latent + 64 rope, 656-byte FP8 rows), decode with 16 heads and split-KV."""
    cache = _cache("fp8", torch.bfloat16, 64, 256, 512, 64)
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(2, 16, 576, generator=gen).to(torch.bfloat16)
    _check(q, cache, _indices(2, 96, 256), 576**-0.5, num_splits=2, block_n=32)


def test_sparse_mla_fp32_query_over_bf16_rows() -> None:
    """Mixed dtypes compute in fp32 on the bf16 rows, like the reference."""
    cache = _cache("float", torch.bfloat16, 4, 64, 128, 32)
    q = torch.randn(4, 3, 160, generator=torch.Generator().manual_seed(5))
    _check(q, cache, _indices(4, 24, 64), 0.1)


def test_sparse_mla_fp8_rank_not_a_power_of_two() -> None:
    """R = 384: three scale tiles per row, read per element instead of per tile."""
    cache = _cache("fp8", torch.float32, 8, 64, 384, 64)
    q = torch.randn(3, 4, 448, generator=torch.Generator().manual_seed(6))
    _check(q, cache, _indices(3, 20, 64), 0.05)
