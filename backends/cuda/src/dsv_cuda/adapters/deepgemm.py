"""DeepGEMM adapters: block-FP8 linear (``fp8_gemm_nt``), MoE grouped GEMM
(``m_grouped_fp8_gemm_nt_contiguous``) and the V3.2 indexer logits (``fp8_mqa_logits`` for prefill,
``get_paged_mqa_logits_metadata`` + ``fp8_paged_mqa_logits`` for decode), followed by top-k.

DeepGEMM comes from its own build or bundled with sgl-kernel (top-level ``deep_gemm``). Entry points were
renamed over time (``fp8_fp4_*`` in 2026), so each call looks up the names it knows.
"""

from __future__ import annotations

import functools

import torch

from dsv.backend.interface import KernelUnavailable
from dsv.ops.indexer import topk_positions
from dsv.ops.kv_cache import IndexKCacheLayer
from dsv.ops.linear import linear as reference_linear
from dsv.ops.metadata import AttentionMetadata, sequence_slots
from dsv.ops.moe import ExpertWeights
from dsv_cuda.adapters.common import import_vendor, quantize_activations, vendor_fn

MODULES = ("deep_gemm",)
BLOCK = (128, 128)
#: The paged indexer kernel reads 64-token blocks on SM90.
PAGED_BLOCK_KV = 64


def _lib():
    return import_vendor(MODULES, "DeepGEMM")


# ----- dense block-FP8 GEMM -----


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale_inv: torch.Tensor | None = None,
    block: tuple[int, int] = BLOCK,
    act_scale_fmt: str | None = None,
) -> torch.Tensor:
    """``linear`` through ``fp8_gemm_nt((x_fp8, x_sf), (w_fp8, w_sf), out)``.

    x [..., K] is quantized per 1x128 group (``act_quant``, power-of-two scales with ue8m0); the scales are
    passed in their natural [M, K/128] / [N/128, K/128] fp32 form and DeepGEMM transforms them into its
    TMA-aligned MN-major layout. Float weights and other block shapes use the reference math.
    """
    if scale_inv is None or tuple(block) != BLOCK:
        return reference_linear(x, weight, scale_inv, block, act_scale_fmt)
    dg = _lib()
    k = x.shape[-1]
    n = weight.shape[0]
    x2 = x.reshape(-1, k)
    xq, xs = quantize_activations(x2, BLOCK[1], act_scale_fmt)
    out = torch.empty(x2.shape[0], n, dtype=torch.bfloat16, device=x.device)
    vendor_fn(dg, "fp8_gemm_nt", "fp8_fp4_gemm_nt")((xq, xs.contiguous()), (weight, scale_inv.float()), out)
    return out.to(x.dtype).view(*x.shape[:-1], n)


# ----- MoE: M-grouped contiguous layout -----


def _alignment(dg) -> int:
    return int(
        vendor_fn(dg, "get_mk_alignment_for_contiguous_layout", "get_m_alignment_for_contiguous_layout")()
    )


