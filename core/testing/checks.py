"""Comparators: element-wise closeness, FP8-aware cache closeness, top-k as sets with ties, MoE routing.

Every check states its rule (``tolerance``) and the reason for it (``why``), and reports the worst and mean
absolute error plus ``ratio`` = worst error / allowed error, so a report shows how close a pass came to failing.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import torch

from dsv.testing.case import Verdict

E4M3_STEP = 2.0**-3  # spacing of e4m3 values relative to the start of their binade (3 mantissa bits)
E4M3_SUBNORMAL_STEP = 2.0**-9  # spacing below the smallest normal, in units of the scale


def _fail(detail: str) -> Verdict:
    return Verdict(False, detail=detail)


def _as_float(out: Any, shape: torch.Size, what: str = "output") -> torch.Tensor | Verdict:
    if not isinstance(out, torch.Tensor):
        return _fail(f"{what} is {type(out).__name__}, expected a tensor")
    if tuple(out.shape) != tuple(shape):
        return _fail(f"{what} has shape {tuple(out.shape)}, expected {tuple(shape)}")
    return out.detach().float().cpu()


def compare_allowed(out: torch.Tensor, ref: torch.Tensor, allowed: torch.Tensor) -> Verdict:
    """Element-wise ``|out - ref| <= allowed`` with the error statistics of the report."""
    if not torch.isfinite(out).all():
        bad = (~torch.isfinite(out)).nonzero()[0].tolist()
        return _fail(f"non-finite value at index {bad}")
    err = (out - ref).abs()
    ratio = (err / allowed.clamp_min(1e-30)).max().item() if err.numel() else 0.0
    worst = err.argmax().item() if err.numel() else 0
    ok = ratio <= 1.0
    detail = ""
    if not ok:
        where = list(torch.unravel_index(torch.tensor(worst), err.shape)) if err.numel() else []
        where = [int(i) for i in where]
        detail = (
            f"worst at {where}: got {out.flatten()[worst].item():.6g}, reference {ref.flatten()[worst].item():.6g}"
            f" (allowed {allowed.flatten()[worst].item():.3g}); "
            f"{int((err > allowed).sum())} of {err.numel()} values out of tolerance"
        )
    return Verdict(
        ok, err.max().item() if err.numel() else 0.0, err.mean().item() if err.numel() else 0.0, ratio, detail
    )


@dataclass(frozen=True)
class Close:
    """``|out - ref| <= rtol·|ref| + atol·max|ref|`` element-wise (atol is relative to the output's scale)."""

    rtol: float
    atol: float
    why: str

    @property
    def tolerance(self) -> str:
        return f"|out-ref| <= {self.rtol:.3g}*|ref| + {self.atol:.3g}*max|ref|"

    def expect(self, ref_out: Any, ref_inputs: dict[str, Any]) -> torch.Tensor:
        return ref_out.detach().float().cpu()

    def compare(self, out: Any, ref: torch.Tensor) -> Verdict:
        got = _as_float(out, ref.shape)
        if isinstance(got, Verdict):
            return got
        allowed = self.rtol * ref.abs() + self.atol * ref.abs().max()
        return compare_allowed(got, ref, allowed)


@dataclass(frozen=True)
class QuantizedClose:
    """Cache rows whose first ``quant_cols`` columns are e4m3 in groups of ``group``; the rest must be exact.

    A quantized value may land one e4m3 step away from the reference (a kernel that multiplies by the
    reciprocal scale instead of dividing rounds differently right at a midpoint): allowed
    ``2^-3·|ref| + 2^-8·amax_group/448`` (the second term covers subnormals and a power-of-two scale up to
    twice amax/448). Unquantized columns are a single cast of the same input, which is correctly rounded
    everywhere, so they must match exactly.
    """

    quant_cols: int
    group: int = 128
    why: str = ""

    @property
    def tolerance(self) -> str:
        if not self.quant_cols:
            return "exact"
        return (
            f"cols<{self.quant_cols}: |out-ref| <= 2^-3*|ref| + 2^-8*amax_{self.group}/448 (one e4m3 step); "
            "other cols exact"
        )

    def expect(self, ref_out: Any, ref_inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        ref = ref_out.detach().float().cpu()
        allowed = torch.zeros_like(ref)
        q = self.quant_cols
        if q:
            groups = ref[:, :q].reshape(ref.shape[0], q // self.group, self.group)
            amax = groups.abs().amax(-1, keepdim=True)
            tol = E4M3_STEP * groups.abs() + 2 * E4M3_SUBNORMAL_STEP * amax / 448.0
            allowed[:, :q] = tol.reshape(ref.shape[0], q)
        return ref, allowed

    def compare(self, out: Any, expected: tuple[torch.Tensor, torch.Tensor]) -> Verdict:
        ref, allowed = expected
        got = _as_float(out, ref.shape, "cache contents")
        if isinstance(got, Verdict):
            return got
        return compare_allowed(got, ref, allowed)


def _sorted_scores(scores: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Reference scores at the chosen entries, sorted descending per row; -1 entries count as -inf."""
    valid = idx >= 0
    picked = scores.gather(1, idx.long().clamp_min(0)).masked_fill(~valid, float("-inf"))
    return picked.sort(dim=1, descending=True).values


def _set_problems(out: torch.Tensor, ref: torch.Tensor, width: int) -> str:
    """Structural problems of a top-k answer: dtype, padding count, range, duplicates (empty if none)."""
    if out.dtype.is_floating_point or out.dtype == torch.bool:
        return f"indices have dtype {out.dtype}, expected an integer dtype"
    valid = out >= 0
    n_out, n_ref = valid.sum(1), (ref >= 0).sum(1)
    if not torch.equal(n_out, n_ref):
        row = int((n_out != n_ref).nonzero()[0])
        return f"row {row}: {int(n_out[row])} valid entries, reference has {int(n_ref[row])} (the rest -1)"
    if (out < -1).any() or (out >= width).any():
        row = int(((out < -1) | (out >= width)).any(1).nonzero()[0])
        return f"row {row}: index out of range [-1, {width}): {out[row].tolist()[:16]}"
    keyed = torch.where(valid, out.long(), -1 - torch.arange(out.shape[1]).expand_as(out))
    srt = keyed.sort(dim=1).values
    dup = (srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)
    if dup.any():
        row = int(dup.any(1).nonzero()[0])
        return f"row {row}: an index is selected twice"
    return ""


@dataclass(frozen=True)
class TopKSet:
    """Top-k positions compared as sets with ties.

    Per row: the number of -1 entries must match; valid entries must be distinct and visible; and the
    reference scores at the chosen positions, sorted, must match the reference's own sorted top-k scores to
    ``rel`` of the row's largest |score|. Different positions are accepted where their reference scores tie
    within that tolerance; order within the row is free.
    """

    scores: Any  # callable(ref_inputs) -> [T, L] fp32 reference scores, -inf where not visible
    rel: float
    why: str

    @property
    def tolerance(self) -> str:
        return (
            f"same -1 count; sorted reference scores at chosen keys within {self.rel:.3g}*max|score| per row"
        )

    def expect(self, ref_out: Any, ref_inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.scores(ref_inputs).float().cpu(), ref_out.cpu()

    def compare(self, out: Any, expected: tuple[torch.Tensor, torch.Tensor]) -> Verdict:
        scores, ref = expected
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(ref.shape):
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            return _fail(f"top-k output {shape}, expected {tuple(ref.shape)}")
        out = out.cpu()
        problem = _set_problems(out, ref, scores.shape[1])
        if problem:
            return _fail(problem)
        got, want = _sorted_scores(scores, out), _sorted_scores(scores, ref)
        valid = torch.isfinite(want)
        if (torch.isinf(got) & valid).any():
            row = int((torch.isinf(got) & valid).any(1).nonzero()[0])
            return _fail(
                f"row {row}: selects a key that is not visible to the query (causal / beyond seq_len)"
            )
        finite = scores.masked_fill(~torch.isfinite(scores), 0.0).abs().amax(1, keepdim=True)
        allowed = (self.rel * finite).expand_as(got).clamp_min(1e-30)
        err = torch.where(valid, (got - want).abs(), torch.zeros_like(got))
        ratio = (err / allowed).max().item() if err.numel() else 0.0
        mean = err[valid].mean().item() if valid.any() else 0.0
        ok = ratio <= 1.0
        detail = ""
        if not ok:
            row = int((err / allowed).amax(1).argmax())
            detail = (
                f"row {row}: selected keys' scores differ from the reference top-k by {err[row].max():.4g} "
                f"(allowed {allowed[row, 0]:.4g})"
            )
        return Verdict(ok, err.max().item() if err.numel() else 0.0, mean, ratio, detail)


def route_scores(logits: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigmoid scores, biased choice scores) as ``dsv.ops.moe.moe_route`` defines them; the set comparison
    needs these intermediates, which the reference op does not return."""
    scores = torch.sigmoid(logits.float())
    return scores, scores + bias.float().to(scores.device) if bias is not None else scores.clone()


def group_scores(choice: torch.Tensor, n_group: int) -> torch.Tensor:
    """[T, n_group]: the sum of each group's two best choice scores (DeepSeek's group ranking)."""
    grouped = choice.view(choice.shape[0], n_group, -1)
    return grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)


def route_weights(scores: torch.Tensor, ids: torch.Tensor, renormalize: bool, scaling: float) -> torch.Tensor:
    """The routing weights ``moe_route`` defines for the experts ``ids``: sigmoid scores at them,
    renormalized over the row when asked, times ``scaling``."""
    w = scores.gather(1, ids.long().to(scores.device))
    if renormalize:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    return w * scaling


@dataclass(frozen=True)
class RouteSet:
    """MoE routing: chosen experts as sets with ties, weights recomputed at the chosen experts.

    The biased choice scores at the chosen experts, sorted, must match the reference's within ``id_tol``;
    the weights must equal the unbiased sigmoid scores at the backend's own choice, renormalized and scaled,
    within ``rtol·|w| + atol`` (so a legitimate tie-break is not punished for its different weights).
    """

    id_tol: float
    rtol: float
    atol: float
    why: str

    @property
    def tolerance(self) -> str:
        return (
            f"choice scores as sets within {self.id_tol:.3g}; weights within "
            f"{self.rtol:.3g}*|w| + {self.atol:.3g}"
        )

    def expect(self, ref_out: Any, ref_inputs: dict[str, Any]) -> dict[str, Any]:
        a = ref_inputs
        scores, choice = route_scores(a["logits"].cpu(), None if a["bias"] is None else a["bias"].cpu())
        return {
            "scores": scores,
            "choice": choice,
            "ids": ref_out[1].cpu(),
            "n_group": a["n_group"],
            "topk_group": a["topk_group"],
            "renormalize": a["renormalize"],
            "scaling": a["scaling"],
        }

    def _choice_error(self, exp: dict[str, Any], ids: torch.Tensor) -> torch.Tensor:
        """Per row, how far the chosen experts' choice scores are from a top-k, inf when impossible.

        With groups, the backend may have kept a different set of groups where group scores tie, so each row
        is judged against its best-matching group selection among those that are near ties themselves (every
        kept group within ``id_tol`` of every dropped one) and contain all groups the backend chose from.
        """
        choice, n_group, k = exp["choice"], exp["n_group"], ids.shape[1]
        got = _sorted_scores(choice, ids)
        if n_group <= 1:
            return (got - choice.topk(k, dim=1).values).abs().amax(1)
        t, e = choice.shape
        ranked = group_scores(choice, n_group)  # [T, G]
        combos = list(itertools.combinations(range(n_group), exp["topk_group"]))
        sel = torch.zeros(len(combos), n_group, dtype=torch.bool)
        for c, groups in enumerate(combos):
            sel[c, list(groups)] = True
        kept_min = ranked[None].masked_fill(~sel[:, None], float("inf")).amin(-1)  # [C, T]
        dropped_max = ranked[None].masked_fill(sel[:, None], float("-inf")).amax(-1)
        chosen = torch.zeros(t, n_group, dtype=torch.bool).scatter_(1, ids.long() // (e // n_group), True)
        usable = (kept_min >= dropped_max - self.id_tol) & ~(chosen[None] & ~sel[:, None]).any(-1)
        masked = (
            choice.view(1, t, n_group, -1).masked_fill(~sel[:, None, :, None], float("-inf")).view(-1, t, e)
        )
        err = (got[None] - masked.topk(k, dim=-1).values).abs().amax(-1)  # [C, T]
        return err.masked_fill(~usable, float("inf")).amin(0)

    def compare(self, out: Any, exp: dict[str, Any]) -> Verdict:
        if not (isinstance(out, tuple) and len(out) == 2):
            return _fail(f"moe_route returned {type(out).__name__}, expected (weights, ids)")
        weights, ids = (x.detach().cpu() for x in out)
        ref_ids = exp["ids"]
        if tuple(ids.shape) != tuple(ref_ids.shape) or tuple(weights.shape) != tuple(ref_ids.shape):
            return _fail(
                f"shapes {tuple(weights.shape)}, {tuple(ids.shape)}; expected {tuple(ref_ids.shape)}"
            )
        problem = _set_problems(ids, ref_ids, exp["choice"].shape[1])
        if problem:
            return _fail(problem)
        id_err = self._choice_error(exp, ids)
        if torch.isinf(id_err).any():
            row = int(torch.isinf(id_err).nonzero()[0])
            return _fail(
                f"row {row}: experts {ids[row].tolist()} come from groups no near-tie selection keeps"
            )
        w = route_weights(exp["scores"], ids, exp["renormalize"], exp["scaling"])
        verdict = compare_allowed(weights.float(), w, self.rtol * w.abs() + self.atol)
        if verdict.ratio is None:  # non-finite weights
            return verdict
        id_ratio = id_err.max().item() / self.id_tol
        ratio = max(verdict.ratio or 0.0, id_ratio)
        detail = verdict.detail or (
            f"expert choice differs beyond ties by {id_err.max():.3g}" if id_ratio > 1 else ""
        )
        return Verdict(ratio <= 1.0, verdict.max_err, verdict.mean_err, ratio, detail)
