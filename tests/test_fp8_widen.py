"""fp8_to_float: the CPU bit path widens every e4m3fn code exactly as torch does."""

from __future__ import annotations

import torch

from dsv.ops.quant import act_dequant, act_quant, fp8_to_float


def test_every_e4m3_code_widens_exactly():
    codes = torch.arange(256, dtype=torch.uint8).repeat(128)  # 32768 values: the bit path
    q = codes.view(torch.float8_e4m3fn)
    got, want = fp8_to_float(q), q.float()
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert torch.equal(got.isnan(), want.isnan())
    finite = ~want.isnan()
    assert torch.equal(got[finite].view(torch.int32), want[finite].view(torch.int32))  # -0.0 stays -0.0


def test_strided_and_small_inputs_and_other_fp8_types():
    q = torch.randn(64, 40, 130).to(torch.float8_e4m3fn)
    view = q[:, ::3, 1:129]  # non-contiguous
    assert torch.equal(fp8_to_float(view), view.float())
    small = torch.randn(10).to(torch.float8_e4m3fn)
    assert torch.equal(fp8_to_float(small), small.float())
    e5 = torch.randn(40000).to(torch.float8_e5m2)
    assert torch.equal(fp8_to_float(e5), e5.float())


def test_act_dequant_unchanged_by_the_bit_path():
    x = torch.randn(300, 256) * 5
    q, s = act_quant(x, 128, "ue8m0")
    assert torch.equal(act_dequant(q, s, 128), (q.float().view(300, 2, 128) * s.unsqueeze(-1)).view(300, 256))
