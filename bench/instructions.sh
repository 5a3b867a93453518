#!/usr/bin/env bash
# Counts the CPU instructions each request costs, under valgrind's callgrind: gatekeeper's full
# default pipeline, the same without each of its recording stages, and the bare aiohttp proxy.
# Instruction counts repeat to within about 0.1% from run to run, whatever else the machine does,
# so they show what a change or a plugin costs where wall-clock runs (bench/run.sh) are too noisy.
# Run from the project root, after `pip install -e .` into .venv and `../shared/bench/setup.sh`:
#     bash bench/instructions.sh                 (about 6 minutes)
#     SECONDS_PER_RUN=20 CASES="small:hit small:miss large:hit" bash bench/instructions.sh
# Needs valgrind (callgrind_control), nginx and wrk; uses ports 18081-18082 and 18200, like the harness.
# Counts are user-space instructions of the server process, all threads; not kernel time, and
# not time: SHA-256 counts high (valgrind hides the CPU's SHA instructions from OpenSSL).
set -euo pipefail
cd "$(dirname "$0")/.."
HARNESS="${HARNESS:-$(cd ../shared/bench && pwd)}"
SECONDS_PER_RUN="${SECONDS_PER_RUN:-15}"
CASES="${CASES:-small:hit small:miss}"
VARIANTS="${VARIANTS:-full no_access_log no_metering no_audit core ref ref_uvloop}"
PORT=18200
for tool in valgrind callgrind_control nginx wrk; do
  command -v "$tool" >/dev/null || { echo "$tool not found (apt-get install valgrind nginx wrk)" >&2; exit 1; }
done
[[ -x .venv/bin/gatekeeper ]] || { echo ".venv/bin/gatekeeper missing: pip install -e . into .venv" >&2; exit 1; }
[[ -x "$HARNESS/.venv-ref/bin/python" ]] || { echo "run $HARNESS/setup.sh first" >&2; exit 1; }

WORK="$(mktemp -d /tmp/gatekeeper-instructions.XXXXXX)"
MOCK_PID="" SERVER_PID=""
stop_server() {
  if [[ -n "$SERVER_PID" ]]; then kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; fi
  SERVER_PID=""
}
cleanup() {
  stop_server
  [[ -n "$MOCK_PID" ]] && { kill "$MOCK_PID" 2>/dev/null || true; wait "$MOCK_PID" 2>/dev/null || true; }
  rm -rf "$WORK"
}
trap cleanup EXIT

# The harness's constant nginx mock upstream, in a prefix of our own.
mkdir -p "$WORK/mock/tmp"
python3 "$HARNESS/gen_bodies.py" "$WORK/mock/bodies" >/dev/null
nginx_user=(); [[ $EUID -eq 0 ]] && nginx_user=(-g "user root;")
nginx -p "$WORK/mock/" -c "$HARNESS/nginx/mock.conf" -e stderr "${nginx_user[@]}" >"$WORK/mock.log" 2>&1 &
MOCK_PID=$!
for _ in $(seq 50); do curl -sf -o /dev/null http://127.0.0.1:18082/v1/models && break; sleep 0.1; done

# The variants of bench/gatekeeper.toml: each leaves out one recording stage (or all three).
variant_config() {  # name -> path of its config
  local name=$1 out="$WORK/$1.toml" blocked="" access_log=""
  case "$name" in
    full) ;;
    no_access_log) access_log="access_log = false" ;;
    no_metering) blocked='["metering"]' ;;
    no_audit) blocked='["audit"]' ;;
    core) blocked='["metering", "audit"]'; access_log="access_log = false" ;;
  esac
  { [[ -n "$blocked" ]] && printf '[plugins]\nblocked = %s\n\n' "$blocked"
    sed "s/^port = $PORT\$/port = $PORT\n$access_log/" bench/gatekeeper.toml; } >"$out"
  echo "$out"
}

FIXED_BODY='{"model":"gpt-image-1","prompt":"A watercolor painting of a red fox standing in a misty pine forest at dawn","n":1,"size":"1024x1024","quality":"high"}'
load() {  # mode seconds -> wrk's request count
  local body_mode=fixed; [[ $1 == miss ]] && body_mode=vary
  BODY_MODE=$body_mode BODY_SEED="$RANDOM-$RANDOM" BENCH_FIXED_BODY="$FIXED_BODY" \
    wrk -t1 -c4 -d"$2"s --timeout 60s -s "$HARNESS/wrk/post.lua" "http://127.0.0.1:$PORT/v1/images/generations" \
    | sed -n 's/^WRKJSON //p' | python3 -c 'import json, sys; print(json.load(sys.stdin)["requests"])'
}

measure() {  # variant size mode -> instructions per request
  local variant=$1 size=$2 mode=$3 upstream=http://127.0.0.1:18082 command
  [[ $size == large ]] && upstream=http://127.0.0.1:18081
  case "$variant" in
    ref|ref_uvloop)
      command=("$HARNESS/.venv-ref/bin/python" "$HARNESS/ref_aiohttp_proxy.py" --port "$PORT" --upstream "$upstream")
      [[ $mode == hit ]] && command+=(--cache)
      [[ $variant == ref_uvloop ]] && command+=(--uvloop) ;;
    *)
      command=(.venv/bin/python .venv/bin/gatekeeper serve --config "$(variant_config "$variant")") ;;
  esac
  rm -rf "$WORK"/callgrind.* "$WORK/state" && mkdir -p "$WORK/state"
  BENCH_UPSTREAM_V1="$upstream/v1" BENCH_STATE="$WORK/state" BENCH_CACHE_BACKEND=memory PYTHONHASHSEED=0 valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$WORK/callgrind.%p" \
    "${command[@]}" >"$WORK/server.log" 2>&1 &
  SERVER_PID=$!
  for _ in $(seq 600); do
    curl -sf -o /dev/null -H 'Authorization: Bearer sk-bench-client' "http://127.0.0.1:$PORT/v1/models" && break
    kill -0 "$SERVER_PID" 2>/dev/null || { tail "$WORK/server.log" >&2; exit 1; }
    sleep 0.2
  done
  load "$mode" 5 >/dev/null  # warm-up: caches primed, code paths taken once
  callgrind_control -i on "$SERVER_PID" >/dev/null 2>&1
  local requests; requests="$(load "$mode" "$SECONDS_PER_RUN")"
  callgrind_control -i off "$SERVER_PID" >/dev/null 2>&1
  callgrind_control -d "$SERVER_PID" >/dev/null 2>&1
  local total; total="$(awk '/^(totals|summary):/ { s += $2 } END { print s + 0 }' "$WORK"/callgrind.*.*)"
  stop_server
  echo $((total / requests))
}

echo "| variant | $(for c in $CASES; do printf '%s %s | ' "${c%%:*}" "${c##*:}"; done)"
echo "|---|$(for _ in $CASES; do printf -- '---:|'; done)"
for variant in $VARIANTS; do
  row="| $variant |"
  for c in $CASES; do row+=" $(measure "$variant" "${c%%:*}" "${c##*:}" | sed ':a;s/\B[0-9]\{3\}\>/,&/;ta') |"; done
  echo "$row"
done
