"""The CPU engine's bf16 read copy of the FP8 indexer keys: the same values as dequantizing the FP8 bytes."""

from __future__ import annotations

import torch

from dsv.engine.kv_pool import CacheSpec
from dsv.ops.kv_cache import IndexKCacheLayer
from tests.engine_helpers import make_engine


def _caches(pages: int, page: int, dim: int) -> tuple[IndexKCacheLayer, IndexKCacheLayer]:
    plain = IndexKCacheLayer(pages, page, dim, True, torch.bfloat16, "cpu")
    copied = IndexKCacheLayer(pages, page, dim, True, torch.bfloat16, "cpu", read_copy=True)
    return plain, copied


def test_read_copy_gives_the_dequantized_fp8_keys_exactly():
    """Keys over a wide range of magnitudes (scales 2^-110 .. 2^40): every read of the copy equals the
    dequantized FP8 bytes bit for bit, and the FP8 bytes themselves are unchanged by keeping a copy."""
    pages, page, dim = 6, 4, 64
    plain, copied = _caches(pages, page, dim)
    g = torch.Generator().manual_seed(0)
    slots = torch.randperm(pages * page, generator=g)[:20]
    exponents = torch.linspace(-100, 45, 20).round()
    k = torch.randn(20, dim, generator=g) * torch.exp2(exponents)[:, None]
    k[3, :5] = 0.0  # zeros and a row of one sign
    k[7] = k[7].abs()
    for cache in (plain, copied):
        cache.write(slots, k)
    assert torch.equal(plain.storage, copied.storage)
    assert torch.equal(copied.read(slots), plain.read(slots))
    table = torch.randperm(pages, generator=g)[: pages - 1].view(1, -1).expand(2, -1).contiguous()
    for length in (1, page, 3 * page + 2):
        got = copied.read_sequences(table, length)
        assert got.dtype == torch.float32
        assert torch.equal(got, plain.read_sequences(table, length))
    assert copied.bytes_per_token == plain.bytes_per_token + 2 * dim == dim + 4 + 2 * dim


def test_cpu_engine_keeps_the_copy_and_counts_its_bytes():
    engine = make_engine()
    assert engine.spec.index_read_copy
    index = engine.pool.layers[0].index
    assert index.copy is not None and "bf16 read copy" in engine.kv_summary()
    assert index.bytes_per_token == 3 * index.head_dim + 4
    unquantized = make_engine(indexer_quant="none")
    assert unquantized.spec == CacheSpec(unquantized.spec.page_size, "auto", "none")
    assert unquantized.pool.layers[0].index.copy is None
