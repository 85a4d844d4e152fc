#!/usr/bin/env bash
# Side-by-side load figures for SPEC §10, all on 127.0.0.1:
#   - local by-name hits: catalog-cache vs nginx proxy_cache vs Varnish, same entities, same wrk load;
#   - upstream down (refused) and black-holed: throughput, errors, worst latency;
#   - full sync time, restart-to-ready from disk, resident memory.
# Usage: N=5000 DURATION=10s CONNECTIONS=64 benches/load.sh   (needs wrk; nginx and varnishd optional)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
N="${N:-5000}"
DURATION="${DURATION:-10s}"
CONNECTIONS="${CONNECTIONS:-64}"
BIN=target/release
cargo build --release --workspace --bins -q
work="$(mktemp -d)"
chmod 755 "$work"  # Varnish reads its VCL as its own user
pids=()
cleanup() {
  # TERM, not KILL: nginx's and Varnish's masters take their workers with them.
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  sleep 0.5
  rm -rf "$work"
}
trap cleanup EXIT

UP=127.0.0.1:27007; CTL=127.0.0.1:27017; PROXY=127.0.0.1:27070; ADMIN=127.0.0.1:27071
rss() { awk '/VmRSS/ {printf "%.1f MiB", $2/1024}' "/proc/$1/status"; }
wait_ready() {
  local t0; t0=$(date +%s.%N)
  for _ in $(seq 1 3000); do
    curl -fs "http://$ADMIN/readyz" >/dev/null 2>&1 && break
    sleep 0.01
  done
  echo "$(date +%s.%N) - $t0" | bc
}
start_sidecar() {
  env CATALOG_CACHE_UPSTREAM_URL="http://$UP/api/catalog" CATALOG_CACHE_LISTEN_PROXY=$PROXY \
    CATALOG_CACHE_LISTEN_ADMIN=$ADMIN CATALOG_CACHE_MIRROR_PATH="$work/catalog-cache.db" \
    CATALOG_CACHE_ADMIN_TOKEN_FILE="$work/admin.token" CATALOG_CACHE_LOG_LEVEL=warn "$@" \
    $BIN/catalog-cache serve >>"$work/sidecar.log" 2>&1 &
  SIDECAR=$!
  pids+=("$SIDECAR")
}
start_catalog() {
  $BIN/catalog-chaos fake-catalog --listen $UP --control $CTL --entities "$N" >"$work/catalog.log" 2>&1 &
  CATALOG=$!
  pids+=("$CATALOG")
  for _ in $(seq 1 600); do curl -fs "http://$UP/api/catalog/entities/by-query?limit=0" >/dev/null 2>&1 && break; sleep 0.1; done
}
load() { # name url
  local out
  out=$(wrk -t2 -c"$CONNECTIONS" -d"$DURATION" --latency -s "$work/paths.lua" "$2")
  printf '%-34s %10s req/s   p50 %8s   p99 %8s   max %8s   non-2xx %s\n' "$1" \
    "$(awk '/Requests\/sec/ {print $2}' <<<"$out")" "$(awk '$1=="50%" {print $2}' <<<"$out")" \
    "$(awk '$1=="99%" {print $2}' <<<"$out")" "$(awk '/Latency/ {print $4; exit}' <<<"$out")" \
    "$(awk '/Non-2xx/ {print $5}' <<<"$out" | grep . || echo 0)"
}

echo "catalog-cache load figures: $N entities, wrk -t2 -c$CONNECTIONS -d$DURATION, $(nproc) cores"
start_catalog
curl -fs "http://$UP/api/catalog/entities/by-query?limit=$N&fields=kind,metadata.name,metadata.namespace" \
  | python3 -c 'import json,sys
for e in json.load(sys.stdin)["items"]:
    m=e["metadata"]; print("/api/catalog/entities/by-name/%s/%s/%s" % (e["kind"], m.get("namespace","default"), m["name"]))' \
  >"$work/paths.txt"
