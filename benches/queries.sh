#!/usr/bin/env bash
# Query latency over HTTP at scale: the sidecar in front of a demo catalog of
# N entities (default 100,000), each query type driven by wrk for a few
# seconds, p50 and p99 reported. All on 127.0.0.1.
# Usage: N=100000 DURATION=5s CONNECTIONS=4 benches/queries.sh   (needs wrk)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
N="${N:-100000}"
DURATION="${DURATION:-5s}"
CONNECTIONS="${CONNECTIONS:-4}"
BIN=target/release
cargo build --release --workspace --bins -q
work="$(mktemp -d)"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
UP=127.0.0.1:27107; PROXY=127.0.0.1:27170; ADMIN=127.0.0.1:27171
$BIN/catalog-chaos fake-catalog --listen $UP --control 127.0.0.1:27117 --entities "$N" >"$work/catalog.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 1200); do curl -fs "http://$UP/api/catalog/entities/by-query?limit=0" >/dev/null 2>&1 && break; sleep 0.1; done
CATALOG_CACHE_UPSTREAM_URL="http://$UP/api/catalog" CATALOG_CACHE_LISTEN_PROXY=$PROXY CATALOG_CACHE_LISTEN_ADMIN=$ADMIN \
  CATALOG_CACHE_MIRROR_PATH="$work/catalog-cache.db" CATALOG_CACHE_ADMIN_TOKEN_FILE="$work/admin.token" \
  CATALOG_CACHE_LOG_LEVEL=warn $BIN/catalog-cache serve >"$work/sidecar.log" 2>&1 &
SIDECAR=$!
pids+=("$SIDECAR")
for _ in $(seq 1 6000); do curl -fs "http://$ADMIN/readyz" >/dev/null 2>&1 && break; sleep 0.05; done
# The first query waits for the index; after that every query is measured warm.
curl -fs -o /dev/null "http://$PROXY/api/catalog/entities/by-query?filter=kind=component&limit=1"
owner=$(curl -fs "http://$PROXY/api/catalog/entities/by-query?filter=kind=group&limit=1&fields=metadata.name" \
  | python3 -c 'import json,sys; print("group:default/" + json.load(sys.stdin)["items"][0]["metadata"]["name"].lower())')
name=$(curl -fs "http://$PROXY/api/catalog/entities/by-query?filter=kind=component&limit=1&fields=metadata.name" \
  | python3 -c 'import json,sys; print(json.load(sys.stdin)["items"][0]["metadata"]["name"])')
run() { # label method path [body]
  local script="$work/req.lua"
  if [ "$2" = POST ]; then
    printf 'wrk.method = "POST"\nwrk.body = %s\nwrk.headers["Content-Type"] = "application/json"\n' "$(python3 -c 'import json,sys; print(json.dumps(sys.argv[1]))' "$4")" >"$script"
  else
    : >"$script"
  fi
  local out
  out=$(wrk -t1 -c"$CONNECTIONS" -d"$DURATION" --latency -s "$script" "http://$PROXY$3")
  local items
  if [ "$2" = POST ]; then
    items=$(curl -fs -X POST -H 'content-type: application/json' -d "$4" "http://$PROXY$3" | python3 -c 'import json,sys; d=json.load(sys.stdin); print(len(d.get("items", d.get("facets", []))))')
  else
    items=$(curl -fs "http://$PROXY$3" | python3 -c 'import json,sys; d=json.load(sys.stdin); print(len(d["items"]) if "items" in d else (len(d["facets"]) if "facets" in d else 1))')
  fi
  printf '%-42s %9s req/s  p50 %9s  p99 %9s  non-2xx %s  items %s\n' "$1" "$(awk '/Requests\/sec/ {print $2}' <<<"$out")" \
    "$(awk '$1=="50%" {print $2}' <<<"$out")" "$(awk '$1=="99%" {print $2}' <<<"$out")" \
    "$(awk '/Non-2xx/ {print $5}' <<<"$out" | grep . || echo 0)" "$items"
}
echo "query latency over HTTP: $N entities, wrk -t1 -c$CONNECTIONS -d$DURATION, $(nproc) cores"
run "selective filter (one name)" GET "/api/catalog/entities/by-query?filter=metadata.name=$name"
run "relation filter (owned by one group)" GET "/api/catalog/entities/by-query?filter=relations.ownedBy=$owner&limit=50"
run "broad filter (all components, 200/page)" GET "/api/catalog/entities/by-query?filter=kind=component"
run "broad filter, ordered by name, fields" GET "/api/catalog/entities/by-query?filter=kind=component&orderField=metadata.name,asc&fields=metadata.name,spec.owner"
run "predicate \$any/\$not" POST "/api/catalog/entities/by-query" '{"query":{"$all":[{"$any":[{"kind":"component"},{"kind":"api"}]},{"$not":{"spec.lifecycle":"experimental"}}]},"limit":50}'
run "full text (name contains)" GET "/api/catalog/entities/by-query?fullTextFilterTerm=checkout&fullTextFilterFields=metadata.name&limit=50"
run "facets (kind, spec.lifecycle)" GET "/api/catalog/entity-facets?facet=kind&facet=spec.lifecycle"
run "by-name (entity read)" GET "/api/catalog/entities/by-name/component/default/$name"
echo "sidecar RSS: $(awk '/VmRSS/ {printf "%.0f MiB", $2/1024}' "/proc/$SIDECAR/status")"
