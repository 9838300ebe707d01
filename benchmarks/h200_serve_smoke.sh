set -u; OUT=${OUT:-/tmp/out}; mkdir -p $OUT
export DSV_CACHE_DIR=/tmp/dsvc HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/base/*.whl 2>/dev/null && export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-deps --no-build-isolation -e . -e backends/cuda > $OUT/install.txt 2>&1
dsv serve --device cuda --port 30000 > $OUT/serve.txt 2>&1 & pid=$!
for _ in $(seq 90); do curl -sf localhost:30000/health >/dev/null && break; sleep 1; done
curl -s localhost:30000/v1/completions -H 'content-type: application/json' -d '{"model":"dsv-default","prompt":"Hello","max_tokens":8}'; echo
curl -s localhost:30000/v1/chat/completions -H 'content-type: application/json' -d '{"model":"dsv-default","messages":[{"role":"user","content":"Hi"}],"max_tokens":8,"chat_template_kwargs":{"thinking":true}}'; echo
curl -sN localhost:30000/v1/completions -H 'content-type: application/json' -d '{"model":"dsv-default","prompt":"Hi","max_tokens":4,"stream":true}' | tail -3
curl -s localhost:30000/metrics | grep -E "^dsv_(requests|generation)" | head -5
kill -TERM $pid; wait $pid; echo "serve exit=$?"; tail -5 $OUT/serve.txt
