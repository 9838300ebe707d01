#!/usr/bin/env python3
"""A/B timing of dsv's TileLang grouped GEMMs on one fused-MoE layout, the variants alternating in one process.

    python backends/cuda/scripts/tilelang_moe_ab.py [--tokens 8192] [--rounds 5] [--out ab.json]

Separate runs of tilelang_moe_check.py on fresh leases of the H200 differed by up to 15% for the same
kernel, so kernel variants are compared here round by round on the same inputs. Variants (each one the
gate/up and the down GEMM of V3.2's routed experts, 256 x top-8, hidden 7168, inter 2048):

* ``auto``: both GEMMs with TileLang's automatic pipeline, 128 x 256 tiles (the default from 24K to 48K rows);
* ``persistent``: both with :mod:`dsv_cuda.tilelang_moe.persistent_kernel` (128 x 128 tiles);
* ``default``: :func:`dsv_cuda.tilelang_moe.plan.tiles_for` the row count.

Each round times every variant's two GEMMs and the whole op (``triton.testing.do_bench`` medians) and reads the SM clock,
power and temperature from nvidia-smi. The JSON keeps every round and, per variant, the median over rounds
of the useful TFLOPS (padding rows not counted). The outputs of every variant are compared with ``auto``'s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tilelang_moe_check as check  # noqa: E402
from dsv_cuda.tilelang_moe import moe as tl_moe  # noqa: E402
from dsv_cuda.tilelang_moe.plan import Tiles, flops, gemm_key, tiles_for  # noqa: E402

#: Every variant has 128-row tiles, so all of them run on one layout.
AUTO = Tiles(block_m=128, block_n=256, gate_up_block_n=128, num_stages=4, threads=256)
PERSISTENT = Tiles(block_m=128, block_n=128, gate_up_block_n=64, num_stages=4, threads=256,
                   gate_up_schedule="persistent", down_schedule="persistent")  # fmt: skip


def gpu_state() -> str:
    q = "clocks.sm,power.draw,temperature.gpu,clocks_event_reasons.active"
    try:
        res = subprocess.run(
            ["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"], capture_output=True, text=True
        )
        return res.stdout.strip()
    except OSError as exc:
        return f"nvidia-smi: {exc}"


def compile_pair(tiles: Tiles) -> tuple[Any, Any, Tiles]:
    """(gate/up kernel, down kernel, tiles) of ``tiles``."""
    from dsv_cuda.tilelang_moe.kernel import compiled

    gate_up = gemm_key(check.INTER, check.HIDDEN, True, "bfloat16", tiles, check.SMS)
    down = gemm_key(check.HIDDEN, check.INTER, False, "bfloat16", tiles, check.SMS)
    return compiled(gate_up), compiled(down), tiles


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8192, help="tokens (x 8 routed rows)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()
    t = args.tokens
    rows = t * check.TOPK
    fl = flops(rows, check.INTER, check.HIDDEN)
    if tiles_for(rows, check.HIDDEN).block_m != 128:
        raise SystemExit(f"{rows} routed rows take 64-row tiles by default: use --tokens 3072 or more")
    variants = {
        "auto": compile_pair(AUTO),
        "persistent": compile_pair(PERSISTENT),
        "default": compile_pair(tiles_for(rows, check.HIDDEN)),
    }
    # Inputs of both GEMMs, captured once from the op (every variant uses block_m 128: the same layout).
    ex = check.make_experts(check.E, check.HIDDEN, check.INTER, "ue8m0", 7, exact=False)
    w, ids, x = check.large_tokens(t)
    launches: list[tuple] = []

    def record(key: Any, *a: torch.Tensor) -> None:
        tl_moe._run_kernel(key, *a)
        launches.append(a)

    tl_moe.fused_moe(x, w, ids, ex, tiles=AUTO, gemm=record)
    gu_args, dn_args = launches
    outputs = {}
    for name, (kgu, kdn, _) in variants.items():
        kgu(*gu_args)
        kdn(*dn_args)
        outputs[name] = (gu_args[-1].clone(), dn_args[-1].clone())
    result: dict[str, Any] = {"tokens": t, "rows": rows, "gpu": torch.cuda.get_device_name(), "rounds": []}
    result["max_rel_vs_auto"] = {
        name: [check.rel_err(o, r)[0] for o, r in zip(out, outputs["auto"])] for name, out in outputs.items()
    }
    print("max rel vs auto (gate/up, down):", json.dumps(result["max_rel_vs_auto"]), flush=True)
    for r in range(args.rounds):
        entry: dict[str, Any] = {"gpu_before": gpu_state()}
        for name, (kgu, kdn, tiles) in variants.items():
            ms_gu = check.bench_ms(lambda k=kgu: k(*gu_args))
            ms_dn = check.bench_ms(lambda k=kdn: k(*dn_args))
            ms_op = check.bench_ms(lambda t=tiles: tl_moe.fused_moe(x, w, ids, ex, tiles=t))
            entry[name] = {
                "op_ms": ms_op,
                "op_tflops": fl / ms_op / 1e9,
                "gate_up_ms": ms_gu,
                "down_ms": ms_dn,
                "gate_up_tflops": fl * 2 / 3 / ms_gu / 1e9,
                "down_tflops": fl / 3 / ms_dn / 1e9,
                "gemms_tflops": fl / (ms_gu + ms_dn) / 1e9,
            }
        entry["gpu_after"] = gpu_state()
        result["rounds"].append(entry)
        print(f"round {r}", json.dumps(entry), flush=True)
    result["median"] = {
        name: {
            k: statistics.median(e[name][k] for e in result["rounds"])
            for k in ("op_tflops", "gate_up_tflops", "down_tflops", "gemms_tflops")
        }
        for name in variants
    }
    print("median", json.dumps(result["median"]), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
