"""Building :class:`AttentionMetadata` for a batch of sequence chunks."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dsv.ops.metadata import AttentionMetadata


@dataclass(frozen=True)
class SeqChunk:
    """``num_tokens`` new tokens of one sequence starting at position ``start``, whose KV lives in ``pages``."""

    start: int
    num_tokens: int
    pages: list[int]


def build_metadata(
    chunks: list[SeqChunk], page_size: int, device: torch.device | str = "cpu"
) -> AttentionMetadata:
    """Metadata for the concatenation of ``chunks`` (tokens grouped by sequence, in order)."""
    if not chunks:
        raise ValueError("a batch needs at least one sequence")
    positions, token_seq, slots = [], [], []
    qsl = [0]
    seq_lens = []
    for b, c in enumerate(chunks):
        end = c.start + c.num_tokens
        if len(c.pages) * page_size < end:
            raise ValueError(
                f"sequence {b} needs {end} cache slots but holds {len(c.pages)} pages of {page_size}"
            )
        pos = list(range(c.start, end))
        positions += pos
        token_seq += [b] * c.num_tokens
        slots += [c.pages[p // page_size] * page_size + p % page_size for p in pos]
        qsl.append(qsl[-1] + c.num_tokens)
        seq_lens.append(end)
    max_pages = max(len(c.pages) for c in chunks)
    table = torch.zeros(len(chunks), max_pages, dtype=torch.int32)
    for b, c in enumerate(chunks):
        table[b, : len(c.pages)] = torch.tensor(c.pages, dtype=torch.int32)
    meta = AttentionMetadata(
        positions=torch.tensor(positions, dtype=torch.int64),
        token_seq=torch.tensor(token_seq, dtype=torch.int64),
        query_start_loc=torch.tensor(qsl, dtype=torch.int64),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int64),
        block_table=table,
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        page_size=page_size,
        max_seq_len=max(seq_lens),
        max_query_len=max(c.num_tokens for c in chunks),
    )
    return meta if str(device) == "cpu" else meta.to(device)
