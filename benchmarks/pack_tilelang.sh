#!/usr/bin/env bash
# Packs TileLang (with apache-tvm-ffi and torch-c-dlpack-ext) and z3-solver, installed for the H200 image's
# Python 3.12, into one xz archive: .whl/tlz3.tar.xz (about 39 MB). One device call can then carry it with
# .whl/base (8 MB) under the 64 MiB limit, where the wheels themselves (51 + 28 MB) need two calls of one lease.
# Needs the wheels in .whl/tilelang and .whl/z3 (see docs/benchmarks.md). benchmarks/h200_perf.sh unpacks the
# archive when it finds it.
set -eu
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m pip install -q --no-index --no-deps --no-compile --target "$work/tl" .whl/tilelang/*.whl
python3 -m pip install -q --no-index --no-deps --no-compile --target "$work/z3site" .whl/z3/*.whl
rm -rf "$work/z3site/bin"  # the z3 command-line program (the library is what TileLang loads)
XZ_OPT=-9 tar -cJf .whl/tlz3.tar.xz -C "$work" tl z3site
ls -l .whl/tlz3.tar.xz
