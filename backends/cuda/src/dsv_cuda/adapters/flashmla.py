"""FlashMLA adapters: ``flashmla_prefill`` (``flash_mla_sparse_fwd``) and ``flashmla_decode``
(``get_mla_metadata`` + ``flash_mla_with_kvcache`` with indices over the FP8 cache).

Both take dsv's ``sparse_mla(q [T, H, 576], cache, indices [T, K] global slots, sm_scale) -> [T, H, 512]``.
FlashMLA comes from a source build (``flash_mla``) or from sgl-kernel (``sgl_kernel.flash_mla``, launch API).
"""

from __future__ import annotations

import torch

from dsv.backend.interface import KernelUnavailable
from dsv.ops.kv_cache import MLACacheLayer
from dsv_cuda.adapters.common import (
    arch_major,
    compact_valid_first,
    import_vendor,
    pad_heads,
    pad_last,
    zero_rows_without_keys,
)

MODULES = ("flash_mla", "sgl_kernel.flash_mla")
#: FlashMLA's V3.2 kernels: 512 latent + 64 rope dims, one latent KV head.
D_QK, D_V = 576, 512
#: Sparse decode tiles top-k by 64 tokens; SM90 sparse prefill by 2 x 64.
DECODE_TOPK_MULTIPLE = 64
PREFILL_TOPK_MULTIPLE = 128
#: Decode reads 64-token pages (asserted by the launch API and by SGLang).
DECODE_PAGE_SIZE = 64


def _lib():
    return import_vendor(MODULES, "FlashMLA")


def _check_dims(q: torch.Tensor, cache: MLACacheLayer, kernel: str) -> None:
    if q.shape[-1] != D_QK or cache.kv_lora_rank != D_V:
        raise KernelUnavailable(
            f"{kernel} runs DeepSeek-V3.2 shapes (d_qk {D_QK}, d_v {D_V}); got d_qk {q.shape[-1]}, "
            f"kv_lora_rank {cache.kv_lora_rank}. Use the triton or torch kernel for other shapes"
        )


def padded_heads(heads: int, major: int) -> int:
    """Head count FlashMLA accepts: 64 or 128 on Hopper (SGLang pads to 64), 128 on Blackwell."""
    if heads > 128:
        raise KernelUnavailable(f"FlashMLA takes at most 128 query heads per call, got {heads}")
    if major >= 10 or heads > 64:
        return 128
    return 64


# ----- sparse prefill -----


