"""dsv's TileLang fused MoE for the CUDA backend: an m-grouped contiguous FP8 GEMM (DeepGEMM's layout) for
both GEMMs of the routed experts.

Importing this package imports neither ``tilelang`` nor ``triton``: availability is
:func:`dsv_cuda.tilelang.tilelang_status` (tilelang importable, sm_90), and the kernels are compiled at their
first call (per weight shape, output dtype and tile config; the row count stays dynamic).

Modules:
    plan: compiled-kernel keys, tile choice and what the program refuses (pure Python).
    kernel: the TileLang program with TileLang's automatic pipeline, one tile per block (imports tilelang).
    persistent_kernel: the persistent, hand warp-specialized program whose promotion overlaps the MMAs.
    moe: ``fused_moe`` (the torch side: layout, quantization, launches) and a torch emulation of the kernel.
    combine: the weighted top-k sum (Triton).
"""

from __future__ import annotations

from dsv_cuda.tilelang_moe.moe import fused_moe

__all__ = ["fused_moe"]