cat >"$work/paths.lua" <<LUA
paths = {}
for line in io.lines("$work/paths.txt") do paths[#paths + 1] = line end
math.randomseed(42)
request = function() return wrk.format("GET", paths[math.random(#paths)]) end
LUA

start_sidecar
printf 'first sync + ready:                %.3f s\n' "$(wait_ready)"
curl -fs "http://$ADMIN/status" | python3 -c 'import json,sys; s=json.load(sys.stdin)["last_sync"]; print("full sync (from status):           %.3f s, %d entities" % (s["duration_seconds"], s["added"]+s["changed"]+s["unchanged"]))'
echo "sidecar RSS after sync:            $(rss "$SIDECAR")"
load "catalog-cache (upstream healthy)" "http://$PROXY"
echo "sidecar RSS after load:            $(rss "$SIDECAR")"

if command -v nginx >/dev/null; then
  mkdir -p "$work/nginx/cache"
  cat >"$work/nginx/nginx.conf" <<NGINX
user root;
worker_processes 2;
pid $work/nginx/nginx.pid;
error_log $work/nginx/error.log;
events { worker_connections 4096; }
http {
  access_log off;
  proxy_cache_path $work/nginx/cache keys_zone=catalog:64m max_size=2g inactive=1h;
  upstream catalog { server $UP; keepalive 64; }
  server {
    listen 127.0.0.1:27080;
    location / {
      proxy_pass http://catalog;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_cache catalog;
      proxy_cache_valid 200 404 10m;
      proxy_cache_use_stale error timeout http_500 http_502 http_503 http_504;
    }
  }
}
NGINX
  nginx -c "$work/nginx/nginx.conf" -p "$work/nginx"
  pids+=("$(cat "$work/nginx/nginx.pid")")
  while read -r p; do curl -s -o /dev/null "http://127.0.0.1:27080$p" || true; done <"$work/paths.txt"
  load "nginx proxy_cache (warm)" "http://127.0.0.1:27080"
fi
if command -v varnishd >/dev/null; then
  cat >"$work/default.vcl" <<VCL
vcl 4.1;
backend default { .host = "127.0.0.1"; .port = "27007"; }
sub vcl_backend_response { set beresp.ttl = 10m; }
VCL
  varnishd -a 127.0.0.1:27081 -f "$work/default.vcl" -s malloc,512m -n "$work/varnish" -P "$work/varnish.pid" >/dev/null
  sleep 1
  pids+=("$(cat "$work/varnish.pid")")
  while read -r p; do curl -s -o /dev/null "http://127.0.0.1:27081$p" || true; done <"$work/paths.txt"
  load "varnish (warm)" "http://127.0.0.1:27081"
fi

# Upstream down: restart the sidecar with a short freshness so every read is
# past fresh and must be decided without the upstream.
kill -9 "$SIDECAR"; sleep 0.2
kill -9 "$CATALOG"
start_sidecar CATALOG_CACHE_FRESHNESS_FRESH_FOR=1s CATALOG_CACHE_MIRROR_SYNC_INTERVAL=1s
printf 'restart-to-ready, upstream down:   %.3f s\n' "$(wait_ready)"
sleep 1.5
load "catalog-cache (upstream refused)" "http://$PROXY"

# Black hole: accepts, never answers. Fresh sidecar process, from the first request on.
start_catalog
curl -fs -X PUT "http://$CTL/faults" -H 'content-type: application/json' -d '{"black_hole":true}' >/dev/null
kill -9 "$SIDECAR"; sleep 0.2
start_sidecar CATALOG_CACHE_FRESHNESS_FRESH_FOR=1s CATALOG_CACHE_MIRROR_SYNC_INTERVAL=1s
wait_ready >/dev/null
sleep 1.5
load "catalog-cache (upstream black hole)" "http://$PROXY"
echo "sidecar RSS:                       $(rss "$SIDECAR")"
