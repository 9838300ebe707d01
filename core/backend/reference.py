"""The reference backend (``--device cpu``): plain torch on any torch device, the numerical oracle.

Every operation of the contract is implemented here with the definitions in ``dsv.ops``; other backends are
checked against these by the conformance suite.
"""

from __future__ import annotations

import torch

from dsv.backend.interface import BACKEND_API_VERSION, Backend, Capabilities, Kernel, ProbeResult
from dsv.ops import attention, indexer, moe
from dsv.ops.kv_cache import IndexKCacheLayer, MLACacheLayer
from dsv.ops.linear import linear
from dsv.ops.norm import rms_norm


def kv_write(cache: MLACacheLayer, slots: torch.Tensor, latent: torch.Tensor, rope: torch.Tensor) -> None:
    """Write MLA latents [T, R] and rope keys [T, Dr] at global slots [T]."""
    cache.write(slots, latent, rope)


def index_k_write(cache: IndexKCacheLayer, slots: torch.Tensor, k: torch.Tensor) -> None:
    """Write rotated indexer keys [T, D] at global slots [T] (quantized when the cache is FP8)."""
    cache.write(slots, k)


#: op name -> reference function; the signature every backend's kernel for that op must accept.
REFERENCE_OPS = {
    "linear": linear,
    "rms_norm": rms_norm,
    "indexer_topk_prefill": indexer.indexer_topk,
    "indexer_topk_decode": indexer.indexer_topk,
    "sparse_mla_prefill": attention.sparse_mla,
    "sparse_mla_decode": attention.sparse_mla,
    "mha_prefill": attention.mha_prefill,
    "kv_write": kv_write,
    "index_k_write": index_k_write,
    "moe_route": moe.moe_route,
    "fused_moe": moe.fused_moe,
}


#: Reference ops that synchronize with the host, so a CUDA/HIP graph cannot capture them (the others can).
HOST_SYNC_OPS = {
    "fused_moe": "torch.bincount(...).tolist() sizes the per-expert GEMMs",
    "mha_prefill": "cu_seqlens .tolist()",
    "indexer_topk_prefill": "query_start_loc .tolist() (prefill branch)",
}


def reference_kernel(op: str, name: str = "torch", note: str = "") -> Kernel:
    """The reference implementation of ``op`` as a :class:`Kernel` (backends use it as their fallback)."""
    return Kernel(
        op=op,
        name=name,
        fn=REFERENCE_OPS[op],
        description=note or "plain torch reference",
        capturable=op not in HOST_SYNC_OPS,
    )


def probe() -> ProbeResult:
    """Always available: the reference backend needs nothing but torch."""
    return ProbeResult(
        name="cpu",
        available=True,
        reason="plain torch reference (runs on the CPU or any torch device)",
        score=0,
        backend_class="dsv.backend.reference:ReferenceBackend",
        api_version=BACKEND_API_VERSION,
    )


class ReferenceBackend(Backend):
    """Plain-torch backend; ``device`` may be any torch device string (default ``cpu``)."""

    name = "cpu"

    def __init__(self, device: str = "cpu") -> None:
        self.device = device

    def capabilities(self) -> Capabilities:
        return Capabilities(
            device_type=torch.device(self.device).type,
            torch_device=self.device,
            dist_backend="gloo",
            fp8_dtype=torch.float8_e4m3fn,
            kv_layouts=("float", "fp8"),
            page_sizes=None,
            graph_capture=False,
            kernels={op: [reference_kernel(op)] for op in REFERENCE_OPS},
        )
