#!/usr/bin/env python3
"""Check dsv's TileLang sparse MLA kernels against the torch reference on the GPU, then time them.

    python backends/cuda/scripts/tilelang_check.py [--out result.json] [--no-bench] [--triton]
        [--variants simple,ws] [--precompile] [--quick] [--fp8-only]

Correctness: ``dsv_cuda.tilelang.sparse_mla`` vs ``dsv.ops.attention.sparse_mla`` (fp32 math on the same bf16
inputs) at several shapes, for each kernel variant (``--variants``; default both: "simple" and the
warp-specialized "ws"): 16/64/128 heads, top-k 2048 and top-k not a multiple of the 64-row
block, an odd number of 64-row blocks (per split too), -1 entries scattered through rows, rows with no valid
index (must give 0), forced split-KV, the first rows of the large prefill runs, a cache past 2^31 elements
(64-bit row offsets), and (with "ws") FlashMLA's FP8 cache rows, which the ws producer dequantizes.
Tolerance: |out - ref| <= 2^-7 + 2^-7 |ref|. Why: the kernel takes bf16 inputs and accumulates in fp32 like
the reference, but it rounds the softmax probabilities to bf16 before the P @ V product (up to 2^-8 relative
of the averaged values) and rounds the output to bf16 (another 2^-8).

Speed: decode (one query per sequence) at batch 1/16/64/128 and prefill at 4K/16K query tokens, H = 128,
top-k 2048, bf16 KV, timed with triton.testing.do_bench for each variant (and the FP8 rows at decode B64 /
B128 and prefill 4K); prints µs and TFLOPS (4 * H * K * (R + Dr / 2) FLOPs per token: the QK^T product over
R + Dr and the PV product over R). ``--triton`` also times dsv's Triton kernel on the decode shapes for
comparison. Exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

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


def make_fp8_cache(slots: int, seed: int) -> MLACacheLayer:
    """A cache in FlashMLA's FP8 layout (656-byte rows, read back as bf16), every slot written."""
    page = 64
    cache = MLACacheLayer((slots + page - 1) // page, page, R, DR, "fp8", torch.bfloat16, DEV)
    g = torch.Generator(device=DEV).manual_seed(seed)
    step = 65536
    for s in range(0, cache.flat.shape[0], step):
        n = min(step, cache.flat.shape[0] - s)
        latent = torch.randn(n, R, generator=g, device=DEV)
        rope = torch.randn(n, DR, generator=g, device=DEV)
        cache.write(torch.arange(s, s + n, device=DEV), latent, rope)
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


def _compile_one(
    heads: int, topk: int, splits: int, variant: str, kv_format: str = "half"
) -> tuple[str, float, str]:
    from dsv_cuda.tilelang.sparse_mla import DEFAULT_TILES, Plan, kernel_key
    from dsv_cuda.tilelang.sparse_mla_kernel import compiled

    t0 = time.time()
    plan = Plan(heads, topk, splits, variant)
    key = kernel_key(plan, DEFAULT_TILES, R, DR, SM_SCALE, "bfloat16", 0, kv_format)
    try:
        compiled(key)
        err = ""
    except Exception:
        err = traceback.format_exc()[-3000:]
    return f"{variant}-{kv_format}-h{heads}-k{topk}-s{splits}", round(time.time() - t0, 1), err


def precompile(results: list[dict], variants: list[str]) -> None:
    """Compile the kernels used below in parallel processes: they fill TileLang's disk cache, so the checks
    then load them instead of compiling one after another."""
    import multiprocessing as mp

    from dsv_cuda.tilelang.sparse_mla import plan

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    shapes = [(t, h, k, s) for _, t, h, k, _, _, _, s in CASES] + [(t, 128, 2048, None) for _, t in BENCH]
    plans = {plan(t, h, k, sms, s, variant=v) for t, h, k, s in shapes for v in variants}
    jobs = sorted({(p.heads, p.topk, p.splits, p.variant, "half") for p in plans})
    if "ws" in variants:
        fp8_shapes = [(t, h, k, s) for _, t, h, k, _, _, _, s in FP8_CASES] + [
            (t, 128, 2048, None) for _, t in FP8_BENCH
        ]
        fp8_plans = {plan(t, h, k, sms, s, variant="ws") for t, h, k, s in fp8_shapes}
        jobs += sorted({(p.heads, p.topk, p.splits, "ws", "fp8") for p in fp8_plans})
    t0 = time.time()
    with mp.get_context("spawn").Pool(min(len(jobs), 16)) as pool:
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
    # 3 blocks of 64 in one split, and 3 per split with 4 splits: odd block counts.
    ("decode-b2-h128-k192-odd", 2, 128, 192, 4096, 0.2, 0, None),
    ("decode-b2-h128-k768-split4-odd", 2, 128, 768, 4096, 0.1, 1, 4),
]
BENCH = [("decode", b) for b in (1, 16, 64, 128)] + [("prefill", 4096), ("prefill", 16384)]
# FlashMLA's FP8 rows, read by the "ws" variant only (same fields as CASES).
FP8_CASES = [
    ("fp8-decode-b4-h128-k2048", 4, 128, 2048, 8192, 0.0, 0, None),
    ("fp8-decode-b2-h128-k2048-split4", 2, 128, 2048, 8192, 0.1, 0, 4),
    ("fp8-decode-b8-h64-k2048-invalid", 8, 64, 2048, 8192, 0.3, 2, None),
    ("fp8-prefill-t256-h128-k1000", 256, 128, 1000, 16384, 0.05, 3, None),
]
FP8_BENCH = [("decode", 64), ("decode", 128), ("prefill", 4096)]


