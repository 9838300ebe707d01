"""A CPU candidate filter for exact greedy decoding: the lm_head GEMM in int8, with a proven error bound.

On a CPU the greedy head is bound by reading the bf16 weight (66 MB for 129280 x 256 per step) and by
top-k over the [N, vocab] logits. An int8 copy halves the bytes and ``torch._int_mm`` computes the int8 dot
products exactly (int32 sums), so the only error of the screen is the quantization of the hidden state and
of the weight, and both are bounded here with norms:

    |h·w_v - s_h s_w (q_h·q_v)| <= ||h - s_h q_h|| ||w_v|| + ||s_h q_h|| ||w_v - s_w q_v||
                                <= e_h N + ||ĥ|| R          (N, R: the largest row norms, precomputed)

The screen's own best token is scored in fp32 first; any token whose screened logit is more than that bound
(plus the fp32 rounding of the scores) below this score cannot be the fp32 argmax, so only the tokens above
the cut are re-scored in fp32. The result is the same token as the full fp32 argmax, not an approximation.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

_QMAX = 127
#: Candidate chunks one row may hit before it is left to the next candidate pass (near-flat logits).
_MAX_CHUNKS_PER_ROW = 64
#: Rows whose |h|_1 max|w| reaches this could overflow an fp32 partial sum: left to the next pass.
_FP32_SAFE = 2.0**120


@dataclass(frozen=True)
class Candidates:
    """Tokens to re-score: ``(rows[i], cols[i])`` pairs, and which rows the pairs cover (the others need the
    full scan)."""

    rows: torch.Tensor
    cols: torch.Tensor
    inside: torch.Tensor


@dataclass(frozen=True)
class PackedInt8:
    """An int8 weight [vocab, K] prepacked for oneDNN's int8 GEMM, with the unit per-row scales and zero
    points that call takes (the screen wants the integers themselves)."""

    weight: torch.Tensor
    ones: torch.Tensor  # fp32 [vocab]
    zeros: torch.Tensor  # int64 [vocab]


@dataclass(frozen=True)
class Int8Screen:
    """A per-tensor int8 copy of a [vocab, K] head weight and the norms that bound its error."""

    weight: torch.Tensor  # the float head weight [vocab, K] (not a copy): pass 1 scores with it
    weight_t: torch.Tensor  # [K, vocab] int8, the layout torch._int_mm takes
    scale: float  # s_w: weight ≈ scale * q
    resid: float  # R = max_v ||w_v - scale q_v||_2
    norm: float  # N = max_v ||w_v||_2
    amax: float  # max |w|
    chunk: int  # vocabulary chunk whose maxima locate the candidates
    #: oneDNN's prepacked copy of ``weight_t`` (:func:`_prepack`), or None: ``torch._int_mm`` then.
    packed: PackedInt8 | None = None

    @classmethod
    def build(
        cls, weight: torch.Tensor, rows_per_pass: int = 16384, check_speed: bool = True
    ) -> Int8Screen | None:
        """The screen of a float ``weight``, or None where it does not apply: not on the CPU, no int8 GEMM
        in this torch or one slower than the weight's own GEMM here (oneDNN's int8 path needs VNNI; without
        it ``_int_mm`` is many times slower; ``check_speed=False`` skips that timing), non-finite or all-zero
        weights."""
        if weight.device.type != "cpu" or weight.dim() != 2 or not hasattr(torch, "_int_mm"):
            return None
        amax = float(weight.abs().max()) if weight.numel() else 0.0
        if not math.isfinite(amax) or amax == 0.0:
            return None
        scale = amax / _QMAX
        q = torch.empty(weight.shape, dtype=torch.int8)
        resid = norm = 0.0
        for start in range(0, weight.shape[0], rows_per_pass):  # fp64 bounds without a full fp64 copy
            w = weight[start : start + rows_per_pass].double()
            qw = torch.round(w / scale).clamp_(-_QMAX, _QMAX)
            q[start : start + rows_per_pass] = qw.to(torch.int8)
            resid = max(resid, float((w - qw * scale).norm(dim=1).max()))
            norm = max(norm, float(w.norm(dim=1).max()))
        if not _int8_runs(weight, q):
            return None
        packed = _prepack(q)
        if check_speed and not _int8_is_faster(weight, q, packed is not None):
            return None
        return cls(weight, q.t(), scale, resid, norm, amax, math.gcd(weight.shape[0], 128), packed)

    def int_dots(self, hq: torch.Tensor) -> torch.Tensor:
        """The exact integer dot products [n, vocab] of int8 rows ``hq`` with every int8 weight row: through
        oneDNN's prepacked int8 GEMM when :func:`_prepack` made one (fp32 holding the integers exactly, about
        25% faster than ``torch._int_mm`` on a 2-core Zen 4), else ``torch._int_mm`` (int32)."""
        if self.packed is None:
            return torch._int_mm(hq, self.weight_t)
        return _packed_dots(hq, self.packed)

    def candidates(self, hidden: torch.Tensor) -> Candidates:
        """Every token of each row that may be its fp32 argmax (see the module docstring for the bound)."""
        n, k = hidden.shape
        h = hidden.double()
        h_abs = h.abs()
        s_h = h_abs.amax(dim=1) / _QMAX
        ok = torch.isfinite(s_h) & (s_h > 0)
        safe = torch.where(ok, s_h, 1.0)
        hq = torch.round(h / safe[:, None]).clamp_(-_QMAX, _QMAX).nan_to_num_(0.0)
        h_hat = hq * safe[:, None]
        # |h·w_v - s_h s_w (q_h·q_v)| <= the quantization bound for every token v; an fp32 score (products
        # rounded once, K additions in any order) is within eps = gamma_K |h| N + K 2^-149 of h·w_v (the
        # second term: products and sums that fall into fp32's subnormal range). The cut below compares a
        # decision score with pass 1's score of another token, each computed once: 3 eps cover both. Rows
        # whose partial sums could overflow fp32 are left to the next pass.
        gamma = (k + 1) * 2.0**-24 / (1 - (k + 1) * 2.0**-24)
        eps = gamma * h.norm(dim=1) * self.norm + k * 2.0**-149
        ok &= h_abs.sum(dim=1) * self.amax < _FP32_SAFE
        quant = (h - h_hat).norm(dim=1) * self.norm + h_hat.norm(dim=1) * self.resid
        slack = (quant + 3 * eps) * (1 + 2.0**-20)
        unit = safe * self.scale
        screened = self.int_dots(hq.to(torch.int8))  # [n, vocab] exact integer dots
        vocab = screened.shape[1]
        by_chunk = screened.view(n, vocab // self.chunk, self.chunk)
        chunk_max = by_chunk.amax(dim=-1)
        # Pass 1: the fp32 score of one of the screen's argmax tokens is a score the winner must reach; any
        # token whose screened score is more than `slack` below it cannot (its fp32 score is below that score).
        # Any token would do; the screen's best keeps the cut tight. Found through its chunk, not a scan.
        best, best_chunk = chunk_max.max(dim=-1)
        lane = by_chunk[torch.arange(n), best_chunk].argmax(dim=-1)
        first = score_pairs(hidden, self.weight, torch.arange(n), best_chunk * self.chunk + lane).double()
        cut = torch.floor((first - slack) / unit) - 1
        ok &= torch.isfinite(cut) & (cut > -(2**31))
        # Pass 2: every token at or above that cut.
        threshold = torch.where(ok, cut, best.double()).long()
        hit = chunk_max >= threshold[:, None]
        ok &= hit.sum(dim=1) <= _MAX_CHUNKS_PER_ROW
        rows, cols = self._gather(screened, hit & ok[:, None], threshold)
        return Candidates(rows, cols, ok)

    def _gather(
        self, screened: torch.Tensor, hit: torch.Tensor, threshold: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(row, token) pairs whose screened score is >= the row's threshold, found through the ``hit`` chunks
        [n, chunks] (those whose maximum reaches it, of the rows that take part)."""
        hit_rows, hit_chunks = hit.nonzero(as_tuple=True)
        cols = hit_chunks[:, None] * self.chunk + torch.arange(self.chunk)
        pair, lane = (screened[hit_rows[:, None], cols] >= threshold[hit_rows, None]).nonzero(as_tuple=True)
        return hit_rows[pair], cols[pair, lane]


