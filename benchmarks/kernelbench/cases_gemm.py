"""FP8 block-scaled GEMM cases at V3.2's projection shapes, with cuBLAS bf16 at the same shape."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .case import Case
from .roofline import FP8_FLOPS


def linear_case(family: str, name: str, x: float | str, m: int, n: int, k: int) -> Case:
    def setup(dev: str) -> tuple:
        w = (torch.randn(n, k, device=dev) * 0.05).to(torch.float8_e4m3fn)
        s = torch.rand(-(-n // 128), -(-k // 128), device=dev) * 1e-2 + 1e-3
        xx = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        return xx, w, s, (128, 128), "ue8m0"

    def cublas(args: tuple) -> Callable[[], Any]:
        xx, w = args[0], args[1]
        wb = torch.randn(w.shape, device=w.device, dtype=torch.bfloat16)
        return lambda: torch.nn.functional.linear(xx, wb)

    return Case(
        family,
        name,
        x,
        "linear",
        setup,
        m * k * 2 + n * k + m * n * 2,
        2 * m * n * k,
        FP8_FLOPS,
        extras={"cublas_bf16": cublas},
    )


# V3.2 projections (N, K): attention (q_a, q_b, kv_a, wkv_b, o), shared expert and dense MLP (gate / up / down).
LINEAR_SHAPES: dict[str, tuple[int, int]] = {
    "q_a 1536x7168": (1536, 7168),
    "q_b 24576x1536": (24576, 1536),
    "kv_a 576x7168": (576, 7168),
    "wkv_b 32768x512": (32768, 512),
    "o 7168x16384": (7168, 16384),
    "shared_gate_up 2048x7168": (2048, 7168),
    "shared_down 7168x2048": (7168, 2048),
    "mlp_gate_up 18432x7168": (18432, 7168),
    "mlp_down 7168x18432": (7168, 18432),
}
