"""Runs each dsv kernel of issue #7's target cases once inside a CUDA profiler range, for Nsight Compute.

Every implementation is called once to compile and warm up, then once more between
``cudaProfilerStart``/``cudaProfilerStop``; the torch reference is left out. Run it under ncu:

    ncu --profile-from-start off --section SpeedOfLight --section MemoryWorkloadAnalysis \\
        --section Occupancy --section LaunchStats --section WarpStateStats --csv --page details \\
        python3 benchmarks/ncu_targets.py > ncu.csv

It prints, in order, the case and implementation of every profiled range, so that the kernels in ncu's
report (named by their own kernel names) can be matched with what launched them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

HERE = str(Path(__file__).resolve().parent)
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from kernelbench.suite import plan  # noqa: E402
from kernelbench.table import implementations, kernel_table  # noqa: E402

#: (family, case name) of the sizes issue #7 sets targets for.
TARGETS = (
    ("sparse_mla_decode_bf16", "B64"),
    ("sparse_mla_decode_fp8", "B64"),
    ("indexer_decode", "B64 ctx128K"),
    ("sparse_mla_prefill", "T16384"),
    ("fused_moe", "T4096 (32768 rows)"),
)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="comma-separated substrings of family names")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("ncu_targets.py needs a CUDA GPU")
        return 2
    only = [s for s in args.only.split(",") if s]
    wanted = [t for t in TARGETS if not only or any(s in t[0] for s in only)]
    cases = [c for c in plan(False, False) if (c.family, c.name) in wanted]
    table = kernel_table("cuda", None)
    for case in cases:
        inputs = case.setup("cuda")
        impls, skipped = implementations(case, table)
        for name, fn in impls:
            if name == "torch":
                continue
            try:
                fn(*inputs)
                torch.cuda.synchronize()
                torch.cuda.profiler.start()
                fn(*inputs)
                torch.cuda.synchronize()
                torch.cuda.profiler.stop()
                print(f"profiled: {case.family} {case.name} {name}", flush=True)
            except Exception as exc:  # report and go on: one kernel failing must not hide the others
                print(
                    f"failed: {case.family} {case.name} {name}: {type(exc).__name__}: {exc}"[:500], flush=True
                )
        for name, why in skipped.items():
            print(f"skipped: {case.family} {case.name} {name}: {why}"[:300], flush=True)
        del inputs
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
