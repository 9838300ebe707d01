"""Triton lightning-indexer logits and radix top-k against the reference op.

Logits: identical -inf masks and finite values within 1e-5 * max|ref| (fp32 accumulation of exact products:
FP8 keys times power-of-two scales and FP8-rounded or fp32 queries). Top-k: the same number of valid entries
per row, no duplicates, and the chosen entries' reference scores equal the reference selection's (sorted), up
to the logits tolerance; the Triton selection is unsorted, so only the set is compared.
"""

from __future__ import annotations

import pytest
import torch

from tests.triton_support import triton_test_device

DEVICE = triton_test_device()

from dsv.engine.batch import SeqChunk, build_metadata  # noqa: E402
from dsv.kernels.triton.indexer import indexer_logits, indexer_topk  # noqa: E402
from dsv.kernels.triton.topk import topk_indices  # noqa: E402
from dsv.ops import indexer as ref  # noqa: E402
from dsv.ops.kv_cache import IndexKCacheLayer  # noqa: E402
from dsv.ops.metadata import AttentionMetadata  # noqa: E402
from dsv.ops.quant import quant_roundtrip  # noqa: E402

# (cached prefix, new tokens): a prefill, a decode, a chunk over a cached prefix, a very short sequence.
SPANS = [(0, 5), (37, 1), (100, 3), (2, 1)]


def _batch(
    page: int, quantized: bool, d: int = 64, spans: list[tuple[int, int]] = SPANS
) -> tuple[AttentionMetadata, IndexKCacheLayer, IndexKCacheLayer]:
    """Metadata over shuffled pages (every sequence crosses non-adjacent pages), with keys for every position
    written by the reference into a CPU cache and a device copy of it."""
    gen = torch.Generator().manual_seed(page)
    need = [-(-(s + n) // page) for s, n in spans]
    order = (torch.randperm(sum(need), generator=gen) + 1).tolist()
    chunks, at = [], 0
    for (start, n), k in zip(spans, need):
        chunks.append(SeqChunk(start, n, order[at : at + k]))
        at += k
    meta = build_metadata(chunks, page)
    cache = IndexKCacheLayer(sum(need) + 1, page, d, quantized, torch.bfloat16, "cpu")
    for c in chunks:
        pos = torch.arange(c.start + c.num_tokens)
        cache.write(
            torch.tensor(c.pages)[pos // page] * page + pos % page, torch.randn(len(pos), d, generator=gen)
        )
    dev = IndexKCacheLayer(sum(need) + 1, page, d, quantized, torch.bfloat16, DEVICE)
    dev.storage.copy_(cache.storage)
    return meta, cache, dev


def _query(meta: AttentionMetadata, quantized: bool, dtype: torch.dtype | str, h: int = 8, d: int = 64):
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(meta.num_tokens, h, d, generator=gen)
    if dtype == "fp8":
        q = q.to(torch.float8_e4m3fn)
    elif quantized:
        q = quant_roundtrip(q, d, "ue8m0").to(dtype)  # what the model feeds an FP8 cache
    else:
        q = q.to(dtype)
    return q, torch.rand(meta.num_tokens, h, generator=gen) * h**-0.5


def _check_topk(
    got: torch.Tensor, want: torch.Tensor, scores: torch.Tensor, positions: torch.Tensor, tol: float = 1e-5
) -> None:
    got = got.cpu()
    assert got.shape == want.shape and got.dtype == torch.int32
    assert torch.equal((got >= 0).sum(1), (want >= 0).sum(1)), "different numbers of valid entries"
    for t in range(got.shape[0]):
        g = got[t][got[t] >= 0].long()
        w = want[t][want[t] >= 0].long()
        if w.numel() == 0:
            continue
        assert g.unique().numel() == g.numel(), f"row {t} has duplicates"
        assert int(g.max()) <= int(positions[t]), f"row {t} selects an invisible key"
        diff = (scores[t, g].sort().values - scores[t, w].sort().values).abs().max()
        assert diff <= tol * scores[t, w].abs().max(), f"row {t}: chosen scores differ by {diff}"


@pytest.mark.parametrize(
    "page,quantized,qdtype",
    [
        (1, True, torch.float32),
        (16, True, torch.bfloat16),
        (16, True, "fp8"),
        (4, False, torch.float32),
        (64, False, torch.bfloat16),
    ],
)
def test_indexer_matches_reference(page: int, quantized: bool, qdtype: torch.dtype | str) -> None:
    meta, cache, dev = _batch(page, quantized)
    q, w = _query(meta, quantized, qdtype)
    dmeta = meta.to(DEVICE)
    want_logits = ref.indexer_logits(q, w, cache, meta)
    got_logits = indexer_logits(q.to(DEVICE), w.to(DEVICE), dev, dmeta).cpu()
    inf = torch.isinf(want_logits)
    assert torch.equal(torch.isinf(got_logits), inf) and (got_logits[inf] < 0).all()
    # Compiled for Hopper, an FP8 dot with 64+ keys runs on wgmma, whose FP8 accumulation keeps fewer bits than
    # fp32 (H200: 8e-5 of max here, 1.2e-4 at 64 heads x 128 dims, as the earlier heads-as-M kernel had there).
    tol = 5e-4 if qdtype == "fp8" and DEVICE == "cuda" else 1e-5
    err = (got_logits[~inf] - want_logits[~inf]).abs().max().item()
    assert err <= tol * want_logits[~inf].abs().max().item()
    # 8: fewer than most rows' keys; 64: more than the short rows have; 256: more than any row (all -1 padded)
    for topk in (8, 64, 256):
        want = ref.indexer_topk(q, w, cache, meta, topk)
        got = indexer_topk(q.to(DEVICE), w.to(DEVICE), dev, dmeta, topk, topk_impl="triton")
        _check_topk(got, want, want_logits, meta.positions, tol)


@pytest.mark.parametrize(
    "impl,iters", [("torch", None), ("auto", None), ("multiblock", 1), ("multiblock", 3)]
)
def test_indexer_topk_impl_options(impl: str, iters: int | None) -> None:
    # logits_iters changes how many key blocks each logits program scores, and so the groups whose maxima
    # the multiblock top-k filters with; the selection must not change.
    meta, cache, dev = _batch(16, True)
    q, w = _query(meta, True, torch.float32)
    got = indexer_topk(
        q.to(DEVICE), w.to(DEVICE), dev, meta.to(DEVICE), 32, topk_impl=impl, logits_iters=iters
    )
    want = ref.indexer_topk(q, w, cache, meta, 32)
    _check_topk(got, want, ref.indexer_logits(q, w, cache, meta), meta.positions)


@pytest.mark.parametrize("bits", [8, 11])
def test_radix_topk_ties_signs_and_short_rows(bits: int) -> None:
    """Heavy ties at the threshold, negative and huge values, empty and short rows, -inf holes; 8-bit digits
    (four passes) and 11-bit digits (three passes, the last one 10 bits wide)."""
    gen = torch.Generator().manual_seed(8)
    length = 3000
    x = torch.randn(6, length, generator=gen)
    x[0] = torch.randint(0, 5, (length,), generator=gen).float()  # ties
    x[2, :1000] = -x[2, :1000].abs() * 1e30
    x[4, ::2] = float("-inf")
    lengths = torch.tensor([3000, 100, 2500, 0, 1500, 2999])
    for t, n in enumerate(lengths.tolist()):
        x[t, n:] = float("-inf")
    for topk in (16, 1024):
        got = topk_indices(x.to(DEVICE), lengths.to(DEVICE), topk, radix_bits=bits)
        _check_topk(got, ref.topk_positions(x, topk), x, lengths - 1)
