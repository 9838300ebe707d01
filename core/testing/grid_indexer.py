"""Lightning-indexer cases: scores plus top-k for ragged prefill, chunks on a cached prefix, decode with one or
several query tokens, FP8 and unquantized key caches, exact ties, and the real top-k of 2048."""

from __future__ import annotations

from typing import Any

import torch

from dsv.ops.indexer import indexer_logits
from dsv.ops.quant import act_quant
from dsv.testing.case import Case, Inputs, Needs
from dsv.testing.checks import TopKSet
from dsv.testing.grid_cache import INDEX_DIM, INDEX_HEADS, filled_index_cache

TOPK_WHY = (
    "the inputs are exact (fp8 or bf16), so only the logits' precision differs: fp32 accumulation in any order "
    "is far inside 2^-8, and a kernel may keep logits in bf16 (2^-8 relative) before selecting; keys whose "
    "reference scores are that close are ties"
)
TOPK_CHECK = TopKSet(
    scores=lambda a: indexer_logits(a["q"], a["weights"], a["cache"], a["meta"]), rel=2.0**-8, why=TOPK_WHY
)


def _build(spans, page, quantized, topk, repeats=1):
    def build(inp: Inputs) -> dict[str, Any]:
        meta, pages = inp.batch(spans, page)
        cache = filled_index_cache(inp, meta, pages, quantized, repeats)
        t = meta.num_tokens
        weights = inp.randn(t, INDEX_HEADS, dtype=torch.float32, std=(INDEX_HEADS * INDEX_DIM) ** -0.5)
        q = inp.randn(t, INDEX_HEADS, INDEX_DIM)
        if quantized:
            # As the model does: e4m3 queries with one power-of-two scale per (token, head) folded into weights.
            q, scale = act_quant(q, INDEX_DIM, "ue8m0")
            weights = weights * scale[..., 0]
        return {"q": q, "weights": weights, "cache": cache, "meta": meta, "topk": topk}

    return build


def _call(fn: Any, a: dict[str, Any]) -> torch.Tensor:
    return fn(a["q"], a["weights"], a["cache"], a["meta"], a["topk"])


def indexer_cases() -> list[Case]:
    grid = [
        # op, id, spans (cached prefix, new tokens), page, fp8 keys, topk, repeated keys, quick
        ("prefill", "ragged/fewer-than-topk", [(0, 5), (0, 60), (0, 140)], 1, True, 128, 1, True),
        ("prefill", "chunk-on-prefix", [(150, 30), (0, 20)], 64, True, 128, 1, True),
        ("prefill", "chunk-on-prefix", [(150, 30), (0, 20)], 64, False, 128, 1, False),
        ("prefill", "exact-ties", [(0, 100)], 64, True, 64, 4, True),
        ("prefill", "topk2048", [(2100, 8)], 64, True, 2048, 1, False),
        ("decode", "ragged/fewer-than-topk", [(0, 1), (127, 1), (128, 1), (300, 1)], 64, True, 128, 1, True),
        ("decode", "ragged", [(0, 1), (127, 1), (300, 1)], 1, False, 128, 1, False),
        ("decode", "spec-verify-3-tokens", [(200, 3), (90, 3)], 1, True, 128, 1, True),
        ("decode", "exact-ties", [(300, 1), (200, 1)], 64, True, 128, 8, False),
        ("decode", "topk2048", [(2046, 1), (2600, 1)], 64, True, 2048, 1, False),
    ]
    cases = []
    for phase, name, spans, page, quantized, topk, repeats, quick in grid:
        rid = f"{name}/{'fp8' if quantized else 'bf16'}/page{page}/topk{topk}"
        cases.append(
            Case(
                "ops",
                f"indexer_topk_{phase}",
                rid,
                _build(spans, page, quantized, topk, repeats),
                _call,
                TOPK_CHECK,
                Needs(page_size=page),
                quick=quick,
                seed=400 + len(cases),
            )
        )
    return cases
