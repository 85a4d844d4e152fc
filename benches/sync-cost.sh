#!/usr/bin/env bash
# What one sync cycle costs the upstream, at N entities (default 100,000):
# bytes (as on the wire) and requests, for an unchanged catalog and after
# 1 % churn, id-walk (mirror.full_sync_every large) vs full walk
# (mirror.full_sync_every = 1), and how long the cycle took to converge.
# An unchanged id-walk is shown twice: without page tags (the first after
# start) and with them (every page a 304).
# Read from the sidecar's own catalog_cache_sync_{requests,bytes}_total and
# sync report. All on 127.0.0.1.
# Usage: N=100000 CHURN=0.01 benches/sync-cost.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
N="${N:-100000}"
CHURN="${CHURN:-0.01}"
BIN=target/release
cargo build --release --workspace --bins -q
work="$(mktemp -d)"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
UP=127.0.0.1:27207; CONTROL=127.0.0.1:27217
$BIN/catalog-chaos fake-catalog --listen $UP --control $CONTROL --entities "$N" >"$work/catalog.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 1200); do curl -fs "http://$UP/api/catalog/entities/by-query?limit=0" >/dev/null 2>&1 && break; sleep 0.1; done

# sidecar NAME PROXY ADMIN FULL_SYNC_EVERY
start() {
  mkdir -p "$work/$1"
  CATALOG_CACHE_UPSTREAM_URL="http://$UP/api/catalog" CATALOG_CACHE_LISTEN_PROXY="$2" CATALOG_CACHE_LISTEN_ADMIN="$3" \
    CATALOG_CACHE_MIRROR_PATH="$work/$1/catalog-cache.db" CATALOG_CACHE_ADMIN_TOKEN_FILE="$work/$1/admin.token" \
    CATALOG_CACHE_MIRROR_SYNC_INTERVAL=1h CATALOG_CACHE_MIRROR_FULL_SYNC_EVERY="$4" CATALOG_CACHE_UPSTREAM_TIMEOUT=30s \
    CATALOG_CACHE_LOG_LEVEL=warn $BIN/catalog-cache serve >"$work/$1/sidecar.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 1 6000); do
    curl -fs "http://$3/status" 2>/dev/null | python3 -c 'import json,sys; sys.exit(0 if json.load(sys.stdin).get("mirror") else 1)' 2>/dev/null && break
    sleep 0.1
  done
}
metric_sum() { # ADMIN NAME -> sum over kinds
  curl -fs "http://$1/metrics" | awk -v m="$2" 'index($0, m"{")==1 {s+=$NF} END {printf "%.0f", s}'
}
# cycle NAME ADMIN -> "requests bytes seconds method"
cycle() {
  local r0 b0 r1 b1 report
  r0=$(metric_sum "$2" catalog_cache_sync_requests_total); b0=$(metric_sum "$2" catalog_cache_sync_bytes_total)
  report=$(curl -fs -X POST -H "Authorization: Bearer $(cat "$work/$1/admin.token")" -H 'content-type: application/json' \
    -d '{"accept_deletions":false}' "http://$2/admin/sync")
  r1=$(metric_sum "$2" catalog_cache_sync_requests_total); b1=$(metric_sum "$2" catalog_cache_sync_bytes_total)
  python3 -c 'import json,sys; r=json.loads(sys.argv[1]); print(sys.argv[2], sys.argv[3], "%.2f" % r["duration_seconds"], r.get("method","-"), r["result"], r["added"], r["changed"], r["removed"])' \
    "$report" "$((r1 - r0))" "$((b1 - b0))"
}
start ids 127.0.0.1:27270 127.0.0.1:27271 10000
start full 127.0.0.1:27280 127.0.0.1:27281 1

printf '\nsync cost per cycle: %s entities, %s churn, %s cores\n' "$N" "$CHURN" "$(nproc)"
printf '%-10s %-10s %9s %14s %9s %-10s %-9s %s\n' cycle sidecar requests bytes seconds method result "added/changed/removed"
row() { # LABEL NAME ADMIN
  read -r req bytes secs method result a c r <<<"$(cycle "$2" "$3")"
  printf '%-10s %-10s %9s %14s %9s %-10s %-9s %s/%s/%s\n' "$1" "$2" "$req" "$bytes" "$secs" "$method" "$result" "$a" "$c" "$r"
}
# The sidecar's first sync (at start) is a full walk; its first id-walk
# then takes every page's ETag, and the next one asks with If-None-Match.
row unchanged ids 127.0.0.1:27271
row unchanged ids 127.0.0.1:27271
row unchanged full 127.0.0.1:27281
curl -fs -X POST -d "{\"share\": $CHURN}" "http://$CONTROL/churn" >/dev/null
row churned ids 127.0.0.1:27271
row churned full 127.0.0.1:27281
row unchanged ids 127.0.0.1:27271
