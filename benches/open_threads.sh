#!/usr/bin/env bash
# CPU per session opened, thread by thread, of one wsgate process: N opens PARALLEL at a time
# through PATH (/ws/generic/echo.bench; /ws/twilio or /ws/telnyx?serviceHost=echo.bench for a
# provider's: loadgen sends Twilio's connected and start on every path) to loadgen's echo bot,
# each thread's utime+stime (/proc/PID/task/*/stat) read before and after (benches/README.md,
# "Session opens, round 4"). Run it alternating two builds (their PYTHONPATHs) for an A/B that
# load.py's short open rounds blur.
#
# usage: benches/open_threads.sh [PYTHONPATH] [N] [PARALLEL] [PATH]
#   defaults: ./python, 10000, 8, /ws/generic/echo.bench. loadgen: $LOADGEN, else the one
#   load.py builds (${CARGO_TARGET_DIR:-/tmp/target-loadgen}/release/loadgen).
set -euo pipefail
pythonpath=$(realpath "${1:-python}")
n=${2:-10000}
parallel=${3:-8}
path=${4:-/ws/generic/echo.bench}
loadgen=${LOADGEN:-${CARGO_TARGET_DIR:-/tmp/target-loadgen}/release/loadgen}
[ -x "$loadgen" ] || { echo "no loadgen at $loadgen: run benches/load.py once, or set LOADGEN" >&2; exit 2; }

tmp=$(mktemp -d)
pids=()
# Waited for: a gateway still draining would take CPU from the next run's.
trap 'kill "${pids[@]}" 2>/dev/null || true; wait "${pids[@]}" 2>/dev/null || true; rm -rf "$tmp"' EXIT
# shellcheck source=benches/bench_gateway.sh
. "$(dirname "$0")/bench_gateway.sh"
serve_bench "$tmp" "$pythonpath" "$loadgen"
url="ws://127.0.0.1:$gw_port$path"

# CPU ticks so far of each thread, summed by thread name.
ticks() {
  for t in /proc/"$gw"/task/*; do
    echo "$(cat "$t/comm") $(awk '{print $14 + $15}' "$t/stat")"
  done | awk '{a[$1] += $2} END {for (k in a) print k, a[k]}' | sort
}
"$loadgen" opens --url "$url" --conns 500 --parallel "$parallel" --warmup-opens 100 > /dev/null
ticks > "$tmp/before"
"$loadgen" opens --url "$url" --conns "$n" --parallel "$parallel" --warmup-opens 0
ticks > "$tmp/after"
hz=$(getconf CLK_TCK)
join "$tmp/before" "$tmp/after" |
  awk -v n="$n" -v hz="$hz" '{printf "%s %.0f us/session\n", $1, ($3 - $2) * 1e6 / hz / n}'