def _bf16_rows(cache: MLACacheLayer, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bf16 ``kv`` [N, 1, 576] FlashMLA prefill reads and ``indices`` as row numbers into it.

    A bf16 cache is used in place (row = global slot). An FP8 cache is dequantized for the distinct slots
    this batch selects only (FlashMLA's sparse prefill has no FP8 input), as SGLang does before it.
    """
    if cache.layout == "float":
        if cache.storage.dtype != torch.bfloat16:
            raise KernelUnavailable(
                f"flashmla_prefill reads a bf16 KV cache; this one holds {cache.storage.dtype} "
                "(use --kv-cache-dtype bf16 or a bf16 model)"
            )
        return cache.flat.view(-1, 1, cache.flat.shape[-1]), indices
    uniq, inverse = torch.unique(indices, return_inverse=True)  # host sync: fine in prefill
    rows = cache.read_rows(uniq.clamp_min(0)).to(torch.bfloat16)
    remapped = torch.where(indices >= 0, inverse, torch.full_like(inverse, -1))
    return rows.view(-1, 1, rows.shape[-1]), remapped


def sparse_prefill(
    q: torch.Tensor, cache: MLACacheLayer, indices: torch.Tensor, sm_scale: float
) -> torch.Tensor:
    """``sparse_mla_prefill`` through ``flash_mla_sparse_fwd(q, kv, indices, sm_scale, d_v)``.

    q [T, H, 576] -> bf16, heads zero-padded to 64/128; kv = the cache viewed as [slots, 1, 576];
    indices [T, 1, topk'] int32 row ids with topk padded by -1 to a multiple of 128; output sliced back.
    """
    _check_dims(q, cache, "flashmla_prefill")
    lib = _lib()
    t, h, _ = q.shape
    kv, rows = _bf16_rows(cache, indices.long())
    idx = pad_last(rows.to(torch.int32), PREFILL_TOPK_MULTIPLE, -1).unsqueeze(1).contiguous()
    qp = pad_heads(q.to(torch.bfloat16).contiguous(), padded_heads(h, arch_major(q.device)))
    out = lib.flash_mla_sparse_fwd(qp, kv, idx, sm_scale, d_v=D_V)[0]
    out = zero_rows_without_keys(out[:, :h], (indices >= 0).sum(-1))
    return out.to(q.dtype)


# ----- sparse decode -----


def _is_head_api(sched: object, num_splits: object) -> bool:
    """HEAD FlashMLA (2026) returns ``(FlashMLASchedMeta, None)``; the launch API two int32 tensors."""
    return num_splits is None and not isinstance(sched, torch.Tensor)


def sparse_decode(
    q: torch.Tensor, cache: MLACacheLayer, indices: torch.Tensor, sm_scale: float
) -> torch.Tensor:
    """``sparse_mla_decode`` through ``flash_mla_with_kvcache(..., is_fp8_kvcache=True, indices=...)``.

    Every query token is its own batch entry: q [T, H, 576] -> [b=T, s_q=1, H, 576]; the cache storage
    [pages, 64, 656] uint8 -> [pages, 64, 1, 656]; indices = global slots [T, 1, topk'] int32 (valid first,
    -1 padded to a multiple of 64). Both API generations of ``get_mla_metadata`` are handled: the launch API
    gives (tile_scheduler_metadata, num_splits) tensors; HEAD gives (FlashMLASchedMeta, None), wants
    ``num_splits=None`` and 64 or 128 query heads. No host sync: capturable in a CUDA graph.
    """
    if cache.layout != "fp8":
        raise KernelUnavailable(
            "flashmla_decode reads FlashMLA's FP8 KV layout (656 bytes/token); start with "
            "--kv-cache-dtype fp8_e4m3, or use --nsa-decode fa3 with a bf16 cache"
        )
    if cache.page_size != DECODE_PAGE_SIZE:
        raise KernelUnavailable(
            f"flashmla_decode needs --page-size {DECODE_PAGE_SIZE}, got {cache.page_size}"
        )
    _check_dims(q, cache, "flashmla_decode")
    lib = _lib()
    t, h, d = q.shape
    slots, counts = compact_valid_first(indices)
    slots = pad_last(slots, DECODE_TOPK_MULTIPLE, -1)
    topk = slots.shape[-1]
    k_cache = cache.storage.view(cache.storage.shape[0], cache.page_size, 1, cache.storage.shape[-1])
    seqlens = counts.clamp_min(1)  # per-token key count; the scheduler dislikes empty sequences
    sched, num_splits = lib.get_mla_metadata(
        cache_seqlens=seqlens,
        num_q_tokens_per_head_k=h,  # s_q * h_q / h_kv with s_q = 1, h_kv = 1
        num_heads_k=1,
        num_heads_q=h,
        is_fp8_kvcache=True,
        topk=topk,
    )
    heads = padded_heads(h, arch_major(q.device)) if _is_head_api(sched, num_splits) else h
    q4 = pad_heads(q.to(torch.bfloat16).reshape(t, 1, h, d), heads, dim=2)
    out, _lse = lib.flash_mla_with_kvcache(
        q=q4,
        k_cache=k_cache,
        block_table=torch.empty(t, 0, dtype=torch.int32, device=q.device),  # unused in sparse mode
        cache_seqlens=seqlens,
        head_dim_v=D_V,
        tile_scheduler_metadata=sched,
        num_splits=num_splits,
        softmax_scale=sm_scale,
        causal=False,
        is_fp8_kvcache=True,
        indices=slots.view(t, 1, topk),
    )
    out = zero_rows_without_keys(out.reshape(t, heads, D_V)[:, :h], counts)
    return out.to(q.dtype)
