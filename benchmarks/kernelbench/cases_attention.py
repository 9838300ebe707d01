"""Attention-side cases: sparse MLA (decode / prefill, bf16 or FP8 cache), indexer top-k decode, KV write."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .case import Case
from .compare import topk_mismatch
from .roofline import BF16_FLOPS, FP8_FLOPS


def _mla_cache(dev: str, slots: int, layout: str):
    from dsv.ops.kv_cache import MLACacheLayer

    r, dr, page = 512, 64, 64
    cache = MLACacheLayer(-(-slots // page), page, r, dr, layout, torch.bfloat16, dev)
    if layout == "fp8":
        from dsv.backend.reference import kv_write

        chunk = 65536
        for s in range(0, slots, chunk):
            n = min(chunk, slots - s)
            idx = torch.arange(s, s + n, device=dev)
            kv_write(cache, idx, torch.randn(n, r, device=dev), torch.randn(n, dr, device=dev))
    else:
        cache.storage.normal_()
    return cache


def sparse_mla_case(
    family: str, name: str, x: float, tokens: int, layout: str, heads: int, topk: int, slots: int, op: str
) -> Case:
    r, dr = 512, 64
    row_bytes = 656 if layout == "fp8" else (r + dr) * 2

    def setup(dev: str) -> tuple:
        cache = _mla_cache(dev, slots, layout)
        q = torch.randn(tokens, heads, r + dr, device=dev, dtype=torch.bfloat16)
        idx = torch.randint(0, slots, (tokens, topk), device=dev, dtype=torch.int32)
        idx[:, -topk // 8 :] = -1  # some padding, as short sequences have
        return q, cache, idx, (r + dr) ** -0.5

    # Key rows read at least once (decode: every token gathers its own; prefill: shared, at most every slot once).
    nbytes = min(tokens * topk, slots) * row_bytes + tokens * heads * ((r + dr) * 2 + r * 2)
    return Case(
        family,
        name,
        x,
        op,
        setup,
        nbytes,
        2 * tokens * heads * topk * (r + dr + r),
        BF16_FLOPS,
        config={"kv_cache_dtype": "fp8_e4m3" if layout == "fp8" else "bf16", "page_size": 64},
    )


def indexer_case(
    family: str,
    name: str,
    x: float | str,
    batch: int,
    ctx: int,
    topk: int,
    extras: bool = False,
    mixed: bool = False,
) -> Case:
    """Indexer decode over ``batch`` sequences of ``ctx`` keys; ``mixed``: lengths spread evenly from ctx/8 to
    ctx (a serving batch at long context), ``ctx`` being the longest."""
    heads, dim, page = 64, 128, 64
    lengths = [max(ctx * (b + 1) // batch, ctx // 8, 1) if mixed else ctx for b in range(batch)]

    def setup(dev: str) -> tuple:
        from dsv.engine.batch import SeqChunk, build_metadata
        from dsv.ops.kv_cache import IndexKCacheLayer

        pages = [-(-n // page) for n in lengths]
        perm = (torch.randperm(sum(pages)) + 1).tolist()
        starts = [sum(pages[:b]) for b in range(batch)]
        chunks = [SeqChunk(n - 1, 1, perm[s : s + p]) for n, s, p in zip(lengths, starts, pages)]
        meta = build_metadata(chunks, page, dev)
        cache = IndexKCacheLayer(sum(pages) + 1, page, dim, True, torch.bfloat16, dev)
        keys = cache.storage[:, : page * dim].view(torch.float8_e4m3fn)
        keys.copy_(torch.randn(keys.shape, device=dev).to(torch.float8_e4m3fn))
        cache.scales.fill_(2.0**-6)
        q = torch.randn(batch, heads, dim, device=dev).to(torch.float8_e4m3fn)
        w = torch.rand(batch, heads, device=dev) * heads**-0.5
        return q, w, cache, meta, topk

    def compare(args: tuple) -> Callable[[Any, Any], float]:
        from dsv.ops.indexer import indexer_logits

        return topk_mismatch(indexer_logits(*args[:4]))

    keys = sum(lengths)
    nbytes = keys * (dim + 4) + batch * ctx * 4 * 2
    case = Case(
        family,
        name,
        x,
        "indexer_topk_decode",
        setup,
        nbytes,
        2 * keys * heads * dim,
        FP8_FLOPS,
        compare=compare,
        config={"page_size": page, "indexer_quant": "fp8"},
    )
    if extras:
        # Each "auto" choice on its own, and the logits kernel alone (what the top-k adds is the difference).
        for impl in ("triton", "multiblock", "torch"):
            case.extras[f"triton {impl}"] = lambda a, impl=impl: indexer_call(a, topk_impl=impl)
        case.extras["triton logits only"] = lambda a: indexer_call(a, logits=True)
    return case


def indexer_call(args: tuple, logits: bool = False, **kw: Any) -> Callable[[], Any]:
    from dsv.kernels.triton.indexer import indexer_logits, indexer_topk

    if logits:
        return lambda: indexer_logits(*args[:4], **kw)
    return lambda: indexer_topk(*args, **kw)


def kv_write_case(family: str, name: str, x: float, tokens: int, layout: str) -> Case:
    def setup(dev: str) -> tuple:
        from dsv.ops.kv_cache import MLACacheLayer

        cache = MLACacheLayer(tokens // 64 + 1, 64, 512, 64, layout, torch.bfloat16, dev)
        slots = torch.randperm(cache.flat.shape[0], device=dev)[:tokens]
        lat = torch.randn(tokens, 512, device=dev, dtype=torch.bfloat16)
        rope = torch.randn(tokens, 64, device=dev, dtype=torch.bfloat16)
        return cache, slots, lat, rope

    def compare(args: tuple) -> Callable[[Any, Any], float]:
        # Fraction of cache bytes that differ (torch on CUDA divides by a Python scalar through its reciprocal, so
        # the reference's amax/448 FP8 scales may differ from a kernel's in the last bit).
        return lambda out, ref: float((out != ref).float().mean())

    row = 656 if layout == "fp8" else 1152
    return Case(
        family,
        name,
        x,
        "kv_write",
        setup,
        tokens * (576 * 2 + row),
        0,
        BF16_FLOPS,
        compare=compare,
        output=lambda args, _: args[0].storage.view(torch.uint8).clone(),  # kv_write returns nothing
        reset=lambda args: args[0].storage.zero_(),
    )
