"""MoE routing (sigmoid scores, group-limited top-k) in one launch per call.

The reference (:func:`dsv.ops.moe.moe_route`) is about fifteen small torch kernels: sigmoid, bias, the group
top-2 sums, the group top-k, a mask, the expert top-k, a gather and the renormalization. At decode sizes each
costs more as a launch than as arithmetic. Here one program routes one token: its E scores sit in registers as
[groups, experts per group], and the top-k selections are repeated arg-max passes (ties go to the lowest
index; the reference's ``torch.topk`` leaves tie order unspecified, and the conformance suite compares choices
as sets with ties).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _moe_route_kernel(
    logits_ptr,
    bias_ptr,
    weights_ptr,
    ids_ptr,
    stride_l,
    scaling,
    N_GROUP: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_S: tl.constexpr,
    TOPK_GROUP: tl.constexpr,
    TOP_K: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_TOP: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    RENORMALIZE: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    g = tl.arange(0, BLOCK_G)[:, None]
    s = tl.arange(0, BLOCK_S)[None, :]
    valid = (g < N_GROUP) & (s < GROUP_SIZE)
    expert = g * GROUP_SIZE + s  # [BLOCK_G, BLOCK_S]
    neg = float("-inf")
    logits = tl.load(logits_ptr + t * stride_l + expert, mask=valid, other=0.0).to(tl.float32)
    scores = 1.0 / (1.0 + tl.exp(-logits))
    choice = scores
    if HAS_BIAS:
        choice = choice + tl.load(bias_ptr + expert, mask=valid, other=0.0).to(tl.float32)
    choice = tl.where(valid, choice, neg)
    if N_GROUP > 1:
        # Group score: the sum of the group's GROUP_TOP (<= 2) best biased scores.
        best = tl.max(choice, axis=1)
        group_score = best
        if GROUP_TOP == 2:
            first = tl.argmax(choice, axis=1)
            rest = tl.where(s == first[:, None], neg, choice)
            group_score = best + tl.max(rest, axis=1)
        gi = tl.arange(0, BLOCK_G)
        group_score = tl.where(gi < N_GROUP, group_score, neg)
        keep = gi < 0
        for _ in tl.static_range(TOPK_GROUP):
            pick = tl.argmax(group_score, axis=0)
            keep = keep | (gi == pick)
            group_score = tl.where(gi == pick, neg, group_score)
        choice = tl.where(keep[:, None], choice, neg)
    kk = tl.arange(0, BLOCK_K)
    ids = tl.zeros([BLOCK_K], tl.int64)
    weights = tl.zeros([BLOCK_K], tl.float32)
    flat_choice = tl.reshape(choice, [BLOCK_G * BLOCK_S])
    flat_scores = tl.reshape(scores, [BLOCK_G * BLOCK_S])
    flat_expert = tl.reshape(expert, [BLOCK_G * BLOCK_S])
    for j in tl.static_range(TOP_K):
        pos = tl.argmax(flat_choice, axis=0)
        chosen = tl.arange(0, BLOCK_G * BLOCK_S) == pos
        e = tl.sum(tl.where(chosen, flat_expert, 0), axis=0)
        w = tl.sum(tl.where(chosen, flat_scores, 0.0), axis=0)
        ids = tl.where(kk == j, e, ids)
        weights = tl.where(kk == j, w, weights)
        flat_choice = tl.where(chosen, neg, flat_choice)
    if RENORMALIZE:
        weights = weights / (tl.sum(weights, axis=0) + 1e-20)
    out = t * TOP_K + kk
    tl.store(weights_ptr + out, weights * scaling, mask=kk < TOP_K)
    tl.store(ids_ptr + out, ids, mask=kk < TOP_K)


def moe_route(
    logits: torch.Tensor,
    bias: torch.Tensor | None,
    top_k: int,
    n_group: int,
    topk_group: int,
    renormalize: bool,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of :func:`dsv.ops.moe.moe_route`: (weights [T, top_k] fp32, expert ids [T, top_k] int64)."""
    t, e = logits.shape
    if n_group < 1 or e % n_group:
        raise ValueError(f"{e} experts do not split into {n_group} groups")
    if not 1 <= top_k <= e or (n_group > 1 and not 1 <= topk_group <= n_group):
        raise ValueError(
            f"top_k {top_k} / topk_group {topk_group} out of range for {e} experts, {n_group} groups"
        )
    weights = torch.empty(t, top_k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(t, top_k, dtype=torch.int64, device=logits.device)
    if t == 0:
        return weights, ids
    rows = logits if logits.stride(-1) == 1 else logits.contiguous()
    group_size = e // n_group
    _moe_route_kernel[(t,)](
        rows,
        rows if bias is None else bias.contiguous(),
        weights,
        ids,
        rows.stride(0),
        float(scaling),
        N_GROUP=n_group,
        GROUP_SIZE=group_size,
        BLOCK_G=triton.next_power_of_2(n_group),
        BLOCK_S=triton.next_power_of_2(group_size),
        TOPK_GROUP=topk_group if n_group > 1 else 1,
        TOP_K=top_k,
        BLOCK_K=triton.next_power_of_2(top_k),
        GROUP_TOP=min(2, group_size),
        HAS_BIAS=bias is not None,
        RENORMALIZE=renormalize,
        num_warps=4,
    )
    return weights, ids
