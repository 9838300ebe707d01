"""dsv's own TileLang kernels for the CUDA backend.

Importing this package never imports ``tilelang``: :func:`tilelang_status` answers from the module lookup and
the GPU's compute capability, and the kernels are compiled at their first call (per shape and tile config).

Kernels:
    sparse_mla: absorbed sparse MLA over top-k global slots (``sparse_mla_decode`` / ``sparse_mla_prefill``),
        bf16/fp16 "float" KV layout; FlashMLA's FP8 656-byte layout for decode (the "ws" program's producer
        dequantizes it; dsv's Triton kernel serves the small batches "ws" does not take), refused with the
        reason for prefill. Two programs:
        sparse_mla_kernel ("simple") and sparse_mla_ws_kernel ("ws", warp-specialized: the default where it
        is faster).
"""

from __future__ import annotations

from dsv_cuda.tilelang.sparse_mla import sparse_mla_decode, sparse_mla_prefill
from dsv_cuda.tilelang.status import tilelang_status

__all__ = ["sparse_mla_decode", "sparse_mla_prefill", "tilelang_status"]
