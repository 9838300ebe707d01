#!/usr/bin/env python3
"""Check dsv's TileLang fused MoE on the GPU against the torch reference and dsv's Triton kernel, then time it.

    python backends/cuda/scripts/tilelang_moe_check.py [--out result.json] [--sizes 2048,4096,8192]
        [--configs m128n128g64s4t256,m128n256g64s4t256-pg,...] [--no-bench] [--budget-s 240] [--profile]

A config names the tiles (``plan.Tiles``): m<block_m>n<block_n>g<gate_up_block_n>s<stages>t<threads>, then
``-pg`` / ``-pd`` for the persistent schedule of the gate/up / down GEMM. ``--profile`` only runs the default
and each config once inside a CUDA profiler range, for ``ncu --profile-from-start off``.

Steps (each one recorded in the JSON, which is rewritten after every step, so a run cut short keeps its
results):

1. compile: every grouped GEMM the later steps need, in parallel threads (errors per kernel key).
2. small: ``dsv_cuda.tilelang_moe.fused_moe`` vs ``dsv.ops.moe.fused_moe`` at small shapes (the conformance
   suite's, an expert with no token, several tiles per expert, fp32 and bf16 x, ue8m0 and amax scales), and
   each grouped GEMM alone vs :func:`dsv_cuda.tilelang_moe.moe.emulate_gemm`. Tolerance: max |out - ref| <=
   2e-2 max |ref| (the Triton kernel's bf16 bound in tests/test_triton_linear_moe.py) for bf16 and fp32 x: the
   wgmma accumulates the four 32-deep FP8 products of a 128-wide K step in the tensor core's reduced precision
   before the fp32 promotion (DeepGEMM's numerics), and a product that moves an e4m3 requantization of h by
   one step (2^-3 of that element) moves the output by up to ~1% of its scale. Triton's FP8 dot promotes
   after every 32-deep product and meets 2e-3 for fp32 x; the GEMMs alone meet 2e-3 against the emulation.
3. large: DeepSeek-V3.2's routed experts (E = 256, top-8, hidden 7168, inter 2048, random e4m3 weights with
   128x128 scales, ue8m0 activation scales as benchmarks/kernelbench/cases_moe.py makes them) at T tokens
   (--sizes; T x 8 routed rows): each tile config vs dsv's Triton fused_moe (same tolerance as bf16 above),
   the first size also vs the reference.
4. bench: triton.testing.do_bench medians of dsv's Triton fused_moe and of each TileLang config, the whole op
   and the two grouped GEMMs alone, as useful TFLOPS (2 x rows x 3 x inter x hidden; padding rows not counted).

Exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import sys
import time
import traceback
from typing import Any

import torch
from dsv_cuda.tilelang_moe import moe as tl_moe
from dsv_cuda.tilelang_moe.plan import Tiles, flops, tiles_for

from dsv.ops.moe import ExpertWeights
from dsv.ops.moe import fused_moe as reference
from dsv.ops.quant import weight_quant

DEV = torch.device("cuda")
SMS = torch.cuda.get_device_properties(DEV).multi_processor_count if torch.cuda.is_available() else 132
TOL = {torch.float32: 2e-2, torch.bfloat16: 2e-2}
E, TOPK, HIDDEN, INTER = 256, 8, 7168, 2048
#: (tokens, experts, top_k, hidden, inter, x dtype, act scale format, experts left without tokens)
SMALL = [
    (33, 16, 4, 512, 256, torch.bfloat16, "ue8m0", 0),  # the conformance suite's quick case
    (1, 16, 4, 512, 256, torch.bfloat16, "ue8m0", 0),
    (9, 8, 2, 256, 128, torch.bfloat16, None, 0),
    (300, 4, 2, 256, 128, torch.float32, None, 1),  # ~200 rows per used expert: several tiles each
    (77, 8, 2, 512, 256, torch.float32, "ue8m0", 3),
]
CONFIG_RE = re.compile(r"m(\d+)n(\d+)g(\d+)s(\d+)t(\d+)(-pg)?(-pd)?")


def parse_config(text: str) -> Tiles:
    m = CONFIG_RE.fullmatch(text)
    if not m:
        raise SystemExit(
            f"bad config {text!r}: use m<block_m>n<block_n>g<gate_up_block_n>s<stages>t<threads>[-pg][-pd] "
            "(-pg / -pd: the persistent schedule for the gate/up / down GEMM)"
        )
    bm, bn, g, s, t = (int(v) for v in m.groups()[:5])
    gate_up, down = ("persistent" if m.group(i) else "auto" for i in (6, 7))
    return Tiles(
        block_m=bm, block_n=bn, gate_up_block_n=g, num_stages=s, threads=t, gate_up_schedule=gate_up,
        down_schedule=down,
    )  # fmt: skip


def config_name(t: Tiles) -> str:
    suffix = ("-pg" if t.gate_up_schedule == "persistent" else "") + (
        "-pd" if t.down_schedule == "persistent" else ""
    )
    return f"m{t.block_m}n{t.block_n}g{t.gate_up_block_n}s{t.num_stages}t{t.threads}{suffix}"


def make_experts(e: int, d: int, inter: int, fmt: str | None, seed: int, exact: bool) -> ExpertWeights:
    """FP8 experts: ``exact`` quantizes random fp32 weights with weight_quant (small shapes, as the tests do);
    otherwise random e4m3 values and scales made directly on the GPU (the V3.2 shape, as cases_moe does)."""
    g = torch.Generator(device=DEV if not exact else "cpu").manual_seed(seed)
    mats, scales = [], []
    for o, i in ((inter, d), (inter, d), (d, inter)):
        if exact:
            w = torch.randn(e, o, i, generator=g) * i**-0.5
            pairs = [weight_quant(w[j]) for j in range(e)]
            mats.append(torch.stack([p[0] for p in pairs]).to(DEV))
            scales.append(torch.stack([p[1] for p in pairs]).to(DEV))
        else:
            w = torch.empty(e, o, i, dtype=torch.float8_e4m3fn, device=DEV)
            for j in range(0, e, 32):  # 32 experts at a time keeps the fp32 temporary near 2 GB
                w[j : j + 32] = (torch.randn(min(32, e - j), o, i, generator=g, device=DEV) * 0.05).to(
                    w.dtype
                )
            mats.append(w)
            scales.append(torch.rand(e, o // 128, i // 128, generator=g, device=DEV) * 1e-2 + 1e-3)
    return ExpertWeights(*mats, *scales, (128, 128), fmt)


def routing(t: int, e: int, top_k: int, seed: int, unused: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct random experts per token (the last ``unused`` experts never chosen) and routing weights."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    ids = torch.rand(t, e - unused, generator=g, device=DEV).topk(top_k, dim=1).indices
    return torch.rand(t, top_k, generator=g, device=DEV), ids


def large_tokens(t: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(routing weights, expert ids, bf16 x [t, HIDDEN]) of the large cases' ``t`` tokens, seeded by ``t``."""
    w, ids = routing(t, E, TOPK, 300 + t)
    x = torch.randn(t, HIDDEN, generator=torch.Generator(device=DEV).manual_seed(t), device=DEV)
    return w, ids, x.to(torch.bfloat16)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(max |out - ref| / max |ref|, mean |out - ref| / mean |ref|)."""
    d = (out.float() - ref.float()).abs()
    r = ref.float().abs()
    return float(d.max() / r.max().clamp_min(1e-30)), float(d.mean() / r.mean().clamp_min(1e-30))


def bench_ms(fn: Any, rep: int = 40) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=5, rep=rep, return_mode="median"))


class Recorder:
    def __init__(self, path: str | None) -> None:
        self.path = path
        self.data: dict[str, Any] = {"steps": {}}
        self.ok = True

    def put(self, step: str, value: Any) -> None:
        self.data["steps"].setdefault(step, []).append(value)
        print(step, json.dumps(value, default=str), flush=True)
        if self.path:
            with open(self.path, "w") as f:
                json.dump(self.data, f, indent=1, default=str)

    def fail(self, step: str, what: str, exc: BaseException) -> None:
        self.ok = False
        self.put(
            step,
            {
                "what": what,
                "error": f"{type(exc).__name__}: {exc}"[:3000],
                "tb": traceback.format_exc()[-3000:],
            },
        )


def step_compile(rec: Recorder, configs: list[Tiles], small_tiles: list[Tiles]) -> None:
    from dsv_cuda.tilelang_moe.kernel import precompile
    from dsv_cuda.tilelang_moe.plan import gemm_key

    keys = []
    for tiles in configs:
        keys += [
            gemm_key(INTER, HIDDEN, True, "bfloat16", tiles, SMS),
            gemm_key(HIDDEN, INTER, False, "bfloat16", tiles, SMS),
        ]
    for tiles in small_tiles:
        for _, _, _, d, inter, dtype, _, _ in SMALL:
            out = tl_moe.OUT_DTYPES[dtype]
            keys += [gemm_key(inter, d, True, out, tiles, SMS), gemm_key(d, inter, False, out, tiles, SMS)]
    keys = list(dict.fromkeys(keys))
    t0 = time.perf_counter()
    errors = precompile(keys, workers=12)
    rec.put("compile", {"kernels": len(keys), "seconds": round(time.perf_counter() - t0, 1)})
    for key, err in errors.items():
        if err:
            rec.ok = False
            rec.put("compile", {"key": str(key), "error": err[:3000]})


def step_small(rec: Recorder, small_tiles: list[Tiles]) -> None:
    from dsv.kernels.triton.fused_moe import fused_moe as triton_moe

    for i, (t, e, k, d, inter, dtype, fmt, unused) in enumerate(SMALL):
        ex = make_experts(e, d, inter, fmt, 100 + i, exact=True)
        w, ids = routing(t, e, k, 200 + i, unused)
        x = torch.randn(t, d, generator=torch.Generator(device=DEV).manual_seed(i), device=DEV).to(dtype)
        ref = reference(x, w, ids, ex)
        triton_mx = rel_err(triton_moe(x, w, ids, ex), ref)[0]
        for tiles in small_tiles:
            what = f"T{t} E{e} top{k} D{d} I{inter} {str(dtype)[6:]} {fmt} {config_name(tiles)}"
            try:
                out = tl_moe.fused_moe(x, w, ids, ex, tiles=tiles)
                emu = tl_moe.fused_moe(x, w, ids, ex, tiles=tiles, gemm=_checked_gemm(rec, what))
                mx, mean = rel_err(out, ref)
                emx, _ = rel_err(emu, ref)
                ok = out.dtype == dtype and mx <= TOL[dtype] and not bool(torch.isnan(out).any())
                rec.ok &= ok
                rec.put(
                    "small",
                    {"case": what, "ok": ok, "max_rel": mx, "mean_rel": mean, "triton_max_rel": triton_mx,
                     "emulated_max_rel": emx},
                )  # fmt: skip
            except Exception as exc:
                rec.fail("small", what, exc)


def _checked_gemm(rec: Recorder, what: str) -> Any:
    """A gemm launcher that runs the TileLang kernel and the torch emulation on the same inputs, records their
    difference (relative to the emulation's max) and returns the emulation's output."""

    def run(key: Any, *args: torch.Tensor) -> None:
        tl_moe._run_kernel(key, *args)
        got = args[-1].clone()
        tl_moe.emulate_gemm(key, *args)
        want = args[-1]
        mx, _ = rel_err(got, want)
        tol = 2e-3 if key.out_dtype == "float32" else 1e-2
        ok = mx <= tol and not bool(torch.isnan(got).any())
        rec.ok &= ok
        rec.put("gemm", {"case": what, "swiglu": key.swiglu, "ok": ok, "max_rel": mx})

    return run


def step_large(rec: Recorder, sizes: list[int], configs: list[Tiles], bench: bool, deadline: float) -> None:
    from dsv.kernels.triton.fused_moe import fused_moe as triton_moe

    ex = make_experts(E, HIDDEN, INTER, "ue8m0", 7, exact=False)
    for n, t in enumerate(sizes):
        if time.perf_counter() > deadline:
            rec.put("large", {"T": t, "skipped": "time budget spent"})
            continue
        w, ids, x = large_tokens(t)
        rows = t * TOPK
        fl = flops(rows, INTER, HIDDEN)
        base = triton_moe(x, w, ids, ex)
        ref = reference(x, w, ids, ex) if n == 0 else None
        entry: dict[str, Any] = {"T": t, "rows": rows}
        if bench:
            ms = bench_ms(functools.partial(triton_moe, x, w, ids, ex))
            entry["triton"] = {"ms": ms, "tflops": fl / ms / 1e9}
        if ref is not None:
            entry["triton_vs_ref_max_rel"] = rel_err(base, ref)[0]
        for tiles in [None, *configs]:
            name = "default" if tiles is None else config_name(tiles)
            if tiles is not None and tiles == tiles_for(rows, HIDDEN):
                continue  # the default already
            try:
                out = tl_moe.fused_moe(x, w, ids, ex, tiles=tiles)
                mx, mean = rel_err(out, base)
                ok = mx <= TOL[torch.bfloat16] and not bool(torch.isnan(out).any())
                res: dict[str, Any] = {"vs_triton_max_rel": mx, "vs_triton_mean_rel": mean, "ok": ok}
                if ref is not None:
                    res["vs_ref_max_rel"] = rel_err(out, ref)[0]
                    ok &= res["vs_ref_max_rel"] <= TOL[torch.bfloat16]
                    res["ok"] = ok
                rec.ok &= ok
                if bench and time.perf_counter() < deadline:
                    ms = bench_ms(functools.partial(tl_moe.fused_moe, x, w, ids, ex, tiles=tiles))
                    res.update(ms=ms, tflops=fl / ms / 1e9)
                    res.update(_gemm_times(x, w, ids, ex, tiles or tiles_for(rows, HIDDEN), fl))
                entry[name] = res
            except Exception as exc:
                rec.fail("large", f"T{t} {name}", exc)
        rec.put("large", entry)
        del base, ref
        torch.cuda.empty_cache()


def _gemm_times(
    x: torch.Tensor, w: torch.Tensor, ids: torch.Tensor, ex: ExpertWeights, tiles: Tiles, fl: int
) -> dict:
    """The two grouped GEMMs alone (inputs prepared once), and the padding overhead of the layout."""
    launches: list[tuple] = []

    def record(key: Any, *args: torch.Tensor) -> None:
        tl_moe._run_kernel(key, *args)
        launches.append((key, args))

    tl_moe.fused_moe(x, w, ids, ex, tiles=tiles, gemm=record)
    (k1, a1), (k2, a2) = launches
    ms1 = bench_ms(lambda: tl_moe._run_kernel(k1, *a1))
    ms2 = bench_ms(lambda: tl_moe._run_kernel(k2, *a2))
    used = int((a1[6][0] >= 0).sum()) * tiles.block_m
    rows = ids.numel()
    return {
        "gate_up_ms": ms1,
        "down_ms": ms2,
        "gemms_tflops": fl / (ms1 + ms2) / 1e9,
        "gate_up_tflops": fl * 2 / 3 / ms1 / 1e9,
        "down_tflops": fl / 3 / ms2 / 1e9,
        "padded_rows_used": used,
        "padding_overhead": used / rows - 1,
    }


def step_profile(rec: Recorder, t: int, configs: list[Tiles]) -> None:
    """One warm call of the default tiles and of each config inside cudaProfilerStart/Stop, in that order."""
    ex = make_experts(E, HIDDEN, INTER, "ue8m0", 7, exact=False)
    w, ids, x = large_tokens(t)
    for tiles in [None, *configs]:
        tl_moe.fused_moe(x, w, ids, ex, tiles=tiles)
        torch.cuda.synchronize()
        torch.cuda.profiler.start()
        tl_moe.fused_moe(x, w, ids, ex, tiles=tiles)
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
        rec.put("profile", {"T": t, "config": "default" if tiles is None else config_name(tiles)})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--sizes", default="2048,4096,8192", help="token counts of the large cases (x 8 rows)")
    ap.add_argument(
        "--configs",
        default="m64n256g128s4t256,m128n256g128s4t256,m128n128g64s4t256",
        help="tile configs of the large cases, besides the default: "
        "m<block_m>n<block_n>g<gate_up>s<stages>t<threads>[-pg][-pd] (-pg/-pd: persistent gate/up / down GEMM)",
    )
    ap.add_argument(
        "--small-configs",
        default="",
        help="tile configs of the small cases (default: the default tiles and m128n128g64s3t256-pg-pd)",
    )
    ap.add_argument("--no-bench", action="store_true", help="correctness only")
    ap.add_argument(
        "--profile",
        action="store_true",
        help="only run the default and each config once at the first size inside a CUDA profiler range (for "
        "ncu --profile-from-start off), no checks",
    )
    ap.add_argument("--no-small", action="store_true", help="skip the small reference cases")
    ap.add_argument("--budget-s", type=float, default=240.0, help="skip timing and sizes after this long")
    args = ap.parse_args()
    start = time.perf_counter()
    rec = Recorder(args.out)
    import tilelang

    rec.put(
        "env",
        {"torch": torch.__version__, "tilelang": tilelang.__version__, "gpu": torch.cuda.get_device_name()},
    )
    configs = [parse_config(c) for c in args.configs.split(",") if c]
    small_tiles = [parse_config(c) for c in args.small_configs.split(",") if c] or [
        tiles_for(1, 256),
        parse_config("m128n128g64s3t256-pg-pd"),  # the persistent program, odd K-step counts included
    ]
    sizes = [int(s) for s in args.sizes.split(",") if s]
    try:
        step_compile(
            rec,
            [*configs, *{tiles_for(t * TOPK, HIDDEN) for t in sizes}],
            [] if args.no_small else small_tiles,
        )
    except Exception as exc:
        rec.fail("compile", "precompile", exc)
    if args.profile:
        step_profile(rec, sizes[0], configs)
        return 0
    if not args.no_small:
        step_small(rec, small_tiles)
    try:
        step_large(rec, sizes, configs, not args.no_bench, start + args.budget_s)
    except Exception as exc:
        rec.fail("large", "setup", exc)
    rec.put("done", {"ok": rec.ok, "seconds": round(time.perf_counter() - start, 1)})
    return 0 if rec.ok else 1


if __name__ == "__main__":
    sys.exit(main())
