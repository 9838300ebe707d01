"""Batch metadata every attention-side op receives: where each token sits and where its sequence's KV lives.

The KV caches are paged: a token of sequence ``b`` at position ``p`` lives in the global *slot*
``block_table[b, p // page_size] * page_size + p % page_size``. Attention kernels take global slots (FlashMLA's
decode convention); the indexer returns positions within the sequence, turned into slots by
:func:`positions_to_slots`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    """Per-forward description of a ragged batch of sequences (prefill chunks and/or decode tokens).

    Attributes:
        positions: [T] int64 absolute position of each query token in its sequence.
        token_seq: [T] int64 index of the token's sequence in the batch.
        query_start_loc: [B + 1] int64 offsets of each sequence's query tokens (tokens are grouped by sequence).
        seq_lens: [B] int64 number of keys of each sequence after this step's tokens are written.
        block_table: [B, P] int32 physical page ids of each sequence (unused entries may hold anything).
        slot_mapping: [T] int64 global cache slot where each new token's KV is written.
        page_size: tokens per page.
        max_seq_len: max(seq_lens), kept as a Python int to avoid device syncs.
        max_query_len: the longest query span of one sequence in this batch.
    """

    positions: torch.Tensor
    token_seq: torch.Tensor
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_table: torch.Tensor
    slot_mapping: torch.Tensor
    page_size: int
    max_seq_len: int
    max_query_len: int

    @property
    def num_tokens(self) -> int:
        return int(self.positions.shape[0])

    @property
    def num_seqs(self) -> int:
        return int(self.seq_lens.shape[0])

    @property
    def is_decode(self) -> bool:
        """True when every sequence contributes exactly one query token (a pure decode step)."""
        return self.max_query_len == 1

    def to(self, device: torch.device | str) -> AttentionMetadata:
        return AttentionMetadata(
            positions=self.positions.to(device),
            token_seq=self.token_seq.to(device),
            query_start_loc=self.query_start_loc.to(device),
            seq_lens=self.seq_lens.to(device),
            block_table=self.block_table.to(device),
            slot_mapping=self.slot_mapping.to(device),
            page_size=self.page_size,
            max_seq_len=self.max_seq_len,
            max_query_len=self.max_query_len,
        )


def positions_to_slots(meta: AttentionMetadata, positions: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Map positions [N, K] of sequences ``meta.token_seq[rows]`` to global slots; -1 stays -1."""
    pos = positions.long()
    valid = pos >= 0
    safe = pos.clamp_min(0)
    seq = meta.token_seq[rows].long()
    pages = meta.block_table.long()[seq[:, None], safe // meta.page_size]
    slots = pages * meta.page_size + safe % meta.page_size
    return torch.where(valid, slots, torch.full_like(slots, -1))


def sequence_slots(meta: AttentionMetadata, max_len: int | None = None) -> torch.Tensor:
    """Global slots [B, max_len] of every sequence's positions 0..max_len-1 (entries past seq_len are junk)."""
    max_len = meta.max_seq_len if max_len is None else max_len
    pos = torch.arange(max_len, device=meta.block_table.device)
    pages = meta.block_table.long()[:, pos // meta.page_size]
    return pages * meta.page_size + (pos % meta.page_size)[None, :]


def used_slots(meta: AttentionMetadata) -> torch.Tensor:
    """Global slots [N] of every position 0..seq_len-1 of every sequence of ``meta``, sequence by sequence."""
    slots = sequence_slots(meta)
    return torch.cat([slots[b, :n] for b, n in enumerate(meta.seq_lens.tolist())])