def _tiles(variant: str):
    from dsv_cuda.tilelang.sparse_mla import Tiles

    return Tiles(variant=variant)


def correctness(results: list[dict], variants: list[str], cases: int | None = None) -> bool:
    """Each case of :data:`CASES` (the first ``cases`` of them) with each variant against the reference."""
    from dsv_cuda.tilelang.sparse_mla import sparse_mla

    ok = True
    for i, (name, t, h, k, slots, inv, empty, splits) in enumerate(CASES[:cases]):
        cache = make_cache(slots, 10 + i)
        q = make_q(t, h, 20 + i)
        idx = make_indices(t, k, slots, 30 + i, inv, empty)
        ref = reference(q, cache, idx, SM_SCALE)
        for variant in variants:
            row = {"check": name, "variant": variant}
            try:
                out = sparse_mla(q, cache, idx, SM_SCALE, splits=splits, tiles=_tiles(variant))
                row.update(compare(out, ref))
                if empty:
                    row["empty_rows_zero"] = bool((out[-empty:] == 0).all())
                    row["ok"] = row["ok"] and row["empty_rows_zero"]
            except Exception as exc:
                row.update(
                    ok=False, error=f"{type(exc).__name__}: {exc}", trace=traceback.format_exc()[-2000:]
                )
            ok = ok and row["ok"]
            results.append(row)
            print(json.dumps(row), flush=True)
    return ok


def big_cache(results: list[dict], variants: list[str]) -> bool:
    """A cache past 2^31 elements (64-bit row offsets): indices near its end, checked and timed at B64."""
    from dsv_cuda.tilelang.sparse_mla import sparse_mla
    from triton.testing import do_bench

    ok = True
    try:
        slots = 2**31 // (R + DR) + 131072
        cache = make_cache(slots, 7)
        q = make_q(64, 128, 8)
        idx = make_indices(64, 2048, 131072, 9) + (slots - 131072)  # every index past the int32 limit
        idx[:, :64] = make_indices(64, 64, 4096, 10)  # and a few near the start
        ref = reference(q, cache, idx, SM_SCALE)
    except Exception as exc:
        row = {"check": "big-cache-int64", "ok": False, "error": f"{type(exc).__name__}: {exc}"}
        results.append(row)
        print(json.dumps(row), flush=True)
        return False
    for variant in variants:
        row: dict = {"check": "big-cache-int64", "variant": variant, "cache_elements": cache.flat.numel()}
        try:
            run = functools.partial(sparse_mla, q, cache, idx, SM_SCALE, tiles=_tiles(variant))
            row.update(compare(run(), ref))
            ms = do_bench(run, warmup=25, rep=100)
            row["us"] = round(ms * 1e3, 1)
        except Exception as exc:
            row.update(ok=False, error=f"{type(exc).__name__}: {exc}", trace=traceback.format_exc()[-2000:])
        ok = ok and row["ok"]
        results.append(row)
        print(json.dumps(row), flush=True)
    torch.cuda.empty_cache()
    return ok


