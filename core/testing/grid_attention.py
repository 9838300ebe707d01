"""Attention cases: sparse MLA (prefill and decode) over global slots, and the dense short-sequence prefill."""

from __future__ import annotations

from typing import Any

import torch

from dsv.ops.metadata import AttentionMetadata, positions_to_slots
from dsv.testing.case import Case, Inputs, Needs
from dsv.testing.checks import Close
from dsv.testing.grid_cache import KV_RANK, ROPE_DIM, filled_mla_cache

SM_SCALE = 0.1352338  # DeepSeek-V3.2: 192^-0.5 times the YaRN mscale^2 (factor 40)
NOPE_DIM, V_DIM = 128, 128

ATTN_WHY = (
    "bf16 output (2^-8 rounding) of a softmax average; flash-style kernels also round the probabilities to "
    "bf16 before the PV product, an error of up to 2^-8 of the largest value averaged"
)
ATTN_TOL = Close(rtol=2.0**-7, atol=2.0**-7, why=ATTN_WHY)
ATTN_FP8_TOL = Close(
    rtol=2.0**-7,
    atol=2.0**-6,
    why=ATTN_WHY + "; FP8 rows are also dequantized to bf16 before the products (another 2^-8 per value)",
)
ATTN_FP32_TOL = Close(
    rtol=2.0**-10, atol=2.0**-10, why="fp32 in and out; kernels may use TF32 (10-bit mantissa) products"
)


def random_topk_positions(
    inp: Inputs, meta: AttentionMetadata, topk: int, empty_rows: int = 0, interleave: bool = False
) -> torch.Tensor:
    """[T, topk] random distinct visible positions per query token, -1 padded when fewer are visible.

    ``interleave`` scatters the -1 entries through the row (a conforming indexer may return them anywhere);
    ``empty_rows`` makes the last rows all -1 (a row with no valid key must give 0).
    """
    rows = []
    for p in meta.positions.tolist():
        visible = p + 1
        chosen = inp.randperm(visible)[: min(topk, visible)]
        row = torch.full((topk,), -1, dtype=torch.int64)
        row[: len(chosen)] = chosen
        rows.append(row[inp.randperm(topk)] if interleave else row)
    out = torch.stack(rows)
    if empty_rows:
        out[-empty_rows:] = -1
    return out.to(meta.positions.device)


def _sparse_build(spans, page, layout, heads, topk, empty_rows=0, interleave=False):
    def build(inp: Inputs) -> dict[str, Any]:
        meta, pages = inp.batch(spans, page)
        cache = filled_mla_cache(inp, meta, pages, layout)
        pos = random_topk_positions(inp, meta, topk, empty_rows, interleave)
        rows = torch.arange(meta.num_tokens, device=pos.device)
        return {
            "q": inp.randn(meta.num_tokens, heads, KV_RANK + ROPE_DIM),
            "cache": cache,
            "indices": positions_to_slots(meta, pos, rows),
            "sm_scale": SM_SCALE,
        }

    return build


def _sparse_call(fn: Any, a: dict[str, Any]) -> torch.Tensor:
    return fn(a["q"], a["cache"], a["indices"], a["sm_scale"])


