#!/usr/bin/env python3
"""Check dsv's TileLang sparse MLA kernels against the torch reference on the GPU, then time them.

    python backends/cuda/scripts/tilelang_check.py [--out result.json] [--no-bench] [--triton]

Correctness: ``dsv_cuda.tilelang.sparse_mla`` vs ``dsv.ops.attention.sparse_mla`` (fp32 math on the same bf16
inputs) at several shapes: 16/64/128 heads, top-k 2048 and top-k not a multiple of the 64-row block, -1
entries scattered through rows, rows with no valid index (must give 0), forced split-KV, and the first rows of
the large prefill runs, and a cache past 2^31 elements (64-bit row offsets). Tolerance: |out - ref| <= 2^-7 + 2^-7 |ref|. Why: the kernel takes bf16 inputs and
accumulates in fp32 like the reference, but it rounds the softmax probabilities to bf16 before the P @ V
product (up to 2^-8 relative of the averaged values) and rounds the output to bf16 (another 2^-8).

Speed: decode (one query per sequence) at batch 1/16/64/128 and prefill at 4K/16K query tokens, H = 128,
top-k 2048, bf16 KV, timed with triton.testing.do_bench; prints µs and TFLOPS (4 * H * K * (R + Dr / 2)
FLOPs per token: the QK^T product over R + Dr and the PV product over R). ``--triton`` also times dsv's
Triton kernel on the decode shapes for comparison. Exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
import traceback

import torch

from dsv.ops.attention import sparse_mla as reference
from dsv.ops.kv_cache import MLACacheLayer

R, DR = 512, 64
SM_SCALE = 0.1352338
DEV = torch.device("cuda")
TOL = 2.0**-7


def make_cache(slots: int, seed: int) -> MLACacheLayer:
    page = 64
    cache = MLACacheLayer((slots + page - 1) // page, page, R, DR, "float", torch.bfloat16, DEV)
    g = torch.Generator(device=DEV).manual_seed(seed)
    cache.flat.copy_(torch.randn(cache.flat.shape, generator=g, device=DEV).to(torch.bfloat16))
    return cache


def make_indices(
    t: int, k: int, slots: int, seed: int, invalid: float = 0.0, empty_rows: int = 0
) -> torch.Tensor:
    """[t, k] int64 random distinct-ish slots; a fraction ``invalid`` of entries set to -1 anywhere in the row."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    idx = torch.randint(0, slots, (t, k), generator=g, device=DEV)
    if invalid:
        idx = idx.masked_fill(torch.rand(t, k, generator=g, device=DEV) < invalid, -1)
    if empty_rows:
        idx[-empty_rows:] = -1
    return idx


def make_q(t: int, h: int, seed: int) -> torch.Tensor:
    g = torch.Generator(device=DEV).manual_seed(seed)
    return torch.randn(t, h, R + DR, generator=g, device=DEV).to(torch.bfloat16)


def compare(out: torch.Tensor, ref: torch.Tensor) -> dict:
    diff = (out.float() - ref.float()).abs()
    bound = TOL + TOL * ref.float().abs()
    return {
        "max_abs_err": float(diff.max()),
        "max_rel_to_bound": float((diff / bound).max()),
        "nan": bool(torch.isnan(out).any()),
        "ok": bool((diff <= bound).all()) and not bool(torch.isnan(out).any()),
    }


def _compile_one(heads: int, topk: int, splits: int) -> tuple[str, float, str]:
    from dsv_cuda.tilelang.sparse_mla import BLOCK_H, BLOCK_I
    from dsv_cuda.tilelang.sparse_mla_kernel import KernelKey, compiled

    t0 = time.time()
    key = KernelKey(heads, R, DR, topk, splits, SM_SCALE, "bfloat16", block_h=BLOCK_H, block_i=BLOCK_I)
    try:
        compiled(key)
        err = ""
    except Exception:
        err = traceback.format_exc()[-3000:]
    return f"h{heads}-k{topk}-s{splits}", round(time.time() - t0, 1), err


def precompile(results: list[dict]) -> None:
    """Compile the kernels used below in parallel processes: they fill TileLang's disk cache, so the checks
    then load them instead of compiling one after another."""
    import multiprocessing as mp

    from dsv_cuda.tilelang.sparse_mla import plan

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    shapes = [(t, h, k, s) for _, t, h, k, _, _, _, s in CASES] + [(t, 128, 2048, None) for _, t in BENCH]
    jobs = sorted({(p.heads, p.topk, p.splits) for p in (plan(t, h, k, sms, s) for t, h, k, s in shapes)})
    t0 = time.time()
    with mp.get_context("spawn").Pool(min(len(jobs), 12)) as pool:
        done = pool.starmap(_compile_one, jobs)
    for name, secs, err in done:
        row = {"compile": name, "s": secs, "ok": not err}
        if err:
            row["error"] = err
        results.append(row)
        print(json.dumps(row)[:3000], flush=True)
    print(f"precompile wall {time.time() - t0:.1f}s", flush=True)


