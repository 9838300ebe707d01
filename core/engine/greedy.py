"""Exact greedy tokens from a low-precision lm_head: the fp32 argmax at about the cost of a bf16 (or, on the
CPU, int8) GEMM."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from dsv.engine.int8_screen import Candidates, Int8Screen, pair_scores

#: Relative error bound of the bf16/fp16 head GEMM: it rounds its output once (unit roundoff 2^-8 for
#: bf16), so two logits' errors add up to < 2^-7 of the largest magnitude; 2^-6 also covers the rounding of
#: the threshold itself and the accumulation order.
LOWP_MARGIN = 2.0**-6
#: Candidates looked for with one top-k pass; more candidates than this (near ties) take a full scan.
_TOPK_CANDIDATES = 8


def exact_greedy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    margin: float = LOWP_MARGIN,
    *,
    screen: Int8Screen | None = None,
    weight_fp32: torch.Tensor | None = None,
) -> torch.Tensor:
    """argmax [N] of the fp32 logits ``hidden.float() @ weight.float().T`` for a bf16/fp16 ``weight``.

    Candidates come from a cheap pass with a proven error bound: the int8 ``screen`` when given (CPU; rows it
    cannot narrow enough go on to the next pass), else the GEMM in the weight's dtype (exact products, fp32
    accumulation, one rounding of the output) and one top-k pass. The candidates' fp32 logits decide; ties go
    to the lowest id, as with argmax. A row with more near ties than the pass holds, or with non-finite
    values, gets the full fp32 argmax (in vocabulary chunks, so a flat row cannot blow up memory; over
    ``weight_fp32`` when the caller keeps an fp32 copy). Exact wherever the fp32 logits are finite: a logit
    whose fp32 partial sums overflow depends on the summation order, so no single fp32 argmax exists there.
    """
    if screen is not None:
        tokens, rest = _decide(hidden, weight, screen.candidates(hidden))
        if rest.numel():  # rows the int8 bound cannot narrow enough: the low-precision pass, then the scan
            tokens[rest] = exact_greedy(hidden[rest], weight, margin, weight_fp32=weight_fp32)
        return tokens
    tokens, rest = _decide(hidden, weight, _lowp_candidates(hidden, weight, margin))
    if rest.numel():
        tokens[rest] = _fp32_argmax(hidden[rest], weight if weight_fp32 is None else weight_fp32)
    return tokens


def _decide(
    hidden: torch.Tensor, weight: torch.Tensor, picked: Candidates
) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [N], rows the candidates do not cover): per row the candidate with the largest fp32 score,
    the lowest id among equal scores."""
    rows, cols = picked.rows, picked.cols
    exact, best = pair_scores(hidden, weight, rows, cols)
    winner = exact == best[rows]
    first = torch.full((hidden.shape[0],), weight.shape[0], dtype=torch.int64, device=hidden.device)
    tokens = first.scatter_reduce(0, rows[winner], cols[winner], "amin")
    return tokens, (~picked.inside).nonzero(as_tuple=True)[0]


def _lowp_candidates(hidden: torch.Tensor, weight: torch.Tensor, margin: float) -> Candidates:
    """Tokens within the rounding margin of each row's best bf16/fp16 logit, found among its top few."""
    with _single_rounding(weight):
        approx = torch.nn.functional.linear(hidden.to(weight.dtype), weight)
    vocab = approx.shape[-1]
    k = min(_TOPK_CANDIDATES, vocab)
    values, ids = approx.topk(k, dim=-1)
    top = values[:, :1].float()
    scale = torch.maximum(top.abs(), approx.amin(dim=-1, keepdim=True).float().abs())
    # Rounding the threshold to the weight dtype may raise it by one unit roundoff: the margin covers it.
    threshold = (top - scale * margin - 1e-6).to(weight.dtype)
    inside = (values[:, -1:] < threshold).squeeze(1) | (k == vocab)  # every candidate is in the top-k
    inside &= torch.isfinite(scale).squeeze(1)
    rows, pos = (values >= threshold).nonzero(as_tuple=True)
    keep = inside[rows]
    return Candidates(rows[keep], ids[rows[keep], pos[keep]], inside)


def _fp32_argmax(hidden: torch.Tensor, weight: torch.Tensor, chunk: int = 16384) -> torch.Tensor:
    """argmax of ``hidden.float() @ weight.float().T`` over vocabulary chunks (first maximum wins; NaN
    counts as the maximum, as in torch.argmax)."""
    h = hidden.float()
    best_val = torch.full((h.shape[0],), float("-inf"), device=h.device)
    best_id = torch.zeros(h.shape[0], dtype=torch.int64, device=h.device)
    for start in range(0, weight.shape[0], chunk):
        logits = torch.nn.functional.linear(h, weight[start : start + chunk].float())
        val, idx = logits.max(dim=-1)
        better = (val > best_val) | (val.isnan() & ~best_val.isnan())
        best_val = torch.where(better, val, best_val)
        best_id = torch.where(better, idx + start, best_id)
    return best_id


@contextlib.contextmanager
def _single_rounding(weight: torch.Tensor) -> Iterator[None]:
    """cuBLAS may round split-K partial sums of a bf16/fp16 GEMM to the output dtype, which breaks the
    one-rounding error bound the margin relies on: turn that off for the head GEMM."""
    if weight.device.type != "cuda":
        yield
        return
    flags = torch.backends.cuda.matmul
    saved = (flags.allow_bf16_reduced_precision_reduction, flags.allow_fp16_reduced_precision_reduction)
    flags.allow_bf16_reduced_precision_reduction = False
    flags.allow_fp16_reduced_precision_reduction = False
    try:
        yield
    finally:
        flags.allow_bf16_reduced_precision_reduction, flags.allow_fp16_reduced_precision_reduction = saved
