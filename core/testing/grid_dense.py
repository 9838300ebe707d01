"""Dense-math cases: block-FP8 and float GEMM, RMSNorm, MoE routing and the routed experts."""

from __future__ import annotations

from typing import Any

import torch

from dsv.ops.moe import ExpertWeights, moe_route
from dsv.ops.quant import weight_quant
from dsv.testing.case import Case, Inputs
from dsv.testing.checks import Close, RouteSet

BF16_GEMM = Close(
    rtol=2.0**-7,
    atol=2.0**-8,
    why="bf16 output rounding (2^-8) of an fp32-accumulated product; near-zero outputs of large terms are "
    "bounded by the output's scale",
)
FP32_GEMM = Close(
    rtol=2.0**-9, atol=2.0**-9, why="fp32 GEMMs may run in TF32 on tensor cores (10-bit mantissa)"
)
FP8_GEMM = Close(
    rtol=2.0**-6,
    atol=2.0**-6,
    why="activations are quantized to e4m3 per 1x128 group by definition; a kernel quantizing with a "
    "reciprocal scale may move a few of them one e4m3 step (2^-3 relative), a per-output error well under 2^-6 "
    "of the scale; plus bf16 output rounding",
)
NORM_BF16 = Close(
    rtol=2.0**-7, atol=2.0**-12, why="one bf16 rounding of the output (2^-8) on an fp32 reduction"
)
NORM_FP32 = Close(rtol=2.0**-18, atol=2.0**-20, why="fp32 reduction over <= 7168 terms in any order")
MOE_BF16 = Close(
    rtol=2.0**-4,
    atol=2.0**-4,
    why="three e4m3 GEMMs in a row: the bf16 rounding of the SwiGLU product moves about one in 16 of its "
    "e4m3 re-quantizations by one step (2^-3), a few percent of the output's scale",
)
ROUTE = RouteSet(
    id_tol=1e-5,
    rtol=1e-5,
    atol=1e-6,
    why="fp32 logits in, fp32 sigmoid scores (0..1) out: kernels agree to ~1e-7; fast-math exp is within 1e-5",
)


def _linear_build(t: int, out_f: int, in_f: int, fp8: bool, scale_fmt: str | None, dtype: torch.dtype):
    def build(inp: Inputs) -> dict[str, Any]:
        x = inp.randn(t, in_f, dtype=dtype)
        w = torch.randn(out_f, in_f, generator=inp.gen) * in_f**-0.5
        if fp8:
            q, s = weight_quant(w)
            return {
                "x": x,
                "weight": q.to(inp.device),
                "scale_inv": s.to(inp.device),
                "block": (128, 128),
                "act_scale_fmt": scale_fmt,
            }
        return {
            "x": x,
            "weight": inp.place(w.to(dtype)),
            "scale_inv": None,
            "block": (128, 128),
            "act_scale_fmt": None,
        }

    return build


def _linear_call(fn: Any, a: dict[str, Any]) -> torch.Tensor:
    return fn(a["x"], a["weight"], a["scale_inv"], a["block"], a["act_scale_fmt"])


def _norm_build(t: int, d: int, dtype: torch.dtype):
    def build(inp: Inputs) -> dict[str, Any]:
        return {
            "x": inp.randn(t, d, dtype=dtype, std=3.0),
            "weight": inp.randn(d, dtype=dtype, std=0.5),
            "eps": 1e-6,
        }

    return build


def _norm_call(fn: Any, a: dict[str, Any]) -> torch.Tensor:
    return fn(a["x"], a["weight"], a["eps"])


