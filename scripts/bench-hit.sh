#!/usr/bin/env bash
# Cache-hit benchmark: builds the release binary, runs `token-broker demo` on
# 127.0.0.1 (ephemeral ports, simulated vendor), warms one token, then drives
# GET /v1/tokens with wrk and prints throughput, latency and resident memory.
#
#   scripts/bench-hit.sh [seconds] [connections] [log level]
#
# Defaults: 10 s, 32 connections, log level "info" (one JSON line per request,
# as in production). Needs wrk (Debian: apt-get install wrk). Stops by itself.
set -euo pipefail
cd "$(dirname "$0")/.."

duration=${1:-10}
connections=${2:-32}
level=${3:-info}
command -v wrk >/dev/null || { echo "wrk is needed: apt-get install wrk" >&2; exit 1; }

cargo build --release --locked --quiet --bin token-broker
out=$(mktemp)
TOKEN_BROKER__SERVER__LISTEN=127.0.0.1:0 \
TOKEN_BROKER__SERVER__ADMIN_LISTEN=127.0.0.1:0 \
TOKEN_BROKER__LOG__LEVEL="$level" \
  timeout $((duration + 30)) target/release/token-broker demo >"$out" 2>&1 &
broker=$!
trap 'kill "$broker" 2>/dev/null; wait "$broker" 2>/dev/null; rm -f "$out"' EXIT

for _ in $(seq 100); do grep -q '^  curl ' "$out" && break; sleep 0.1; done
curl_line=$(grep -m1 '^  curl ' "$out")
key=$(sed -E "s/.*Bearer ([0-9a-f]+)'.*/\1/" <<<"$curl_line")
url=$(sed -E "s/.*'(http[^']+)'.*/\1/" <<<"$curl_line")
admin=$(grep -m1 -o 'Metrics: http://[^/]*' "$out" | cut -d/ -f3)
curl -sf -o /dev/null -H "Authorization: Bearer $key" "$url"   # warm the cache

echo "== wrk -t2 -c$connections -d${duration}s, log.level=$level: GET $url"
wrk -t2 -c"$connections" -d"${duration}s" --latency -H "Authorization: Bearer $key" "$url" |
  grep -E 'Requests/sec|^ +(50|90|99)%|Non-2xx|Socket errors'
echo "== one connection, 5 s"
wrk -t1 -c1 -d5s --latency -H "Authorization: Bearer $key" "$url" | grep -E 'Requests/sec|^ +(50|99)%'
rss=$(curl -s "http://$admin/metrics" | awk '/^process_resident_memory_bytes/ {printf "%.1f MiB", $2/1048576}')
hits=$(curl -s "http://$admin/metrics" | awk -F' ' '/^token_broker_cache_lookups_total\{result="hit"\}/ {print $2}')
echo "== resident memory after the run: $rss; cache hits counted: $hits"
