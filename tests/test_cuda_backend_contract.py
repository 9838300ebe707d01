"""Contract tests of the dsv-cuda adapters (FlashMLA, FA3, DeepGEMM, torch._scaled_mm).

These libraries cannot run here (no GPU). Each test installs a stand-in module (tests/test_cuda_backend_
standins.py) that asserts the shapes, dtypes, layouts and constraints the real library documents and
computes with the reference math, calls the adapter on CPU tensors, and compares with dsv's reference op.
They are contract tests: they check that the adapters honor the documented interfaces, not that the
hardware path works (run backends/cuda/scripts/h200_check.py on an H200 for that).
"""

from __future__ import annotations

import sys

import pytest
import torch

from dsv.backend.interface import KernelUnavailable
from dsv.backend.reference import REFERENCE_OPS
from dsv.engine.batch import SeqChunk, build_metadata
from dsv.ops.kv_cache import IndexKCacheLayer, MLACacheLayer
from dsv.ops.moe import ExpertWeights
from dsv.ops.quant import act_quant, weight_quant
from tests import test_cuda_backend_standins as standins

pytest.importorskip("dsv_cuda", reason="install with: pip install -e backends/cuda --no-deps")

from dsv_cuda.adapters import deepgemm, fa3, flashmla, scaled_mm  # noqa: E402

R, DR, D = 512, 64, 576
SCALE = D**-0.5


@pytest.fixture(autouse=True)
def _no_real_sgl_kernel(monkeypatch):
    # The adapters try sgl_kernel first; make sure only the stand-ins are found.
    monkeypatch.setitem(sys.modules, "sgl_kernel", None)


def install(monkeypatch, mod):
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    return mod


def mla_cache(layout: str, page_size: int = 64, pages: int = 6, seed: int = 0) -> MLACacheLayer:
    """An MLA cache of V3.2 width with every slot written."""
    cache = MLACacheLayer(pages, page_size, R, DR, layout, torch.bfloat16, "cpu")
    g = torch.Generator().manual_seed(seed)
    n = pages * page_size
    cache.write(torch.arange(n), torch.randn(n, R, generator=g), torch.randn(n, DR, generator=g))
    return cache


