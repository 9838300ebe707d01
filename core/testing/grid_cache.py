"""Cache cases: the MLA latent write (float and FP8 656-byte layouts) and the indexer key write; plus the
cache builders the attention and indexer cases share."""

from __future__ import annotations

from typing import Any

import torch

from dsv.ops.kv_cache import IndexKCacheLayer, MLACacheLayer
from dsv.ops.metadata import AttentionMetadata, used_slots
from dsv.ops.quant import unpack_fp8_kv
from dsv.testing.case import Case, Inputs, Needs
from dsv.testing.checks import QuantizedClose

# DeepSeek-V3.2's attention dimensions: kernels are specialized for them, so the grid uses them.
KV_RANK, ROPE_DIM = 512, 64
INDEX_HEADS, INDEX_DIM = 64, 128


def mla_cache(inp: Inputs, num_pages: int, page_size: int, layout: str, device: str) -> MLACacheLayer:
    """An empty MLA cache; bf16 on the backend side, fp32 rows (same stored values) on the reference side."""
    return MLACacheLayer(num_pages, page_size, KV_RANK, ROPE_DIM, layout, inp.dtype(torch.bfloat16), device)


def _index_cache(
    inp: Inputs, num_pages: int, page_size: int, quantized: bool, device: str
) -> IndexKCacheLayer:
    return IndexKCacheLayer(num_pages, page_size, INDEX_DIM, quantized, inp.dtype(torch.bfloat16), device)


# Input caches are filled on the CPU and their bytes copied to the device, so both sides of a case read the
# same bytes: an FP8 cast on another device may round a value differently, which is kv_write's business.


def filled_mla_cache(inp: Inputs, meta: AttentionMetadata, num_pages: int, layout: str) -> MLACacheLayer:
    """An MLA cache holding random latents at every position of every sequence (the reference write)."""
    cpu = mla_cache(inp, num_pages, meta.page_size, layout, "cpu")
    slots = used_slots(meta).cpu()
    cpu.write(slots, inp.randn(len(slots), KV_RANK).cpu(), inp.randn(len(slots), ROPE_DIM).cpu())
    if inp.device == "cpu":
        return cpu
    cache = mla_cache(inp, num_pages, meta.page_size, layout, inp.device)
    cache.storage.copy_(cpu.storage)
    return cache


def filled_index_cache(
    inp: Inputs, meta: AttentionMetadata, num_pages: int, quantized: bool, repeats: int = 1
) -> IndexKCacheLayer:
    """An indexer key cache with random keys at every position; ``repeats > 1`` writes each key that many
    times in a row, which makes exact score ties."""
    cpu = _index_cache(inp, num_pages, meta.page_size, quantized, "cpu")
    slots = used_slots(meta).cpu()
    n = -(-len(slots) // repeats)
    cpu.write(slots, inp.randn(n, INDEX_DIM).cpu().repeat_interleave(repeats, 0)[: len(slots)])
    if inp.device == "cpu":
        return cpu
    cache = _index_cache(inp, num_pages, meta.page_size, quantized, inp.device)
    cache.storage.copy_(cpu.storage)
    return cache


def mla_values(cache: MLACacheLayer) -> torch.Tensor:
    """Every cache row as fp32 [slots, R + Dr], read back through the reference layout."""
    if cache.layout == "fp8":
        return unpack_fp8_kv(cache.flat, cache.kv_lora_rank, cache.rope_dim, torch.float32)
    return cache.flat.float()


def _kv_write_build(spans: list[tuple[int, int]], page_size: int, layout: str, prefilled: bool):
    def build(inp: Inputs) -> dict[str, Any]:
        meta, pages = inp.batch(spans, page_size)
        cache = (
            filled_mla_cache(inp, meta, pages, layout)
            if prefilled
            else mla_cache(inp, pages, page_size, layout, inp.device)
        )
        t = meta.num_tokens
        return {
            "cache": cache,
            "slots": meta.slot_mapping,
            "latent": inp.randn(t, KV_RANK),
            "rope": inp.randn(t, ROPE_DIM),
        }

    return build


def _kv_write_call(fn: Any, a: dict[str, Any]) -> torch.Tensor:
    fn(a["cache"], a["slots"], a["latent"], a["rope"])
    return mla_values(a["cache"])


def _index_write_build(spans: list[tuple[int, int]], page_size: int, quantized: bool):
    def build(inp: Inputs) -> dict[str, Any]:
        meta, pages = inp.batch(spans, page_size)
        cache = _index_cache(inp, pages, page_size, quantized, inp.device)
        return {"cache": cache, "slots": meta.slot_mapping, "k": inp.randn(meta.num_tokens, INDEX_DIM)}

    return build


def _index_write_call(fn: Any, a: dict[str, Any]) -> torch.Tensor:
    fn(a["cache"], a["slots"], a["k"])
    cache: IndexKCacheLayer = a["cache"]
    return cache.read(torch.arange(cache.storage.shape[0] * cache.page_size, device=cache.storage.device))


FP8_WHY = (
    "e4m3 keeps 3 mantissa bits: a correct kernel may round a value at a midpoint to the neighbouring e4m3 "
    "value; scales, rope and unquantized columns are one correctly rounded cast, hence exact"
)
FLOAT_WHY = "a float-layout write is one cast of the same input, correctly rounded on any hardware: exact"


def cache_cases() -> list[Case]:
    """kv_write and index_k_write over page sizes 1 and 64, fresh and partly filled caches."""
    cases = []
    for layout, page, spans, prefilled, quick in [
        ("float", 64, [(0, 70), (0, 5)], False, True),
        ("fp8", 64, [(0, 70), (0, 5)], False, True),
        ("fp8", 1, [(30, 9), (0, 3)], True, False),
        ("float", 1, [(30, 9), (0, 3)], True, False),
        ("fp8", 64, [(100, 1), (63, 1), (64, 1)], True, False),
    ]:
        rid = f"{layout}/page{page}/{'on-prefix' if prefilled else 'fresh'}/T{sum(n for _, n in spans)}"
        check = QuantizedClose(
            KV_RANK if layout == "fp8" else 0, why=FP8_WHY if layout == "fp8" else FLOAT_WHY
        )
        cases.append(
            Case(
                "ops",
                "kv_write",
                rid,
                _kv_write_build(spans, page, layout, prefilled),
                _kv_write_call,
                check,
                Needs(kv_layout=layout, page_size=page),
                quick=quick,
                seed=len(cases),
            )
        )
    for quantized, page, spans, quick in [
        (True, 64, [(0, 70), (0, 5)], True),
        (True, 1, [(30, 9), (0, 3)], False),
        (False, 64, [(0, 70), (0, 5)], False),
    ]:
        rid = f"{'fp8' if quantized else 'bf16'}/page{page}/T{sum(n for _, n in spans)}"
        check = QuantizedClose(INDEX_DIM if quantized else 0, why=FP8_WHY if quantized else FLOAT_WHY)
        cases.append(
            Case(
                "ops",
                "index_k_write",
                rid,
                _index_write_build(spans, page, quantized),
                _index_write_call,
                check,
                Needs(page_size=page),
                quick=quick,
                seed=100 + len(cases),
            )
        )
    return cases
