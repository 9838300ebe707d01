"""Shared set-up of the Triton kernel tests: interpreter on the CPU, compiled kernels on a GPU.

Import this module first in a ``test_triton_*`` module: ``DEVICE = triton_test_device()``. It sets
``TRITON_INTERPRET=1`` unless the caller chose otherwise, and skips the module with the reason when Triton is
missing, was imported before the interpreter flag could take effect, or ``TRITON_INTERPRET=0`` has no GPU.
"""

from __future__ import annotations

import os

import pytest
import torch


def triton_test_device() -> str:
    """``"cpu"`` under the interpreter, ``"cuda"`` for compiled kernels; skips the calling module otherwise."""
    os.environ.setdefault("TRITON_INTERPRET", "1")
    triton = pytest.importorskip("triton", reason="triton is not installed (pip install 'dsv[triton]')")
    interpret = os.environ["TRITON_INTERPRET"] not in ("", "0")
    if interpret and type(triton.language.standard.sum).__name__ == "JITFunction":
        pytest.skip(
            "triton was imported before TRITON_INTERPRET=1 was set in this process; "
            "export TRITON_INTERPRET=1 or run the test_triton_* modules on their own",
            allow_module_level=True,
        )
    if not interpret and not torch.cuda.is_available():
        pytest.skip("TRITON_INTERPRET=0 needs a GPU", allow_module_level=True)
    return "cpu" if interpret else "cuda"
