#!/usr/bin/env bash
# One device call on the lent H200: install dsv + dsv-cuda from this checkout (no network there; extra wheels are
# carried in .whl/), then run dsv generate, dsv bench offline and (when the server exists) dsv serve + dsv bench
# serving on the embedded default model with the cuda backend. Results land in $OUT.
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export DSV_CACHE_DIR=/tmp/dsvc HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/base/*.whl && export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-deps --no-build-isolation -e . -e backends/cuda > "$OUT/install.txt" 2>&1
log() { echo "== $*" | tee -a "$OUT/smoke.txt"; }
run() { log "$*"; timeout 120 "$@" >> "$OUT/smoke.txt" 2>&1; echo "rc=$?" >> "$OUT/smoke.txt"; }
run nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
run dsv backends
run dsv generate --device cuda --prompt "Hello, H200" --max-new-tokens 16 --json
run dsv generate --device cuda --prompt "Hello, H200" --max-new-tokens 16 --json --kv-cache-dtype fp8_e4m3
run dsv generate --device cuda --input-ids 0,5,7 --max-new-tokens 8 --json --dtype float32 --ignore-eos
run dsv bench offline --device cuda --num-prompts 32 --input-len 128 --output-len 64 --json
if python3 -c "import dsv.server.cmd_serve" 2>/dev/null; then
  log "dsv serve --device cuda"
  dsv serve --device cuda --port 30000 > "$OUT/serve.txt" 2>&1 &
  pid=$!
  for _ in $(seq 60); do curl -sf localhost:30000/health > /dev/null && break; sleep 1; done
  run curl -s localhost:30000/v1/completions -H 'content-type: application/json' \
    -d '{"model": "dsv-default", "prompt": "Hello", "max_tokens": 8}'
  run dsv bench serving --num-prompts 32 --random-input-len 128 --random-output-len 64 --output-file "$OUT/serving.json"
  kill -TERM $pid; wait $pid; echo "serve exit=$?" >> "$OUT/smoke.txt"
fi
tail -c 6000 "$OUT/smoke.txt"
