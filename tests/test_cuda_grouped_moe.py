"""dsv-cuda's grouped-GEMM ``fused_moe`` (``dsv_cuda.adapters.grouped_mm``) on the CPU.

torch CPU has ``torch._grouped_mm`` (bf16 and fp32), so the bf16 kernel runs for real and is compared with the
reference ``fused_moe``. ``torch._scaled_grouped_mm`` is CUDA-only: the FP8 kernel runs with a stand-in that
first calls the real op on meta tensors (ATen's own layout / dtype / scale-shape checks) and then does the same
math in fp32 through ``torch._grouped_mm``. Running the whole op on the meta device proves it never reads a
value back to the host (no ``.item()``, ``.tolist()``, ``nonzero``, CUDA ``bincount``): graph-capturable.
"""

from __future__ import annotations

import pytest
import torch

from dsv.backend.interface import KernelUnavailable
from dsv.ops.moe import ExpertWeights, fused_moe
from dsv.ops.quant import weight_dequant, weight_quant

pytest.importorskip("dsv_cuda", reason="install with: pip install -e backends/cuda --no-deps")

from dsv_cuda.adapters import grouped_mm as gm  # noqa: E402
from dsv_cuda.backend import CudaBackend  # noqa: E402

needs_grouped_mm = pytest.mark.skipif(
    not hasattr(torch, "_grouped_mm"), reason="this torch has no _grouped_mm"
)
BF16_ULP = 2.0**-8  # relative spacing of bf16 at the bottom of a binade (8 significant bits)


