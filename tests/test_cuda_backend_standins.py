"""Stand-ins for the NVIDIA vendor libraries, used by the contract tests of ``dsv_cuda``'s adapters.

No tests here. Each stand-in module implements the vendor entry points the adapters call with plain torch
math on the CPU, and asserts the argument shapes, dtypes, layouts and constraints the real libraries
document (FlashMLA's README/interface, FA3's ``flash_attn_with_kvcache`` as SGLang drives it, DeepGEMM's
README and tests, ATen's ``_scaled_mm`` checks). Passing them proves the adapters honor those contracts;
it is not proof that the hardware path works (that is ``backends/cuda/scripts/h200_check.py``).
"""

from __future__ import annotations

import dataclasses
from types import ModuleType

import torch

from dsv.ops.attention import mha_prefill
from dsv.ops.quant import act_dequant, unpack_fp8_kv

FP8 = torch.float8_e4m3fn


def attend(q: torch.Tensor, rows: torch.Tensor, valid: torch.Tensor, scale: float, dv: int):
    """Softmax attention of q [N, H, D] over rows [N, K, D] (valid [N, K]); output [N, H, dv], lse [N, H]."""
    s = torch.einsum("nhd,nkd->nhk", q.float(), rows.float()) * scale
    s = s.masked_fill(~valid[:, None, :], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return torch.einsum("nhk,nkd->nhd", p, rows[..., :dv].float()), lse


class StandIn(ModuleType):
    """A module object that records which entry points were called."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.calls: list[str] = []


# ----- FlashMLA -----


@dataclasses.dataclass
class FlashMLASchedMeta:
    have_initialized: bool = False


def flash_mla(head_api: bool) -> StandIn:
    """``flash_mla`` with the launch API (Sept 2025) or the HEAD API (2026) of ``get_mla_metadata``."""
    mod = StandIn("flash_mla")

    def get_mla_metadata(*args, **kwargs):
        mod.calls.append("get_mla_metadata")
        if head_api:
            return FlashMLASchedMeta(), None
        seqlens = kwargs["cache_seqlens"]
        assert seqlens.dtype == torch.int32 and seqlens.dim() == 1
        assert kwargs["num_heads_k"] == 1 and kwargs["is_fp8_kvcache"] is True
        assert kwargs["topk"] % 64 == 0
        assert kwargs["num_q_tokens_per_head_k"] == kwargs["num_heads_q"]  # s_q = 1, h_kv = 1
        return torch.zeros(132, 8, dtype=torch.int32), torch.zeros(seqlens.shape[0] + 1, dtype=torch.int32)

    def flash_mla_with_kvcache(
        q,
        k_cache,
        block_table,
        cache_seqlens,
        head_dim_v,
        tile_scheduler_metadata,
        num_splits=None,
        softmax_scale=None,
        causal=False,
        is_fp8_kvcache=False,
        indices=None,
    ):
        mod.calls.append("flash_mla_with_kvcache")
        b, s_q, h_q, d = q.shape
        assert q.dtype == torch.bfloat16 and d == 576 and head_dim_v == 512
        nb, page, h_k, width = k_cache.shape
        assert page == 64, "page_block_size must be 64"
        assert h_k == 1 and width == 656 and k_cache.dtype in (torch.uint8, torch.int8, FP8)
        assert k_cache.stride(1) == 656 and k_cache.stride(0) == 64 * 656, "whole blocks contiguous"
        assert is_fp8_kvcache is True and causal is False, "sparse decode: FP8 cache, causal=False"
        assert indices is not None and indices.dtype == torch.int32 and indices.shape[:2] == (b, s_q)
        assert indices.shape[-1] % 64 == 0, "topk % 64 == 0"
        assert block_table.dtype == torch.int32 and block_table.shape[0] == b
        assert cache_seqlens.dtype == torch.int32 and cache_seqlens.shape == (b,)
        if head_api:
            assert isinstance(tile_scheduler_metadata, FlashMLASchedMeta) and num_splits is None
            assert h_q in (64, 128), "HEAD FlashMLA takes 64 or 128 query heads"
        else:
            assert isinstance(tile_scheduler_metadata, torch.Tensor) and num_splits.shape == (b + 1,)
        idx = indices.reshape(b * s_q, -1)
        valid = (idx >= 0) & (idx < nb * page)
        flat = k_cache.reshape(nb * page, width)
        rows = unpack_fp8_kv(flat[idx.clamp_min(0).reshape(-1).long()], 512, 64).view(
            b * s_q, idx.shape[1], d
        )
        out, lse = attend(q.reshape(b * s_q, h_q, d), rows, valid, softmax_scale, head_dim_v)
        return out.view(b, s_q, h_q, 512).to(torch.bfloat16), lse.view(b, s_q, h_q).transpose(1, 2)

    def flash_mla_sparse_fwd(q, kv, indices, sm_scale, d_v=512):
        mod.calls.append("flash_mla_sparse_fwd")
        s_q, h_q, d = q.shape
        assert q.dtype == torch.bfloat16 and kv.dtype == torch.bfloat16 and d in (576, 512) and d_v == 512
        assert h_q in (64, 128), "h_q must be 64 or 128"
        s_kv, h_kv, d_kv = kv.shape
        assert h_kv == 1 and d_kv == d and kv.stride(-1) == 1
        assert indices.dtype == torch.int32 and indices.shape[:2] == (s_q, 1)
        assert indices.shape[-1] % 128 == 0, "SM90 sparse prefill needs topk % 128 == 0"
        idx = indices[:, 0]
        valid = (idx >= 0) & (idx < s_kv)
        rows = kv[idx.clamp(0, s_kv - 1).reshape(-1).long(), 0].view(s_q, idx.shape[1], d)
        out, lse = attend(q, rows, valid, sm_scale, d_v)
        return out.to(torch.bfloat16), lse, lse  # (out, max_logits, lse): only out is used

    mod.get_mla_metadata = get_mla_metadata
    mod.flash_mla_with_kvcache = flash_mla_with_kvcache
    mod.flash_mla_sparse_fwd = flash_mla_sparse_fwd
    return mod


# ----- FA3 -----


def flash_attn_interface() -> StandIn:
    """FA3's ``flash_attn_interface`` (the hopper/ build; sgl_kernel.flash_attn has the same signatures)."""
    mod = StandIn("flash_attn_interface")

    def flash_attn_with_kvcache(
        q,
        k_cache,
        v_cache,
        k=None,
        v=None,
        qv=None,
        cache_seqlens=None,
        page_table=None,
        cu_seqlens_q=None,
        cu_seqlens_k_new=None,
        max_seqlen_q=None,
        softmax_scale=None,
        causal=False,
        return_softmax_lse=False,
    ):
        mod.calls.append("flash_attn_with_kvcache")
        t, h, dr = q.shape
        assert q.dtype in (torch.bfloat16, torch.float16) and qv.dtype == q.dtype and k_cache.dtype == q.dtype
        assert k is None and v is None and q.stride(-1) == 1 and qv.stride(-1) == 1
        n, page, hk, dk = k_cache.shape
        assert page == 1 and hk == 1 and dk == dr and k_cache.stride(-1) == 1
        assert (
            v_cache.shape[:3] == (n, 1, 1)
            and v_cache.stride(-1) == 1
            and qv.shape == (t, h, v_cache.shape[-1])
        )
        assert page_table.dtype == torch.int32 and page_table.shape[0] == t
        assert cache_seqlens.dtype == torch.int32 and cache_seqlens.shape == (t,)
        assert torch.equal(cu_seqlens_q, torch.arange(t + 1, dtype=torch.int32)), "one query per sequence"
        assert cu_seqlens_k_new is None or torch.equal(cu_seqlens_k_new[1:], cache_seqlens.cumsum(0).int())
        assert max_seqlen_q == 1 and causal is True
        j = torch.arange(page_table.shape[1])[None, :]
        used = j < cache_seqlens[:, None].long()
        assert bool(((page_table >= 0) & (page_table < n))[used].all()), (
            "the first cache_seqlens pages are valid"
        )
        slots = page_table.clamp(0, n - 1).long()
        rows = torch.cat([v_cache[slots, 0, 0], k_cache[slots, 0, 0]], dim=-1)  # [T, K, R + Dr]
        out, lse = attend(torch.cat([qv, q], dim=-1), rows, used, softmax_scale, v_cache.shape[-1])
        out = out.to(q.dtype)
        return (out, lse) if return_softmax_lse else out

    def flash_attn_varlen_func(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale=None, causal=False
    ):
        mod.calls.append("flash_attn_varlen_func")
        assert q.dtype in (torch.bfloat16, torch.float16) and k.dtype == q.dtype and v.dtype == q.dtype
        assert cu_seqlens_q.dtype == torch.int32 and cu_seqlens_k.dtype == torch.int32
        assert isinstance(max_seqlen_q, int) and isinstance(max_seqlen_k, int)
        assert max_seqlen_q == int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max()) and causal is True
        return mha_prefill(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale)

    mod.flash_attn_with_kvcache = flash_attn_with_kvcache
    mod.flash_attn_varlen_func = flash_attn_varlen_func
    return mod


