"""Triton MoE routing against the reference, through the conformance suite's own moe_route cases and check
(choices compared as sets with ties, weights at the kernel's own choice), plus an exact-order comparison where
nothing ties.

Runs on the CPU through Triton's interpreter; with TRITON_INTERPRET=0 on a GPU the compiled kernel runs.
"""

from __future__ import annotations

import pytest
import torch

from tests.triton_support import triton_test_device

DEVICE = triton_test_device()

from dsv.backend.reference import REFERENCE_OPS  # noqa: E402
from dsv.kernels.triton.route import moe_route  # noqa: E402
from dsv.testing.case import Inputs  # noqa: E402
from dsv.testing.cases import all_cases  # noqa: E402

ROUTE_CASES = [c for c in all_cases(["ops"]) if c.op == "moe_route"]


def _on(device: str, args: dict) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in args.items()}


@pytest.mark.parametrize("case", ROUTE_CASES, ids=[c.id for c in ROUTE_CASES])
def test_conformance_cases(case) -> None:
    args = case.build(Inputs("cpu", True, case.seed))
    ref = case.call(REFERENCE_OPS["moe_route"], args)
    out = case.call(moe_route, _on(DEVICE, args))
    verdict = case.check.compare(out, case.check.expect(ref, args))
    assert verdict.ok, verdict


def test_same_experts_in_the_same_order_without_ties() -> None:
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(9, 256, generator=gen) * 2
    bias = torch.randn(256, generator=gen) * 0.1
    ref_w, ref_ids = REFERENCE_OPS["moe_route"](logits, bias, 8, 8, 4, True, 2.5)
    w, ids = moe_route(logits.to(DEVICE), bias.to(DEVICE), 8, 8, 4, True, 2.5)
    assert ids.dtype == torch.int64 and w.dtype == torch.float32
    assert torch.equal(ids.cpu(), ref_ids)
    torch.testing.assert_close(w.cpu(), ref_w, rtol=1e-6, atol=1e-7)


def test_bad_groups_are_refused() -> None:
    with pytest.raises(ValueError, match="do not split into 3 groups"):
        moe_route(torch.randn(2, 64).to(DEVICE), None, 4, 3, 1, True, 1.0)
