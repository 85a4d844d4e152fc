#!/usr/bin/env bash
# Runs the chaos suite N times in a row and counts the verdicts: the proof
# that a run's verdict does not depend on luck.
#
#   chaos/repeat.sh 20                 quick suite, debug binaries (as CI runs it), 20 times
#   chaos/repeat.sh --busy 10          the same while a `cargo build` keeps both cores busy beside it
#   chaos/repeat.sh --full 5           full suite, release binaries, 5 times
#
# Options: --seed S (default: a new seed each run, printed, so that a
# failure can be replayed with `catalog-chaos run --seed S ...`), --only
# NAMES (passed on). Each run's output goes to $REPEAT_DIR (default
# target/chaos-repeat/<time>); a failed run's table names the data dir it
# kept. Exit 0 only if every run passed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

runs=""
full=0
busy=0
seed=""
only=""
while [ $# -gt 0 ]; do
  case "$1" in
    --full) full=1 ;;
    --busy) busy=1 ;;
    --seed) seed="$2"; shift ;;
    --only) only="$2"; shift ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) runs="$1" ;;
  esac
  shift
done
[[ "$runs" =~ ^[0-9]+$ ]] || { echo "usage: chaos/repeat.sh [--full] [--busy] [--seed S] [--only NAMES] N" >&2; exit 2; }

if [ "$full" = 1 ]; then
  cargo build --release --workspace --bins
  bin=target/release
  mode=()
else
  cargo build --workspace --bins
  bin=target/debug
  mode=(--quick)
fi
out="${REPEAT_DIR:-target/chaos-repeat/$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$out"

# --busy: a real `cargo build` of this workspace, from scratch and in a
# target dir of its own, restarted whenever it finishes, for as long as the
# runs last.
busy_pid=""
stop_busy() {
  if [ -n "$busy_pid" ]; then
    kill -- "-$busy_pid" 2>/dev/null || kill "$busy_pid" 2>/dev/null || true
    wait "$busy_pid" 2>/dev/null || true
  fi
}
# A run in progress is stopped too (SIGTERM: it kills its own children).
run_pid=""
stop_all() {
  if [ -n "$run_pid" ]; then
    kill "$run_pid" 2>/dev/null || true
    wait "$run_pid" 2>/dev/null || true
  fi
  stop_busy
}
trap stop_all EXIT
trap 'exit 130' INT TERM
if [ "$busy" = 1 ]; then
  busy_target="$out/busy-target"
  set -m
  (
    while true; do
      rm -rf "$busy_target"
      CARGO_TARGET_DIR="$busy_target" cargo build --workspace --all-targets >"$out/busy-build.log" 2>&1 || true
    done
  ) &
  busy_pid=$!
  set +m
  echo "busy: cargo build running beside the runs (pid $busy_pid, log $out/busy-build.log)"
fi

passed=0
failed=0
for i in $(seq 1 "$runs"); do
  s="${seed:-$(( (RANDOM << 15 | RANDOM) ))}"
  args=(run "${mode[@]}" --sidecar "$bin/catalog-cache" --seed "$s")
  [ -n "$only" ] && args+=(--only "$only")
  log="$out/run-$i.log"
  started=$(date +%s)
  "$bin/catalog-chaos" "${args[@]}" >"$log" 2>&1 &
  run_pid=$!
  if wait "$run_pid"; then
    passed=$((passed + 1)); verdict=PASS
  else
    failed=$((failed + 1)); verdict=FAIL
  fi
  run_pid=""
  echo "run $i/$runs: $verdict in $(( $(date +%s) - started ))s (seed $s, log $log)"
  if [ "$verdict" = FAIL ]; then
    grep -E '\[FAIL\]' "$log" | head -5 || true
  fi
done
echo "repeat: $passed passed, $failed failed of $runs ($([ "$full" = 1 ] && echo full || echo quick)$([ "$busy" = 1 ] && echo ', beside a cargo build'))"
[ "$failed" -eq 0 ]