# ----- DeepGEMM -----


def _deq_blocks(w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """[N, K] e4m3 with [ceil(N/128), ceil(K/128)] fp32 scales -> fp32."""
    n, k = w.shape
    full = s.float().repeat_interleave(128, 0)[:n].repeat_interleave(128, 1)[:, :k]
    return w.float() * full


def deep_gemm(alignment: int = 128) -> StandIn:
    mod = StandIn("deep_gemm")

    def check_lhs(a):
        x, sf = a
        assert x.dtype == FP8 and x.is_contiguous() and sf.dtype == torch.float32
        assert sf.shape == (x.shape[0], -(-x.shape[1] // 128)), "1x128 activation scales"
        return act_dequant(x, sf, 128)

    def fp8_gemm_nt(a, b, d, c=None):
        mod.calls.append("fp8_gemm_nt")
        lhs = check_lhs(a)
        w, ws = b
        assert w.dtype == FP8 and w.stride(-1) == 1 and ws.dtype == torch.float32
        assert ws.shape == (-(-w.shape[0] // 128), -(-w.shape[1] // 128)), "128x128 weight scales"
        assert d.dtype == torch.bfloat16 and d.shape == (lhs.shape[0], w.shape[0]) and c is None
        d.copy_(lhs @ _deq_blocks(w, ws).t())

    def get_mk_alignment_for_contiguous_layout():
        return alignment

    def m_grouped_fp8_gemm_nt_contiguous(a, b, d, m_indices):
        mod.calls.append("m_grouped_fp8_gemm_nt_contiguous")
        lhs = check_lhs(a)
        w, ws = b
        g, n, k = w.shape
        assert w.dtype == FP8 and ws.shape == (g, -(-n // 128), -(-k // 128)) and ws.dtype == torch.float32
        m = lhs.shape[0]
        assert d.dtype == torch.bfloat16 and d.shape == (m, n)
        assert m_indices.dtype == torch.int32 and m_indices.shape == (m,) and m % alignment == 0
        blocks = m_indices.view(-1, alignment)
        # each expert's segment starts on an aligned row: a block holds one expert, then -1 padding
        same = (blocks == blocks[:, :1]) | (blocks == -1)
        padding_last = (blocks[:, 1:] >= 0) <= (blocks[:, :-1] >= 0)
        assert bool(same.all() and padding_last.all()), "expert segments aligned to the M alignment"
        assert bool(((m_indices >= -1) & (m_indices < g)).all())
        for e in range(g):
            rows = m_indices == e
            if rows.any():
                d[rows] = (lhs[rows] @ _deq_blocks(w[e], ws[e]).t()).to(d.dtype)

    def fp8_mqa_logits(q, kv, weights, ks, ke, clean_logits=True):
        mod.calls.append("fp8_mqa_logits")
        k, sf = kv
        s, h, dim = q.shape
        assert q.dtype == FP8 and q.is_contiguous() and h in (32, 64), "SM90: 32 or 64 heads"
        assert (
            k.dtype == FP8 and k.shape[1] == dim and sf.dtype == torch.float32 and sf.shape == (k.shape[0],)
        )
        assert weights.dtype == torch.float32 and weights.shape == (s, h)
        assert ks.dtype == torch.int32 and ke.dtype == torch.int32 and clean_logits is True
        score = torch.einsum("shd,nd->shn", q.float(), k.float() * sf[:, None]).relu()
        logits = torch.einsum("shn,sh->sn", score, weights)
        j = torch.arange(k.shape[0])[None, :]
        inside = (j >= ks[:, None]) & (j < ke[:, None])
        return logits.masked_fill(~inside, float("-inf"))

    def get_paged_mqa_logits_metadata(context_lens, block_kv, num_sms):
        mod.calls.append("get_paged_mqa_logits_metadata")
        assert context_lens.dtype == torch.int32 and block_kv == 64 and isinstance(num_sms, int)
        return torch.zeros(num_sms + 1, 2, dtype=torch.int32)

    def fp8_paged_mqa_logits(
        q, kv_cache, weights, context_lens, block_table, schedule, max_context_len, clean_logits
    ):
        mod.calls.append("fp8_paged_mqa_logits")
        b, next_n, h, dim = q.shape
        nb, block, one, width = kv_cache.shape
        assert q.dtype == FP8 and q.is_contiguous() and next_n in (1, 2) and h in (32, 64)
        assert kv_cache.dtype == torch.uint8 and block == 64 and one == 1 and width == dim + 4
        assert weights.dtype == torch.float32 and weights.shape == (b * next_n, h)
        assert context_lens.dtype == torch.int32 and block_table.dtype == torch.int32
        assert schedule.dtype == torch.int32 and isinstance(max_context_len, int)
        raw = kv_cache.view(nb, block * width)  # per block: 64 x D e4m3 values, then 64 fp32 scales
        keys = raw[:, : block * dim].contiguous().view(FP8).view(nb, block, dim).float()
        scales = raw[:, block * dim :].contiguous().view(torch.float32).view(nb, block)
        pos = torch.arange(max_context_len)
        pages = block_table.long()[:, pos // block]
        k = keys[pages, pos % block] * scales[pages, pos % block][..., None]  # [B, L, D]
        score = torch.einsum("bhd,bld->bhl", q[:, 0].float(), k).relu()
        logits = torch.einsum("bhl,bh->bl", score, weights)
        return logits.masked_fill(pos[None, :] >= context_lens[:, None], float("-inf"))

    for fn in (
        fp8_gemm_nt,
        get_mk_alignment_for_contiguous_layout,
        m_grouped_fp8_gemm_nt_contiguous,
        fp8_mqa_logits,
        get_paged_mqa_logits_metadata,
        fp8_paged_mqa_logits,
    ):
        setattr(mod, fn.__name__, fn)
    return mod


# ----- torch._scaled_mm -----


def _check_mats(mat1, mat2, scale_a):
    m, k = mat1.shape
    n = mat2.shape[1]
    assert mat1.dtype == FP8 and mat2.dtype == FP8 and mat2.shape[0] == k
    assert mat1.stride(1) == 1, "mat1 row-major"
    assert mat2.stride(0) == 1, "mat2 column-major"
    assert k % 16 == 0 and n % 16 == 0
    kb = -(-k // 128)
    assert scale_a.dtype == torch.float32 and scale_a.shape == (m, kb)
    assert scale_a.stride(0) == 1 and (kb == 1 or scale_a.stride(1) == m), "scale_a outer-dim-major"
    # Seen on the H200 (cuBLAS 13): the scales' leading dimensions must be 16-byte aligned.
    assert m % 4 == 0, "M % 4 == 0 (else CUBLAS_STATUS_NOT_SUPPORTED)"
    return m, k, n, kb, -(-n // 128)


def scaled_mm(calls: list[str]):
    """``torch._scaled_mm`` (v1) with the (BlockWise1x128, BlockWise128x128) checks of ATen's Blas.cpp."""

    def _scaled_mm(mat1, mat2, scale_a, scale_b, out_dtype=None):
        calls.append("_scaled_mm")
        m, k, n, kb, nb = _check_mats(mat1, mat2, scale_a)
        assert scale_b.dtype == torch.float32 and scale_b.shape == (kb, nb)
        assert scale_b.t().is_contiguous(), "scale_b.t() row-major [N/128, K/128]"
        assert kb % 4 == 0, "ceil(K/128) % 4 == 0 (else the v1 call computes wrong results on the H200)"
        assert out_dtype in (torch.bfloat16, torch.float16)
        lhs = act_dequant(mat1, scale_a, 128)
        return (lhs @ _deq_blocks(mat2.t(), scale_b.t()).t()).to(out_dtype)

    return _scaled_mm


def scaled_mm_v2(calls: list[str]):
    """``torch.nn.functional.scaled_mm`` (v2) with ATen's ``_scaled_block1x128_block128x128`` checks."""
    from torch.nn.functional import ScalingType

    def scaled_mm(
        mat_a, mat_b, scale_a, scale_recipe_a, scale_b, scale_recipe_b, output_dtype=torch.bfloat16
    ):
        calls.append("scaled_mm")
        assert scale_recipe_a == ScalingType.BlockWise1x128 and scale_recipe_b == ScalingType.BlockWise128x128
        m, k, n, kb, nb = _check_mats(mat_a, mat_b, scale_a)
        l4 = -(-kb // 4) * 4
        assert scale_b.dtype == torch.float32 and scale_b.shape == (l4, nb), (
            "scale_b [round_up(K/128, 4), N/128]"
        )
        assert scale_b.stride(0) == 1 and (nb == 1 or scale_b.stride(1) == l4)
        lhs = act_dequant(mat_a, scale_a, 128)
        return (lhs @ _deq_blocks(mat_b.t(), scale_b.t()[:, :kb]).t()).to(output_dtype)

    return scaled_mm