def fp8(results: list[dict], with_bench: bool) -> bool:
    """The "ws" variant on FlashMLA's FP8 cache rows: checks against the reference (which dequantizes the
    same rows to bf16), then decode B64 / B128 and prefill 4K timings."""
    from dsv_cuda.tilelang.sparse_mla import sparse_mla
    from triton.testing import do_bench

    ok = True
    tiles = _tiles("ws")
    for i, (name, t, h, k, slots, inv, empty, splits) in enumerate(FP8_CASES):
        row: dict = {"check": name, "variant": "ws-fp8"}
        try:
            cache = make_fp8_cache(slots, 40 + i)
            q = make_q(t, h, 50 + i)
            idx = make_indices(t, k, slots, 60 + i, inv, empty)
            out = sparse_mla(q, cache, idx, SM_SCALE, splits=splits, tiles=tiles)
            row.update(compare(out, reference(q, cache, idx, SM_SCALE)))
            if empty:
                row["empty_rows_zero"] = bool((out[-empty:] == 0).all())
                row["ok"] = row["ok"] and row["empty_rows_zero"]
        except Exception as exc:
            row.update(ok=False, error=f"{type(exc).__name__}: {exc}", trace=traceback.format_exc()[-2000:])
        ok = ok and row["ok"]
        results.append(row)
        print(json.dumps(row), flush=True)
    if not with_bench:
        return ok
    for phase, t in FP8_BENCH:
        row = {"bench": f"{phase}-t{t}-h128-k2048", "variant": "ws-fp8"}
        try:
            slots = t * 4096 if phase == "decode" else 65536
            cache = make_fp8_cache(slots, 1)
            q = make_q(t, 128, 2)
            idx = make_indices(t, 2048, slots, 3)
            n = min(t, 64)
            run = functools.partial(sparse_mla, q, cache, idx, SM_SCALE, tiles=tiles)
            row.update(compare(run()[:n], reference(q[:n], cache, idx[:n], SM_SCALE)))
            ms = do_bench(run, warmup=25, rep=100)
            row["us"] = round(ms * 1e3, 1)
            row["tflops"] = round(flops(t, 128, 2048) / (ms * 1e-3) / 1e12, 1)
            if phase == "decode":
                row["graph_us"] = graph_us(run)[0]
        except Exception as exc:
            row.update(ok=False, error=f"{type(exc).__name__}: {exc}", trace=traceback.format_exc()[-2000:])
        torch.cuda.empty_cache()
        ok = ok and row.get("ok", False)
        results.append(row)
        print(json.dumps(row), flush=True)
    return ok


def graph_us(run: Callable[[], Any]) -> tuple[float, Any]:
    """Median µs of CUDA graph replays of ``run`` (triton do_bench; ``run`` already ran eagerly, so it is
    compiled) and the output the graph writes on every replay."""
    from triton.testing import do_bench

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    graph.replay()
    torch.cuda.synchronize()
    return round(do_bench(graph.replay, warmup=25, rep=100) * 1e3, 1), out


def flops(t: int, h: int, k: int) -> float:
    return 2.0 * t * h * k * (R + DR) + 2.0 * t * h * k * R


