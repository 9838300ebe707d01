"""Per-layer KV storage: the MLA latent cache (float or FlashMLA FP8 layout) and the indexer key cache.

Both are paged: storage is [num_pages, page_size, width] and addressed by global slot
(``page * page_size + offset``). The methods here are the reference read/write; backends may write
through faster kernels but must produce the same bytes.
"""

from __future__ import annotations

import torch

from dsv.ops import cache_ops
from dsv.ops.quant import act_dequant, fp8_kv_bytes, pack_fp8_kv, unpack_fp8_kv

KV_DTYPES = ("auto", "bf16", "fp8_e4m3")


class MLACacheLayer:
    """One layer's MLA cache: rows of [latent R | rope Dr] per token.

    ``layout`` is ``"float"`` (rows in ``dtype``; 1152 B/token in bf16 for V3.2) or ``"fp8"`` (FlashMLA's
    656-byte rows: R e4m3 | R/128 fp32 scales of amax/448 | Dr bf16).
    """

    def __init__(
        self,
        num_pages: int,
        page_size: int,
        kv_lora_rank: int,
        rope_dim: int,
        layout: str,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        if layout not in ("float", "fp8"):
            raise ValueError(f"unknown MLA cache layout {layout!r}")
        self.kv_lora_rank = kv_lora_rank
        self.rope_dim = rope_dim
        self.layout = layout
        self.dtype = dtype  # dtype rows are read back in
        self.page_size = page_size
        if layout == "fp8":
            width = fp8_kv_bytes(kv_lora_rank, rope_dim)
            self.storage = torch.zeros(num_pages, page_size, width, dtype=torch.uint8, device=device)
        else:
            width = kv_lora_rank + rope_dim
            self.storage = torch.zeros(num_pages, page_size, width, dtype=dtype, device=device)

    @property
    def flat(self) -> torch.Tensor:
        """[num_slots, width] view of the storage."""
        return self.storage.view(-1, self.storage.shape[-1])

    @property
    def bytes_per_token(self) -> int:
        return self.storage.shape[-1] * self.storage.element_size()

    def write(self, slots: torch.Tensor, latent: torch.Tensor, rope: torch.Tensor) -> None:
        """Store [T, R] latents and [T, Dr] rope keys at global ``slots`` [T]."""
        if self.layout == "fp8":
            rows = pack_fp8_kv(latent, rope)
        else:
            rows = torch.cat([latent, rope], dim=-1).to(self.dtype)
        if torch.compiler.is_compiling():  # an in-place op, not a functionalized copy of the storage
            cache_ops.rows_write(self.storage, slots, rows)
            return
        self.flat[slots.long()] = rows

    def read_rows(self, slots: torch.Tensor) -> torch.Tensor:
        """Rows [N, R + Dr] (dequantized, in ``self.dtype``) at global ``slots`` [N]."""
        # index_select, not flat[slots]: advanced indexing into a large cache is ~100x slower on the CPU.
        if torch.compiler.is_compiling():
            rows = cache_ops.rows_read(self.storage, slots)
        else:
            rows = self.flat.index_select(0, slots.long())
        if self.layout == "fp8":
            return unpack_fp8_kv(rows, self.kv_lora_rank, self.rope_dim, self.dtype)
        return rows


class IndexKCacheLayer:
    """One layer's indexer key cache.

    With ``quantized=True`` each page is laid out as SGLang/DeepGEMM expect: ``page_size * D`` e4m3 key bytes
    followed by ``page_size`` fp32 scales (power-of-two, ue8m0), 132 bytes per token for D = 128.
    Otherwise keys are kept unquantized in ``dtype`` (``--indexer-quant none``).

    ``read_copy`` (quantized caches only; the CPU engine turns it on) also keeps every key dequantized in
    bf16, written with the FP8 bytes, and the reads gather that copy instead of widening e4m3 bytes and
    multiplying by scales on every read (most of a CPU decode step's indexer time). The copy holds the same
    values: an e4m3 value (at most 4 significant bits) times a power-of-two scale is exact in bf16 (8 bits,
    fp32's exponent range) down to bf16's subnormals, i.e. for every key whose scale is above 2^-117.
    It costs 2 D bytes per token more (the reported bytes per token include it).
    """

    def __init__(
        self,
        num_pages: int,
        page_size: int,
        head_dim: int,
        quantized: bool,
        dtype: torch.dtype,
        device: torch.device | str,
        read_copy: bool = False,
    ) -> None:
        self.head_dim = head_dim
        self.quantized = quantized
        self.dtype = dtype
        self.page_size = page_size
        if quantized:
            self.storage = torch.zeros(
                num_pages, page_size * (head_dim + 4), dtype=torch.uint8, device=device
            )
            self.keys, self.scales = cache_ops.index_views(self.storage, page_size, head_dim)
            self.copy: torch.Tensor | None = None
            if read_copy:
                self.copy = torch.zeros(num_pages, page_size, head_dim, dtype=torch.bfloat16, device=device)
        else:
            self.storage = torch.zeros(num_pages, page_size, head_dim, dtype=dtype, device=device)
            self.keys = self.storage
            self.scales = None
            self.copy = None

    @property
    def bytes_per_token(self) -> int:
        if not self.quantized:
            return self.head_dim * self.storage.element_size()
        return self.head_dim + 4 + (0 if self.copy is None else 2 * self.head_dim)

    def _page_offset(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        slots = slots.long()
        return slots // self.page_size, slots % self.page_size

    def write(self, slots: torch.Tensor, k: torch.Tensor) -> None:
        """Store keys [T, D] (already rotated) at global ``slots`` [T], quantizing when the cache is FP8."""
        if torch.compiler.is_compiling():  # in-place custom ops, see dsv.ops.cache_ops
            if self.quantized:
                cache_ops.index_keys_write(self.storage, self.copy, slots, k, self.page_size, self.head_dim)
            else:
                cache_ops.rows_write(self.storage, slots, k.to(self.dtype))
            return
        if self.quantized:
            cache_ops.write_index_keys(self.keys, self.scales, self.copy, slots, k, self.page_size)
        else:
            page, off = self._page_offset(slots)
            self.keys[page, off] = k.to(self.dtype)

    @property
    def _float_pages(self) -> torch.Tensor | None:
        """The float pages the reads gather: the bf16 read copy or an unquantized cache; None when only the
        FP8 bytes exist (the reads then dequantize them)."""
        if self.copy is not None:
            return self.copy
        return None if self.quantized else self.keys

    def read(self, slots: torch.Tensor) -> torch.Tensor:
        """Dequantized keys [..., D] in fp32 at global ``slots`` (any shape)."""
        page, off = self._page_offset(slots)
        pages = self._float_pages
        if pages is None:
            return act_dequant(self.keys[page, off], self.scales[page, off].unsqueeze(-1), self.head_dim)
        return pages[page, off].float()

    def read_sequences(self, block_table: torch.Tensor, length: int) -> torch.Tensor:
        """Dequantized keys [B, length, D] fp32 of positions 0..length-1 of every sequence of ``block_table``.

        The same values as :meth:`read` of the sequences' slots, gathered a page at a time (a page's keys
        are contiguous), which is much cheaper than one index per token.
        """
        pages = self._float_pages
        quantized = pages is None
        read = cache_ops.pages_read if torch.compiler.is_compiling() else cache_ops.gather_index_pages
        return read(
            self.storage if quantized else pages,
            block_table,
            length,
            self.page_size,
            self.head_dim,
            quantized,
        )
