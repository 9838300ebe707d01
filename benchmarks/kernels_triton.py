"""GPU benchmark of dsv's portable Triton kernels against the reference torch ops at DeepSeek-V3.2 sizes.

Every case times the Triton kernel and the reference op, checks the Triton output against the reference
(max error relative to max|ref|), and gives a roofline bound from bytes moved and FLOPs (H200: 4.8 TB/s HBM,
989 TFLOP/s dense bf16, 1979 fp8). Each case runs in its own try/except so one failure does not stop the rest.

    python benchmarks/kernels_triton.py --out triton_bench.json            # full run (a few minutes)
    python benchmarks/kernels_triton.py --quick --out triton_bench.json    # a subset
    TRITON_INTERPRET=1 python benchmarks/kernels_triton.py --smoke         # tiny shapes on the CPU (code check)
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
from typing import Any

import torch

HBM_BPS, BF16_FLOPS, FP8_FLOPS = 4.8e12, 989e12, 1979e12


def _sync(dev: str) -> None:
    if dev == "cuda":
        torch.cuda.synchronize()


def timeit(fn: Callable[[], Any], dev: str, budget_ms: float = 150.0) -> float:
    """Median milliseconds of ``fn``: do_bench for fast calls, a few event-timed calls for slow ones."""
    fn()
    _sync(dev)
    t0 = time.perf_counter()
    fn()
    _sync(dev)
    once = (time.perf_counter() - t0) * 1e3
    if dev != "cuda":
        return once
    if once > 20:  # slow references: three timed runs
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

    return float(triton.testing.do_bench(fn, warmup=10, rep=budget_ms, return_mode="median"))


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.float(), ref.float()
    return float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def roofline_ms(nbytes: float, flops: float, peak: float) -> float:
    return max(nbytes / HBM_BPS, flops / peak) * 1e3


# ----- cases: each returns (triton fn, reference fn, compare(out_triton, out_ref) -> error, bytes, flops, peak)


def case_sparse_mla(dev: str, batch: int, layout: str, heads: int, topk: int, slots: int, **kw: Any) -> tuple:
    from dsv.kernels.triton.sparse_mla import sparse_mla
    from dsv.ops.attention import sparse_mla as ref
    from dsv.ops.kv_cache import MLACacheLayer

    r, dr, page = 512, 64, 64
    cache = MLACacheLayer(slots // page, page, r, dr, layout, torch.bfloat16, dev)
    if layout == "fp8":
        from dsv.kernels.triton.kv_write import kv_write

        chunk = 65536
        for s in range(0, slots, chunk):
            n = min(chunk, slots - s)
            idx = torch.arange(s, s + n, device=dev)
            kv_write(cache, idx, torch.randn(n, r, device=dev), torch.randn(n, dr, device=dev))
    else:
        cache.storage.normal_()
    q = torch.randn(batch, heads, r + dr, device=dev, dtype=torch.bfloat16)
    idx = torch.randint(0, slots, (batch, topk), device=dev, dtype=torch.int32)
    idx[:, -topk // 8 :] = -1  # some padding, as short sequences have
    scale = (r + dr) ** -0.5
    nbytes = batch * (topk * cache.bytes_per_token + heads * (r + dr) * 2 + heads * r * 2)
    flops = 2 * batch * heads * topk * (r + dr + r)
    return (
        lambda: sparse_mla(q, cache, idx, scale, **kw),
        lambda: ref(q, cache, idx, scale),
        rel_err,
        nbytes,
        flops,
        BF16_FLOPS,
    )


def _indexer_setup(dev: str, batch: int, ctx: int, heads: int = 64, dim: int = 128):
    from dsv.engine.batch import SeqChunk, build_metadata
    from dsv.ops.kv_cache import IndexKCacheLayer

    page = 64
    per_seq = ctx // page
    perm = torch.randperm(batch * per_seq) + 1
    chunks = [SeqChunk(ctx - 1, 1, perm[b * per_seq : (b + 1) * per_seq].tolist()) for b in range(batch)]
    meta = build_metadata(chunks, page, dev)
    cache = IndexKCacheLayer(batch * per_seq + 1, page, dim, True, torch.bfloat16, dev)
    keys = cache.storage[:, : page * dim].view(torch.float8_e4m3fn)
    keys.copy_(torch.randn(keys.shape, device=dev).to(torch.float8_e4m3fn))
    cache.scales.fill_(2.0**-6)
    q = torch.randn(batch, heads, dim, device=dev).to(torch.float8_e4m3fn)
    w = torch.rand(batch, heads, device=dev) * heads**-0.5
    return q, w, cache, meta


def case_indexer(dev: str, batch: int, ctx: int, part: str, topk: int = 2048, **topk_kw: Any) -> tuple:
    from dsv.kernels.triton.indexer import indexer_logits, indexer_topk
    from dsv.kernels.triton.topk import topk_indices
    from dsv.ops import indexer as ref

    q, w, cache, meta = _indexer_setup(dev, batch, ctx)
    heads, dim = q.shape[1:]
    key_bytes = batch * ctx * (dim + 4)
    flops = 2 * batch * ctx * heads * dim
    if part == "logits":
        return (
            lambda: indexer_logits(q, w, cache, meta),
            lambda: ref.indexer_logits(q, w, cache, meta),
            rel_err_finite,
            key_bytes + batch * ctx * 4,
            flops,
            FP8_FLOPS,
        )
    if part == "topk":
        logits = indexer_logits(q, w, cache, meta)
        lengths = (meta.positions + 1).to(torch.int32)
        return (
            lambda: topk_indices(logits, lengths, topk, **topk_kw),
            lambda: ref.topk_positions(logits, topk),
            lambda a, b: topk_mismatch(a, b, logits),
            batch * ctx * 4 * 5,  # four histogram passes and one output pass over the row
            0,
            FP8_FLOPS,
        )
    logits = ref.indexer_logits(q, w, cache, meta)
    return (
        lambda: indexer_topk(q, w, cache, meta, topk),
        lambda: ref.indexer_topk(q, w, cache, meta, topk),
        lambda a, b: topk_mismatch(a, b, logits),
        key_bytes + batch * ctx * 4 * 6,
        flops,
        FP8_FLOPS,
    )


def rel_err_finite(out: torch.Tensor, ref: torch.Tensor) -> float:
    fin = torch.isfinite(ref)
    if not torch.equal(fin, torch.isfinite(out)):
        return math.inf
    return rel_err(out[fin], ref[fin])


def topk_mismatch(out: torch.Tensor, ref: torch.Tensor, scores: torch.Tensor) -> float:
    """Largest gap between the sorted scores of the two selections, relative to max|score| (0 = same set)."""

    def picked(idx: torch.Tensor) -> torch.Tensor:
        vals = scores.gather(1, idx.long().clamp_min(0)).masked_fill(idx < 0, -1e30)
        return vals.sort(dim=1, descending=True).values

    return rel_err(picked(out), picked(ref)) if (out >= 0).sum() == (ref >= 0).sum() else math.inf


def case_linear(dev: str, m: int, n: int, k: int, config: dict[str, int] | None = None) -> tuple:
    from dsv.kernels.triton.fp8_gemm import linear
    from dsv.ops.linear import linear as ref

    w = (torch.randn(n, k, device=dev) * 0.05).to(torch.float8_e4m3fn)
    s = torch.rand(-(-n // 128), -(-k // 128), device=dev) * 1e-2 + 1e-3
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    nbytes = m * k * 2 + n * k + m * n * 2
    return (
        lambda: linear(x, w, s, (128, 128), "ue8m0", config=config),
        lambda: ref(x, w, s, (128, 128), "ue8m0"),
        rel_err,
        nbytes,
        2 * m * n * k,
        FP8_FLOPS,
    )


def case_bf16_matmul(dev: str, m: int, n: int, k: int) -> tuple:
    """cuBLAS bf16 at the same shape: the speed a block-FP8 GEMM should beat."""
    w = torch.randn(n, k, device=dev, dtype=torch.bfloat16)
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    fn = lambda: torch.nn.functional.linear(x, w)  # noqa: E731
    return fn, None, None, m * k * 2 + n * k * 2 + m * n * 2, 2 * m * n * k, BF16_FLOPS


def case_moe(
    dev: str, tokens: int, experts: int = 256, top_k: int = 8, inter: int = 2048, hidden: int = 7168
):
    from dsv.kernels.triton.fused_moe import fused_moe
    from dsv.ops.moe import ExpertWeights
    from dsv.ops.moe import fused_moe as ref

    def weight(e: int, o: int, i: int) -> torch.Tensor:
        w = torch.empty(e, o, i, device=dev, dtype=torch.float8_e4m3fn)
        for j in range(e):  # one expert at a time keeps the temporary small
            w[j] = (torch.randn(o, i, device=dev) * 0.05).to(torch.float8_e4m3fn)
        return w

    def scale(e: int, o: int, i: int) -> torch.Tensor:
        return torch.rand(e, -(-o // 128), -(-i // 128), device=dev) * 1e-2 + 1e-3

    ex = ExpertWeights(
        weight(experts, inter, hidden),
        weight(experts, inter, hidden),
        weight(experts, hidden, inter),
        scale(experts, inter, hidden),
        scale(experts, inter, hidden),
        scale(experts, hidden, inter),
        (128, 128),
        "ue8m0",
    )
    x = torch.randn(tokens, hidden, device=dev, dtype=torch.bfloat16)
    ids = torch.rand(tokens, experts, device=dev).topk(top_k, dim=1).indices
    wts = torch.rand(tokens, top_k, device=dev)
    used = min(experts, tokens * top_k) if tokens * top_k < experts else len(torch.unique(ids))
    nbytes = used * 3 * inter * hidden + tokens * hidden * 4
    flops = 2 * tokens * top_k * 3 * inter * hidden
    return (
        lambda: fused_moe(x, wts, ids, ex),
        lambda: ref(x, wts, ids, ex),
        rel_err,
        nbytes,
        flops,
        FP8_FLOPS,
    )


def case_kv_write(dev: str, tokens: int, layout: str) -> tuple:
    from dsv.backend.reference import kv_write as ref
    from dsv.kernels.triton.kv_write import kv_write
    from dsv.ops.kv_cache import MLACacheLayer

    pages = tokens // 64 + 1
    a, b = (MLACacheLayer(pages, 64, 512, 64, layout, torch.bfloat16, dev) for _ in range(2))
    slots = torch.randperm(a.flat.shape[0], device=dev)[:tokens]
    lat = torch.randn(tokens, 512, device=dev, dtype=torch.bfloat16)
    rope = torch.randn(tokens, 64, device=dev, dtype=torch.bfloat16)

    def compare(_: Any, __: Any) -> float:
        # Bytes differing from the reference run on the CPU (the oracle; torch on CUDA divides a tensor by a
        # Python scalar through its reciprocal, so its amax/448 scales can differ in the last bit).
        cpu = MLACacheLayer(pages, 64, 512, 64, layout, torch.bfloat16, "cpu")
        ref(cpu, slots.cpu(), lat.cpu(), rope.cpu())
        return float((a.storage.cpu().view(torch.uint8) != cpu.storage.view(torch.uint8)).sum())

    nbytes = tokens * (576 * 2 + a.bytes_per_token)
    return (
        lambda: kv_write(a, slots, lat, rope),
        lambda: ref(b, slots, lat, rope),
        compare,
        nbytes,
        0,
        BF16_FLOPS,
    )


def sweep_cases() -> list[tuple[str, Callable[[str], tuple]]]:
    """Tile-size variants of the main kernels (``--sweep``), to pick defaults on a new GPU."""
    out: list[tuple[str, Callable[[str], tuple]]] = []
    for bh, bn, w, st in [
        (16, 32, 4, 2),
        (32, 64, 4, 2),
        (64, 32, 8, 1),
        (64, 64, 8, 1),
        (64, 64, 8, 2),
        (64, 128, 8, 1),
    ]:
        kw = {"block_h": bh, "block_n": bn, "num_warps": w, "num_stages": st}
        for lay in ("float", "fp8"):
            build = lambda d, lay=lay, kw=kw: case_sparse_mla(d, 64, lay, 128, 2048, 1 << 18, **kw)  # noqa: E731
            out.append((f"sweep sparse_mla {lay} B64 h{bh} n{bn} w{w} s{st}", build))
    for block, bits, w in [
        (1024, 8, 8),
        (2048, 8, 8),
        (4096, 8, 16),
        (1024, 11, 8),
        (2048, 11, 8),
        (4096, 11, 16),
    ]:
        kw = {"block": block, "radix_bits": bits, "num_warps": w}
        build = lambda d, kw=kw: case_indexer(d, 64, 32768, "topk", **kw)  # noqa: E731
        out.append((f"sweep topk B64 ctx32K block{block} bits{bits} w{w}", build))
    for bm, bn, w, st in [(64, 128, 4, 3), (128, 128, 8, 4), (64, 128, 4, 5)]:
        cfg = {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w, "num_stages": st}
        build = lambda d, cfg=cfg: case_linear(d, 4096, 7168, 16384, config=cfg)  # noqa: E731
        out.append((f"sweep linear M4096 o bm{bm} bn{bn} w{w} s{st}", build))
    return out


# ----- the plan


def plan(quick: bool, smoke: bool) -> list[tuple[str, Callable[[str], tuple]]]:
    cases: list[tuple[str, Callable[[str], tuple]]] = []
    if smoke:  # tiny shapes: exercises every code path under the interpreter
        cases.append(("sparse_mla fp8 B2 H16 k64", lambda d: case_sparse_mla(d, 2, "fp8", 16, 64, 256)))
        cases.append(("indexer full B2 4K", lambda d: case_indexer(d, 2, 256, "full", 64)))
        cases.append(("linear fp8 M16 256x256", lambda d: case_linear(d, 16, 256, 256)))
        cases.append(("fused_moe T3 E8", lambda d: case_moe(d, 3, 8, 2, 128, 256)))
        cases.append(("kv_write fp8 T64", lambda d: case_kv_write(d, 64, "fp8")))
        return cases
    batches = [1, 64] if quick else [1, 16, 64, 128]
    for layout in ("float", "fp8"):
        for b in batches:
            name = f"sparse_mla_decode {'bf16' if layout == 'float' else 'fp8'} B{b} H128 topk2048"
            cases.append((name, lambda d, b=b, lay=layout: case_sparse_mla(d, b, lay, 128, 2048, 1 << 18)))
    for ctx in [4096, 32768] if quick else [4096, 32768, 131072]:
        for part in ("logits", "topk", "full"):
            cases.append(
                (
                    f"indexer_decode {part} B64 ctx{ctx // 1024}K",
                    lambda d, c=ctx, p=part: case_indexer(d, 64, c, p),
                )
            )
    shapes = {
        "q_a 1536x7168": (1536, 7168),
        "kv_a 576x7168": (576, 7168),
        "q_b 24576x1536": (24576, 1536),
        "o 7168x16384": (7168, 16384),
        "mlp_up 18432x7168": (18432, 7168),
        "mlp_down 7168x18432": (7168, 18432),
        "idx_wq 8192x1536": (8192, 1536),
    }
    if quick:
        shapes = {k: shapes[k] for k in ("q_a 1536x7168", "o 7168x16384", "mlp_up 18432x7168")}
    for label, (n, k) in shapes.items():
        cases.append((f"linear_fp8 M4096 {label}", lambda d, n=n, k=k: case_linear(d, 4096, n, k)))
        cases.append((f"bf16_cublas M4096 {label}", lambda d, n=n, k=k: case_bf16_matmul(d, 4096, n, k)))
    if not quick:
        cases.append(("linear_fp8 M64 o 7168x16384", lambda d: case_linear(d, 64, 7168, 16384)))
    for t in [1, 64] if quick else [1, 64, 512, 4096]:
        cases.append((f"fused_moe fp8 T{t} E256 top8 I2048 D7168", lambda d, t=t: case_moe(d, t)))
    for layout in ("float", "fp8"):
        cases.append((f"kv_write {layout} T4096", lambda d, lay=layout: case_kv_write(d, 4096, lay)))
    return cases


def kernel_times(fn: Callable[[], Any], calls: int = 3) -> list[tuple[str, float]]:
    """GPU kernels launched by ``fn`` with their mean time per call in microseconds (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    rows = [(e.key, e.device_time_total / calls) for e in prof.key_averages() if e.device_time_total > 0]
    return sorted(rows, key=lambda r: -r[1])[:8]


def run_case(
    name: str, build: Callable[[str], tuple], dev: str, time_ref: bool, profile: bool
) -> dict[str, Any]:
    row: dict[str, Any] = {"case": name}
    try:
        fn, ref, compare, nbytes, flops, peak = build(dev)
        row["roofline_ms"] = roofline_ms(nbytes, flops, peak)
        row["triton_ms"] = timeit(fn, dev)
        row["roofline_frac"] = row["roofline_ms"] / row["triton_ms"]
        if dev == "cuda" and row["triton_ms"] < 5:
            # Inside a CUDA graph (as a serving engine runs decode): kernel time without launch overhead.
            try:
                import triton.testing

                row["graph_ms"] = float(triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median"))
            except Exception as exc:
                row["graph_error"] = f"{type(exc).__name__}: {exc}"
        if profile and dev == "cuda":
            row["kernels_us"] = kernel_times(fn)
        if ref is not None:
            out = fn()
            ref_out = ref()
            row["error"] = compare(out, ref_out)
            if time_ref:
                row["ref_ms"] = timeit(ref, dev)
                row["speedup"] = row["ref_ms"] / row["triton_ms"]
    except Exception as exc:  # one failing case must not stop the others
        row["failed"] = f"{type(exc).__name__}: {exc}"
        row["traceback"] = traceback.format_exc(limit=6)
    finally:
        if dev == "cuda":
            torch.cuda.empty_cache()
    return row


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--quick", action="store_true", help="fewer sizes")
    ap.add_argument(
        "--smoke", action="store_true", help="tiny shapes; runs on the CPU under TRITON_INTERPRET=1"
    )
    ap.add_argument("--only", default="", help="comma-separated substrings of case names to run")
    ap.add_argument("--sweep", action="store_true", help="also time tile-size variants of the main kernels")
    ap.add_argument("--profile", action="store_true", help="list each case's GPU kernels (torch.profiler)")
    args = ap.parse_args()
    interpret = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if not torch.cuda.is_available() and not (args.smoke and interpret):
        print("kernels_triton.py needs a CUDA/ROCm GPU (or --smoke with TRITON_INTERPRET=1 on the CPU)")
        return 2
    dev = "cpu" if interpret else "cuda"
    import triton

    torch.manual_seed(0)
    env = {
        "torch": torch.__version__,
        "triton": triton.__version__,
        "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu (interpreter)",
    }
    print(json.dumps(env))
    only = [s for s in args.only.split(",") if s]
    rows = []
    header = (
        f"{'case':52s} {'triton ms':>10s} {'graph ms':>9s} {'ref ms':>10s} {'speedup':>8s} {'roofline':>9s} "
        f"{'%roof':>6s} {'error':>9s}"
    )
    print(header)
    cases = [(n, b, True) for n, b in plan(args.quick, args.smoke)]
    cases += [(n, b, False) for n, b in sweep_cases()] if args.sweep else []
    for name, build, time_ref in cases:
        if only and not any(s in name for s in only):
            continue
        row = run_case(name, build, dev, time_ref, args.profile)
        rows.append(row)
        if "failed" in row:
            print(f"{name:52s} FAILED {row['failed']}", flush=True)
            continue
        frac = row.get("roofline_frac")
        print(
            f"{name:52s} {_fmt(row.get('triton_ms'), '10.4f')} {_fmt(row.get('graph_ms'), '9.4f')} "
            f"{_fmt(row.get('ref_ms'), '10.3f')} "
            f"{_fmt(row.get('speedup'), '8.1f')} {_fmt(row.get('roofline_ms'), '9.4f')} "
            f"{_fmt(None if frac is None else 100 * frac, '6.1f')} {_fmt(row.get('error'), '9.2e')}",
            flush=True,
        )
        for kname, us in row.get("kernels_us", []):
            print(f"    {us:10.1f} us  {kname[:100]}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"env": env, "peaks": [HBM_BPS, BF16_FLOPS, FP8_FLOPS], "rows": rows}, f, indent=1)
    return 1 if any("failed" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
