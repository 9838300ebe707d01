"""Which optional kernel libraries are installed, and whether this GPU can run them.

Nothing here imports a vendor library: presence is checked with :func:`importlib.util.find_spec` on
top-level module names (a submodule lookup would import its parent package). The adapters import the
library at their first call.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Library:
    """An optional vendor library.

    Attributes:
        name: how messages call it.
        modules: top-level modules that provide it (any one is enough).
        install: how to install it, quoted in "not installed" reasons.
        archs: SM major versions its kernels are built for.
    """

    name: str
    modules: tuple[str, ...]
    install: str
    archs: tuple[int, ...] = (9, 10)


FLASH_MLA = Library(
    "FlashMLA",
    ("flash_mla", "sgl_kernel"),
    "build it from source (github.com/deepseek-ai/FlashMLA, see backends/cuda/README.md) "
    "or pip install sgl-kernel, which ships its launch API as sgl_kernel.flash_mla",
)
FA3 = Library(
    "FA3",
    ("sgl_kernel", "flash_attn_interface"),
    "pip install sgl-kernel (sgl_kernel.flash_attn), or build flash-attention's hopper/ (flash_attn_interface)",
    archs=(9,),
)
DEEP_GEMM = Library(
    "DeepGEMM",
    ("deep_gemm",),
    "build it from github.com/deepseek-ai/DeepGEMM (./install.sh) or pip install sgl-kernel, which bundles it; "
    "the PyPI 'deep-gemm' 1.0.0 is an unusable Feb-2025 stub",
)
TILELANG = Library("TileLang", ("tilelang",), "pip install tilelang")


def module_present(name: str) -> bool:
    """True when top-level module ``name`` is importable (or already imported), without importing it."""
    if name in sys.modules:
        return sys.modules[name] is not None
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def device_arch(device: str | torch.device = "cuda") -> tuple[int, int] | None:
    """(major, minor) compute capability of ``device``, or None when no CUDA device is visible."""
    try:
        if torch.version.cuda is None or not torch.cuda.is_available():
            return None
        return torch.cuda.get_device_capability(torch.device(device))
    except Exception:
        return None


def no_gpu_reason() -> str:
    if torch.version.cuda is None:
        return "torch built without CUDA"
    return "no CUDA device visible"


def library_status(lib: Library, arch: tuple[int, int] | None) -> tuple[bool, str]:
    """(usable, reason): installed, and built for this GPU's architecture."""
    if not any(module_present(m) for m in lib.modules):
        return False, f"{lib.name} is not installed ({lib.install})"
    if arch is None:
        return False, f"{lib.name} needs an NVIDIA GPU: {no_gpu_reason()}"
    if arch[0] not in lib.archs:
        want = "/".join(f"sm_{a}0" for a in lib.archs)
        return False, f"{lib.name} runs on {want}; this GPU is sm_{arch[0]}{arch[1]}"
    return True, ""


def scaled_mm_status(arch: tuple[int, int] | None) -> tuple[bool, str]:
    """torch._scaled_mm takes DeepSeek's 1x128 / 128x128 block scales on Hopper only (cuBLASLt >= 12.9)."""
    if arch is None:
        return False, f"torch._scaled_mm block-FP8 needs an sm_90 GPU: {no_gpu_reason()}"
    if arch[0] != 9:
        return (
            False,
            f"torch._scaled_mm 1x128/128x128 block scaling runs on sm_90 only; this GPU is sm_{arch[0]}{arch[1]}",
        )
    if not hasattr(torch, "_scaled_mm"):
        return False, f"torch {torch.__version__} has no torch._scaled_mm"
    return True, ""


def triton_kernels() -> tuple[dict[str, Callable[..., Any]], bool, str]:
    """dsv's portable Triton kernels: (op -> callable, usable, reason).

    ``dsv.kernels.triton`` exposes ``TRITON_KERNELS`` and ``triton_available() -> (bool, reason)``.
    """
    if not module_present("triton"):
        return {}, False, "triton is not installed (pip install 'dsv-cuda[triton]')"
    try:
        mod = importlib.import_module("dsv.kernels.triton")
    except ModuleNotFoundError as exc:
        if exc.name is not None and exc.name.startswith("dsv.kernels"):
            return {}, False, "this dsv has no portable Triton kernels (dsv.kernels.triton)"
        return {}, False, f"dsv.kernels.triton failed to import: {exc}"
    except Exception as exc:  # a broken kernel module must not hide the other kernels
        return {}, False, f"dsv.kernels.triton failed to import: {type(exc).__name__}: {exc}"
    if not hasattr(mod, "TRITON_KERNELS") or not hasattr(mod, "triton_available"):
        return (
            {},
            False,
            "dsv.kernels.triton lacks TRITON_KERNELS / triton_available() (incomplete dsv install)",
        )
    kernels = dict(mod.TRITON_KERNELS)
    try:
        ok, reason = mod.triton_available()
    except Exception as exc:
        ok, reason = False, f"triton_available() failed: {exc}"
    return kernels, bool(ok), str(reason)
