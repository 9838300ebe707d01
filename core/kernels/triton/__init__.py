"""Portable Triton kernels (used by the cuda and rocm backends).

Importing this package never imports Triton: ``triton_available()`` answers whether the kernels can run, and
``TRITON_KERNELS`` (op name from :data:`dsv.backend.interface.OPS` -> callable with the reference signature)
imports the kernel modules on first access; it is empty when Triton cannot be imported.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

#: op name -> (module under this package, function name).
_KERNELS: dict[str, tuple[str, str]] = {
    "linear": ("fp8_gemm", "linear"),
    "rms_norm": ("norm", "rms_norm"),
    "moe_route": ("route", "moe_route"),
    "indexer_topk_prefill": ("indexer", "indexer_topk"),
    "indexer_topk_decode": ("indexer", "indexer_topk"),
    "sparse_mla_prefill": ("sparse_mla", "sparse_mla"),
    "sparse_mla_decode": ("sparse_mla", "sparse_mla"),
    "kv_write": ("kv_write", "kv_write"),
    "index_k_write": ("kv_write", "index_k_write"),
    "fused_moe": ("fused_moe", "fused_moe"),
}

_IMPORT_ERROR: str | None = None


def triton_available() -> tuple[bool, str]:
    """(usable, reason): Triton imports and, outside the interpreter, a GPU target is present."""
    try:
        import triton  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install raising anything
        return False, f"triton cannot be imported: {type(exc).__name__}: {exc}"
    import os

    import torch

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return True, f"triton {triton.__version__} (interpreter, TRITON_INTERPRET=1)"
    if not torch.cuda.is_available():  # ROCm builds of torch answer through torch.cuda too
        return False, f"triton {triton.__version__} is installed but torch sees no CUDA/ROCm GPU"
    if _load() is None:
        return False, f"dsv.kernels.triton failed to import: {_IMPORT_ERROR}"
    return True, f"triton {triton.__version__}"


def _load() -> dict[str, Callable[..., Any]] | None:
    global _IMPORT_ERROR
    try:
        table = {}
        for op, (module, name) in _KERNELS.items():
            table[op] = getattr(importlib.import_module(f"{__name__}.{module}"), name)
        return table
    except Exception as exc:
        _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"
        return None


def __getattr__(name: str) -> Any:
    # PEP 562: the kernel modules (and Triton) are imported on first access only.
    if name == "TRITON_KERNELS":
        table = _load()
        if table is None:
            return {}  # triton_available() says why
        globals()["TRITON_KERNELS"] = table
        return table
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["TRITON_KERNELS", "triton_available"]