def sparse_indices(t: int, k: int, n_slots: int, seed: int = 1) -> torch.Tensor:
    """[t, k] distinct global slots with -1 scattered in (not valid-first), one row entirely -1."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(n_slots, generator=g)[:k] for _ in range(t)])
    idx = idx.masked_fill(torch.rand(t, k, generator=g) < 0.3, -1)
    idx[-1] = -1
    return idx.to(torch.int32)


def queries(t: int, h: int, seed: int = 2) -> torch.Tensor:
    return torch.randn(t, h, D, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 2e-2) -> None:
    torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol)


# ----- FlashMLA -----


@pytest.mark.parametrize("head_api", [False, True], ids=["launch-api", "head-api"])
def test_flashmla_decode_contract(monkeypatch, head_api):
    mod = install(monkeypatch, standins.flash_mla(head_api))
    cache = mla_cache("fp8")
    q, idx = queries(4, 16), sparse_indices(4, 100, 6 * 64)
    out = flashmla.sparse_decode(q, cache, idx, SCALE)
    assert mod.calls == ["get_mla_metadata", "flash_mla_with_kvcache"]
    assert out.shape == (4, 16, R) and out.dtype == q.dtype
    close(out, REFERENCE_OPS["sparse_mla_decode"](q, cache, idx, SCALE))
    assert bool((out[-1] == 0).all())


def test_flashmla_decode_refuses_what_it_cannot_read(monkeypatch):
    install(monkeypatch, standins.flash_mla(False))
    q, idx = queries(2, 16), sparse_indices(2, 64, 4 * 16)
    with pytest.raises(KernelUnavailable, match="FP8 KV layout"):
        flashmla.sparse_decode(q, mla_cache("float"), idx, SCALE)
    with pytest.raises(KernelUnavailable, match="--page-size 64"):
        flashmla.sparse_decode(q, mla_cache("fp8", page_size=16, pages=4), idx, SCALE)


@pytest.mark.parametrize("layout", ["float", "fp8"])
def test_flashmla_prefill_contract(monkeypatch, layout):
    mod = install(monkeypatch, standins.flash_mla(False))
    cache = mla_cache(layout)
    q, idx = queries(5, 16), sparse_indices(5, 90, 6 * 64)
    out = flashmla.sparse_prefill(q, cache, idx, SCALE)
    assert mod.calls == ["flash_mla_sparse_fwd"]
    assert out.shape == (5, 16, R)
    close(out, REFERENCE_OPS["sparse_mla_prefill"](q, cache, idx, SCALE))


def test_flashmla_rejects_other_shapes(monkeypatch):
    install(monkeypatch, standins.flash_mla(False))
    small = MLACacheLayer(2, 64, 128, 64, "float", torch.bfloat16, "cpu")
    with pytest.raises(KernelUnavailable, match="DeepSeek-V3.2 shapes"):
        flashmla.sparse_prefill(torch.zeros(1, 4, 192, dtype=torch.bfloat16), small, torch.zeros(1, 8), 1.0)


# ----- FA3 -----


@pytest.mark.parametrize("page_size", [1, 16, 64])
def test_fa3_sparse_mla_contract(monkeypatch, page_size):
    mod = install(monkeypatch, standins.flash_attn_interface())
    pages = 384 // page_size
    cache = mla_cache("float", page_size=page_size, pages=pages)
    q, idx = queries(6, 8), sparse_indices(6, 130, 384)
    out = fa3.sparse_mla(q, cache, idx, SCALE)
    assert mod.calls == ["flash_attn_with_kvcache"]
    close(out, REFERENCE_OPS["sparse_mla_decode"](q, cache, idx, SCALE))
    assert bool((out[-1] == 0).all())


def test_fa3_refuses_the_fp8_cache(monkeypatch):
    install(monkeypatch, standins.flash_attn_interface())
    with pytest.raises(KernelUnavailable, match="bf16 KV cache"):
        fa3.sparse_mla(queries(1, 4), mla_cache("fp8"), sparse_indices(1, 64, 64), SCALE)


def test_fa3_mha_prefill_contract(monkeypatch):
    mod = install(monkeypatch, standins.flash_attn_interface())
    g = torch.Generator().manual_seed(3)
    q = torch.randn(7, 4, 192, generator=g).to(torch.bfloat16)
    k = torch.randn(12, 4, 192, generator=g).to(torch.bfloat16)
    v = torch.randn(12, 4, 128, generator=g).to(torch.bfloat16)
    cu_q, cu_k = torch.tensor([0, 3, 7]), torch.tensor([0, 5, 12])  # chunk on top of a cached prefix
    out = fa3.mha_prefill(q, k, v, cu_q, cu_k, 0.1)
    assert mod.calls == ["flash_attn_varlen_func"]
    close(out, REFERENCE_OPS["mha_prefill"](q, k, v, cu_q, cu_k, 0.1))


# ----- DeepGEMM / scaled_mm linear -----


def fp8_weight(n: int, k: int, seed: int = 4):
    w, s = weight_quant(torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05)
    return w, s


@pytest.mark.parametrize("fmt", [None, "ue8m0"])
@pytest.mark.parametrize("n", [384, 576])  # 576: a ragged last block of 64 rows (kv_a_proj)
def test_deepgemm_linear_contract(monkeypatch, fmt, n):
    mod = install(monkeypatch, standins.deep_gemm())
    w, s = fp8_weight(n, 256)
    x = torch.randn(2, 3, 256).to(torch.bfloat16)
    out = deepgemm.linear(x, w, s, (128, 128), fmt)
    assert mod.calls == ["fp8_gemm_nt"] and out.shape == (2, 3, n)
    close(out, REFERENCE_OPS["linear"](x, w, s, (128, 128), fmt))


@pytest.mark.parametrize("m", [1, 5, 8])
@pytest.mark.parametrize("n", [384, 576])
@pytest.mark.parametrize("k", [512, 640])  # 640: 5 K-blocks, not a multiple of 4 -> the v2 API
def test_scaled_mm_linear_contract(monkeypatch, m, n, k):
    calls: list[str] = []
    monkeypatch.setattr(torch, "_scaled_mm", standins.scaled_mm(calls))
    monkeypatch.setattr(torch.nn.functional, "scaled_mm", standins.scaled_mm_v2(calls))
    w, s = fp8_weight(n, k)
    x = torch.randn(m, k).to(torch.bfloat16)
    out = scaled_mm.linear(x, w, s, (128, 128), "ue8m0")
    assert calls == (["_scaled_mm"] if k == 512 else ["scaled_mm"])
    assert out.shape == (m, n)
    close(out, REFERENCE_OPS["linear"](x, w, s, (128, 128), "ue8m0"))


def test_scaled_mm_leaves_unsupported_shapes_to_the_reference(monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(torch, "_scaled_mm", standins.scaled_mm(calls))
    x = torch.randn(3, 40)
    w = torch.randn(24, 40)
    torch.testing.assert_close(scaled_mm.linear(x, w), REFERENCE_OPS["linear"](x, w))
    assert calls == []


def test_deepgemm_fused_moe_contract(monkeypatch):
    mod = install(monkeypatch, standins.deep_gemm())
    e, d, i, t, top = 4, 256, 128, 6, 2
    g = torch.Generator().manual_seed(5)
    packs = [
        [weight_quant(torch.randn(o, n, generator=g) * 0.05) for _ in range(e)]
        for o, n in ((i, d), (i, d), (d, i))
    ]
    stacked = [(torch.stack([p[0] for p in ws]), torch.stack([p[1] for p in ws])) for ws in packs]
    experts = ExpertWeights(
        stacked[0][0],
        stacked[1][0],
        stacked[2][0],
        stacked[0][1],
        stacked[1][1],
        stacked[2][1],
        act_scale_fmt="ue8m0",
    )
    x = torch.randn(t, d, generator=g).to(torch.bfloat16)
    ids = torch.tensor([[0, 2], [2, 3], [0, 1], [2, 0], [3, 2], [2, 1]])
    weights = torch.rand(t, top, generator=g)
    out = deepgemm.fused_moe(x, weights, ids, experts)
    assert mod.calls.count("m_grouped_fp8_gemm_nt_contiguous") == 3
    close(out, REFERENCE_OPS["fused_moe"](x, weights, ids, experts), tol=3e-2)


# ----- DeepGEMM indexer -----

IH, ID, TOPK = 32, 128, 64


def indexer_batch(chunks: list[SeqChunk], seed: int = 6):
    """A quantized indexer cache with every page written, metadata for ``chunks``, fp8 q and weights."""
    g = torch.Generator().manual_seed(seed)
    cache = IndexKCacheLayer(8, 64, ID, True, torch.bfloat16, "cpu")
    cache.write(torch.arange(8 * 64), torch.randn(8 * 64, ID, generator=g))
    meta = build_metadata(chunks, 64)
    q, q_scale = act_quant(torch.randn(meta.num_tokens, IH, ID, generator=g), ID, "ue8m0")
    weights = torch.rand(meta.num_tokens, IH, generator=g) * q_scale[..., 0]
    return cache, meta, q, weights


def same_sets(a: torch.Tensor, b: torch.Tensor) -> None:
    """Top-k rows hold the same positions (order is free: attention does not depend on it)."""
    assert a.shape == b.shape and a.dtype == torch.int32
    assert torch.equal(a.sort(-1).values, b.sort(-1).values)


def test_indexer_cache_is_deepgemm_paged_layout():
    cache, *_ = indexer_batch([SeqChunk(0, 1, [1])])
    view = cache.storage.view(8, 64, 1, ID + 4)
    assert view.data_ptr() == cache.storage.data_ptr() and view.is_contiguous()
    # block b: 64 x 128 e4m3 key bytes then 64 fp32 scales, as deep_gemm's kv_cache_cast_to_fp8 builds it
    raw = view.view(8, 64 * (ID + 4))
    assert torch.equal(
        raw[3, : 64 * ID].view(torch.float8_e4m3fn).view(64, ID).float(), cache.keys[3].float()
    )
    assert torch.equal(raw[3, 64 * ID :].view(torch.float32), cache.scales[3])


def test_deepgemm_indexer_prefill_contract(monkeypatch):
    mod = install(monkeypatch, standins.deep_gemm())
    cache, meta, q, w = indexer_batch([SeqChunk(0, 70, [2, 5]), SeqChunk(60, 40, [1, 3])])
    out = deepgemm.indexer_prefill(q, w, cache, meta, TOPK)
    assert mod.calls == ["fp8_mqa_logits"]
    same_sets(out, REFERENCE_OPS["indexer_topk_prefill"](q, w, cache, meta, TOPK))


def test_deepgemm_indexer_decode_contract(monkeypatch):
    mod = install(monkeypatch, standins.deep_gemm())
    cache, meta, q, w = indexer_batch(
        [SeqChunk(99, 1, [4, 6]), SeqChunk(30, 1, [7]), SeqChunk(127, 1, [2, 1])]
    )
    out = deepgemm.indexer_decode(q, w, cache, meta, TOPK)
    assert mod.calls == ["get_paged_mqa_logits_metadata", "fp8_paged_mqa_logits"]
    same_sets(out, REFERENCE_OPS["indexer_topk_decode"](q, w, cache, meta, TOPK))


def test_deepgemm_indexer_refuses_unquantized_cache_and_other_pages(monkeypatch):
    install(monkeypatch, standins.deep_gemm())
    cache = IndexKCacheLayer(2, 16, ID, True, torch.bfloat16, "cpu")
    meta = build_metadata([SeqChunk(3, 1, [1])], 16)
    q = torch.zeros(1, IH, ID).to(torch.float8_e4m3fn)
    with pytest.raises(KernelUnavailable, match="--page-size 64"):
        deepgemm.indexer_decode(q, torch.ones(1, IH), cache, meta, 8)
    plain = IndexKCacheLayer(2, 64, ID, False, torch.bfloat16, "cpu")
    with pytest.raises(KernelUnavailable, match="--indexer-quant fp8"):
        deepgemm.indexer_prefill(q, torch.ones(1, IH), plain, meta, 8)