def _int8_is_faster(
    weight: torch.Tensor, q: torch.Tensor, packed: bool, rows: int = 8192, tries: int = 3
) -> bool:
    """Whether the int8 GEMM the screen would run (oneDNN's prepacked one when ``packed``, else
    ``torch._int_mm``) beats the weight's own GEMM on a slice of the head, on this machine."""
    k = weight.shape[1]
    w, wq = weight[:rows], q[:rows]
    h, hq = torch.zeros(8, k, dtype=weight.dtype), torch.zeros(8, k, dtype=torch.int8)
    part = _prepack(wq) if packed else None

    def int8() -> torch.Tensor:
        return torch._int_mm(hq, wq.t()) if part is None else _packed_dots(hq, part)

    def best(fn) -> float:
        times = []
        for _ in range(tries):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    int8()  # warm-up
    torch.nn.functional.linear(h, w)
    return best(int8) < best(lambda: torch.nn.functional.linear(h, w))


def _prepack(q: torch.Tensor) -> PackedInt8 | None:
    """oneDNN's prepacked form of the int8 weight [vocab, K], when this torch has it and its fp32 output holds
    every dot exactly (|dot| <= K * 127^2 < 2^24, i.e. K <= 1040; V3.2's 7168 is past that) and a check on a
    slice matches ``torch._int_mm``; otherwise None."""
    k = q.shape[1]
    if k * _QMAX * _QMAX >= 2**24 or not hasattr(torch.ops.onednn, "qlinear_prepack"):
        return None
    try:
        vocab = q.shape[0]
        packed = PackedInt8(
            torch.ops.onednn.qlinear_prepack(q, None),
            torch.ones(vocab, dtype=torch.float32),
            torch.zeros(vocab, dtype=torch.int64),
        )
        probe = (torch.arange(2 * k) % (2 * _QMAX + 1) - _QMAX).to(torch.int8).view(2, k)
        part = min(q.shape[0], 256)
        exact = torch.equal(_packed_dots(probe, packed)[:, :part], torch._int_mm(probe, q[:part].t()).float())
    except (RuntimeError, NotImplementedError):
        return None
    return packed if exact else None


