"""The KV caches' reads and writes as opaque torch ops, for a compiled forward (``torch.compile``).

Inside a compiled graph an in-place write into a cache becomes, after functionalization, a copy of the whole
storage (71 MB per layer for the default model's indexer keys: most of a compiled CPU decode step), and the
indexer cache's fp8 / fp32 views of one uint8 storage are mutated views of different dtypes, which
aot_autograd refuses. As custom ops the writes mutate the storage in place (``mutates_args``) and the reads
are plain calls: inductor keeps both out of its kernels. Their bodies are the eager cache code
(:mod:`dsv.ops.kv_cache`), which calls them only while compiling.
"""

from __future__ import annotations

import torch

from dsv.ops.quant import act_dequant, act_quant


def _index_views(storage: torch.Tensor, page_size: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 keys [pages, page_size, D], fp32 scales [pages, page_size]) of a quantized indexer storage."""
    pages, key_bytes = storage.shape[0], page_size * head_dim
    keys = storage[:, :key_bytes].view(torch.float8_e4m3fn).view(pages, page_size, head_dim)
    return keys, storage[:, key_bytes:].view(torch.float32).view(pages, page_size)


@torch.library.custom_op("dsv::rows_write", mutates_args=("storage",))
def rows_write(storage: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor) -> None:
    """``storage`` viewed as [slots, width]: rows ``slots`` = ``rows`` (already in the storage's dtype)."""
    storage.view(-1, storage.shape[-1]).index_copy_(0, slots.long(), rows)


@torch.library.custom_op("dsv::rows_read", mutates_args=())
def rows_read(storage: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Rows ``slots`` of ``storage`` viewed as [slots, width]."""
    return storage.view(-1, storage.shape[-1]).index_select(0, slots.long())


@rows_read.register_fake
def _(storage: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    return storage.new_empty(slots.shape[0], storage.shape[-1])


@torch.library.custom_op("dsv::index_keys_write", mutates_args=("storage",))
def index_keys_write(
    storage: torch.Tensor, slots: torch.Tensor, k: torch.Tensor, page_size: int, head_dim: int
) -> None:
    """Quantize keys [T, D] (ue8m0 e4m3, one scale per token) into a quantized indexer storage at ``slots``."""
    keys, scales = _index_views(storage, page_size, head_dim)
    q, s = act_quant(k, head_dim, "ue8m0")
    slots = slots.long()
    page, off = slots // page_size, slots % page_size
    keys[page, off] = q
    scales[page, off] = s[:, 0]


@torch.library.custom_op("dsv::index_keys_read", mutates_args=())
def index_keys_read(
    storage: torch.Tensor, block_table: torch.Tensor, length: int, page_size: int, head_dim: int
) -> torch.Tensor:
    """Dequantized keys [B, length, D] fp32 of positions 0..length-1 of every sequence of ``block_table``."""
    keys_all, scales_all = _index_views(storage, page_size, head_dim)
    pages = block_table[:, : -(-length // page_size)].long()
    b, flat = pages.shape[0], pages.reshape(-1)
    keys = keys_all.index_select(0, flat).view(b, -1, head_dim)[:, :length]
    scales = scales_all.index_select(0, flat).view(b, -1)[:, :length]
    return act_dequant(keys, scales.unsqueeze(-1), head_dim)


@index_keys_read.register_fake
def _(
    storage: torch.Tensor, block_table: torch.Tensor, length: int, page_size: int, head_dim: int
) -> torch.Tensor:
    return storage.new_empty(block_table.shape[0], length, head_dim, dtype=torch.float32)
