#!/usr/bin/env bash
# Shows that every weakening still turns the scenarios (and attacks) it
# targets to FAIL: the proof that a PASS of the chaos run and of the abuse
# suite means something. One weakened run per weakening, in a table.
#
#   chaos/weakenings.sh                chaos scenarios and abuse attacks, debug binaries
#   chaos/weakenings.sh --release      the same with release binaries
#   chaos/weakenings.sh --only NAMES   only these weakenings (comma-separated)
#   chaos/weakenings.sh --bin DIR      binaries already built in DIR (no build)
#
# Each run's output goes to $WEAKEN_DIR (default
# target/chaos-weakenings/<time>). Exit 0 only if every weakening made
# every one of its targets FAIL.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

profile=debug
only=""
bin=""
while [ $# -gt 0 ]; do
  case "$1" in
    --release) profile=release ;;
    --only) only=",$2,"; shift ;;
    --bin) bin="$2"; shift ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "usage: chaos/weakenings.sh [--release] [--only NAMES] [--bin DIR]" >&2; exit 2 ;;
  esac
  shift
done

if [ -z "$bin" ]; then
  if [ "$profile" = release ]; then
    cargo build --release --workspace --bins
  else
    cargo build --workspace --bins
  fi
  bin="target/$profile"
fi
out="${WEAKEN_DIR:-target/chaos-weakenings/$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$out"

# The verdict a run's table gives `name` (its last column), or "-".
verdict_of() {
  awk -F'|' -v n="$2" '
    { name = $2; gsub(/^ +| +$/, "", name) }
    name == n && NF > 3 { v = $(NF - 1); gsub(/^ +| +$/, "", v); print v; exit }
  ' "$1" | grep . || echo "-"
}

shown=0
missed=0
echo "| suite | weakening | must FAIL | verdicts | shown |"
echo "|---|---|---|---|---|"
for suite in run abuse; do
  # `--weaken NAME: about (must FAIL: a, b)`
  "$bin/catalog-chaos" "$suite" --list |
    sed -n 's/^--weaken \([^:]*\): .*(must FAIL: \(.*\))$/\1|\2/p' >"$out/$suite.list"
  while IFS='|' read -r name breaks; do
    if [ -n "$only" ] && [[ "$only" != *",$name,"* ]]; then
      continue
    fi
    log="$out/$suite-$name.log"
    args=("$suite" --weaken "$name" --sidecar "$bin/catalog-cache")
    # Quick sizes, every target named (naming a scenario runs it even if
    # only the full run has it).
    [ "$suite" = run ] && args+=(--quick --only "$(echo "$breaks" | tr -d ' ')")
    "$bin/catalog-chaos" "${args[@]}" >"$log" 2>&1 </dev/null || true
    verdicts=()
    all_failed=1
    IFS=',' read -ra targets <<<"$breaks"
    for t in "${targets[@]}"; do
      t="${t# }"
      v="$(verdict_of "$log" "$t")"
      verdicts+=("$t $v")
      [ "$v" = FAIL ] || all_failed=0
    done
    if [ "$all_failed" = 1 ]; then
      shown=$((shown + 1)); mark=yes
    else
      missed=$((missed + 1)); mark="NO (log $log)"
    fi
    echo "| $suite | $name | $breaks | $(IFS=';'; echo "${verdicts[*]}" | sed 's/;/, /g') | $mark |"
  done <"$out/$suite.list"
done
echo "weakenings: $shown shown able to fail, $missed not"
[ "$missed" -eq 0 ]