def bench_one(phase: str, t: int, h: int, k: int, with_triton: bool, variants: list[str]) -> list[dict]:
    """Time one shape with each variant; also compares its first (up to 64) rows with the reference."""
    from dsv_cuda.tilelang.sparse_mla import sparse_mla
    from triton.testing import do_bench

    # Decode: each sequence has its own 4096 cached tokens; prefill: one 64K-token sequence.
    slots = t * 4096 if phase == "decode" else 65536
    cache = make_cache(slots, 1)
    q = make_q(t, h, 2)
    idx = make_indices(t, k, slots, 3)
    n = min(t, 64)
    ref = reference(q[:n], cache, idx[:n], SM_SCALE)
    rows = []
    for variant in variants:
        row: dict = {"bench": f"{phase}-t{t}-h{h}-k{k}", "variant": variant}
        try:
            tiles = _tiles(variant)
            run = functools.partial(sparse_mla, q, cache, idx, SM_SCALE, tiles=tiles)
            t0 = time.time()
            out = run()
            torch.cuda.synchronize()
            row["first_call_s"] = round(time.time() - t0, 2)  # includes compilation
            row.update(compare(out[:n], ref))
            ms = do_bench(run, warmup=25, rep=100)
            row["us"] = round(ms * 1e3, 1)
            row["tflops"] = round(flops(t, h, k) / (ms * 1e-3) / 1e12, 1)
            if phase == "decode":
                # Decode runs inside CUDA graphs when serving: time a replay too (no host launch overhead).
                row["graph_us"], g_out = graph_us(run)
                row["graph_matches_eager"] = bool(torch.equal(g_out, out))
        except Exception as exc:
            row.update(ok=False, error=f"{type(exc).__name__}: {exc}", trace=traceback.format_exc()[-2000:])
        rows.append(row)
    if with_triton and phase == "decode":
        from dsv.kernels.triton.sparse_mla import sparse_mla as triton_mla

        triton_mla(q, cache, idx, SM_SCALE)
        us = round(do_bench(lambda: triton_mla(q, cache, idx, SM_SCALE)) * 1e3, 1)
        rows.append({"bench": f"{phase}-t{t}-h{h}-k{k}", "variant": "triton", "us": us, "ok": True})
    return rows


def bench(results: list[dict], with_triton: bool, variants: list[str]) -> bool:
    ok = True
    h, k = 128, 2048
    for phase, t in BENCH:
        try:
            rows = bench_one(phase, t, h, k, with_triton, variants)
        except Exception as exc:
            rows = [{"bench": f"{phase}-t{t}", "ok": False, "error": f"{type(exc).__name__}: {exc}"}]
            rows[0]["trace"] = traceback.format_exc()[-2000:]
        torch.cuda.empty_cache()
        for row in rows:
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
                tiles = Tiles(bi, ns, th, bh, "simple")
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
    ap.add_argument("--variants", default="simple,ws", help="kernel variants to check and time (simple,ws)")
    ap.add_argument(
        "--quick", action="store_true", help="only the first two checks (one without, one with splits)"
    )
    ap.add_argument(
        "--fp8-only",
        action="store_true",
        help="only the 'ws' variant on FP8 cache rows: checks, then timings",
    )
    ap.add_argument(
        "--ws-set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="set a build-time switch of the 'ws' program (e.g. FP8_PREFETCH_ROWS=0) for A/B timings",
    )
    args = ap.parse_args()
    for item in args.ws_set:
        from dsv_cuda.tilelang import sparse_mla_ws_kernel

        name, _, value = item.partition("=")
        if not hasattr(sparse_mla_ws_kernel, name):
            ap.error(f"sparse_mla_ws_kernel has no switch {name!r}")
        setattr(sparse_mla_ws_kernel, name, type(getattr(sparse_mla_ws_kernel, name))(json.loads(value)))
    variants = [v for v in args.variants.split(",") if v]
    results: list[dict] = [{"device": torch.cuda.get_device_name(), "torch": torch.__version__}]
    if args.sweep:
        sweep(results)
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"results": results}, f, indent=1)
        return 0
    if args.fp8_only:
        ok = fp8(results, not args.no_bench)
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"ok": ok, "results": results}, f, indent=1)
        print("ALL OK" if ok else "FAILURES", flush=True)
        return 0 if ok else 1
    if args.quick:
        ok = correctness(results, variants, cases=2)
        print("ALL OK" if ok else "FAILURES", flush=True)
        return 0 if ok else 1
    if args.precompile:
        precompile(results, variants)
    ok = correctness(results, variants)
    ok = big_cache(results, variants) and ok
    if not args.no_bench:
        ok = bench(results, args.triton, variants) and ok
    if "ws" in variants:
        ok = fp8(results, not args.no_bench) and ok
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"ok": ok, "results": results}, f, indent=1)
    print("ALL OK" if ok else "FAILURES", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
