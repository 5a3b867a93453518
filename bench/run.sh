#!/usr/bin/env bash
# Reruns the measurements in docs/benchmarks.md: gatekeeper's full default pipeline side by side with
# nginx, LiteLLM and the bare aiohttp proxy, on small and large (1.5 MB b64) bodies, then a hit from
# the Redis cache backend. Run from the project root, after `pip install -e .` into .venv:
#     bash bench/run.sh            (about 20 minutes; ROUNDS=1 DURATION=5s for a quick look)
# Results: the harness prints each table and keeps it under its .run/results-*/summary.md.
set -euo pipefail
cd "$(dirname "$0")/.."
HARNESS="${HARNESS:-$(cd ../shared/bench && pwd)}"
bash "$HARNESS/setup.sh"

export GATEWAY_URL=http://127.0.0.1:18200
export GATEWAY_CMD="bash bench/serve.sh"
export GATEWAY_AUTH="Bearer sk-bench-client"
export GATEWAY_READY_URL=http://127.0.0.1:18200/ready
export GATEWAY_NAME=gatekeeper

for size in small large; do
  BODY_SIZE=$size BENCH_CACHE_BACKEND=memory bash "$HARNESS/compare.sh"
done
for size in small large; do
  BODY_SIZE=$size BENCH_CACHE_BACKEND=redis GATEWAY_MODES=hit GATEWAY_NAME="gatekeeper redis" \
    TARGETS="ref_hit uvloop_hit" bash "$HARNESS/compare.sh"
done
