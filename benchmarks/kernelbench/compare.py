"""Error of an output against the basis output: relative max error, or the gap between two top-k selections."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.float(), ref.float()
    return float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def topk_mismatch(scores: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], float]:
    """Largest gap between the sorted scores of two selections, relative to max|score| (0: same set; ties
    make index sets differ without any gap)."""

    def compare(out: torch.Tensor, ref: torch.Tensor) -> float:
        def picked(idx: torch.Tensor) -> torch.Tensor:
            vals = scores.gather(1, idx.long().clamp_min(0)).masked_fill(idx < 0, -1e30)
            return vals.sort(dim=1, descending=True).values

        if int((out >= 0).sum()) != int((ref >= 0).sum()):
            return math.inf
        return rel_err(picked(out), picked(ref))

    return compare
