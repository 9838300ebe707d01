"""The paged KV pool: per-layer MLA and indexer caches plus a page allocator."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dsv.config import ModelConfig
from dsv.model.attention import LayerCache
from dsv.ops.kv_cache import KV_DTYPES, IndexKCacheLayer, MLACacheLayer


class OutOfPages(RuntimeError):
    """The pool has fewer free pages than asked for."""


@dataclass(frozen=True)
class CacheSpec:
    """How the caches are laid out.

    kv_cache_dtype: "auto" (model dtype), "bf16", or "fp8_e4m3" (FlashMLA's 656-byte layout).
    indexer_quant: "fp8" (e4m3 keys + one ue8m0 fp32 scale per token, as DeepSeek) or "none".
    index_read_copy: keep a bf16 copy of the FP8 indexer keys for the reads (the CPU engine's choice: see
    :class:`~dsv.ops.kv_cache.IndexKCacheLayer`).
    """

    page_size: int = 64
    kv_cache_dtype: str = "auto"
    indexer_quant: str = "fp8"
    index_read_copy: bool = False

    def __post_init__(self) -> None:
        if self.kv_cache_dtype not in KV_DTYPES:
            raise ValueError(f"--kv-cache-dtype must be one of {KV_DTYPES}, got {self.kv_cache_dtype!r}")
        if self.indexer_quant not in ("fp8", "none"):
            raise ValueError(f"--indexer-quant must be 'fp8' or 'none', got {self.indexer_quant!r}")
        if self.page_size < 1:
            raise ValueError(f"--page-size must be >= 1, got {self.page_size}")


class KVPool:
    """All layers' caches (main layers, then the MTP layers when ``with_mtp``) and free-page bookkeeping."""

    def __init__(
        self,
        cfg: ModelConfig,
        spec: CacheSpec,
        num_pages: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        with_mtp: bool = False,
    ) -> None:
        self.spec = spec
        self.num_pages = num_pages
        self.page_size = spec.page_size
        layout = "fp8" if spec.kv_cache_dtype == "fp8_e4m3" else "float"
        float_dtype = torch.bfloat16 if spec.kv_cache_dtype == "bf16" else dtype
        n_layers = cfg.num_hidden_layers + (cfg.num_nextn_predict_layers if with_mtp else 0)
        self.layers = [
            LayerCache(
                MLACacheLayer(
                    num_pages,
                    spec.page_size,
                    cfg.kv_lora_rank,
                    cfg.qk_rope_head_dim,
                    layout,
                    float_dtype,
                    device,
                ),
                IndexKCacheLayer(
                    num_pages,
                    spec.page_size,
                    cfg.index_head_dim,
                    spec.indexer_quant == "fp8",
                    dtype,
                    device,
                    read_copy=spec.index_read_copy,
                ),
            )
            for _ in range(n_layers)
        ]
        # Page 0 is never handed out: padded block-table entries point at it harmlessly.
        self._free = list(range(num_pages - 1, 0, -1))

    @staticmethod
    def bytes_per_token(cfg: ModelConfig, spec: CacheSpec, dtype: torch.dtype, with_mtp: bool = False) -> int:
        """Cache bytes one token occupies over all layers (e.g. 61 × (656 + 132) for V3.2 with FP8)."""
        probe = KVPool(cfg, spec, 1, dtype, "meta", with_mtp=False)
        per_layer = probe.layers[0].mla.bytes_per_token + probe.layers[0].index.bytes_per_token
        return per_layer * (cfg.num_hidden_layers + (cfg.num_nextn_predict_layers if with_mtp else 0))

    @property
    def free_pages(self) -> int:
        return len(self._free)

    @property
    def capacity_tokens(self) -> int:
        return (self.num_pages - 1) * self.page_size

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfPages(f"asked for {n} KV pages, {len(self._free)} free")
        return [self._free.pop() for _ in range(n)]

    def release(self, pages: list[int]) -> None:
        self._free.extend(reversed(pages))


def plan_num_pages(
    cfg: ModelConfig,
    spec: CacheSpec,
    dtype: torch.dtype,
    budget_bytes: int | None,
    max_total_tokens: int | None,
    with_mtp: bool = False,
    max_useful_tokens: int | None = None,
) -> int:
    """Pages to allocate (page 0 included): ``max_total_tokens`` when given, else as many as ``budget_bytes``
    holds, never more than ``max_useful_tokens`` (what the running requests could ever fill)."""
    if max_total_tokens is None:
        if budget_bytes is None:
            raise ValueError("give --max-total-tokens or --mem-fraction-static")
        per_page = KVPool.bytes_per_token(cfg, spec, dtype, with_mtp) * spec.page_size
        pages = budget_bytes // per_page
        if max_useful_tokens is not None:
            pages = min(pages, -(-max_useful_tokens // spec.page_size))
    else:
        pages = -(-max_total_tokens // spec.page_size)
    if pages < 1:
        raise ValueError(
            f"the KV cache budget does not hold a single page of {spec.page_size} tokens; "
            "raise --mem-fraction-static or --max-total-tokens"
        )
    return pages + 1
