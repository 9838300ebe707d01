"""``fused_moe`` through torch's grouped GEMMs: ``torch._scaled_grouped_mm`` (FP8, row-wise scales) and
``torch._grouped_mm`` (bf16), both CUTLASS kernels in ATen on sm_90.

The routed (token, slot) rows are sorted by expert on the GPU (scatter-add counts, stable argsort, cumsum: no
host sync, so the whole op can be captured in a CUDA graph), each expert's run padded to a multiple of
``ALIGN_M`` rows; one grouped GEMM computes gate and up together (w1 and w3 concatenated on N), SiLU * up runs
element-wise, a second grouped GEMM computes down, and each token's ``top_k`` rows are gathered back and summed
in fp32 with their routing weights (a gather and a sum, no atomics: deterministic).

ATen's contract (``GroupedBlas.cpp`` / ``_meta_grouped_mm_common``, torch 2.9-2.13), 2D x 3D form:

- ``mat_a`` [M, K] row-major; ``mat_b`` [G, K, N] column-major, i.e. the [G, N, K] weight ``.transpose(1, 2)``;
- ``offs`` [G] int32, cumulative group ends (``offs[-1]`` may equal M; output rows past it are NOT written);
- every stride a multiple of 16 bytes and, for the FP8 op, K and N multiples of 16: weights are zero-padded
  once (K and N to ``ALIGN_K``), activations' K on the fly (zero columns add nothing);
- group sizes: ATen does not check them, but the kernels' users (torchtitan, nvFuser) keep every group a
  multiple of 16 rows for the FP8 kernel (8 for bf16); we pad every group to ``ALIGN_M`` = 16 rows, which adds
  no tile work (CUTLASS tiles are >= 64 rows) and at most E * 15 zero rows;
- ``_scaled_grouped_mm``: e4m3 operands, fp32 ``scale_a`` [M] (per row) and ``scale_b`` [G, N] (per output
  channel), bf16 output, sm_90 / sm_100 only. ``_grouped_mm``: bf16 operands and output (sm_90 fast path).

Numerics of ``scaled_grouped_mm`` versus the reference (``dsv.ops.moe.fused_moe``), which multiplies
activations quantized per 1x128 group with the checkpoint's 128x128 block-scaled weights:

- weights are requantized ONCE to one scale per output channel: W = w_fp8 * s_block is dequantized (fp32),
  r_n = max_k |W[n, k]| / 448, Ŵ[n, k] = r_n * e4m3(W[n, k] / r_n) (round to nearest even). Element-wise
  |Ŵ - W| <= max(2^-4 |W|, 2^-10 r_n): half an e4m3 ulp (3 mantissa bits) in the normal range, half the
  subnormal step 2^-9 below it. Only where s_block / r_n is a power of two for every block of the row are the
  values kept exactly; otherwise each weight takes a second rounding, at most 6.25% of itself, ~2-3% rms.
- activations are quantized with ONE scale per row (amax / 448 over all K, not rounded to ue8m0) instead of
  per 128 columns: the same element-wise bound with the row's amax, so columns far smaller than the row's
  largest lose relative precision (subnormal e4m3) where the per-group scale kept it.
- the products accumulate in fp32 (``use_fast_accum=False``), output rounded to bf16 per GEMM as in the
  reference.

``grouped_mm`` (bf16) keeps the reference's activation quantization exactly (per-1x128 quantize-dequantize,
``act_scale_fmt`` honoured) and multiplies by the dequantized weight rounded to bf16 (relative error <= 2^-9 per
weight, zero when the block scale is a power of two): the closest to the reference, at bf16 tensor-core speed and
twice the FP8 weight memory.

Both keep a prepared copy of each layer's experts (requantized / dequantized, concatenated, padded), built at
the first call and cached while the weights live and are unchanged. That copy is the same size as the FP8
experts (FP8 variant) or twice it (bf16): a model serving from these kernels holds its routed experts twice.
"""

from __future__ import annotations

import logging
import os
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dsv.backend.interface import KernelUnavailable
from dsv.ops.moe import ExpertWeights, sort_by_expert
from dsv.ops.quant import AMAX_FLOOR, quant_roundtrip, weight_dequant

log = logging.getLogger(__name__)

#: Rows per expert group are padded to a multiple of this (FP8 grouped GEMM's TMA alignment).
ALIGN_M = 16
#: K and N of both GEMMs are padded to a multiple of this (ATen checks K % 16 and N % 16 for FP8).
ALIGN_K = 16
FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)
#: Experts dequantized at once while preparing weights (bounds the fp32 temporary: 8 x 4096 x 7168 x 4 B).
PREP_CHUNK = 8

