"""GPU benchmark of every available dsv-cuda kernel against the plain-torch reference at DeepSeek-V3.2 sizes.

The command line of benchmarks/kernels.py (whose docstring describes the run): flags, the case loop, the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import torch

from .cases_moe import moe_sweep_cases, release_moe
from .report import print_row, write_json
from .runner import Options, run_case
from .suite import plan, sweep_cases
from .table import kernel_table


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
    cases = plan(args.quick, args.smoke) + (sweep_cases() + moe_sweep_cases() if args.sweep else [])
    cases = [c for c in cases if not only or any(s in f"{c.family} {c.name}" for s in only)]
    opts = Options(rep, args.graphs, args.profile)
    rows: list[dict[str, Any]] = []
    start = time.perf_counter()
    for i, case in enumerate(cases):
        if time.perf_counter() - start > budget:
            rows.append({"family": case.family, "case": case.name, "x": case.x, "op": case.op,
                         "failed": f"not run: time budget of {budget:.0f} s spent"})  # fmt: skip
            print_row(rows[-1])
            continue
        row = run_case(case, table, dev, opts)
        row["elapsed_s"] = time.perf_counter() - start
        rows.append(row)
        print_row(row)
        release_moe(case, cases[i + 1] if i + 1 < len(cases) else None)
        if args.out:  # written after every case: a run killed at its time limit still leaves its results
            write_json(args.out, env, kernels, rows)
    print(f"total {time.perf_counter() - start:.1f} s", flush=True)
    failed = sum("failed" in r or any("failed" in v for v in r.get("results", {}).values()) for r in rows)
    print(f"{len(rows)} cases, {failed} with a failure", flush=True)
    return 0
