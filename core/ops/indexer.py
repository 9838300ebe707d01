"""Reference lightning-indexer scoring and top-k selection over the paged indexer key cache."""

from __future__ import annotations

import torch

from dsv.ops.kv_cache import IndexKCacheLayer
from dsv.ops.metadata import AttentionMetadata, sequence_slots


def indexer_logits(
    q: torch.Tensor, weights: torch.Tensor, cache: IndexKCacheLayer, meta: AttentionMetadata
) -> torch.Tensor:
    """Index scores [T, max_seq_len] fp32, -inf where a key is not visible (causal / beyond the sequence).

    score(t, s) = sum_j weights[t, j] * ReLU(q[t, j] · k[s]) with dequantized q and k (DeepSeek's ``fp8_index``
    folds the q scale into ``weights`` and the k scale after the sum; both are positive so the result is the same).

    Args:
        q: [T, H, D] indexer queries (fp32/bf16, already FP8-rounded when the cache is quantized).
        weights: [T, H] fp32 head weights including n_heads^-0.5 and head_dim^-0.5.
    """
    slots = sequence_slots(meta)  # [B, L]
    keys = cache.read(slots)  # [B, L, D] fp32
    k_tok = keys[meta.token_seq]  # [T, L, D]
    dots = torch.einsum("thd,tld->thl", q.float(), k_tok).clamp_min(0.0)
    scores = torch.einsum("th,thl->tl", weights.float(), dots)
    key_pos = torch.arange(meta.max_seq_len, device=q.device)
    visible = key_pos[None, :] <= meta.positions[:, None]
    return scores.masked_fill(~visible, float("-inf"))


def topk_positions(scores: torch.Tensor, topk: int) -> torch.Tensor:
    """Top-k key positions [T, topk] int32 of masked scores; entries beyond the visible keys are -1.

    When a row has at most ``topk`` visible keys all of them are selected (exactly dense attention).
    """
    t, length = scores.shape
    k = min(topk, length)
    values, idx = scores.topk(k, dim=-1)
    idx = torch.where(torch.isinf(values) & (values < 0), torch.full_like(idx, -1), idx)
    if k < topk:
        idx = torch.cat([idx, idx.new_full((t, topk - k), -1)], dim=1)
    return idx.to(torch.int32)


def indexer_topk(
    q: torch.Tensor, weights: torch.Tensor, cache: IndexKCacheLayer, meta: AttentionMetadata, topk: int
) -> torch.Tensor:
    """Lightning indexer: scores then top-k. Returns [T, topk] int32 positions within each sequence, -1 padded."""
    return topk_positions(indexer_logits(q, weights, cache, meta), topk)
