"""Whether dsv's TileLang kernels can run here, and why not."""

from __future__ import annotations

from dsv_cuda.libraries import TILELANG, module_present, no_gpu_reason

#: The kernels use Hopper's wgmma through T.gemm and up to ~224 KB of shared memory per block; they were
#: written and measured for sm_90 (H100/H200) only.
ARCHS = (9,)


def tilelang_status(arch: tuple[int, int] | None) -> tuple[bool, str]:
    """(usable, reason) for a GPU of compute capability ``arch`` (None: no GPU visible)."""
    if not module_present("tilelang"):
        return False, f"tilelang is not installed ({TILELANG.install})"
    if arch is None:
        return False, f"dsv's TileLang kernels need an sm_90 GPU: {no_gpu_reason()}"
    if arch[0] not in ARCHS:
        return False, f"dsv's TileLang kernels need sm_90 (H100/H200); this GPU is sm_{arch[0]}{arch[1]}"
    return True, ""
