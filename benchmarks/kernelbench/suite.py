"""Which cases a run times, in order: full, ``--quick``, ``--smoke``, and the ``--sweep`` tile variants."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .case import Case, sweep_variants
from .cases_attention import indexer_call, indexer_case, kv_write_case, sparse_mla_case
from .cases_gemm import LINEAR_SHAPES, linear_case
from .cases_moe import moe_case


def plan(quick: bool, smoke: bool) -> list[Case]:
    """Every case of the run, in order (most wanted first, so a budget cut drops the tail)."""
    if smoke:  # tiny shapes: every code path once, under the Triton interpreter on the CPU
        return [
            sparse_mla_case("sparse_mla_decode_fp8", "B2", 2, 2, "fp8", 16, 64, 256, "sparse_mla_decode"),
            sparse_mla_case("sparse_mla_decode_bf16", "B2", 2, 2, "float", 16, 64, 256, "sparse_mla_decode"),
            indexer_case("indexer_decode", "B2 ctx256", 256, 2, 256, 64, extras=True),
            linear_case("fp8_gemm M16", "256x256", "256x256", 16, 256, 256),
            moe_case("fused_moe", "T3", 3, 3, 8, 2, 128, 256, ""),
            moe_case("fused_moe", "T5", 5, 5, 8, 2, 128, 256, "smoke: reference skipped to test that path"),
            kv_write_case("kv_write_fp8", "T64", 64, 64, "fp8"),
        ]
    cases: list[Case] = []
    moe_ref_note = (
        "torch reference only at T=64: it dequantizes all 256 experts to fp32 per call (~45 GB, ~0.45 s)"
    )
    for t in [64, 2048, 4096] if quick else [64, 512, 2048, 4096, 8192]:
        cases.append(
            moe_case(
                "fused_moe", f"T{t} ({t * 8} rows)", t, t, 256, 8, 2048, 7168, "" if t == 64 else moe_ref_note
            )
        )
    for m in [4096] if quick else [1, 16, 32, 64, 4096]:
        shapes = LINEAR_SHAPES
        if quick:
            shapes = {k: v for k, v in LINEAR_SHAPES.items() if k.split()[0] in ("q_a", "o", "mlp_gate_up")}
        for label, (n, k) in shapes.items():
            cases.append(linear_case(f"fp8_gemm M{m}", label, label.split()[0], m, n, k))
    for layout, tag in (("float", "bf16"), ("fp8", "fp8")):
        for b in [1, 64] if quick else [1, 16, 64, 128]:
            cases.append(
                sparse_mla_case(
                    f"sparse_mla_decode_{tag}", f"B{b}", b, b, layout, 128, 2048, 1 << 18, "sparse_mla_decode"
                )
            )
    for ctx in [4096, 131072] if quick else [4096, 32768, 131072]:
        cases.append(
            indexer_case("indexer_decode", f"B64 ctx{ctx // 1024}K", ctx, 64, ctx, 2048, extras=True)
        )
    # A serving batch: 64 rows from 16K to 128K keys (each row's group maxima follow its own length).
    cases.append(
        indexer_case("indexer_decode_mixed", "B64 ctx16K-128K", 131072, 64, 131072, 2048, True, mixed=True)
    )
    for t in [4096] if quick else [4096, 16384, 65536]:
        skip = (
            ""
            if t <= 16384
            else "torch reference skipped above 16K tokens (gathers T x 2048 x 576 keys: ~1 s)"
        )
        case = sparse_mla_case(
            "sparse_mla_prefill", f"T{t}", t, t, "float", 128, 2048, t, "sparse_mla_prefill"
        )
        case.ref_skip = skip
        cases.append(case)
    if not quick:
        for layout in ("float", "fp8"):
            cases.append(kv_write_case(f"kv_write_{layout}", "T4096", 4096, 4096, layout))
    return cases


def sweep_cases() -> list[Case]:
    """Tile-size variants of dsv's Triton kernels (``--sweep``), to pick defaults on a new GPU."""
    from dsv.kernels.triton.fp8_gemm import linear
    from dsv.kernels.triton.indexer import indexer_logits
    from dsv.kernels.triton.sparse_mla import sparse_mla
    from dsv.kernels.triton.topk import topk_indices

    cases = []
    for layout in ("float", "fp8"):
        case = sparse_mla_case(
            f"sweep sparse_mla {layout}", "B64", "B64", 64, layout, 128, 2048, 1 << 18, "x"
        )
        tiles = [(16, 32, 4, 2), (32, 64, 4, 2), (64, 32, 8, 1), (64, 64, 8, 2), (64, 128, 8, 1)]
        keys = {"block_h": "h", "block_n": "n", "num_warps": "w", "num_stages": "s"}
        cases.append(sweep_variants(case, sparse_mla, tiles, keys))
    topk = indexer_case("sweep topk", "B64 ctx32K", "B64 ctx32K", 64, 32768, 2048)
    for block, bits, w in [(1024, 8, 8), (2048, 8, 8), (4096, 8, 16), (2048, 11, 8), (4096, 11, 16)]:
        kw = {"block": block, "radix_bits": bits, "num_warps": w}

        def build(a: tuple, kw: dict = kw) -> Callable[[], Any]:
            from dsv.ops.indexer import indexer_logits

            logits = indexer_logits(*a[:4])
            lengths = (a[3].positions + 1).to(torch.int32)
            return lambda: topk_indices(logits, lengths, a[4], **kw)

        topk.extras[f"block{block} bits{bits} w{w}"] = build
    topk.table = False
    cases.append(topk)
    logits = indexer_case("sweep indexer logits", "B64 ctx128K", "B64 ctx128K", 64, 131072, 2048)
    tiles = [(64, 16, 4, 4), (128, 16, 4, 3), (128, 16, 8, 3), (128, 8, 4, 4), (256, 8, 8, 3)]
    keys = {"block_s": "s", "iters": "it", "num_warps": "w", "num_stages": "st"}
    sweep_variants(logits, lambda *a, **kw: indexer_logits(*a[:4], **kw), tiles, keys)
    logits.compare = lambda args: lambda out, ref: float((out - ref).abs().max() / ref.abs().max())
    cases.append(logits)
    for b in (1, 4, 16):
        # Small batches give the logits kernel few programs (32 per row at 128K): a candidate default that
        # splits each row until the 132 SMs get two programs each (B1: 3 key blocks per program, not 32).
        iters = max(1, min(32, 131072 // (128 * max(32, -(-264 // b)))))
        small = indexer_case("sweep indexer small batch", f"B{b} ctx128K", b, b, 131072, 2048)
        small.extras[f"logits iters {iters}"] = lambda a, it=iters: indexer_call(a, logits_iters=it)
        small.table = False
        cases.append(small)
    gemm = linear_case("sweep linear", "M4096 o", "M4096 o", 4096, 7168, 16384)
    gemm.extras = {}
    for bm, bn, w, st in [(64, 128, 4, 3), (128, 128, 8, 4), (64, 128, 4, 5)]:
        cfg = {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w, "num_stages": st}
        gemm.extras[f"bm{bm} bn{bn} w{w} s{st}"] = lambda a, cfg=cfg: lambda: linear(*a, config=cfg)
    gemm.table = False
    cases.append(gemm)
    return cases
