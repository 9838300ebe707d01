"""The KV caches' reads and writes as opaque torch ops, for a compiled forward (``torch.compile``).

Inside a compiled graph an in-place write into a cache becomes, after functionalization, a copy of the whole
storage (71 MB per layer for the default model's indexer keys: most of a compiled CPU decode step), and the
indexer cache's fp8 / fp32 views of one uint8 storage are mutated views of different dtypes, which
aot_autograd refuses. As custom ops the writes mutate the storage in place (mutable schema arguments) and the
reads are plain calls: inductor keeps both out of its kernels. Their bodies are the eager cache code
(:mod:`dsv.ops.kv_cache`), which calls them only while compiling.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from dsv.ops.quant import act_dequant, act_quant

#: The ops are defined through ``torch.library.Library``, not ``torch.library.custom_op``: the latter's Python
#: layers (ADInplaceOrView, autograd, dynamo-disable wrappers) added 3-34 us to each call, about 0.15 ms per
#: compiled CPU decode step of the default model (12 calls). Inference only: no autograd formulas.
_LIB = torch.library.Library("dsv", "DEF")


def _define(
    schema: str, kernel: Callable[..., object], fake: Callable[..., object]
) -> torch._ops.OpOverloadPacket:
    """``dsv::<schema>`` with ``kernel`` for every backend and ``fake`` for tracing; returns the op."""
    name = schema.split("(", 1)[0]
    _LIB.define(schema)
    _LIB.impl(name, kernel, "CompositeExplicitAutograd")
    torch.library.register_fake(f"dsv::{name}", fake, lib=_LIB)
    return getattr(torch.ops.dsv, name)


def index_views(storage: torch.Tensor, page_size: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 keys [pages, page_size, D], fp32 scales [pages, page_size]) of a quantized indexer storage."""
    pages, key_bytes = storage.shape[0], page_size * head_dim
    keys = storage[:, :key_bytes].view(torch.float8_e4m3fn).view(pages, page_size, head_dim)
    return keys, storage[:, key_bytes:].view(torch.float32).view(pages, page_size)


def _rows_write(storage: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor) -> None:
    """``storage`` viewed as [slots, width]: rows ``slots`` = ``rows`` (already in the storage's dtype)."""
    storage.view(-1, storage.shape[-1]).index_copy_(0, slots.long(), rows)


def _rows_read(storage: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Rows ``slots`` of ``storage`` viewed as [slots, width]."""
    return storage.view(-1, storage.shape[-1]).index_select(0, slots.long())


def _no_write(*args: object) -> None:
    """Fake of a write: nothing to compute (the mutation is in the schema)."""


rows_write = _define(
    "rows_write(Tensor(a0!) storage, Tensor slots, Tensor rows) -> ()", _rows_write, _no_write
)
rows_read = _define(
    "rows_read(Tensor storage, Tensor slots) -> Tensor",
    _rows_read,
    lambda storage, slots: storage.new_empty(slots.shape[0], storage.shape[-1]),
)


def write_index_keys(
    keys: torch.Tensor,
    scales: torch.Tensor,
    copy: torch.Tensor | None,
    slots: torch.Tensor,
    k: torch.Tensor,
    page_size: int,
) -> None:
    """Quantize keys [T, D] (ue8m0 e4m3, one scale per token) into the paged ``keys`` / ``scales`` at ``slots``,
    and their dequantized values into the bf16 read ``copy`` when there is one (the quantized indexer cache's
    write, eager or inside :func:`index_keys_write`)."""
    q, s = act_quant(k, keys.shape[-1], "ue8m0")
    slots = slots.long()
    page, off = slots // page_size, slots % page_size
    keys[page, off] = q
    scales[page, off] = s[:, 0]
    if copy is not None:
        copy[page, off] = act_dequant(q, s, keys.shape[-1]).to(copy.dtype)


def gather_sequences(
    keys: torch.Tensor, scales: torch.Tensor | None, block_table: torch.Tensor, length: int
) -> torch.Tensor:
    """Keys [B, length, D] fp32 (dequantized when ``scales`` is given) of positions 0..length-1 of every
    sequence of ``block_table``, a page at a time (the indexer cache's read, through
    :func:`gather_index_pages`)."""
    pages = block_table[:, : -(-length // keys.shape[1])].long()
    b, flat, head_dim = pages.shape[0], pages.reshape(-1), keys.shape[-1]
    rows = keys.index_select(0, flat).view(b, -1, head_dim)[:, :length]
    if scales is None:
        return rows.float()
    row_scales = scales.index_select(0, flat).view(b, -1)[:, :length]
    return act_dequant(rows, row_scales.unsqueeze(-1), head_dim)


def _index_keys_write(
    storage: torch.Tensor,
    copy: torch.Tensor | None,
    slots: torch.Tensor,
    k: torch.Tensor,
    page_size: int,
    head_dim: int,
) -> None:
    """:func:`write_index_keys` into a quantized indexer storage (uint8 pages of keys then scales) and its
    read copy."""
    write_index_keys(*index_views(storage, page_size, head_dim), copy, slots, k, page_size)


index_keys_write = _define(
    "index_keys_write(Tensor(a0!) storage, Tensor(a1!)? copy, Tensor slots, Tensor k, SymInt page_size, "
    "SymInt head_dim) -> ()",
    _index_keys_write,
    _no_write,
)


def gather_index_pages(
    pages: torch.Tensor,
    block_table: torch.Tensor,
    length: int,
    page_size: int,
    head_dim: int,
    quantized: bool,
) -> torch.Tensor:
    """:func:`gather_sequences` of indexer keys: a quantized storage (uint8 pages of keys then scales) when
    ``quantized``, else float pages [num_pages, page_size, head_dim] (a float cache or a read copy). The
    indexer cache's read, eager or inside :func:`pages_read`."""
    if quantized:
        return gather_sequences(*index_views(pages, page_size, head_dim), block_table, length)
    return gather_sequences(pages, None, block_table, length)


#: :func:`gather_index_pages` as an opaque op (while compiling).
pages_read = _define(
    "pages_read(Tensor pages, Tensor block_table, SymInt length, SymInt page_size, SymInt head_dim, "
    "bool quantized) -> Tensor",
    gather_index_pages,
    lambda pages, block_table, length, page_size, head_dim, quantized: pages.new_empty(
        block_table.shape[0], length, head_dim, dtype=torch.float32
    ),
)
