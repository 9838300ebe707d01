#!/usr/bin/env bash
# One entry point for a fresh machine: creates .venv, installs dsv with what the task needs, then runs it.
#   scripts/dev.sh serve [dsv serve flags]   start the server on the embedded default model
#   scripts/dev.sh test  [pytest args]       lint + the whole test suite (what CI runs)
#   scripts/dev.sh generate [flags]          dsv generate
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${DSV_VENV:-.venv}
PY=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
stamp="$VENV/.dsv-installed-$1"
# torch is pinned here (not in pyproject, which declares a range): 2.13.0 is the local CPU build.
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  $PIP install "torch==2.13.0"
  case "$1" in
    test)
      $PIP install -e ".[server,test,triton,plot]"
      # The NVIDIA backend package: its probe, kernel table and vendor adapters are contract-tested on the CPU.
      $PIP install -e backends/cuda --no-deps
      # The dummy backend package proves entry-point discovery and the conformance suite without hardware.
      if [ -d tests/plugins/dsv_dummy_backend ]; then $PIP install -e tests/plugins/dsv_dummy_backend --no-deps; fi
      ;;
    *) $PIP install -e ".[server]" ;;
  esac
  touch "$stamp"
fi

cmd=$1
shift
case "$cmd" in
  test)
    # No GPU in CI: Triton kernels run in the interpreter (set before any test imports triton).
    export TRITON_INTERPRET=${TRITON_INTERPRET:-1}
    "$VENV/bin/ruff" check .
    "$VENV/bin/ruff" format --check .
    exec "$VENV/bin/python" -m pytest -q "$@"
    ;;
  serve | generate | backends | conformance | bench | eval)
    exec "$VENV/bin/dsv" "$cmd" "$@"
    ;;
  *)
    echo "usage: scripts/dev.sh {serve|test|generate|backends|conformance|bench|eval} [args]" >&2
    exit 2
    ;;
esac
