"""FA3 adapters (FlashAttention-3 ``hopper/``, from sgl-kernel or the upstream build).

``sparse_mla``: SGLang's mapping of sparse MLA onto ``flash_attn_with_kvcache``: the top-k slots of each
query token are its page table with page size 1, the rope part of q is ``q`` and the absorbed latent part is
``qv`` (FA3's MLA extension: score = q·k_rope + qv·c). Needs the bf16 ("float") KV layout.

``mha_prefill``: dense causal prefill through ``flash_attn_varlen_func`` (bottom-right causal alignment,
as the reference).
"""

from __future__ import annotations

import torch

from dsv.backend.interface import KernelUnavailable
from dsv.ops.kv_cache import MLACacheLayer
from dsv_cuda.adapters.common import compact_valid_first, import_vendor, zero_rows_without_keys

MODULES = ("sgl_kernel.flash_attn", "flash_attn_interface")
HALF = (torch.bfloat16, torch.float16)


def _lib():
    return import_vendor(MODULES, "FA3")


def _first(result):
    """FA3 builds differ in whether they return ``out`` or ``(out, lse, ...)``."""
    return result[0] if isinstance(result, tuple | list) else result


def sparse_mla(q: torch.Tensor, cache: MLACacheLayer, indices: torch.Tensor, sm_scale: float) -> torch.Tensor:
    """``sparse_mla_prefill`` / ``sparse_mla_decode`` through ``flash_attn_with_kvcache``.

    q [T, H, R + Dr] -> q_rope [T, H, Dr], qv [T, H, R]; k_cache = rope slice of the cache as
    [slots, 1, 1, Dr], v_cache = latent slice [slots, 1, 1, R]; page_table = top-k slots [T, K] int32 with
    the valid ones first, cache_seqlens = their count, cu_seqlens_q = arange (each token its own
    sequence), max_seqlen_q = 1, causal = True. No host sync: capturable in a CUDA graph.
    """
    if cache.layout != "float" or cache.storage.dtype not in HALF:
        got = "the FP8 656-byte layout" if cache.layout == "fp8" else f"{cache.storage.dtype}"
        raise KernelUnavailable(
            f"fa3 reads a bf16 KV cache; this one holds {got}. Use --kv-cache-dtype bf16, "
            "or --nsa-decode flashmla_decode with --kv-cache-dtype fp8_e4m3"
        )
    lib = _lib()
    t = q.shape[0]
    r, dr = cache.kv_lora_rank, cache.rope_dim
    dtype = cache.storage.dtype
    flat = cache.flat
    k_cache = flat[:, r:].view(-1, 1, 1, dr)
    v_cache = flat[:, :r].view(-1, 1, 1, r)
    page_table, seqlens = compact_valid_first(indices)
    cu_q = torch.arange(t + 1, dtype=torch.int32, device=q.device)
    cu_k = torch.nn.functional.pad(seqlens.cumsum(0, dtype=torch.int32), (1, 0))
    out = lib.flash_attn_with_kvcache(
        q=q[..., r:].to(dtype).contiguous(),
        k_cache=k_cache,
        v_cache=v_cache,
        qv=q[..., :r].to(dtype).contiguous(),
        page_table=page_table,
        cache_seqlens=seqlens,
        cu_seqlens_q=cu_q,
        cu_seqlens_k_new=cu_k,
        max_seqlen_q=1,
        softmax_scale=sm_scale,
        causal=True,
        return_softmax_lse=False,
    )
    return zero_rows_without_keys(_first(out), seqlens).to(q.dtype)


def mha_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    sm_scale: float,
) -> torch.Tensor:
    """``mha_prefill`` through ``flash_attn_varlen_func`` (q/k [T, H, 192], v [T, H, 128] in V3.2)."""
    if q.dtype not in HALF:
        raise KernelUnavailable(f"fa3 mha_prefill needs bf16/fp16 activations, got {q.dtype}")
    lib = _lib()
    cu_q = cu_seqlens_q.to(device=q.device, dtype=torch.int32)
    cu_k = cu_seqlens_k.to(device=q.device, dtype=torch.int32)
    # Python ints for the launch grid: one host sync, fine outside CUDA graphs (prefill only).
    max_q = int((cu_q[1:] - cu_q[:-1]).max())
    max_k = int((cu_k[1:] - cu_k[:-1]).max())
    out = lib.flash_attn_varlen_func(
        q=q.contiguous(),
        k=k.to(q.dtype).contiguous(),
        v=v.to(q.dtype).contiguous(),
        cu_seqlens_q=cu_q,
        cu_seqlens_k=cu_k,
        max_seqlen_q=max_q,
        max_seqlen_k=max_k,
        softmax_scale=sm_scale,
        causal=True,
    )
    return _first(out)