def fused_moe(
    x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, experts: ExpertWeights
) -> torch.Tensor:
    """``fused_moe`` through two ``m_grouped_fp8_gemm_nt_contiguous`` calls (gate, up), SwiGLU, and a third
    (down). Token copies are sorted by expert, each expert's rows padded to DeepGEMM's M alignment, padding
    rows marked -1 in ``m_indices``. One host sync (the padded row count): prefill path, not for graphs.
    """
    if experts.w1_scale is None or tuple(experts.block) != BLOCK:
        raise KernelUnavailable("deep_gemm fused_moe needs FP8 experts with 128x128 block scales")
    dg = _lib()
    grouped = vendor_fn(dg, "m_grouped_fp8_gemm_nt_contiguous", "m_grouped_fp8_fp4_gemm_nt_contiguous")
    align = _alignment(dg)
    t, top = ids.shape
    e = experts.num_experts
    flat = ids.reshape(-1).long()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=e)
    padded = (counts + align - 1) // align * align
    start = counts.cumsum(0) - counts
    start_padded = padded.cumsum(0) - padded
    total = int(padded.sum())
    sorted_e = flat[order]
    rank = torch.arange(order.numel(), device=x.device) - start[sorted_e]
    dest = start_padded[sorted_e] + rank  # row of each (token, slot) copy in the padded layout
    m_indices = torch.full((total,), -1, dtype=torch.int32, device=x.device)
    m_indices[dest] = sorted_e.to(torch.int32)
    tok = order // top
    a = x.new_zeros(total, x.shape[-1])
    a[dest] = x[tok]

    def gemm(inp: torch.Tensor, w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        q, qs = quantize_activations(inp, BLOCK[1], experts.act_scale_fmt)
        out = torch.empty(total, w.shape[1], dtype=torch.bfloat16, device=x.device)
        grouped((q, qs.contiguous()), (w, s.float()), out, m_indices)
        return out

    gate = gemm(a, experts.w1, experts.w1_scale)
    up = gemm(a, experts.w3, experts.w3_scale)
    h = (torch.nn.functional.silu(gate.float()) * up.float()).to(x.dtype)
    y = gemm(h, experts.w2, experts.w2_scale)
    out = torch.zeros(t, y.shape[1], dtype=torch.float32, device=x.device)
    out.index_add_(0, tok, y[dest].float() * weights.reshape(-1)[order, None].float())
    return out.to(x.dtype)


# ----- indexer -----


def _check_indexer(q: torch.Tensor, cache: IndexKCacheLayer) -> None:
    if not cache.quantized:
        raise KernelUnavailable("deep_gemm indexer reads the FP8 indexer cache (--indexer-quant fp8)")
    if q.dtype != torch.float8_e4m3fn:
        raise KernelUnavailable(f"deep_gemm indexer takes e4m3 queries, got {q.dtype}")


def indexer_prefill(
    q: torch.Tensor, weights: torch.Tensor, cache: IndexKCacheLayer, meta: AttentionMetadata, topk: int
) -> torch.Tensor:
    """``indexer_topk_prefill`` through ``fp8_mqa_logits``, then top-k.

    The batch's keys are gathered into one contiguous [S, D] e4m3 tensor with fp32 scales [S]; query t sees
    the window [ks, ke) = its sequence's offset + [0, position + 1). Logits [T, S] with -inf outside the
    window; the top-k flat rows are turned back into positions within the sequence.
    """
    _check_indexer(q, cache)
    dg = _lib()
    lens = meta.seq_lens.to(q.device).long()
    slots = sequence_slots(meta)  # [B, L]
    valid = torch.arange(slots.shape[1], device=slots.device)[None, :] < lens[:, None]
    flat = slots[valid]  # [S] in sequence order (host sync: prefill)
    page, off = flat // cache.page_size, flat % cache.page_size
    keys = cache.keys[page, off].contiguous()
    scales = cache.scales[page, off].contiguous()
    seq_start = lens.cumsum(0) - lens
    ks = seq_start[meta.token_seq].to(torch.int32)
    ke = (ks + meta.positions.to(torch.int32) + 1).to(torch.int32)
    logits = dg.fp8_mqa_logits(
        q.contiguous(), (keys, scales), weights.float().contiguous(), ks, ke, clean_logits=True
    )
    rows = topk_positions(logits, topk)
    return torch.where(rows >= 0, rows - ks[:, None], rows).to(torch.int32)


@functools.lru_cache(maxsize=8)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 132  # H200; only contract tests run off-GPU
    return torch.cuda.get_device_properties(device).multi_processor_count


def paged_schedule(dg, context_lens: torch.Tensor, block_kv: int) -> torch.Tensor:
    """``get_paged_mqa_logits_metadata``: (context_lens, block_kv, num_sms) since late 2025; the newest
    builds dropped block_kv."""
    fn = dg.get_paged_mqa_logits_metadata
    sms = _num_sms(context_lens.device)
    try:
        return fn(context_lens, block_kv, sms)
    except TypeError:
        return fn(context_lens, sms)


def indexer_decode(
    q: torch.Tensor, weights: torch.Tensor, cache: IndexKCacheLayer, meta: AttentionMetadata, topk: int
) -> torch.Tensor:
    """``indexer_topk_decode`` through ``fp8_paged_mqa_logits``, then top-k.

    One query token per sequence (next_n = 1): q [B, 1, H, D] e4m3; the paged cache storage
    [pages, 64 * 132] uint8 viewed as [pages, 64, 1, 132] (64 x 128 e4m3 keys then 64 fp32 scales per page,
    exactly DeepGEMM's block layout); context_lens = seq_lens; logits [B, max_seq_len] are positions within
    the sequence already. ``meta.max_seq_len`` is a Python int: frozen at CUDA-graph capture.
    """
    _check_indexer(q, cache)
    if cache.page_size != PAGED_BLOCK_KV:
        raise KernelUnavailable(
            f"deep_gemm paged indexer needs --page-size {PAGED_BLOCK_KV}, got {cache.page_size}"
        )
    if meta.num_tokens != meta.num_seqs:
        raise KernelUnavailable("deep_gemm paged indexer adapter takes one query token per sequence")
    dg = _lib()
    b, h, d = q.shape
    kv = cache.storage.view(cache.storage.shape[0], cache.page_size, 1, d + 4)
    context_lens = meta.seq_lens.to(torch.int32)
    schedule = paged_schedule(dg, context_lens, cache.page_size)
    logits = dg.fp8_paged_mqa_logits(
        q.view(b, 1, h, d).contiguous(),
        kv,
        weights.float().contiguous(),
        context_lens,
        meta.block_table.to(torch.int32).contiguous(),
        schedule,
        meta.max_seq_len,
        clean_logits=True,
    )
    return topk_positions(logits[:, : meta.max_seq_len], topk)