# Prepared weights per (variant, id(w1)); see ``prepared``. Bounded by DSV_GROUPED_MM_CACHE_MB (default: no
# bound); past it the weights are prepared again at every call (slow, correct) and a warning is logged once.
_CACHE: dict[tuple[str, int], tuple[weakref.ref, tuple[int, ...], PreparedExperts]] = {}
_CACHE_LIMIT = int(os.environ.get("DSV_GROUPED_MM_CACHE_MB", "0")) << 20
_cache_bytes = 0
_warned = False


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


# ----- routing -----


@dataclass(frozen=True)
class Routing:
    """The T*top_k routed rows laid out by expert.

    Attributes:
        rows: padded row count P (static: T*top_k + E*(ALIGN_M-1), rounded up), buffer size of both GEMMs.
        offs: [E] int32 cumulative padded group ends (``offs[-1] <= rows``).
        dest: [T*top_k] int64, the padded row of each flat (token, slot) pair ``t * top_k + j``.
    """

    rows: int
    offs: torch.Tensor
    dest: torch.Tensor


def route_rows(ids: torch.Tensor, num_experts: int, align: int = ALIGN_M) -> Routing:
    """Sort the (token, slot) pairs by expert into ``align``-padded groups, on the device without a host sync
    (:func:`dsv.ops.moe.sort_by_expert`)."""
    order, sorted_dest, ends, rows = sort_by_expert(ids, num_experts, align)
    dest = torch.empty_like(sorted_dest)
    dest[order] = sorted_dest
    return Routing(rows=rows, offs=ends.to(torch.int32), dest=dest)


# ----- weight preparation -----


@dataclass(frozen=True)
class PreparedExperts:
    """Experts in the grouped GEMMs' layout: [E, N', K'] contiguous (passed as ``.transpose(1, 2)``).

    w13 stacks gate (rows [0, I)) and up (rows [I', I' + I)) with I' = round_up(I, ALIGN_K); scales are
    [E, N'] fp32 per output channel for the FP8 variant, None for bf16. Padding is zeros (scale 1).
    """

    w13: torch.Tensor
    s13: torch.Tensor | None
    w2: torch.Tensor
    s2: torch.Tensor | None
    inter: int  # I
    dim: int  # D

    @property
    def nbytes(self) -> int:
        ts = [self.w13, self.w2, self.s13, self.s2]
        return sum(t.numel() * t.element_size() for t in ts if t is not None)


