"""Reference attention ops: absorbed sparse MLA over global slots, and dense per-head causal prefill."""

from __future__ import annotations

import torch

from dsv.ops.kv_cache import MLACacheLayer


def sparse_mla(q: torch.Tensor, cache: MLACacheLayer, indices: torch.Tensor, sm_scale: float) -> torch.Tensor:
    """Absorbed ("MQA mode") sparse MLA.

    Args:
        q: [T, H, R + Dr] queries: absorbed ``q_nope · W_UK`` (R = kv_lora_rank) followed by the rope part.
        cache: one layer's MLA latent cache (its rows are [latent R | rope Dr]).
        indices: [T, K] int global slots to attend to; -1 marks an unused entry.
        sm_scale: softmax scale.

    Returns:
        [T, H, R] in q's dtype: softmax-weighted sum of the selected latents. A row with no valid index gives 0.
    """
    t, h, d = q.shape
    k = indices.shape[1]
    if torch.compiler.is_compiling():
        # One block: a loop over token blocks would make torch.compile specialize on the token count (a new
        # compilation per decode batch size).
        return _sparse_mla_block(q, cache, indices, sm_scale)
    out = q.new_empty(t, h, cache.kv_lora_rank)
    # Gathered rows are [tokens, K, R + Dr] fp32; in blocks of tokens they stay in the CPU's caches (one
    # big gather ran 3x slower there). GPUs take the whole batch at once up to a generous memory bound.
    budget = _CPU_BLOCK_BYTES if q.device.type == "cpu" else _GPU_BLOCK_BYTES
    step = max(1, budget // max(1, k * d * 4))
    for start in range(0, t, step):
        end = min(t, start + step)
        out[start:end] = _sparse_mla_block(q[start:end], cache, indices[start:end], sm_scale)
    return out


_CPU_BLOCK_BYTES = 4 << 20
_GPU_BLOCK_BYTES = 1 << 30


def _sparse_mla_block(
    q: torch.Tensor, cache: MLACacheLayer, indices: torch.Tensor, sm_scale: float
) -> torch.Tensor:
    t, _, d = q.shape
    r = cache.kv_lora_rank
    valid = indices >= 0
    rows = cache.read_rows(indices.clamp_min(0).reshape(-1)).view(t, -1, d).float()
    scores = torch.bmm(q.float(), rows.transpose(1, 2)).mul_(sm_scale)  # [t, H, K]
    scores = scores.masked_fill_(~valid[:, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num_(0.0)
    return torch.bmm(probs, rows[..., :r]).to(q.dtype)


def mha_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    sm_scale: float,
) -> torch.Tensor:
    """Dense causal multi-head attention over ragged sequences (per-head MLA form for short prefill).

    Query i of a sequence with Lq queries and Lk keys sees keys 0 .. Lk - Lq + i (bottom-right causal
    alignment, as in FlashAttention's varlen API), so a chunk on top of a cached prefix works.

    Args:
        q: [Tq, H, Dqk]; k: [Tk, H, Dqk]; v: [Tk, H, Dv]; cu_seqlens_*: [B + 1] int offsets.
    Returns:
        [Tq, H, Dv] in q's dtype.
    """
    out = q.new_empty(q.shape[0], q.shape[1], v.shape[-1])
    cq = cu_seqlens_q.tolist()
    ck = cu_seqlens_k.tolist()
    for b in range(len(cq) - 1):
        qs, qe, ks, ke = cq[b], cq[b + 1], ck[b], ck[b + 1]
        if qe == qs:
            continue
        qb, kb, vb = q[qs:qe].float(), k[ks:ke].float(), v[ks:ke].float()
        lq, lk = qe - qs, ke - ks
        scores = torch.einsum("qhd,khd->hqk", qb, kb) * sm_scale
        allowed = torch.arange(lk)[None, :] <= (torch.arange(lq)[:, None] + (lk - lq))
        scores = scores.masked_fill(~allowed.to(scores.device)[None], float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[qs:qe] = torch.einsum("hqk,khd->qhd", probs, vb).to(q.dtype)
    return out