def _experts(
    e: int, inter: int, dim: int, fp8: bool, seed: int = 0, fmt: str | None = "ue8m0"
) -> ExpertWeights:
    g = torch.Generator().manual_seed(seed)

    def one(o: int, i: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        w = torch.randn(e, o, i, generator=g) * 0.05
        # Blocks of different magnitude, so that row-wise requantization has something to round.
        w *= torch.rand(e, 1, -(-i // 128), generator=g).repeat_interleave(128, -1)[..., :i] * 4 + 0.25
        if not fp8:
            return w.to(torch.bfloat16), None
        qs = [weight_quant(w[j]) for j in range(e)]
        return torch.stack([q for q, _ in qs]), torch.stack([s for _, s in qs])

    (w1, s1), (w3, s3), (w2, s2) = one(inter, dim), one(inter, dim), one(dim, inter)
    return ExpertWeights(w1, w3, w2, s1, s3, s2, (128, 128), fmt if fp8 else None)


def _inputs(t: int, e: int, k: int, dim: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, dim, generator=g).to(torch.bfloat16)
    ids = torch.rand(t, e, generator=g).topk(k, dim=1).indices
    weights = torch.rand(t, k, generator=g)
    return x, weights, ids


def _rel(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(max, mean) absolute error relative to max |ref|."""
    d = (out.float() - ref.float()).abs()
    scale = ref.float().abs().max()
    return float(d.max() / scale), float(d.mean() / scale)


def _meta(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")


def emulated_scaled_grouped_gemm(calls: list[tuple[int, int, int]]):
    """``torch._scaled_grouped_mm`` stand-in: ATen's meta checks on the real arguments, then fp32 math."""

    def gemm(a, a_scale, w, w_scale, offs):
        torch._scaled_grouped_mm(
            _meta(a), _meta(w).transpose(1, 2), _meta(a_scale), _meta(w_scale), offs=_meta(offs),
            out_dtype=torch.bfloat16,
        )  # fmt: skip
        assert a.shape[1] % 16 == 0 and w.shape[1] % 16 == 0, "ATen: K and N must be multiples of 16"
        sizes = torch.diff(offs, prepend=offs.new_zeros(1))
        assert bool((sizes % gm.ALIGN_M == 0).all()) and int(offs[-1]) <= a.shape[0]
        calls.append(tuple(w.shape))
        af = a.float() * a_scale[:, None]
        wf = w.float() * w_scale[..., None]
        return torch._grouped_mm(af, wf.transpose(1, 2), offs=offs).to(torch.bfloat16)

    return gemm


# ----- routing -----


@pytest.mark.parametrize("t,e,k", [(1, 8, 2), (37, 16, 4), (200, 256, 8)])
def test_route_rows_groups_by_expert_in_aligned_runs(t, e, k):
    _, _, ids = _inputs(t, e, k, 16)
    r = gm.route_rows(ids, e)
    flat = ids.reshape(-1)
    counts = torch.bincount(flat, minlength=e)
    assert r.offs.dtype == torch.int32 and r.offs.shape == (e,)
    sizes = torch.diff(r.offs.long(), prepend=torch.zeros(1, dtype=torch.long))
    assert (
        bool((sizes % gm.ALIGN_M == 0).all())
        and bool((sizes >= counts).all())
        and bool((sizes < counts + 16).all())
    )
    assert int(r.offs[-1]) <= r.rows == -(-(t * k + e * (gm.ALIGN_M - 1)) // 16) * 16
    assert r.dest.unique().numel() == t * k  # one row per (token, slot)
    group = torch.searchsorted(r.offs.long(), r.dest, right=True)
    assert torch.equal(group, flat)  # each row lies in its expert's group
    for x in range(e):  # within a group: token order, packed at the group's start (stable sort)
        rows = r.dest[flat == x]
        start = int(r.offs[x] - sizes[x])
        assert torch.equal(rows, torch.arange(start, start + rows.numel()))


def test_whole_op_runs_on_meta_tensors_without_host_sync():
    ex = _experts(8, 128, 256, fp8=True)
    meta = ExpertWeights(
        *(t.to("meta") for t in (ex.w1, ex.w3, ex.w2, ex.w1_scale, ex.w3_scale, ex.w2_scale))
    )
    meta.act_scale_fmt = "ue8m0"
    x = torch.empty(5, 256, dtype=torch.bfloat16, device="meta")
    ids = torch.empty(5, 2, dtype=torch.long, device="meta")
    w = torch.empty(5, 2, device="meta")
    # Any .item() / .tolist() / nonzero / bincount(no max) raises on meta tensors; the GEMMs run ATen's checks.
    assert gm.fused_moe_fp8(x, w, ids, meta).shape == (5, 256)
    if hasattr(torch, "_grouped_mm"):
        assert gm.fused_moe_bf16(x, w, ids, meta).shape == (5, 256)


# ----- requantization -----


def test_rowwise_requantization_error_bound():
    ex = _experts(4, 256, 384, fp8=True)
    q, r = gm.requantize_rowwise(ex.w1, ex.w1_scale, ex.block)
    assert q.dtype == gm.FP8 and r.shape == (4, 256)
    w = weight_dequant(ex.w1, ex.w1_scale, ex.block)
    err = (q.float() * r[..., None] - w).abs()
    bound = torch.maximum(w.abs() * 2.0**-4, r[..., None] * 2.0**-10) * (1 + 1e-6)
    assert bool((err <= bound).all()), float((err / bound).max())
    assert float(err.max()) > 0  # the blocks' scales differ: something was rounded (the test can see it)
    # Equal block scales and a 448 in every row: r_n is the block scale, nothing is rounded again.
    w8 = ex.w1.clone()
    w8[..., 0] = 448.0
    same = torch.full_like(ex.w1_scale, 2.0**-7)
    q, r = gm.requantize_rowwise(w8, same, ex.block)
    assert torch.equal(q.float() * r[..., None], weight_dequant(w8, same, ex.block))


def test_row_quantization_error_bound():
    x = torch.randn(64, 512) * torch.logspace(-3, 1, 512)
    q, s = gm.quantize_rows(x)
    err = (q.float() * s[:, None] - x).abs()
    assert bool((err <= torch.maximum(x.abs() * 2.0**-4, s[:, None] * 2.0**-10) * (1 + 1e-6)).all())


# ----- the op against the reference -----


@needs_grouped_mm
@pytest.mark.parametrize("dim,inter", [(256, 128), (200, 100)])  # 200 / 100: K and N padded to 16
def test_bf16_kernel_matches_reference_on_bf16_experts(dim, inter):
    # Same math as the reference (bf16 GEMMs with fp32 accumulation, same roundings): only the summation order
    # inside the GEMMs differs, so outputs agree to a couple of bf16 ulps.
    ex = _experts(8, inter, dim, fp8=False)
    x, w, ids = _inputs(23, 8, 3, dim)
    out, ref = gm.fused_moe_bf16(x, w, ids, ex), fused_moe(x, w, ids, ex)
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    worst, _ = _rel(out, ref)
    assert worst <= 4 * BF16_ULP, worst


@needs_grouped_mm
@pytest.mark.parametrize("fmt", ["ue8m0", None])
def test_bf16_kernel_matches_reference_on_fp8_experts(fmt):
    # Weights are the block-dequantized values rounded to bf16 (<= 2^-9 relative each), so gate/up may differ
    # from the reference by one bf16 ulp; h is then quantized to e4m3 and such a difference can flip one
    # element's e4m3 rounding (a 2^-3 relative step). Bound: 5% of max|ref| for the worst element, 0.5% mean.
    ex = _experts(8, 256, 384, fp8=True, fmt=fmt)
    x, w, ids = _inputs(19, 8, 3, 384)
    worst, mean = _rel(gm.fused_moe_bf16(x, w, ids, ex), fused_moe(x, w, ids, ex))
    assert worst <= 5e-2 and mean <= 5e-3, (worst, mean)


def _rowwise_loop(x, weights, ids, ex):
    """The FP8 kernel's math written per (token, slot), independently of the adapter's layout code."""
    q13 = [
        gm.requantize_rowwise(getattr(ex, n), getattr(ex, n + "_scale"), ex.block) for n in ("w1", "w3", "w2")
    ]
    deq = [q.float() * s[..., None] for q, s in q13]

    def rowq(v: torch.Tensor) -> torch.Tensor:
        s = v.float().abs().amax().clamp_min(1e-4) / 448.0
        return (v.float() / s).clamp(-448, 448).to(gm.FP8).float() * s

    out = torch.zeros(x.shape, dtype=torch.float32)
    for t in range(ids.shape[0]):
        xr = rowq(x[t])
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            g = (deq[0][e] @ xr).to(torch.bfloat16).float()
            u = (deq[1][e] @ xr).to(torch.bfloat16).float()
            h = (torch.nn.functional.silu(g) * u).to(torch.bfloat16)
            out[t] += float(weights[t, j]) * (deq[2][e] @ rowq(h)).to(torch.bfloat16).float()
    return out.to(torch.bfloat16)


@needs_grouped_mm
@pytest.mark.parametrize("dim,inter", [(256, 128), (200, 100)])
def test_fp8_kernel_layout_matches_per_token_math(monkeypatch, dim, inter):
    calls: list[tuple[int, int, int]] = []
    monkeypatch.setattr(gm, "scaled_grouped_gemm", emulated_scaled_grouped_gemm(calls))
    gm.clear_cache()
    ex = _experts(8, inter, dim, fp8=True)
    x, w, ids = _inputs(17, 8, 3, dim)
    out = gm.fused_moe_fp8(x, w, ids, ex)
    ip, dp = -(-inter // 16) * 16, -(-dim // 16) * 16
    assert calls == [(8, 2 * ip, dp), (8, dp, ip)]  # one gate+up GEMM, one down GEMM
    # Same quantized operands, fp32 products: differences are bf16 roundings of gate/up/y that the GEMM's
    # summation order can flip, propagated through h's e4m3 quantization (see the bf16 test): 2% of max.
    worst, mean = _rel(out, _rowwise_loop(x, w, ids, ex))
    assert worst <= 2e-2 and mean <= 2e-3, (worst, mean)


@needs_grouped_mm
def test_fp8_kernel_against_block_scaled_reference(monkeypatch):
    # Row-wise instead of block/group scales: each weight and activation is rounded once more (<= 2^-4
    # relative, ~2% rms, module docstring), independently per element, so a K-long dot product moves by
    # ~2-3% of its typical size (and h's e4m3 roundings flip as in the bf16 test): against max|ref| the worst
    # element stays under 15% (9% seen), the mean under 1.5% (1.0% seen; a wrong routing gives ~15%).
    monkeypatch.setattr(gm, "scaled_grouped_gemm", emulated_scaled_grouped_gemm([]))
    ex = _experts(8, 256, 512, fp8=True)
    x, w, ids = _inputs(29, 8, 4, 512)
    worst, mean = _rel(gm.fused_moe_fp8(x, w, ids, ex), fused_moe(x, w, ids, ex))
    assert worst <= 0.15 and mean <= 1.5e-2, (worst, mean)


@needs_grouped_mm
def test_prepared_experts_are_cached_until_the_weights_change():
    gm.clear_cache()
    ex = _experts(4, 128, 256, fp8=True)
    a = gm.prepared(ex, fp8=False)
    assert gm.prepared(ex, fp8=False) is a
    ex.w1_scale.mul_(2)  # in place, as a weight reload would
    b = gm.prepared(ex, fp8=False)
    assert b is not a and torch.equal(b.w13[:, :128].float(), (a.w13[:, :128].float() * 2))
    gm.clear_cache()


# ----- refusals and availability -----


def test_refuses_what_it_cannot_compute():
    ex = _experts(4, 128, 256, fp8=False)
    x, w, ids = _inputs(3, 4, 2, 256)
    with pytest.raises(KernelUnavailable, match="bf16"):
        gm.fused_moe_bf16(x.float(), w, ids, ex)
    with pytest.raises(KernelUnavailable, match="FP8 block-scaled experts"):
        gm.fused_moe_fp8(x, w, ids, ex)


def test_availability_reasons(monkeypatch):
    none = lambda: "no CUDA device visible"  # noqa: E731
    ok, why = gm.status(None, True, none)
    assert not ok and "sm_90" in why and "no CUDA device" in why
    ok, why = gm.status((8, 0), False, none)
    assert not ok and "sm_80" in why
    monkeypatch.delattr(torch, "_scaled_grouped_mm")
    ok, why = gm.status((9, 0), True, none)
    assert not ok and "has no torch._scaled_grouped_mm" in why


def test_kernel_table_lists_both_and_defaults_stay(monkeypatch):
    backend = CudaBackend(arch=(9, 0))
    moe = {k.name: k for k in backend.capabilities().kernels["fused_moe"]}
    assert {"scaled_grouped_mm", "grouped_mm"} <= set(moe)
    assert moe["grouped_mm"].available == hasattr(torch, "_grouped_mm")
    # Opt-in only: never the default, whatever else is installed.
    assert backend.default_kernels()["fused_moe"] not in ("scaled_grouped_mm", "grouped_mm")
    # `dsv backends` marks backend.kernel(op) as the default: the same answer.
    assert backend.kernel("fused_moe").name == backend.default_kernels()["fused_moe"]
    sm80 = {k.name: k for k in CudaBackend(arch=(8, 0)).capabilities().kernels["fused_moe"]}
    assert not sm80["grouped_mm"].available and "sm_80" in sm80["grouped_mm"].reason
    if moe["grouped_mm"].available:
        assert backend.validate({"fused_moe": "grouped_mm"}) == []
        reasons = backend.validate({"fused_moe": "grouped_mm", "dtype": "float32"})
        assert any("needs --dtype bfloat16" in r for r in reasons), reasons
        with pytest.raises(KernelUnavailable, match="bfloat16"):
            backend.ops({"fused_moe": "grouped_mm"}, config={"dtype": "float32"})
