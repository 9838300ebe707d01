"""Triton block-FP8 linear and fused MoE against the reference ops.

Tolerances, as a fraction of max|ref|: fp32 activations 1e-4 in the interpreter (fp8 products are exact, each
128-wide K block is summed in fp32, so only the summation order differs; compiled Hopper fp8 MMAs accumulate a
block in reduced precision, hence 2e-3 there); bf16 activations 2e-2 (outputs and the reference's dequantized
activations are rounded to bf16, a 2^-8 relative step).
"""

from __future__ import annotations

import pytest
import torch

from tests.triton_support import triton_test_device

DEVICE = triton_test_device()
INTERPRET = DEVICE == "cpu"

from dsv.kernels.triton.fp8_gemm import linear  # noqa: E402
from dsv.kernels.triton.fused_moe import align_by_expert, fused_moe  # noqa: E402
from dsv.ops.linear import linear as ref_linear  # noqa: E402
from dsv.ops.moe import ExpertWeights  # noqa: E402
from dsv.ops.moe import fused_moe as ref_fused_moe  # noqa: E402
from dsv.ops.quant import weight_quant  # noqa: E402

TOL = {torch.float32: 1e-4 if INTERPRET else 2e-3, torch.bfloat16: 2e-2}


def _close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    out, ref = out.float().cpu(), ref.float()
    assert out.shape == ref.shape
    err = (out - ref).abs().max().item()
    assert err <= TOL[dtype] * ref.abs().max().item(), f"max err {err:.3e}, max |ref| {ref.abs().max():.3e}"


@pytest.mark.parametrize(
    "m,n,k,dtype,fmt",
    [
        (5, 200, 300, torch.float32, None),  # ragged N and K blocks
        (33, 256, 256, torch.float32, "ue8m0"),
        (3, 130, 128, torch.bfloat16, "ue8m0"),
        (70, 64, 384, torch.bfloat16, None),
    ],
)
def test_fp8_linear_matches_reference(m: int, n: int, k: int, dtype: torch.dtype, fmt: str | None) -> None:
    gen = torch.Generator().manual_seed(m)
    w, s = weight_quant(torch.randn(n, k, generator=gen) * 0.05)
    x = (torch.randn(2, m, k, generator=gen) * 2).to(dtype)
    out = linear(x.to(DEVICE), w.to(DEVICE), s.to(DEVICE), (128, 128), fmt)
    assert out.dtype == dtype
    _close(out, ref_linear(x, w, s, (128, 128), fmt), dtype)


@pytest.mark.parametrize("splits", [1, 2, 5])
def test_split_k_partials_sum_to_the_same_product(splits: int) -> None:
    # 5 K blocks of 128 (the last ragged): forced splits of 1, 2 (3 + 2 blocks) and 5 (one block each).
    gen = torch.Generator().manual_seed(splits)
    w, s = weight_quant(torch.randn(96, 600, generator=gen) * 0.05)
    x = torch.randn(4, 600, generator=gen)
    out = linear(x.to(DEVICE), w.to(DEVICE), s.to(DEVICE), (128, 128), config=_decode_cfg(splits))
    _close(out, ref_linear(x, w, s, (128, 128)), torch.float32)


def _decode_cfg(splits: int) -> dict[str, int]:
    return {"BLOCK_M": 16, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2, "SPLIT_K": splits}


def test_split_k_choice() -> None:
    from dsv.kernels.triton.fp8_gemm import split_k

    assert split_k(200, 56, 132) == (1, 56)  # the output tiles fill the GPU: no split
    assert split_k(24, 56, 132) == (10, 6)  # q_a at M <= 16: 24 tiles x 10 splits ~ 2 programs per SM
    assert split_k(9, 56, 132) == (28, 2)  # kv_a: 9 tiles
    assert split_k(4, 3, 132) == (3, 1)  # never more splits than K blocks
    assert split_k(1, 1, 132) == (1, 1)


def test_float_linear_is_torch_matmul() -> None:
    x, w = torch.randn(3, 40), torch.randn(24, 40)
    _close(linear(x.to(DEVICE), w.to(DEVICE)), ref_linear(x, w), torch.float32)


def test_align_by_expert_groups_and_pads() -> None:
    ids = torch.tensor([[2, 0], [2, 3], [0, 2]])
    sorted_ids, block_expert = align_by_expert(ids, 5, 4)
    assert sorted_ids.numel() % 4 == 0 and block_expert.numel() == sorted_ids.numel() // 4
    n = ids.numel()
    flat = ids.reshape(-1)
    for b, e in enumerate(block_expert.tolist()):
        rows = sorted_ids[b * 4 : (b + 1) * 4]
        real = rows[rows < n].long()
        if e < 0:
            assert real.numel() == 0
        else:
            assert (flat[real] == e).all()
    assert sorted(sorted_ids[sorted_ids < n].tolist()) == list(range(n))


def _experts(fp8: bool, dtype: torch.dtype, fmt: str | None, e: int = 4, d: int = 256, i: int = 192):
    gen = torch.Generator().manual_seed(e + i)
    w1, w3 = (torch.randn(e, i, d, generator=gen) * 0.05 for _ in range(2))
    w2 = torch.randn(e, d, i, generator=gen) * 0.05
    if not fp8:
        return ExpertWeights(w1.to(dtype), w3.to(dtype), w2.to(dtype))
    q = [[weight_quant(w[x]) for x in range(e)] for w in (w1, w3, w2)]
    (a, sa), (b, sb), (c, sc) = (
        (torch.stack([p[0] for p in qs]), torch.stack([p[1] for p in qs])) for qs in q
    )
    return ExpertWeights(a, b, c, sa, sb, sc, (128, 128), fmt)


def _on_device(ex: ExpertWeights) -> ExpertWeights:
    move = {f: getattr(ex, f) for f in ("w1", "w3", "w2", "w1_scale", "w3_scale", "w2_scale")}
    move = {f: None if v is None else v.to(DEVICE) for f, v in move.items()}
    return ExpertWeights(**move, block=ex.block, act_scale_fmt=ex.act_scale_fmt)


@pytest.mark.parametrize(
    "fp8,dtype,fmt,t",
    [
        (True, torch.float32, None, 5),
        (True, torch.bfloat16, "ue8m0", 9),
        (False, torch.float32, None, 7),
        (False, torch.bfloat16, None, 3),
    ],
)
def test_fused_moe_matches_reference(fp8: bool, dtype: torch.dtype, fmt: str | None, t: int) -> None:
    """4 experts, top-2, inter 192 (a ragged 128-block in N for gate/up and in K for down)."""
    ex = _experts(fp8, dtype, fmt)
    gen = torch.Generator().manual_seed(t)
    x = torch.randn(t, 256, generator=gen).to(dtype)
    ids = torch.stack([torch.randperm(3, generator=gen)[:2] for _ in range(t)])  # expert 3 gets no token
    w = torch.rand(t, 2, generator=gen)
    out = fused_moe(x.to(DEVICE), w.to(DEVICE), ids.to(DEVICE), _on_device(ex))
    assert out.dtype == dtype
    _close(out, ref_fused_moe(x, w, ids, ex), dtype)
    if fp8:  # gate/up writing h in x's dtype, quantized by its own act_quant pass: the very same values
        args = (x.to(DEVICE), w.to(DEVICE), ids.to(DEVICE), _on_device(ex))
        assert torch.equal(fused_moe(*args, gate_up_block_n=64), out)