CASES = [
    # name, tokens, heads, topk, slots, invalid fraction, empty rows, splits (None: the plan's)
    ("decode-b4-h128-k2048", 4, 128, 2048, 8192, 0.0, 0, None),
    ("decode-b2-h128-k2048-split4", 2, 128, 2048, 8192, 0.1, 0, 4),
    ("decode-b8-h64-k2048-invalid", 8, 64, 2048, 8192, 0.3, 2, None),
    ("decode-b8-h16-k128", 8, 16, 128, 4096, 0.2, 1, None),
    ("decode-b3-h128-k1000-ragged", 3, 128, 1000, 4096, 0.0, 0, None),
    ("prefill-t256-h128-k2048", 256, 128, 2048, 16384, 0.05, 3, None),
    ("prefill-t100-h64-k500", 100, 64, 500, 4096, 0.5, 0, None),
    ("prefill-t64-h16-k2048", 64, 16, 2048, 8192, 0.0, 0, None),
]
BENCH = [("decode", b) for b in (1, 16, 64, 128)] + [("prefill", 4096), ("prefill", 16384)]


def correctness(results: list[dict]) -> bool:
    from dsv_cuda.tilelang.sparse_mla import sparse_mla

    ok = True
    for i, (name, t, h, k, slots, inv, empty, splits) in enumerate(CASES):
        row = {"check": name}
        try:
            cache = make_cache(slots, 10 + i)
            q = make_q(t, h, 20 + i)
            idx = make_indices(t, k, slots, 30 + i, inv, empty)
            out = sparse_mla(q, cache, idx, SM_SCALE, splits=splits)
            ref = reference(q, cache, idx, SM_SCALE)
            row.update(compare(out, ref))
            if empty:
                row["empty_rows_zero"] = bool((out[-empty:] == 0).all())
                row["ok"] = row["ok"] and row["empty_rows_zero"]
        except Exception as exc:
            row.update(ok=False, error=f"{type(exc).__name__}: {exc}", trace=traceback.format_exc()[-2000:])
        ok = ok and row["ok"]
        results.append(row)
        print(json.dumps(row), flush=True)
    return ok


def big_cache(results: list[dict]) -> bool:
    """A cache past 2^31 elements (64-bit row offsets): indices near its end, checked and timed at B64."""
    from dsv_cuda.tilelang.sparse_mla import sparse_mla
    from triton.testing import do_bench

    row: dict = {"check": "big-cache-int64"}
    try:
        slots = 2**31 // (R + DR) + 131072
        cache = make_cache(slots, 7)
        row["cache_elements"] = cache.flat.numel()
        q = make_q(64, 128, 8)
        idx = make_indices(64, 2048, 131072, 9) + (slots - 131072)  # every index past the int32 limit
        idx[:, :64] = make_indices(64, 64, 4096, 10)  # and a few near the start
        out = sparse_mla(q, cache, idx, SM_SCALE)
        row.update(compare(out, reference(q, cache, idx, SM_SCALE)))
        row["us"] = round(do_bench(lambda: sparse_mla(q, cache, idx, SM_SCALE), warmup=25, rep=100) * 1e3, 1)
    except Exception as exc:
        row.update(ok=False, error=f"{type(exc).__name__}: {exc}", trace=traceback.format_exc()[-2000:])
    torch.cuda.empty_cache()
    results.append(row)
    print(json.dumps(row), flush=True)
    return row["ok"]


def flops(t: int, h: int, k: int) -> float:
    return 2.0 * t * h * k * (R + DR) + 2.0 * t * h * k * R


def bench_one(phase: str, t: int, h: int, k: int, with_triton: bool) -> dict:
    """Time one shape; also compares its first (up to 64) rows with the reference."""
    from dsv_cuda.tilelang.sparse_mla import sparse_mla
    from triton.testing import do_bench

    row: dict = {"bench": f"{phase}-t{t}-h{h}-k{k}"}
    # Decode: each sequence has its own 4096 cached tokens; prefill: one 64K-token sequence.
    slots = t * 4096 if phase == "decode" else 65536
    cache = make_cache(slots, 1)
    q = make_q(t, h, 2)
    idx = make_indices(t, k, slots, 3)
    t0 = time.time()
    out = sparse_mla(q, cache, idx, SM_SCALE)
    torch.cuda.synchronize()
    row["first_call_s"] = round(time.time() - t0, 2)  # includes compilation
    n = min(t, 64)
    row.update(compare(out[:n], reference(q[:n], cache, idx[:n], SM_SCALE)))
    ms = do_bench(lambda: sparse_mla(q, cache, idx, SM_SCALE), warmup=25, rep=100)
    row["us"] = round(ms * 1e3, 1)
    row["tflops"] = round(flops(t, h, k) / (ms * 1e-3) / 1e12, 1)
    if phase == "decode":
        # Decode runs inside CUDA graphs when serving: time a replay too (no host launch overhead).
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            g_out = sparse_mla(q, cache, idx, SM_SCALE)
        graph.replay()
        torch.cuda.synchronize()
        row["graph_matches_eager"] = bool(torch.equal(g_out, out))
        row["graph_us"] = round(do_bench(graph.replay, warmup=25, rep=100) * 1e3, 1)
    if with_triton and phase == "decode":
        from dsv.kernels.triton.sparse_mla import sparse_mla as triton_mla

        triton_mla(q, cache, idx, SM_SCALE)
        row["triton_us"] = round(do_bench(lambda: triton_mla(q, cache, idx, SM_SCALE)) * 1e3, 1)
    return row


