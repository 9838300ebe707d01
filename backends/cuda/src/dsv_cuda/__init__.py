"""dsv-cuda: the NVIDIA backend of dsv (``--device cuda``).

Only :func:`probe` lives here: it is the ``dsv.backends`` entry point and must stay cheap. It imports torch
(never a vendor SDK: no flash_mla, sgl_kernel, deep_gemm, tilelang, triton) and answers whether a CUDA
device is visible. The backend class (:class:`dsv_cuda.backend.CudaBackend`) is imported only once chosen.
"""

from __future__ import annotations

from dsv.backend.interface import BACKEND_API_VERSION, ProbeResult

__version__ = "0.1.0"

NAME = "cuda"
BACKEND_CLASS = "dsv_cuda.backend:CudaBackend"
#: Higher than the CPU reference (0): an available GPU wins the automatic choice.
SCORE = 100


def _result(available: bool, reason: str) -> ProbeResult:
    return ProbeResult(
        name=NAME,
        available=available,
        reason=reason,
        score=SCORE if available else 0,
        backend_class=BACKEND_CLASS,
        api_version=BACKEND_API_VERSION,
    )


def probe() -> ProbeResult:
    """Is an NVIDIA GPU usable here? The reason names the GPU, or says what is missing.

    Note: reading the device name initializes CUDA in this process (as any torch.cuda query of device
    properties does); start worker processes with ``spawn`` afterwards.
    """
    try:
        import torch
    except ImportError as exc:  # dsv itself needs torch, but say so plainly if it is broken
        return _result(False, f"torch is not importable: {exc}")
    if torch.version.cuda is None:
        build = "a ROCm" if torch.version.hip else "a CPU-only"
        return _result(False, f"torch built without CUDA ({build} build, torch {torch.__version__})")
    try:
        count = torch.cuda.device_count()
    except Exception as exc:  # a broken driver must not take discovery down
        return _result(False, f"no CUDA device visible (CUDA query failed: {exc})")
    if count == 0 or not torch.cuda.is_available():
        return _result(False, "no CUDA device visible (check the driver and CUDA_VISIBLE_DEVICES)")
    try:
        name = torch.cuda.get_device_name(0)
        major, minor = torch.cuda.get_device_capability(0)
    except Exception as exc:
        return _result(False, f"CUDA device 0 cannot be queried: {exc}")
    more = f" (+{count - 1} more)" if count > 1 else ""
    return _result(True, f"{name}, sm_{major}{minor}{more}, CUDA {torch.version.cuda}")
