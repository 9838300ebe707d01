"""Triton RMSNorm against the reference, within the conformance suite's stated rms_norm tolerances.

Runs on the CPU through Triton's interpreter; with TRITON_INTERPRET=0 on a GPU the compiled kernel runs.
"""

from __future__ import annotations

import pytest
import torch

from tests.triton_support import triton_test_device

DEVICE = triton_test_device()

from dsv.kernels.triton.norm import rms_norm  # noqa: E402
from dsv.ops.norm import rms_norm as ref_rms_norm  # noqa: E402
from dsv.testing.grid_dense import NORM_BF16, NORM_FP32  # noqa: E402


@pytest.mark.parametrize(
    "shape,dtype,tol",
    [
        ((5, 7168), torch.bfloat16, NORM_BF16),  # hidden width: a 8192-wide block, 1024 lanes masked
        ((3, 4, 512), torch.bfloat16, NORM_BF16),  # leading dims kept
        ((6, 1536), torch.float32, NORM_FP32),
        ((1, 100), torch.float32, NORM_FP32),  # width not a power of two
    ],
)
def test_matches_reference(shape, dtype, tol) -> None:
    gen = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(shape, generator=gen) * 3).to(dtype).to(DEVICE)
    w = (torch.randn(shape[-1], generator=gen) * 0.5).to(dtype).to(DEVICE)
    out = rms_norm(x, w, 1e-6)
    ref = ref_rms_norm(x, w, 1e-6)
    assert out.dtype == dtype and out.shape == x.shape
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol.rtol, atol=tol.atol)


def test_strided_rows_and_empty_input() -> None:
    x = torch.randn(4, 2, 256).to(DEVICE)[:, 1]  # rows 512 elements apart, last dim contiguous
    w = torch.randn(256).to(DEVICE)
    torch.testing.assert_close(
        rms_norm(x, w, 1e-6), ref_rms_norm(x, w, 1e-6), rtol=NORM_FP32.rtol, atol=NORM_FP32.atol
    )
    assert rms_norm(x[:0], w, 1e-6).shape == (0, 256)


def test_wrong_weight_width_is_refused() -> None:
    with pytest.raises(ValueError, match="does not match width 64"):
        rms_norm(torch.randn(2, 64).to(DEVICE), torch.randn(32).to(DEVICE), 1e-6)