def _route_build(t: int, e: int, top_k: int, n_group: int, topk_group: int, ties: str, bias: bool):
    def build(inp: Inputs) -> dict[str, Any]:
        logits = torch.randn(t, e, generator=inp.gen) * 2
        if ties == "experts":  # neighbours score the same: the k-th choice splits a tied pair
            logits = logits[:, 0::2].repeat_interleave(2, dim=1)
        elif ties == "groups":  # group g and g + n_group/2 score the same: an odd topk_group splits a pair
            logits = logits[:, : e // 2].repeat(1, 2)
        b = torch.randn(e, generator=inp.gen) * 0.1 if bias else None
        return {
            "logits": inp.place(logits),
            "bias": None if b is None else inp.place(b),
            "top_k": top_k,
            "n_group": n_group,
            "topk_group": topk_group,
            "renormalize": True,
            "scaling": 2.5,
        }

    return build


def _route_call(fn: Any, a: dict[str, Any]) -> Any:
    return fn(
        a["logits"], a["bias"], a["top_k"], a["n_group"], a["topk_group"], a["renormalize"], a["scaling"]
    )


def _moe_build(t: int, e: int, top_k: int, d: int, inter: int, fp8: bool, scale_fmt: str | None):
    def build(inp: Inputs) -> dict[str, Any]:
        x = inp.randn(t, d)
        weights, ids = moe_route(torch.randn(t, e, generator=inp.gen), None, top_k, 1, 1, True, 2.5)
        mats, scales = {}, {}
        for name, (out_f, in_f) in {"w1": (inter, d), "w3": (inter, d), "w2": (d, inter)}.items():
            w = torch.randn(e, out_f, in_f, generator=inp.gen) * in_f**-0.5
            if fp8:
                pairs = [weight_quant(w[i]) for i in range(e)]
                mats[name] = torch.stack([p[0] for p in pairs]).to(inp.device)
                scales[name] = torch.stack([p[1] for p in pairs]).to(inp.device)
            else:
                mats[name], scales[name] = inp.place(w.to(torch.bfloat16)), None
        experts = ExpertWeights(
            mats["w1"],
            mats["w3"],
            mats["w2"],
            scales["w1"],
            scales["w3"],
            scales["w2"],
            (128, 128),
            scale_fmt,
        )
        return {"x": x, "weights": inp.place(weights), "ids": ids.to(inp.device), "experts": experts}

    return build


def _moe_call(fn: Any, a: dict[str, Any]) -> torch.Tensor:
    return fn(a["x"], a["weights"], a["ids"], a["experts"])


def dense_cases() -> list[Case]:
    bf16, fp32 = torch.bfloat16, torch.float32
    cases = []

    def add(op: str, rid: str, build, call, check, quick: bool) -> None:
        cases.append(Case("ops", op, rid, build, call, check, quick=quick, seed=500 + len(cases)))

    for rid, args, check, quick in [
        ("fp8/ue8m0/T33/576x512", (33, 576, 512, True, "ue8m0", bf16), FP8_GEMM, True),  # ragged output block
        ("fp8/ue8m0/T1/1024x1536", (1, 1024, 1536, True, "ue8m0", bf16), FP8_GEMM, False),
        ("fp8/amax-scale/T16/256x384", (16, 256, 384, True, None, bf16), FP8_GEMM, False),
        ("bf16/T33/64x512", (33, 64, 512, False, None, bf16), BF16_GEMM, True),
        ("fp32/T7/96x256", (7, 96, 256, False, None, fp32), FP32_GEMM, False),
    ]:
        add("linear", rid, _linear_build(*args), _linear_call, check, quick)
    for rid, args, check, quick in [
        ("bf16/T9/7168", (9, 7168, bf16), NORM_BF16, True),
        ("bf16/T33/512", (33, 512, bf16), NORM_BF16, False),
        ("fp32/T5/1536", (5, 1536, fp32), NORM_FP32, False),
    ]:
        add("rms_norm", rid, _norm_build(*args), _norm_call, check, quick)
    for rid, args, quick in [
        ("e256/top8/groups8of4/T33", (33, 256, 8, 8, 4, "", True), True),
        ("e256/top8/groups8of4/T1", (1, 256, 8, 8, 4, "", True), False),
        ("e32/top4/ungrouped/no-bias/T17", (17, 32, 4, 1, 1, "", False), False),
        ("e64/top7/groups8of4/exact-ties/T16", (16, 64, 7, 8, 4, "experts", False), True),
        ("e64/top6/groups8of3/exact-group-ties/T16", (16, 64, 6, 8, 3, "groups", False), False),
    ]:
        add("moe_route", rid, _route_build(*args), _route_call, ROUTE, quick)
    for rid, args, quick in [
        ("fp8/ue8m0/e16/top4/T33", (33, 16, 4, 512, 256, True, "ue8m0"), True),
        ("fp8/ue8m0/e16/top4/T1", (1, 16, 4, 512, 256, True, "ue8m0"), False),
        ("fp8/amax-scale/e8/top2/T9", (9, 8, 2, 256, 128, True, None), False),
        ("bf16/e8/top2/T9", (9, 8, 2, 256, 128, False, None), False),
    ]:
        add("fused_moe", rid, _moe_build(*args), _moe_call, MOE_BF16, quick)
    return cases