def bench(results: list[dict], with_triton: bool) -> bool:
    ok = True
    h, k = 128, 2048
    for phase, t in BENCH:
        try:
            row = bench_one(phase, t, h, k, with_triton)
        except Exception as exc:
            row = {"bench": f"{phase}-t{t}", "ok": False, "error": f"{type(exc).__name__}: {exc}"}
            row["trace"] = traceback.format_exc()[-2000:]
        torch.cuda.empty_cache()
        ok = ok and row.get("ok", False)
        results.append(row)
        print(json.dumps(row), flush=True)
    return ok


# block_i, num_stages, threads, block_h
SWEEP = [(64, 2, 256, 64), (64, 2, 512, 64), (32, 2, 512, 128), (32, 1, 512, 128), (64, 1, 512, 128)]


def sweep(results: list[dict]) -> None:
    """Time tile configurations (block_i, num_stages, threads, block_h) on decode B64 and prefill 4K."""
    import multiprocessing as mp

    from dsv_cuda.tilelang.sparse_mla import Tiles, sparse_mla
    from triton.testing import do_bench

    jobs = [(128, 2048, 1, *tiles) for tiles in SWEEP]
    with mp.get_context("spawn").Pool(len(jobs)) as pool:
        for row in pool.starmap(_compile_tiles, jobs):
            print(json.dumps(row)[:1500], flush=True)
    for phase, t in (("decode", 64), ("prefill", 4096)):
        slots = t * 4096 if phase == "decode" else 65536
        cache = make_cache(slots, 1)
        q = make_q(t, 128, 2)
        idx = make_indices(t, 2048, slots, 3)
        ref = reference(q[:64], cache, idx[:64], SM_SCALE)
        for bi, ns, th, bh in SWEEP:
            row = {"sweep": f"{phase}-t{t}", "block_i": bi, "stages": ns, "threads": th, "block_h": bh}
            try:
                tiles = Tiles(bi, ns, th, bh)
                out = sparse_mla(q, cache, idx, SM_SCALE, tiles=tiles)
                row.update(compare(out[:64], ref))
                ms = do_bench(functools.partial(sparse_mla, q, cache, idx, SM_SCALE, tiles=tiles))
                row["us"] = round(ms * 1e3, 1)
                row["tflops"] = round(flops(t, 128, 2048) / (ms * 1e-3) / 1e12, 1)
            except Exception as exc:
                row["error"] = f"{type(exc).__name__}: {str(exc)[:500]}"
            results.append(row)
            print(json.dumps(row), flush=True)


def _compile_tiles(heads: int, topk: int, splits: int, bi: int, ns: int, th: int, bh: int) -> dict:
    from dsv_cuda.tilelang.sparse_mla_kernel import KernelKey, compiled

    t0 = time.time()
    key = KernelKey(heads, R, DR, topk, splits, SM_SCALE, "bfloat16", bh, bi, ns, th)
    name = f"bi{bi}-ns{ns}-th{th}-bh{bh}"
    try:
        compiled(key)
        return {"compile": name, "s": round(time.time() - t0, 1), "ok": True}
    except Exception:
        return {"compile": name, "ok": False, "error": traceback.format_exc()[-1200:]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--no-bench", action="store_true", help="correctness checks only")
    ap.add_argument("--triton", action="store_true", help="also time dsv's Triton kernel on decode shapes")
    ap.add_argument("--sweep", action="store_true", help="only time tile configurations and profile splits")
    ap.add_argument(
        "--precompile", action="store_true", help="compile the kernels in parallel processes first"
    )
    args = ap.parse_args()
    results: list[dict] = [{"device": torch.cuda.get_device_name(), "torch": torch.__version__}]
    if args.sweep:
        sweep(results)
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"results": results}, f, indent=1)
        return 0
    if args.precompile:
        precompile(results)
    ok = correctness(results)
    ok = big_cache(results) and ok
    if not args.no_bench:
        ok = bench(results, args.triton) and ok
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"ok": ok, "results": results}, f, indent=1)
    print("ALL OK" if ok else "FAILURES", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
