#!/usr/bin/env bash
# Starts gatekeeper for the benchmark harness: fresh state, the full default pipeline (bench/gatekeeper.toml).
set -euo pipefail
cd "$(dirname "$0")/.."
export BENCH_STATE="${BENCH_STATE:-/tmp/gatekeeper-bench}"
rm -rf "$BENCH_STATE" && mkdir -p "$BENCH_STATE"
if [[ "${BENCH_CACHE_BACKEND:-memory}" == redis ]]; then
  .venv/bin/python - <<'PY'
import redis
client = redis.Redis(host="127.0.0.1", port=6379)
for key in client.scan_iter("gk:bench:*", count=1000):
    client.delete(key)
PY
fi
exec .venv/bin/gatekeeper serve --config bench/gatekeeper.toml