def requantize_rowwise(
    w: torch.Tensor, scale_inv: torch.Tensor | None, block: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-scaled (or float) weights [E, N, K] -> (e4m3 [E, N, K], fp32 per-output-channel scales [E, N]).

    Dequantized a few experts at a time to bound the fp32 temporary. See the module docstring for the error.
    """
    e, n, k = w.shape
    q = torch.empty(e, n, k, dtype=FP8, device=w.device)
    s = torch.empty(e, n, dtype=torch.float32, device=w.device)
    for lo in range(0, e, PREP_CHUNK):
        hi = min(e, lo + PREP_CHUNK)
        deq = w[lo:hi].float() if scale_inv is None else weight_dequant(w[lo:hi], scale_inv[lo:hi], block)
        r = deq.abs().amax(-1).clamp_min(AMAX_FLOOR) / FP8_MAX
        q[lo:hi] = (deq / r[..., None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8)
        s[lo:hi] = r
    return q, s


def dequantize_bf16(w: torch.Tensor, scale_inv: torch.Tensor | None, block: tuple[int, int]) -> torch.Tensor:
    """Weights [E, N, K] in bf16: the block-dequantized value rounded once (float weights: cast)."""
    if scale_inv is None:
        return w.to(torch.bfloat16)
    out = torch.empty(w.shape, dtype=torch.bfloat16, device=w.device)
    for lo in range(0, w.shape[0], PREP_CHUNK):
        hi = min(w.shape[0], lo + PREP_CHUNK)
        out[lo:hi] = weight_dequant(w[lo:hi], scale_inv[lo:hi], block, torch.float32)
    return out


def _pad(w: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Zero-pad the last two dims of [E, N, K] to (n, k)."""
    return F.pad(w, (0, k - w.shape[2], 0, n - w.shape[1]))


def prepare(experts: ExpertWeights, fp8: bool) -> PreparedExperts:
    """The grouped GEMMs' copy of ``experts`` (uncached; see :func:`prepared`)."""
    inter, dim = experts.w1.shape[1], experts.w1.shape[2]
    ip, dp = _round_up(inter, ALIGN_K), _round_up(dim, ALIGN_K)
    block = tuple(experts.block)
    parts = []
    for name, (n, k) in (("w1", (ip, dp)), ("w3", (ip, dp)), ("w2", (dp, ip))):
        w, s = getattr(experts, name), getattr(experts, name + "_scale")
        if fp8:
            q, r = requantize_rowwise(w, s, block)
            parts.append((_pad(q, n, k), F.pad(r, (0, n - r.shape[1]), value=1.0)))
        else:
            parts.append((_pad(dequantize_bf16(w, s, block), n, k), None))
    (w1, s1), (w3, s3), (w2, s2) = parts
    s13 = torch.cat([s1, s3], 1).contiguous() if fp8 else None
    return PreparedExperts(torch.cat([w1, w3], 1).contiguous(), s13, w2.contiguous(), s2, inter, dim)


def prepared(experts: ExpertWeights, fp8: bool) -> PreparedExperts:
    """:func:`prepare`, cached per layer: keyed by w1 (weak reference) and the version counters of all six
    tensors, so an in-place weight update (a reload) prepares again."""
    global _cache_bytes, _warned
    tensors = [experts.w1, experts.w3, experts.w2, experts.w1_scale, experts.w3_scale, experts.w2_scale]
    version = tuple(id(t) for t in tensors) + tuple(t._version for t in tensors if t is not None)
    key = ("fp8" if fp8 else "bf16", id(experts.w1))
    hit = _CACHE.get(key)
    if hit is not None and hit[0]() is experts.w1 and hit[1] == version:
        return hit[2]
    prep = prepare(experts, fp8)
    if hit is not None:
        _forget(key)
    if _CACHE_LIMIT and _cache_bytes + prep.nbytes > _CACHE_LIMIT:
        if not _warned:
            log.warning(
                "grouped_mm fused_moe: prepared experts exceed DSV_GROUPED_MM_CACHE_MB; preparing per call (slow)"
            )
            _warned = True
        return prep
    _CACHE[key] = (weakref.ref(experts.w1, lambda _, k=key: _forget(k)), version, prep)
    _cache_bytes += prep.nbytes
    return prep


def _forget(key: tuple[str, int]) -> None:
    global _cache_bytes
    hit = _CACHE.pop(key, None)
    if hit is not None:
        _cache_bytes -= hit[2].nbytes


def clear_cache() -> None:
    """Drop every prepared copy (tests, or to free the memory)."""
    for key in list(_CACHE):
        _forget(key)


# ----- the GEMM calls (module attributes, so that CPU tests can stand in for the CUDA-only FP8 op) -----


def scaled_grouped_gemm(
    a: torch.Tensor, a_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, offs: torch.Tensor
) -> torch.Tensor:
    """[P, K] e4m3 (row scales [P]) x [E, N, K] e4m3 (channel scales [E, N]) -> [P, N] bf16 per ``offs``."""
    return torch._scaled_grouped_mm(
        a, w.transpose(1, 2), a_scale, w_scale, offs=offs, out_dtype=torch.bfloat16, use_fast_accum=False
    )


def grouped_gemm(a: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """[P, K] bf16 x [E, N, K] bf16 -> [P, N] bf16 per ``offs`` (fp32 accumulation)."""
    return torch._grouped_mm(a, w.transpose(1, 2), offs=offs)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row e4m3 quantization: (values [M, K], fp32 scales [M] = max(amax, 1e-4) / 448)."""
    xf = x.float()
    scale = xf.abs().amax(-1).clamp_min(AMAX_FLOOR) / FP8_MAX
    return (xf / scale[:, None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8), scale


# ----- the op -----


def _check(x: torch.Tensor, experts: ExpertWeights, fp8: bool, what: str) -> None:
    if x.dtype != torch.bfloat16:
        raise KernelUnavailable(
            f"{what} computes in bf16 (grouped GEMM output); this model runs in {x.dtype}"
        )
    if fp8 and experts.w1_scale is None:
        raise KernelUnavailable(f"{what} needs FP8 block-scaled experts; these are {experts.w1.dtype}")


def _scatter_back(
    y: torch.Tensor, routing: Routing, weights: torch.Tensor, t: int, k: int, dim: int
) -> torch.Tensor:
    """out[t] = sum_j weights[t, j] * y[dest[t, j]] in fp32, rounded to bf16 (each y row rounded first)."""
    rows = y[routing.dest, :dim].view(t, k, dim).float()
    return (rows * weights.reshape(t, k, 1).float()).sum(1).to(torch.bfloat16)


def _gather_rows(
    x: torch.Tensor, routing: Routing, k: int, prep: PreparedExperts, experts: ExpertWeights, fp8: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The gate/up GEMM's input [P, D'] (padding rows zero) and, for FP8, its row scales [P].

    Rows are copies of tokens: the T tokens are quantized once (per row for FP8; the reference's per-1x128
    quantize-dequantize for bf16 on FP8 experts), then scattered into the expert-sorted padded layout.
    """
    pair_token = torch.arange(routing.dest.numel(), device=x.device) // k
    dp = prep.w2.shape[1]
    if fp8:
        xq, xs = quantize_rows(F.pad(x, (0, dp - x.shape[1])))
        a = torch.zeros(routing.rows, dp, dtype=FP8, device=x.device)
        a_s = torch.ones(routing.rows, dtype=torch.float32, device=x.device)
        a.view(torch.uint8)[routing.dest] = xq.view(torch.uint8)[pair_token]  # index_put has no fp8 kernel
        a_s[routing.dest] = xs[pair_token]
        return a, a_s
    xr = quant_roundtrip(x, experts.block[1], experts.act_scale_fmt) if experts.w1_scale is not None else x
    a = torch.zeros(routing.rows, dp, dtype=torch.bfloat16, device=x.device)
    a[routing.dest, : x.shape[1]] = xr[pair_token]
    return a, None


def _moe(
    x: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    experts: ExpertWeights,
    fp8: bool,
) -> torch.Tensor:
    t, k = ids.shape
    prep = prepared(experts, fp8)
    if t == 0:
        return x.new_empty(0, prep.dim)
    routing = route_rows(ids, experts.num_experts)
    ip = prep.w2.shape[2]
    a, a_s = _gather_rows(x, routing, k, prep, experts, fp8)
    if fp8:
        gu = scaled_grouped_gemm(a, a_s, prep.w13, prep.s13, routing.offs)
    else:
        gu = grouped_gemm(a, prep.w13, routing.offs)
    # Rows past offs[-1] are never written by the GEMM (uninitialized): every op below is row-wise, and only
    # the dest rows are read back at the end.
    h = (F.silu(gu[:, :ip].float()) * gu[:, ip : 2 * ip].float()).to(torch.bfloat16)
    if fp8:
        hq, hs = quantize_rows(h)
        y = scaled_grouped_gemm(hq, hs, prep.w2, prep.s2, routing.offs)
    else:
        if experts.w1_scale is not None:  # the reference quantizes h per 1x128 group of its I columns
            h[:, : prep.inter] = quant_roundtrip(h[:, : prep.inter], experts.block[1], experts.act_scale_fmt)
        y = grouped_gemm(h, prep.w2, routing.offs)
    return _scatter_back(y, routing, weights, t, k, prep.dim)


def fused_moe_fp8(
    x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, experts: ExpertWeights
) -> torch.Tensor:
    """``fused_moe`` with ``torch._scaled_grouped_mm``: e4m3 with per-row / per-channel scales (see the module
    docstring for how this differs from the block-scaled reference)."""
    _check(x, experts, True, "scaled_grouped_mm fused_moe")
    return _moe(x, weights, ids, experts, fp8=True)


def fused_moe_bf16(
    x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, experts: ExpertWeights
) -> torch.Tensor:
    """``fused_moe`` with ``torch._grouped_mm`` on bf16 (dequantized) experts and the reference's activation
    quantization."""
    _check(x, experts, False, "grouped_mm fused_moe")
    return _moe(x, weights, ids, experts, fp8=False)


def gemms_only(
    x: torch.Tensor, ids: torch.Tensor, experts: ExpertWeights, fp8: bool
) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
    """Benchmark aid: the two grouped GEMM calls of one ``fused_moe`` on prepared inputs (same routing and
    layout; a random intermediate), without the routing, gathers, SiLU, quantization and weighted sum."""
    _check(x, experts, fp8, "grouped GEMMs")
    prep = prepared(experts, fp8)
    routing = route_rows(ids, experts.num_experts)
    a, a_s = _gather_rows(x, routing, ids.shape[1], prep, experts, fp8)
    h = torch.randn(routing.rows, prep.w2.shape[2], device=x.device, dtype=torch.bfloat16)
    if not fp8:
        return lambda: (grouped_gemm(a, prep.w13, routing.offs), grouped_gemm(h, prep.w2, routing.offs))
    hq, hs = quantize_rows(h)
    return lambda: (
        scaled_grouped_gemm(a, a_s, prep.w13, prep.s13, routing.offs),
        scaled_grouped_gemm(hq, hs, prep.w2, prep.s2, routing.offs),
    )


# ----- availability -----


def status(arch: tuple[int, int] | None, fp8: bool, no_gpu: Callable[[], str]) -> tuple[bool, str]:
    """(usable, reason) of the FP8 (``_scaled_grouped_mm``) or bf16 (``_grouped_mm``) kernel on ``arch``."""
    fn = "_scaled_grouped_mm" if fp8 else "_grouped_mm"
    if not hasattr(torch, fn):
        return False, f"torch {torch.__version__} has no torch.{fn}"
    if arch is None:
        return False, f"torch.{fn} fused_moe needs an sm_90 GPU: {no_gpu()}"
    if arch[0] != 9:
        # sm_100 also has both ops, but neither was measured there; sm_80's _grouped_mm is a per-group loop.
        return False, f"torch.{fn} fused_moe is enabled on sm_90 only; this GPU is sm_{arch[0]}{arch[1]}"
    return True, ""
