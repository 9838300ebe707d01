"""Reference MoE: DeepSeek's sigmoid ``noaux_tc`` routing and the routed experts (SwiGLU)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dsv.ops.linear import linear


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


def fused_moe(
    x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, experts: ExpertWeights
) -> torch.Tensor:
    """sum_i weights[t, i] * Expert_{ids[t, i]}(x[t]) accumulated in fp32; result in x's dtype."""
    out = torch.zeros(x.shape[0], experts.w2.shape[1], dtype=torch.float32, device=x.device)
    for e in torch.unique(ids).tolist():
        tok, slot = (ids == e).nonzero(as_tuple=True)
        xe = x[tok]
        gate = linear(xe, experts.w1[e], _at(experts.w1_scale, e), experts.block, experts.act_scale_fmt)
        up = linear(xe, experts.w3[e], _at(experts.w3_scale, e), experts.block, experts.act_scale_fmt)
        h = (torch.nn.functional.silu(gate.float()) * up.float()).to(x.dtype)
        y = linear(h, experts.w2[e], _at(experts.w2_scale, e), experts.block, experts.act_scale_fmt)
        out.index_add_(0, tok, y.float() * weights[tok, slot, None].float())
    return out.to(x.dtype)


def _at(scale: torch.Tensor | None, e: int) -> torch.Tensor | None:
    return None if scale is None else scale[e]
