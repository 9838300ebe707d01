#!/usr/bin/env bash
# One device call on the lent H200 for issue #7's figures: installs TileLang and dsv (no network there: carry
# .whl/tlz3.tar.xz from benchmarks/pack_tilelang.sh and .whl/base, one call; or .whl/tilelang and .whl/base with
# z3-solver already in /tmp/z3site from an earlier call of the same lease, see docs/benchmarks.md), then runs the steps in $STEPS (default all) with results in $OUT:
#   kernels  benchmarks/kernels.py (every family, JSON)        slice  slice_v32.py at 128K x B32, DSA vs dense
#   ncu      Nsight Compute on the target kernels (CSV)         indexer  kernels.py --only indexer
#   moe      the Triton fused-MoE tile sweep at 32K / 65K routed rows
#   tests    the Triton indexer / top-k tests compiled for the GPU (TRITON_INTERPRET=0)
#   sparse   kernels.py --only $SPARSE_ONLY (default sparse_mla: decode and prefill), $SPARSE_BUDGET s    tlcheck  tilelang_check.py $TL_ARGS (default --variants ws --quick)
#   conformance  the conformance ops tier for CONF_OPS (default: sparse MLA, indexer, fused MoE)
# PACK=1 puts every result into $OUT/all.tgz, refreshed after each step (a device call returns at most 8 files).
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
FINAL_OUT=$OUT
if [ -n "${PACK:-}" ]; then OUT=/tmp/res; mkdir -p "$OUT"; fi
# With PACK the archive is refreshed after every step, so a call cut short at its time limit still returns the
# steps that finished.
pack() { if [ -n "${PACK:-}" ]; then tar czf "$FINAL_OUT/all.tgz.tmp" -C "$OUT" . && mv "$FINAL_OUT/all.tgz.tmp" "$FINAL_OUT/all.tgz"; fi; }
export PYTHONUNBUFFERED=1 DSV_CACHE_DIR=/tmp/dsvc HF_HUB_OFFLINE=1
export LD_LIBRARY_PATH=/tmp/z3site/z3/lib:${LD_LIBRARY_PATH:-}
if [ -f .whl/tlz3.tar.xz ]; then
  # benchmarks/pack_tilelang.sh's archive: TileLang and z3 already installed, one call on a cold machine.
  tar -xJf .whl/tlz3.tar.xz -C /tmp > "$OUT/install.txt" 2>&1
else
  pip install -q --no-index --no-deps --no-compile --target /tmp/tl .whl/tilelang/*.whl > "$OUT/install.txt" 2>&1
fi
pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/base/*.whl >> "$OUT/install.txt" 2>&1
export PYTHONPATH=/tmp/tl:/tmp/site:/tmp/z3site
python3 -m pip install -q --no-deps --no-build-isolation -e . -e backends/cuda >> "$OUT/install.txt" 2>&1
STEPS=",${STEPS:-kernels,slice,moe,ncu},"
step() { pack; case "$STEPS" in *",$1,"*) return 0 ;; *) return 1 ;; esac; }
if step tests; then
  TRITON_INTERPRET=0 timeout 200 python3 -m pytest -q tests/test_triton_indexer.py tests/test_triton_topk_multiblock.py \
    tests/test_cuda_tilelang.py tests/test_cuda_tilelang_moe.py > "$OUT/tests.txt" 2>&1
  tail -n 5 "$OUT/tests.txt"
fi
if step indexer; then
  timeout 200 python3 benchmarks/kernels.py --only indexer_decode --graphs --out "$OUT/indexer.json" \
    > "$OUT/indexer.txt" 2>&1
fi
if step kernels; then
  timeout 330 python3 benchmarks/kernels.py --budget-s 270 --out "$OUT/kernels.json" > "$OUT/kernels.txt" 2>&1
fi
if step slice; then
  timeout 330 python3 benchmarks/slice_v32.py --batches 32 --contexts 131072 --modes dsa,dense \
    --kv-cache-dtype bf16,fp8_e4m3 --time-budget-s 200 --out "$OUT/slice.json" > "$OUT/slice.txt" 2>&1
fi
if step moe; then
  timeout 240 python3 benchmarks/kernels.py --sweep --only "sweep fused_moe" --out "$OUT/moe_sweep.json" \
    > "$OUT/moe_sweep.txt" 2>&1
fi
if step ncu; then
  # NCU_ONLY: families to profile (the MoE cases alone take minutes under ncu's kernel replay); NCU_ARGS: more
  # ncu flags, e.g. -k regex:_moe_gemm to profile only those kernels.
  timeout 280 ncu --profile-from-start off --section SpeedOfLight --section MemoryWorkloadAnalysis \
    --section Occupancy --section WarpStateStats ${NCU_ARGS:-} --export "$OUT/ncu" \
    python3 benchmarks/ncu_targets.py --only "${NCU_ONLY:-sparse_mla_decode,indexer}" > "$OUT/ncu.txt" 2> "$OUT/ncu.err"
  ncu --import "$OUT/ncu.ncu-rep" --csv --page details > "$OUT/ncu.csv" 2>> "$OUT/ncu.err"
fi
if step sparse; then
  # Sparse MLA decode (bf16 / FP8 KV, B1-128) and prefill (4K-64K): every registered kernel, CUDA graphs too.
  timeout $((${SPARSE_BUDGET:-240} + 60)) python3 benchmarks/kernels.py --only "${SPARSE_ONLY:-sparse_mla}" --graphs \
    --budget-s "${SPARSE_BUDGET:-240}" --out "$OUT/sparse.json" > "$OUT/sparse.txt" 2>&1
fi
if step conformance; then
  # The ops tier of the conformance suite for the kernels these runs change (report as JSON + markdown).
  timeout 180 python3 -c 'import sys; from dsv.server.cli import main; sys.exit(main())' conformance \
    --device cuda --tiers ops --quick -q --report "$OUT/conformance" --ops "${CONF_OPS:-sparse_mla_decode,sparse_mla_prefill,indexer_topk_decode,indexer_topk_prefill,fused_moe}" \
    > "$OUT/conformance.txt" 2>&1
  tail -n 25 "$OUT/conformance.txt"
fi
if step tlcheck; then
  # dsv's TileLang sparse MLA variants against the torch reference, then timed (FP8-row "ws" section included).
  timeout 200 python3 backends/cuda/scripts/tilelang_check.py ${TL_ARGS:---variants ws --quick} \
    --out "$OUT/tl.json" > "$OUT/tl.txt" 2>&1
fi
for f in indexer kernels slice moe_sweep sparse tl; do [ -f "$OUT/$f.txt" ] && tail -n 40 "$OUT/$f.txt"; done
grep -E "^(profiled|failed|skipped)" "$OUT/ncu.txt" 2>/dev/null | head -30; wc -l "$OUT/ncu.csv" 2>/dev/null
pack
