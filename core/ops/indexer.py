"""Reference lightning-indexer scoring and top-k selection over the paged indexer key cache."""

from __future__ import annotations

import torch

from dsv.ops.kv_cache import IndexKCacheLayer
from dsv.ops.metadata import AttentionMetadata


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
    keys = cache.read_sequences(meta.block_table, meta.max_seq_len)  # [B, L, D] fp32
    qf = q.float()
    if meta.max_query_len == 1 and meta.num_tokens == meta.num_seqs:
        # Decode: token b is sequence b's only query, so the keys need no per-token gather.
        scores = _weighted_relu_scores(qf, weights, keys)
    else:
        # Scored per sequence: gathering [T, L, D] keys per token would cost T/B times the cache read.
        scores = qf.new_full((q.shape[0], meta.max_seq_len), float("-inf"))
        bounds = meta.query_start_loc.tolist()
        for b in range(meta.num_seqs):
            qs, qe = bounds[b], bounds[b + 1]
            if qe > qs:
                scores[qs:qe] = _weighted_relu_scores(qf[qs:qe], weights[qs:qe], keys[b])
    key_pos = torch.arange(meta.max_seq_len, device=q.device)
    visible = key_pos[None, :] <= meta.positions[:, None]
    return scores.masked_fill_(~visible, float("-inf"))


def _weighted_relu_scores(q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """[T, L] = sum_h weights[t, h] * ReLU(q[t, h] · k[l]) for q [T, H, D] and keys [T, L, D] (per token) or
    [L, D] (shared by every token: one GEMM)."""
    dots = torch.matmul(q, keys.transpose(-1, -2)).clamp_min_(0.0)  # [T, H, L]
    return torch.bmm(weights.float().unsqueeze(1), dots).squeeze(1)


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
