"""Reference MoE: DeepSeek's sigmoid ``noaux_tc`` routing and the routed experts (SwiGLU)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from dsv.ops.linear import dequantized_weight
from dsv.ops.quant import fresh_temporary, quant_roundtrip, weight_dequant


@dataclass
class ExpertWeights:
    """Routed experts of one MoE layer, stacked on the expert axis.

    w1 (gate) and w3 (up): [E, I, D]; w2 (down): [E, D, I]; each with an fp32 block scale
    [E, ceil(out/128), ceil(in/128)] when FP8, else None.
    """

    w1: torch.Tensor
    w3: torch.Tensor
    w2: torch.Tensor
    w1_scale: torch.Tensor | None = None
    w3_scale: torch.Tensor | None = None
    w2_scale: torch.Tensor | None = None
    block: tuple[int, int] = (128, 128)
    act_scale_fmt: str | None = None

    @property
    def num_experts(self) -> int:
        return int(self.w1.shape[0])


def moe_route(
    logits: torch.Tensor,
    bias: torch.Tensor | None,
    top_k: int,
    n_group: int,
    topk_group: int,
    renormalize: bool,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Grouped top-k routing with sigmoid scores.

    The correction bias only chooses experts; weights come from the unbiased sigmoid scores, renormalized over
    the chosen experts and multiplied by ``scaling``. Group score = sum of the group's top-2 biased scores.

    Returns:
        (weights [T, top_k] fp32, expert ids [T, top_k] int64)
    """
    scores = torch.sigmoid(logits.float())
    choice = scores + bias.float() if bias is not None else scores
    t, e = choice.shape
    if n_group > 1:
        grouped = choice.view(t, n_group, e // n_group)
        group_scores = grouped.topk(min(2, e // n_group), dim=-1).values.sum(-1)
        keep = group_scores.topk(topk_group, dim=-1).indices
        mask = torch.zeros(t, n_group, dtype=torch.bool, device=logits.device).scatter_(1, keep, True)
        choice = grouped.masked_fill(~mask[..., None], float("-inf")).view(t, e)
    ids = choice.topk(top_k, dim=-1).indices
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return weights * scaling, ids


def sort_by_expert(
    ids: torch.Tensor, num_experts: int, align: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Lay the T*top_k (token, slot) pairs out by expert, each expert's run padded to a multiple of ``align``.

    All on the device with no host sync (graph-safe): counts come from ``scatter_add_`` (CUDA ``bincount``
    reads its maximum back to the host) and the sort is stable, so an expert's rows keep token order.

    Returns:
        order [n]: flat pair indices (``t * top_k + j``) sorted by expert; dest [n]: the padded row of each
        sorted pair; ends [E]: cumulative padded group ends; rows: the padded row count
        ``n + E * (align - 1)`` rounded up to ``align`` (static, a bound on ``ends[-1]``).
    """
    flat = ids.reshape(-1).long()
    n = flat.numel()
    counts = torch.zeros(num_experts, dtype=torch.long, device=ids.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + align - 1) // align * align
    ends = padded.cumsum(0)
    order = torch.argsort(flat, stable=True)
    expert_of = flat[order]
    rank = torch.arange(n, device=ids.device) - (counts.cumsum(0) - counts)[expert_of]
    dest = (ends - padded)[expert_of] + rank
    rows = -(-(n + num_experts * (align - 1)) // align) * align
    return order, dest, ends, rows


def fused_moe(
    x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, experts: ExpertWeights
) -> torch.Tensor:
    """sum_i weights[t, i] * Expert_{ids[t, i]}(x[t]) accumulated in fp32; result in x's dtype.

    Each expert computes exactly what three reference ``linear`` calls would (FP8: activations quantized per
    1x128 group, fp32 products with the dequantized weight, output rounded to x's dtype). The routed rows are
    sorted by expert once so that only the GEMMs run per expert; the element-wise work (activation
    quantization, SiLU, rounding) is row-wise and runs once over all rows, and the weighted sum adds each
    token's contributions in ascending expert order, as a per-expert loop would.
    """
    t, k = ids.shape
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=experts.num_experts).tolist()  # the one host sync
    tok = order // k
    w1, w3, w2 = (_expert_weights(experts, name) for name in ("w1", "w3", "w2"))
    rows = expert_input(x.index_select(0, tok), experts)
    inter, dim = experts.w1.shape[1], experts.w2.shape[1]
    gate = rows.new_empty(rows.shape[0], inter)
    up = rows.new_empty(rows.shape[0], inter)
    _per_expert(counts, rows, w1, gate)
    _per_expert(counts, rows, w3, up)
    h = expert_hidden(gate, up, experts, x.dtype)
    y = h.new_empty(h.shape[0], dim)
    _per_expert(counts, h, w2, y)
    # In place: y.to(x.dtype).float() is a fresh copy or y itself, a temporary of this function either way.
    contrib = y.to(x.dtype).float().mul_(weights.reshape(-1)[order, None].float())
    out = torch.zeros(t, dim, dtype=torch.float32, device=x.device)
    out.index_add_(0, tok, contrib)
    return out.to(x.dtype)


def expert_input(rows: torch.Tensor, experts: ExpertWeights) -> torch.Tensor:
    """What the gate/up products take: the rows as they are, or FP8-quantized per 1x128 (fp32) for FP8 experts."""
    if experts.w1_scale is None:
        return rows
    return quant_roundtrip(rows, experts.block[1], experts.act_scale_fmt, torch.float32)


def expert_hidden(
    gate: torch.Tensor, up: torch.Tensor, experts: ExpertWeights, dtype: torch.dtype
) -> torch.Tensor:
    """h = silu(gate) * up from products rounded to ``dtype``, rounded to ``dtype``; requantized (fp32) for FP8
    experts: what the down product takes."""
    g, u = gate.to(dtype).float(), up.to(dtype).float()
    if fresh_temporary(g, gate):
        h = torch.nn.functional.silu(g, inplace=True).mul_(u)
    else:
        h = torch.nn.functional.silu(g) * u
    return expert_input(h.to(dtype), experts)


def _expert_weights(experts: ExpertWeights, name: str) -> Callable[[int], torch.Tensor]:
    """Expert e's weight [out, in] to multiply with: as stored, or fp32 dequantized when FP8 (from the cached
    stacked copy when the dequantization cache can hold it, else per routed expert on each call: a full-size
    V3.2 layer would need 15 GB per stacked fp32 weight)."""
    w, scale = getattr(experts, name), getattr(experts, name + "_scale")
    if scale is None:
        return lambda e: w[e]
    stacked = dequantized_weight(w, scale, experts.block, cached_only=True)
    if stacked is not None:
        return lambda e: stacked[e]
    return lambda e: weight_dequant(w[e], scale[e], experts.block, torch.float32)


def _per_expert(
    counts: list[int], rows: torch.Tensor, weight: Callable[[int], torch.Tensor], out: torch.Tensor
) -> None:
    """out[rows of expert e] = rows · weight(e)ᵀ for the expert-sorted ``rows`` (in rows' dtype)."""
    start = 0
    for e, n in enumerate(counts):
        if n:
            torch.mm(rows[start : start + n], weight(e).to(rows.dtype).t(), out=out[start : start + n])
            start += n
