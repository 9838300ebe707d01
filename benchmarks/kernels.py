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

import sys
from pathlib import Path

# benchmarks/ is no package: put this folder on sys.path so that kernelbench/ beside this script imports however the
# script is started (python benchmarks/kernels.py, runpy, importlib).
HERE = str(Path(__file__).resolve().parent)
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from kernelbench.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
