"""GPU benchmark of every available dsv-cuda kernel against the plain-torch reference at DeepSeek-V3.2 sizes.

For each case the inputs are built once; then the reference op ("torch", skipped with a note where it is too slow
or too big), every *available* kernel of the CUDA backend's table for that op (triton, tilelang, scaled_mm,
scaled_grouped_mm, grouped_mm, deep_gemm, flashmla, fa3, ... whatever this machine has; kernels whose
requirements the case does not meet, e.g. flashmla_decode on a bf16 cache, are listed as skipped with the
reason), and for GEMMs cuBLAS bf16 at the same shape are timed (``triton.testing.do_bench``, median, small rep).
Each output is checked against the reference (max error relative to max|ref|; where the reference is skipped,
against dsv's Triton kernel, else the first kernel that ran) and set against a roofline (bytes / HBM bandwidth,
FLOPs / peak). For fused MoE, ``*.gemms`` rows time the grouped-GEMM kernels' two GEMM calls alone (the
library's ceiling under the fused op). A failing kernel or case records its error string and the run goes on;
the JSON is rewritten after every case, and cases left when ``--budget-s`` (default 420 s, quick 100 s) is spent
are recorded as not run.

    python benchmarks/kernels.py --out kernels.json              # full run, H200: ~3-7 min
    python benchmarks/kernels.py --quick --out kernels.json      # a subset: < 2 min
    python benchmarks/kernels.py --sweep --only sweep --out sweep.json   # Triton tile variants only
    (--graphs: also CUDA-graph replay times of calls < 5 ms; --profile: each call's GPU kernels)
    python benchmarks/plot_kernels.py kernels.json --out-dir plots   # PNGs, on any machine
    TRITON_INTERPRET=1 python benchmarks/kernels.py --smoke --out smoke.json   # tiny shapes on the CPU

Families: sparse MLA decode (bf16 / FP8 KV; B 1-128, H128, top-k 2048), indexer decode (B64, 4K-128K context),
sparse MLA prefill (4K-64K tokens), FP8 block GEMM at V3.2's projection shapes (M 1 / 64 / 4096), fused MoE
(256 experts top-8, D 7168, I 2048; T 64-8192, i.e. 512-65536 routed rows), KV write.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

HBM_BPS, BF16_FLOPS, FP8_FLOPS = 4.8e12, 989e12, 1979e12  # H200 (SXM) data-sheet peaks, dense
SLOW_MS = 20.0  # calls slower than this are timed by three CUDA-event runs instead of do_bench


# ----- timing and comparison -----


def _sync(dev: str) -> None:
    if dev == "cuda":
        torch.cuda.synchronize()


def timeit(fn: Callable[[], Any], dev: str, rep_ms: float) -> float:
    """Median ms of ``fn``: do_bench (warmup 5 ms, ``rep_ms``) for fast calls, three event-timed runs for slow
    ones (a do_bench of a 300 ms reference would take seconds), one wall-clock run on the CPU."""
    fn()
    _sync(dev)
    t0 = time.perf_counter()
    fn()
    _sync(dev)
    once = (time.perf_counter() - t0) * 1e3
    if dev != "cuda":
        return once
    if once > SLOW_MS:
        times = []
        for _ in range(3):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return sorted(times)[1]
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=5, rep=rep_ms, return_mode="median"))


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.float(), ref.float()
    return float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def topk_mismatch(scores: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], float]:
    """Largest gap between the sorted scores of two selections, relative to max|score| (0: same set; ties
    make index sets differ without any gap)."""

    def compare(out: torch.Tensor, ref: torch.Tensor) -> float:
        def picked(idx: torch.Tensor) -> torch.Tensor:
            vals = scores.gather(1, idx.long().clamp_min(0)).masked_fill(idx < 0, -1e30)
            return vals.sort(dim=1, descending=True).values

        if int((out >= 0).sum()) != int((ref >= 0).sum()):
            return math.inf
        return rel_err(picked(out), picked(ref))

    return compare


# ----- cases -----


@dataclass
class Case:
    """One size of one family: the op's arguments and what bounds it.

    ``args`` is built by ``setup(dev)`` and passed to every implementation as ``fn(*args)`` (the op contract,
    ``dsv.backend.reference.REFERENCE_OPS``). ``ref_skip`` (a reason) skips the torch reference.
    """

    family: str
    name: str
    x: float | str  # the plot's x value: a size, or a label for categorical families
    op: str
    setup: Callable[[str], tuple]
    nbytes: float
    flops: float
    peak: float
    compare: Callable[[tuple], Callable[[Any, Any], float]] = lambda args: rel_err
    ref_skip: str = ""
    extras: dict[str, Callable[[tuple], Callable[[], Any]]] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)  # validate-style keys the kernels must serve
    output: Callable[[tuple, Any], Any] = lambda args, ret: ret  # what to compare, from (args, return value)
    reset: Callable[[tuple], Any] | None = None  # run before each implementation's checked call
    table: bool = True  # time the kernel table's implementations of ``op`` (False: only ``extras``)


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


def indexer_case(family: str, name: str, x: float, batch: int, ctx: int, topk: int) -> Case:
    heads, dim, page = 64, 128, 64

    def setup(dev: str) -> tuple:
        from dsv.engine.batch import SeqChunk, build_metadata
        from dsv.ops.kv_cache import IndexKCacheLayer

        per_seq = -(-ctx // page)
        perm = torch.randperm(batch * per_seq) + 1
        chunks = [SeqChunk(ctx - 1, 1, perm[b * per_seq : (b + 1) * per_seq].tolist()) for b in range(batch)]
        meta = build_metadata(chunks, page, dev)
        cache = IndexKCacheLayer(batch * per_seq + 1, page, dim, True, torch.bfloat16, dev)
        keys = cache.storage[:, : page * dim].view(torch.float8_e4m3fn)
        keys.copy_(torch.randn(keys.shape, device=dev).to(torch.float8_e4m3fn))
        cache.scales.fill_(2.0**-6)
        q = torch.randn(batch, heads, dim, device=dev).to(torch.float8_e4m3fn)
        w = torch.rand(batch, heads, device=dev) * heads**-0.5
        return q, w, cache, meta, topk

    def compare(args: tuple) -> Callable[[Any, Any], float]:
        from dsv.ops.indexer import indexer_logits

        return topk_mismatch(indexer_logits(*args[:4]))

    nbytes = batch * ctx * (dim + 4) + batch * ctx * 4 * 2
    return Case(
        family,
        name,
        x,
        "indexer_topk_decode",
        setup,
        nbytes,
        2 * batch * ctx * heads * dim,
        FP8_FLOPS,
        compare=compare,
        config={"page_size": page, "indexer_quant": "fp8"},
    )


def linear_case(family: str, name: str, x: float | str, m: int, n: int, k: int) -> Case:
    def setup(dev: str) -> tuple:
        w = (torch.randn(n, k, device=dev) * 0.05).to(torch.float8_e4m3fn)
        s = torch.rand(-(-n // 128), -(-k // 128), device=dev) * 1e-2 + 1e-3
        xx = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        return xx, w, s, (128, 128), "ue8m0"

    def cublas(args: tuple) -> Callable[[], Any]:
        xx, w = args[0], args[1]
        wb = torch.randn(w.shape, device=w.device, dtype=torch.bfloat16)
        return lambda: torch.nn.functional.linear(xx, wb)

    return Case(
        family,
        name,
        x,
        "linear",
        setup,
        m * k * 2 + n * k + m * n * 2,
        2 * m * n * k,
        FP8_FLOPS,
        extras={"cublas_bf16": cublas},
    )


def moe_case(
    family: str,
    name: str,
    x: float,
    tokens: int,
    experts: int,
    top_k: int,
    inter: int,
    hidden: int,
    ref_skip: str,
) -> Case:
    def setup(dev: str) -> tuple:
        ex = _moe_weights(dev, experts, inter, hidden)
        xx = torch.randn(tokens, hidden, device=dev, dtype=torch.bfloat16)
        ids = torch.rand(tokens, experts, device=dev).topk(top_k, dim=1).indices
        wts = torch.rand(tokens, top_k, device=dev)
        return xx, wts, ids, ex

    def gemms(fp8: bool) -> Callable[[tuple], Callable[[], Any]]:
        def build(args: tuple) -> Callable[[], Any]:
            from dsv_cuda.adapters import grouped_mm

            return grouped_mm.gemms_only(args[0], args[2], args[3], fp8)

        return build

    used = min(experts, tokens * top_k)  # expected distinct experts is close to this for random routing
    nbytes = used * 3 * inter * hidden + tokens * hidden * 4
    return Case(
        family,
        name,
        x,
        "fused_moe",
        setup,
        nbytes,
        2 * tokens * top_k * 3 * inter * hidden,
        FP8_FLOPS,
        ref_skip=ref_skip,
        config={"dtype": "bfloat16"},
        # The two grouped GEMMs alone on the same routing: the library's ceiling under the fused op.
        extras={"scaled_grouped_mm.gemms": gemms(True), "grouped_mm.gemms": gemms(False)},
    )


_MOE_WEIGHTS: dict[tuple, Any] = {}


def _moe_weights(dev: str, experts: int, inter: int, hidden: int):
    """One random FP8 expert set per shape, shared by the T sizes (the kernels' prepared copies are reused)."""
    from dsv.ops.moe import ExpertWeights

    key = (dev, experts, inter, hidden)
    if key in _MOE_WEIGHTS:
        return _MOE_WEIGHTS[key]

    def weight(o: int, i: int) -> torch.Tensor:
        w = torch.empty(experts, o, i, device=dev, dtype=torch.float8_e4m3fn)
        for j in range(experts):  # one expert at a time keeps the temporary small
            w[j] = (torch.randn(o, i, device=dev) * 0.05).to(torch.float8_e4m3fn)
        return w

    def scale(o: int, i: int) -> torch.Tensor:
        return torch.rand(experts, -(-o // 128), -(-i // 128), device=dev) * 1e-2 + 1e-3

    ex = ExpertWeights(
        weight(inter, hidden),
        weight(inter, hidden),
        weight(hidden, inter),
        scale(inter, hidden),
        scale(inter, hidden),
        scale(hidden, inter),
        (128, 128),
        "ue8m0",
    )
    _MOE_WEIGHTS.clear()  # one shape at a time: 256 x 3 x 2048 x 7168 FP8 is 11 GB
    _MOE_WEIGHTS[key] = ex
    return ex


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


# V3.2 projections (N, K): attention (q_a, q_b, kv_a, wkv_b, o), shared expert and dense MLP (gate / up / down).
LINEAR_SHAPES: dict[str, tuple[int, int]] = {
    "q_a 1536x7168": (1536, 7168),
    "q_b 24576x1536": (24576, 1536),
    "kv_a 576x7168": (576, 7168),
    "wkv_b 32768x512": (32768, 512),
    "o 7168x16384": (7168, 16384),
    "shared_gate_up 2048x7168": (2048, 7168),
    "shared_down 7168x2048": (7168, 2048),
    "mlp_gate_up 18432x7168": (18432, 7168),
    "mlp_down 7168x18432": (7168, 18432),
}


def plan(quick: bool, smoke: bool) -> list[Case]:
    """Every case of the run, in order (most wanted first, so a budget cut drops the tail)."""
    if smoke:  # tiny shapes: every code path once, under the Triton interpreter on the CPU
        return [
            sparse_mla_case("sparse_mla_decode_fp8", "B2", 2, 2, "fp8", 16, 64, 256, "sparse_mla_decode"),
            sparse_mla_case("sparse_mla_decode_bf16", "B2", 2, 2, "float", 16, 64, 256, "sparse_mla_decode"),
            indexer_case("indexer_decode", "B2 ctx256", 256, 2, 256, 64),
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
    for m in [4096] if quick else [1, 64, 4096]:
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
        cases.append(indexer_case("indexer_decode", f"B64 ctx{ctx // 1024}K", ctx, 64, ctx, 2048))
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
    from dsv.kernels.triton.sparse_mla import sparse_mla
    from dsv.kernels.triton.topk import topk_indices

    cases = []
    for layout in ("float", "fp8"):
        case = sparse_mla_case(
            f"sweep sparse_mla {layout}", "B64", "B64", 64, layout, 128, 2048, 1 << 18, "x"
        )
        for bh, bn, w, st in [
            (16, 32, 4, 2),
            (32, 64, 4, 2),
            (64, 32, 8, 1),
            (64, 64, 8, 2),
            (64, 128, 8, 1),
        ]:
            kw = {"block_h": bh, "block_n": bn, "num_warps": w, "num_stages": st}
            case.extras[f"h{bh} n{bn} w{w} s{st}"] = lambda a, kw=kw: lambda: sparse_mla(*a, **kw)
        case.table = False
        cases.append(case)
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
    gemm = linear_case("sweep linear", "M4096 o", "M4096 o", 4096, 7168, 16384)
    gemm.extras = {}
    for bm, bn, w, st in [(64, 128, 4, 3), (128, 128, 8, 4), (64, 128, 4, 5)]:
        cfg = {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w, "num_stages": st}
        gemm.extras[f"bm{bm} bn{bn} w{w} s{st}"] = lambda a, cfg=cfg: lambda: linear(*a, config=cfg)
    gemm.table = False
    cases.append(gemm)
    return cases


# ----- the kernel table -----


def kernel_table(dev: str, arch: tuple[int, int] | None) -> dict[str, list[Any]]:
    """The CUDA backend's kernels per op (``dsv_cuda.kernels.build_kernels``, as ``CudaBackend`` builds them)."""
    from dsv_cuda.kernels import build_kernels
    from dsv_cuda.libraries import device_arch

    return build_kernels(arch if arch is not None else (device_arch(dev) if dev == "cuda" else None))


def implementations(
    case: Case, table: dict[str, list[Any]]
) -> tuple[list[tuple[str, Callable]], dict[str, str]]:
    """(name, fn) of every kernel to time for ``case`` (reference first), and the skipped ones with reasons."""
    from dsv_cuda.requirements import KernelConfig, unmet

    cfg = KernelConfig.from_dict(case.config)
    run: list[tuple[str, Callable]] = []
    skipped: dict[str, str] = {}
    for k in table.get(case.op, []):
        if k.name == "torch":
            if case.ref_skip:
                skipped["torch"] = case.ref_skip
            else:
                run.insert(0, ("torch", k.fn))
            continue
        if not k.available:
            skipped[k.name] = f"unavailable: {k.reason}"
        elif why := unmet(case.op, k.name, cfg):
            skipped[k.name] = "; ".join(why)
        else:
            run.append((k.name, k.fn))
    # The first to run is the others' error basis: the reference, else dsv's Triton twin of it (same math).
    run.sort(key=lambda item: {"torch": 0, "triton": 1}.get(item[0], 2))
    return run, skipped


# ----- running -----


@dataclass(frozen=True)
class Options:
    rep_ms: float
    graphs: bool = False
    profile: bool = False


def graph_time(call: Callable[[], Any], rep_ms: float) -> dict[str, Any]:
    """Median ms of ``call`` replayed from a CUDA graph (kernel time without launch overhead), or why not."""
    import triton.testing

    try:
        return {"graph_ms": float(triton.testing.do_bench_cudagraph(call, rep=rep_ms, return_mode="median"))}
    except Exception as exc:  # e.g. a host sync inside the op (the torch references)
        torch.cuda.synchronize()
        return {"graph_failed": f"{type(exc).__name__}: {exc}"[:500]}


def kernel_times(call: Callable[[], Any], calls: int = 3) -> list[tuple[str, float]]:
    """The GPU kernels ``call`` launches with their mean µs per call (torch.profiler), slowest first."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            call()
        torch.cuda.synchronize()
    rows = [(e.key, e.device_time_total / calls) for e in prof.key_averages() if e.device_time_total > 0]
    return sorted(rows, key=lambda r: -r[1])[:8]


def run_case(case: Case, table: dict[str, list[Any]], dev: str, opts: Options) -> dict[str, Any]:
    row: dict[str, Any] = {
        "family": case.family,
        "case": case.name,
        "x": case.x,
        "op": case.op,
        "bytes": case.nbytes,
        "flops": case.flops,
        "peak_flops": case.peak,
        "roofline_ms": max(case.nbytes / HBM_BPS, case.flops / case.peak) * 1e3,
        "results": {},
    }
    try:
        args = case.setup(dev)
        impls, skipped = implementations(case, table) if case.table else ([], {})
        impls += list(case.extras.items())  # built inside the try below: a failing extra fails alone
        checked = set() if case.table else set(case.extras)  # sweep variants are compared with each other
        row["skipped"] = skipped
        compare = case.compare(args)
        basis: tuple[str, Any] | None = None
        for name, fn in impls:
            compared = name not in case.extras or name in checked
            res: dict[str, Any] = {}
            try:
                call = fn(args) if name in case.extras else (lambda fn=fn: fn(*args))
                if case.reset is not None:
                    case.reset(args)
                out = case.output(args, call())
                _sync(dev)
                if compared:
                    if basis is None:
                        basis = (name, out)
                    else:
                        res["error"] = compare(out, basis[1])
                        res["error_vs"] = basis[0]
                del out
                ms = timeit(call, dev, opts.rep_ms)
                res["ms"] = ms
                if case.flops:
                    res["tflops"] = case.flops / ms / 1e9
                res["gbps"] = case.nbytes / ms / 1e6
                res["roof_frac"] = row["roofline_ms"] / ms
                if opts.graphs and dev == "cuda" and ms < 5:
                    res.update(graph_time(call, opts.rep_ms))
                if opts.profile and dev == "cuda":
                    res["kernels_us"] = kernel_times(call)
            except Exception as exc:  # one kernel failing must not stop the others
                res["failed"] = f"{type(exc).__name__}: {exc}"[:2000]
                res["traceback"] = traceback.format_exc(limit=4)[-3000:]
            row["results"][name] = res
            call = None  # the closure may hold big buffers (prepared GEMM inputs)
            if dev == "cuda":
                try:  # a sticky CUDA error (illegal address) surfaces here; the next kernel reports it too
                    torch.cuda.synchronize()
                    torch.cuda.empty_cache()
                except Exception as exc:
                    res.setdefault("failed", f"after the call: {type(exc).__name__}: {exc}"[:2000])
    except Exception as exc:  # the case itself (inputs, comparison set-up) failed
        row["failed"] = f"{type(exc).__name__}: {exc}"[:2000]
        row["traceback"] = traceback.format_exc(limit=6)[-3000:]
    finally:
        if dev == "cuda":
            torch.cuda.empty_cache()
    return row


def _print_row(row: dict[str, Any]) -> None:
    head = f"{row['family']:24s} {row['case']:28s}"
    if "failed" in row:
        print(f"{head} FAILED {row['failed'][:200]}", flush=True)
        return
    print(f"{head} roofline {row['roofline_ms']:.4f} ms", flush=True)
    for name, res in row["results"].items():
        if "failed" in res:
            print(f"    {name:20s} FAILED {res['failed'][:200]}", flush=True)
            continue
        tf = f"{res['tflops']:8.1f} TFLOPS" if "tflops" in res else f"{res['gbps']:8.0f} GB/s  "
        err = f"err {res['error']:.2e} vs {res['error_vs']}" if "error" in res else ""
        graph = f"graph {res['graph_ms']:.4f} ms " if "graph_ms" in res else ""
        print(
            f"    {name:20s} {res['ms']:10.4f} ms {tf} {100 * res['roof_frac']:6.1f}% roof  {graph}{err}",
            flush=True,
        )
        for kname, us in res.get("kernels_us", []):
            print(f"        {us:10.1f} us  {kname[:100]}")
    for name, why in row.get("skipped", {}).items():
        print(f"    {name:20s} skipped: {why[:150]}", flush=True)


def _release(case: Case, nxt: Case | None) -> None:
    """Free the MoE weights and the grouped-GEMM kernels' prepared copies once the MoE family is done."""
    if case.op == "fused_moe" and (nxt is None or nxt.op != "fused_moe"):
        _MOE_WEIGHTS.clear()
        try:
            from dsv_cuda.adapters import grouped_mm

            grouped_mm.clear_cache()
        except ImportError:
            pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--quick", action="store_true", help="fewer sizes (< 2 min on an H200)")
    ap.add_argument(
        "--smoke", action="store_true", help="tiny shapes; runs on the CPU under TRITON_INTERPRET=1"
    )
    ap.add_argument("--only", default="", help="comma-separated substrings of family or case names to run")
    ap.add_argument("--rep-ms", type=float, default=None, help="do_bench measuring time per kernel")
    ap.add_argument("--budget-s", type=float, default=None, help="skip the remaining cases after this long")
    ap.add_argument("--arch", default="", help="compute capability to assume for the kernel table, e.g. 9.0")
    ap.add_argument(
        "--sweep", action="store_true", help="also time tile-size variants of dsv's Triton kernels"
    )
    ap.add_argument("--graphs", action="store_true", help="also time calls under 5 ms as CUDA-graph replays")
    ap.add_argument("--profile", action="store_true", help="list each implementation's GPU kernels")
    args = ap.parse_args(argv)
    interpret = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if not torch.cuda.is_available() and not (args.smoke and interpret):
        print("kernels.py needs a CUDA GPU (or --smoke with TRITON_INTERPRET=1 on the CPU)")
        return 2
    dev = "cpu" if interpret else "cuda"
    rep = args.rep_ms or (20.0 if args.quick else 40.0)
    budget = args.budget_s or (100.0 if args.quick else 420.0)
    arch = tuple(int(v) for v in args.arch.split(".")) if args.arch else None
    torch.manual_seed(0)
    try:
        table = kernel_table(dev, arch)  # type: ignore[arg-type]
    except ImportError as exc:
        print(f"kernels.py times the dsv-cuda kernel table: {exc} (pip install -e backends/cuda --no-deps)")
        return 2
    env = {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu (interpreter)",
        "cuda": torch.version.cuda,
        "argv": sys.argv[1:] if argv is None else argv,
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    print(json.dumps(env), flush=True)
    kernels = {
        op: {k.name: {"available": k.available, "reason": k.reason} for k in ks} for op, ks in table.items()
    }
    only = [s for s in args.only.split(",") if s]
    cases = plan(args.quick, args.smoke) + (sweep_cases() if args.sweep else [])
    cases = [c for c in cases if not only or any(s in f"{c.family} {c.name}" for s in only)]
    opts = Options(rep, args.graphs, args.profile)
    rows: list[dict[str, Any]] = []
    start = time.perf_counter()
    for i, case in enumerate(cases):
        if time.perf_counter() - start > budget:
            rows.append({"family": case.family, "case": case.name, "x": case.x, "op": case.op,
                         "failed": f"not run: time budget of {budget:.0f} s spent"})  # fmt: skip
            _print_row(rows[-1])
            continue
        row = run_case(case, table, dev, opts)
        row["elapsed_s"] = time.perf_counter() - start
        rows.append(row)
        _print_row(row)
        _release(case, cases[i + 1] if i + 1 < len(cases) else None)
        if args.out:  # written after every case: a run killed at its time limit still leaves its results
            _write(args.out, env, kernels, rows)
    print(f"total {time.perf_counter() - start:.1f} s", flush=True)
    failed = sum("failed" in r or any("failed" in v for v in r.get("results", {}).values()) for r in rows)
    print(f"{len(rows)} cases, {failed} with a failure", flush=True)
    return 0


def _write(path: str, env: dict[str, Any], kernels: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    doc = {
        "env": env,
        "peaks": {"hbm_bps": HBM_BPS, "bf16_flops": BF16_FLOPS, "fp8_flops": FP8_FLOPS},
        "kernels": kernels,
        "rows": rows,
    }
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, default=str)
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
