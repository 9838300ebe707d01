"""The CUDA backend's kernel table: per operation, the named kernels in preference order.

Preference follows SGLang on H200 (vendor kernel > dsv's TileLang > dsv's Triton > torch reference). A
kernel whose library is missing or cannot run on this GPU stays in the table with ``available=False`` and
the reason: ``dsv backends`` shows it, and choosing it is refused with that reason.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dsv.backend.interface import OPS, Kernel
from dsv.backend.reference import reference_kernel
from dsv_cuda import tilelang as tilelang_kernels
from dsv_cuda import tilelang_moe
from dsv_cuda.adapters import deepgemm, fa3, flashmla, grouped_mm, scaled_mm
from dsv_cuda.libraries import (
    DEEP_GEMM,
    FA3,
    FLASH_MLA,
    library_status,
    no_gpu_reason,
    scaled_mm_status,
    triton_kernels,
)
from dsv_cuda.tilelang import tilelang_status

Status = tuple[bool, str]


def _kernel(op: str, name: str, fn: Callable[..., Any] | None, status: Status, description: str) -> Kernel:
    ok, reason = status
    return Kernel(op=op, name=name, fn=fn, available=ok, reason="" if ok else reason, description=description)


def _tilelang(op: str, status: Status) -> Kernel:
    """dsv's TileLang kernel for ``op`` (bf16 KV; decode also FlashMLA's FP8 rows); unavailable without
    tilelang or off sm_90."""
    fns = {
        "sparse_mla_prefill": tilelang_kernels.sparse_mla_prefill,
        "sparse_mla_decode": tilelang_kernels.sparse_mla_decode,
    }
    kv = "bf16 or FP8 KV" if op == "sparse_mla_decode" else "bf16 KV"
    return _kernel(op, "tilelang", fns[op], status, f"dsv TileLang sparse MLA, {kv} (compiled on first use)")


def _triton(op: str, table: dict[str, Callable[..., Any]], status: Status) -> list[Kernel]:
    """dsv's Triton kernel for ``op``; when the Triton package cannot be read at all, one unavailable entry."""
    ok, reason = status
    if op in table:
        return [_kernel(op, "triton", table[op], status, "dsv portable Triton kernel")]
    if not table and not ok:
        return [Kernel(op=op, name="triton", fn=None, available=False, reason=reason)]
    return []


def build_kernels(arch: tuple[int, int] | None) -> dict[str, list[Kernel]]:
    """Every operation's kernels for a GPU of compute capability ``arch`` (None: no GPU visible)."""
    table, t_ok, t_reason = triton_kernels()
    triton_status = (t_ok, t_reason)
    mla = library_status(FLASH_MLA, arch)
    fa = library_status(FA3, arch)
    dg = library_status(DEEP_GEMM, arch)
    tl = tilelang_status(arch)

    vendor: dict[str, list[Kernel]] = {
        "linear": [
            _kernel("linear", "deep_gemm", deepgemm.linear, dg, "DeepGEMM fp8_gemm_nt"),
            _kernel(
                "linear",
                "scaled_mm",
                scaled_mm.linear,
                scaled_mm_status(arch),
                f"torch._scaled_mm 1x128/128x128 (dsv's Triton split-K kernel at M <= {scaled_mm.TRITON_MAX_M})",
            ),
        ],
        "indexer_topk_prefill": [
            _kernel(
                "indexer_topk_prefill", "deep_gemm", deepgemm.indexer_prefill, dg, "fp8_mqa_logits + topk"
            ),
        ],
        "indexer_topk_decode": [
            _kernel(
                "indexer_topk_decode", "deep_gemm", deepgemm.indexer_decode, dg, "fp8_paged_mqa_logits + topk"
            ),
        ],
        "sparse_mla_prefill": [
            _kernel(
                "sparse_mla_prefill", "flashmla_prefill", flashmla.sparse_prefill, mla, "FlashMLA sparse_fwd"
            ),
            _kernel("sparse_mla_prefill", "fa3", fa3.sparse_mla, fa, "FA3 with top-k page table, bf16 KV"),
            _tilelang("sparse_mla_prefill", tl),
        ],
        "sparse_mla_decode": [
            _kernel("sparse_mla_decode", "fa3", fa3.sparse_mla, fa, "FA3 with top-k page table, bf16 KV"),
            _kernel(
                "sparse_mla_decode",
                "flashmla_decode",
                flashmla.sparse_decode,
                mla,
                "FlashMLA with_kvcache, FP8 KV, page 64",
            ),
            _tilelang("sparse_mla_decode", tl),
        ],
        "mha_prefill": [_kernel("mha_prefill", "fa3", fa3.mha_prefill, fa, "FA3 flash_attn_varlen_func")],
        "fused_moe": [
            _kernel("fused_moe", "deep_gemm", deepgemm.fused_moe, dg, "DeepGEMM m_grouped contiguous"),
            _kernel(
                "fused_moe",
                "tilelang",
                tilelang_moe.fused_moe,
                tl,
                "dsv TileLang m-grouped contiguous FP8 GEMMs, FP8 experts (compiled on first use; "
                "Triton below 4096 routed rows)",
            ),
            # Chosen by name only (requirements.OPT_IN): row-wise FP8 requantization changes the numerics.
            _kernel(
                "fused_moe",
                "scaled_grouped_mm",
                grouped_mm.fused_moe_fp8,
                grouped_mm.status(arch, True, no_gpu_reason),
                "torch._scaled_grouped_mm, FP8 row-wise (experts requantized once)",
            ),
            _kernel(
                "fused_moe",
                "grouped_mm",
                grouped_mm.fused_moe_bf16,
                grouped_mm.status(arch, False, no_gpu_reason),
                "torch._grouped_mm, bf16 dequantized experts",
            ),
        ],
    }
    kernels: dict[str, list[Kernel]] = {}
    for op in OPS:
        kernels[op] = [*vendor.get(op, []), *_triton(op, table, triton_status), reference_kernel(op)]
    return kernels