def _packed_dots(hq: torch.Tensor, packed: PackedInt8) -> torch.Tensor:
    """int8 rows times a prepacked int8 weight, exact integers in fp32. oneDNN takes uint8 activations with a
    zero point: hq + 128 with zero point 128 is the same integer."""
    xu8 = (hq.to(torch.int16) + 128).to(torch.uint8)
    return torch.ops.onednn.qlinear_pointwise(
        xu8, 1.0, 128, packed.weight, packed.ones, packed.zeros, None, 1.0, 0, torch.float32, "none", [], ""
    )


def _int8_runs(weight: torch.Tensor, q: torch.Tensor) -> bool:
    """Whether this torch build has a CPU ``torch._int_mm``."""
    try:
        torch._int_mm(torch.zeros(1, weight.shape[1], dtype=torch.int8), q[:1].t())
    except RuntimeError:
        return False
    return True


def score_pairs(
    hidden: torch.Tensor, weight: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor
) -> torch.Tensor:
    """fp32 scores of the (row, token) pairs (exact products, one fp32 sum each): the scores every greedy
    decision is made on (the screen's error bound assumes exactly this computation)."""
    return (hidden[rows].float() * weight[cols].float()).sum(-1)


def pair_scores(
    hidden: torch.Tensor, weight: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`score_pairs` and, per row of ``hidden``, the largest of them (-inf for rows without pairs)."""
    scores = score_pairs(hidden, weight, rows, cols)
    best = torch.full((hidden.shape[0],), float("-inf"), device=hidden.device)
    return scores, best.scatter_reduce(0, rows, scores, "amax")
