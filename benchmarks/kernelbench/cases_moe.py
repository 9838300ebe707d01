"""Fused MoE cases (random FP8 experts shared by the sizes of one shape) and the release of their memory."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .case import Case, sweep_variants
from .roofline import FP8_FLOPS


def moe_case(
    family: str,
    name: str,
    x: float,
    tokens: int,
    experts: int,
    top_k: int,
    inter: int,
    hidden: int,
    ref_skip: str,
) -> Case:
    def setup(dev: str) -> tuple:
        ex = _moe_weights(dev, experts, inter, hidden)
        xx = torch.randn(tokens, hidden, device=dev, dtype=torch.bfloat16)
        ids = torch.rand(tokens, experts, device=dev).topk(top_k, dim=1).indices
        wts = torch.rand(tokens, top_k, device=dev)
        return xx, wts, ids, ex

    def gemms(fp8: bool) -> Callable[[tuple], Callable[[], Any]]:
        def build(args: tuple) -> Callable[[], Any]:
            from dsv_cuda.adapters import grouped_mm

            return grouped_mm.gemms_only(args[0], args[2], args[3], fp8)

        return build

    used = min(experts, tokens * top_k)  # expected distinct experts is close to this for random routing
    nbytes = used * 3 * inter * hidden + tokens * hidden * 4
    return Case(
        family,
        name,
        x,
        "fused_moe",
        setup,
        nbytes,
        2 * tokens * top_k * 3 * inter * hidden,
        FP8_FLOPS,
        ref_skip=ref_skip,
        config={"dtype": "bfloat16"},
        # The two grouped GEMMs alone on the same routing: the library's ceiling under the fused op.
        extras={"scaled_grouped_mm.gemms": gemms(True), "grouped_mm.gemms": gemms(False)},
    )


_MOE_WEIGHTS: dict[tuple, Any] = {}


def _moe_weights(dev: str, experts: int, inter: int, hidden: int):
    """One random FP8 expert set per shape, shared by the T sizes (the kernels' prepared copies are reused)."""
    from dsv.ops.moe import ExpertWeights

    key = (dev, experts, inter, hidden)
    if key in _MOE_WEIGHTS:
        return _MOE_WEIGHTS[key]

    def weight(o: int, i: int) -> torch.Tensor:
        w = torch.empty(experts, o, i, device=dev, dtype=torch.float8_e4m3fn)
        for j in range(experts):  # one expert at a time keeps the temporary small
            w[j] = (torch.randn(o, i, device=dev) * 0.05).to(torch.float8_e4m3fn)
        return w

    def scale(o: int, i: int) -> torch.Tensor:
        return torch.rand(experts, -(-o // 128), -(-i // 128), device=dev) * 1e-2 + 1e-3

    ex = ExpertWeights(
        weight(inter, hidden),
        weight(inter, hidden),
        weight(hidden, inter),
        scale(inter, hidden),
        scale(inter, hidden),
        scale(hidden, inter),
        (128, 128),
        "ue8m0",
    )
    _MOE_WEIGHTS.clear()  # one shape at a time: 256 x 3 x 2048 x 7168 FP8 is 11 GB
    _MOE_WEIGHTS[key] = ex
    return ex


def moe_sweep_cases() -> list[Case]:
    """Tile variants of the Triton fused MoE at prefill sizes (``--sweep``): 32K and 65K routed rows.

    ``g`` is ``gate_up_block_n`` (None: the gate/up GEMM quantizes h in its epilogue, 128-wide tiles)."""
    from dsv.kernels.triton.fused_moe import fused_moe

    tiles = [
        (64, 128, 4, 3, None),
        (64, 128, 8, 4, None),
        (64, 128, 4, 3, 64),
        (64, 128, 8, 3, 64),
        (64, 128, 4, 4, 64),
        (64, 128, 8, 4, 128),
        (128, 128, 8, 3, 64),
        (64, 128, 4, 3, 32),
        (32, 128, 4, 3, 64),
        (64, 128, 4, 2, 64),
        (64, 64, 4, 3, 64),
    ]
    keys = {"block_m": "m", "block_n": "n", "num_warps": "w", "num_stages": "s", "gate_up_block_n": "g"}
    return [
        sweep_variants(
            moe_case("sweep fused_moe", f"T{t}", f"T{t}", t, 256, 8, 2048, 7168, ""), fused_moe, tiles, keys
        )
        for t in (4096, 8192)
    ]


def release_moe(case: Case, nxt: Case | None) -> None:
    """Free the MoE weights and the grouped-GEMM kernels' prepared copies once the MoE family is done."""
    if case.op == "fused_moe" and (nxt is None or nxt.op != "fused_moe"):
        _MOE_WEIGHTS.clear()
        try:
            from dsv_cuda.adapters import grouped_mm

            grouped_mm.clear_cache()
        except ImportError:
            pass