def sparse_mla_cases() -> list[Case]:
    """Prefill and decode over bf16 and FP8 caches, page sizes 1 and 64, 16/64/128 heads, top-k 128 and the
    real 2048, with padding, interleaved padding and rows with no valid key."""
    grid = [
        # op, id, spans (cached prefix, new tokens), page, layout, heads, topk, extras, quick
        ("prefill", "ragged/fewer-than-topk", [(0, 40), (0, 24)], 64, "float", 128, 128, {}, True),
        ("prefill", "chunk-on-prefix", [(150, 20), (0, 12)], 1, "fp8", 16, 128, {}, True),
        ("prefill", "chunk-on-prefix", [(150, 20), (0, 12)], 64, "float", 64, 128, {}, False),
        ("prefill", "interleaved-padding", [(0, 50)], 64, "float", 16, 128, {"interleave": True}, False),
        ("prefill", "topk2048", [(2100, 4)], 64, "fp8", 64, 2048, {}, False),
        ("prefill", "topk2048", [(2100, 4)], 64, "float", 128, 2048, {}, False),
        (
            "decode",
            "ragged/fewer-than-topk",
            [(0, 1), (127, 1), (128, 1), (300, 1)],
            64,
            "float",
            128,
            128,
            {},
            True,
        ),
        ("decode", "ragged", [(0, 1), (127, 1), (128, 1), (300, 1)], 1, "fp8", 16, 128, {}, True),
        ("decode", "ragged", [(40, 1), (200, 1)], 64, "fp8", 64, 128, {}, False),
        ("decode", "spec-verify-3-tokens", [(200, 3), (60, 3)], 64, "float", 128, 128, {}, True),
        ("decode", "spec-verify-3-tokens", [(200, 3), (60, 3)], 64, "fp8", 64, 128, {}, False),
        ("decode", "no-valid-key-row", [(10, 1), (20, 1)], 64, "float", 16, 128, {"empty_rows": 1}, False),
        ("decode", "topk2048", [(2100, 1), (3000, 1)], 64, "fp8", 128, 2048, {}, False),
        ("decode", "topk2048", [(2047, 1), (2600, 1)], 64, "float", 64, 2048, {}, False),
    ]
    cases = []
    for phase, name, spans, page, layout, heads, topk, extra, quick in grid:
        rid = f"{name}/h{heads}/{'fp8' if layout == 'fp8' else 'bf16'}/page{page}/topk{topk}"
        cases.append(
            Case(
                "ops",
                f"sparse_mla_{phase}",
                rid,
                _sparse_build(spans, page, layout, heads, topk, **extra),
                _sparse_call,
                ATTN_FP8_TOL if layout == "fp8" else ATTN_TOL,
                Needs(kv_layout=layout, page_size=page),
                quick=quick,
                seed=200 + len(cases),
            )
        )
    return cases


def _mha_build(qk_lens: list[tuple[int, int]], heads: int, dtype: torch.dtype):
    def build(inp: Inputs) -> dict[str, Any]:
        tq, tk = sum(q for q, _ in qk_lens), sum(k for _, k in qk_lens)
        cu_q = torch.tensor([0] + [q for q, _ in qk_lens]).cumsum(0)
        cu_k = torch.tensor([0] + [k for _, k in qk_lens]).cumsum(0)
        return {
            "q": inp.randn(tq, heads, NOPE_DIM + ROPE_DIM, dtype=dtype),
            "k": inp.randn(tk, heads, NOPE_DIM + ROPE_DIM, dtype=dtype),
            "v": inp.randn(tk, heads, V_DIM, dtype=dtype),
            "cu_seqlens_q": cu_q.to(inp.device),
            "cu_seqlens_k": cu_k.to(inp.device),
            "sm_scale": SM_SCALE,
        }

    return build


def _mha_call(fn: Any, a: dict[str, Any]) -> torch.Tensor:
    return fn(a["q"], a["k"], a["v"], a["cu_seqlens_q"], a["cu_seqlens_k"], a["sm_scale"])


def mha_cases() -> list[Case]:
    """Dense causal prefill of sequences that fit in index_topk: ragged, on a cached prefix (bottom-right
    causal alignment), a one-token sequence, and fp32."""
    grid = [
        ("ragged", [(1, 1), (17, 17), (40, 40)], 128, torch.bfloat16, True),
        ("chunk-on-prefix", [(10, 50), (5, 5)], 16, torch.bfloat16, True),
        ("full-topk", [(128, 128)], 64, torch.bfloat16, False),
        ("ragged", [(3, 3), (30, 30)], 16, torch.float32, False),
    ]
    cases = []
    for name, lens, heads, dtype, quick in grid:
        rid = f"{name}/h{heads}/{'bf16' if dtype == torch.bfloat16 else 'fp32'}"
        tol = ATTN_TOL if dtype == torch.bfloat16 else ATTN_FP32_TOL
        cases.append(
            Case(
                "ops",
                "mha_prefill",
                rid,
                _mha_build(lens, heads, dtype),
                _mha_call,
                tol,
                quick=quick,
                seed=300 + len(cases),
            )
        )
    return cases
