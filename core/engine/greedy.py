"""Exact greedy tokens from a low-precision lm_head: the fp32 argmax at about the bf16 GEMM's cost."""

from __future__ import annotations

import torch

#: Relative error bound of the bf16/fp16 head GEMM: it rounds its output once (unit roundoff 2^-8 for
#: bf16), so two logits' errors add up to < 2^-7 of the largest magnitude; 2^-6 also covers the rounding of
#: the threshold itself and the accumulation order.
LOWP_MARGIN = 2.0**-6
#: Candidates looked for with one top-k pass; more candidates than this (near ties) take a full scan.
_TOPK_CANDIDATES = 8


def exact_greedy(hidden: torch.Tensor, weight: torch.Tensor, margin: float = LOWP_MARGIN) -> torch.Tensor:
    """argmax [N] of the fp32 logits ``hidden.float() @ weight.float().T`` for a bf16/fp16 ``weight``.

    The GEMM runs in the weight's dtype (exact products, fp32 accumulation, one rounding of the output).
    Every token within the rounding margin of the best one is a candidate, and the candidates' fp32 logits
    decide; ties go to the lowest id, as with argmax. The candidates are usually found among the top few
    of one top-k pass; when a row has more near ties than that, the whole row is scanned.
    """
    approx = torch.nn.functional.linear(hidden.to(weight.dtype), weight)
    vocab = approx.shape[-1]
    k = min(_TOPK_CANDIDATES, vocab)
    values, ids = approx.topk(k, dim=-1)
    top = values[:, :1].float()
    scale = torch.maximum(top.abs(), approx.amin(dim=-1, keepdim=True).float().abs())
    # Rounding the threshold to the weight dtype may raise it by one unit roundoff: the margin covers it.
    threshold = (top - scale * margin - 1e-6).to(weight.dtype)
    if k == vocab or bool((values[:, -1:] < threshold).all()):
        rows, pos = (values >= threshold).nonzero(as_tuple=True)
        cols = ids[rows, pos]
    else:
        rows, cols = (approx >= threshold).nonzero(as_tuple=True)
    exact = (hidden[rows].float() * weight[cols].float()).sum(-1)
    n = hidden.shape[0]
    best = torch.full((n,), float("-inf"), device=hidden.device).scatter_reduce(0, rows, exact, "amax")
    winner = exact == best[rows]
    first = torch.full((n,), vocab, dtype=torch.int64, device=hidden.device)
    return first.scatter_reduce(0, rows[winner], cols[winner], "amin")
