#!/usr/bin/env bash
# Instructions per session open, counted by callgrind: a figure that does not move with the
# machine's load, for A/B-ing the open path (benches/README.md, "Session opens, round 2").
#
#   benches/open_instructions.sh [PYTHONPATH] [OPENS]
#
# Runs a gateway (a `none` agent relayed to loadgen's echo bot) under valgrind's callgrind,
# opens 70 sessions to warm it up, zeroes the counters, opens OPENS (default 300) one at a time
# through /ws/generic, dumps, and prints user-space instructions per open of the gateway process
# (every thread). Needs valgrind and benches/loadgen built (CARGO_TARGET_DIR=/tmp/target-loadgen).
set -euo pipefail
pp=${1:-$(cd "$(dirname "$0")/../python" && pwd)}
opens=${2:-300}
lg=${LOADGEN:-/tmp/target-loadgen/release/loadgen}
py=$(python -c 'import sys, os; print(os.path.realpath(sys.executable))')
dir=$(mktemp -d)
trap 'kill "${vg:-}" "${bot:-}" 2>/dev/null || true; [ -n "${KEEP:-}" ] && cp "$dir"/cg.*.1 "$KEEP"; rm -rf "$dir"' EXIT
# shellcheck source=benches/bench_gateway.sh
. "$(dirname "$0")/bench_gateway.sh"
bot_port=$(free_port); port=$(free_port)
"$lg" echo-server --port "$bot_port" >"$dir/bot.log" 2>&1 & bot=$!
bench_config "$dir/gw.toml" "$port" "$bot_port"
PYTHONPATH=$pp valgrind --tool=callgrind --callgrind-out-file="$dir/cg.%p" \
    "$py" -m wsgate serve --config "$dir/gw.toml" >"$dir/gw.log" 2>&1 & vg=$!
for _ in $(seq 240); do
    ss -ltn | grep -q ":$port " && break
    sleep 0.5
done
url="ws://127.0.0.1:$port/ws/generic/echo.bench"
"$lg" opens --url "$url" --conns 50 --parallel 1 --warmup-opens 20 >/dev/null
callgrind_control -z "$vg" >/dev/null
"$lg" opens --url "$url" --conns "$opens" --parallel 1 --warmup-opens 0 >"$dir/opens.json"
callgrind_control -d "$vg" >/dev/null
total=$(callgrind_annotate "$dir"/cg.*.1 | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')
echo "$pp: $((total / opens)) instructions per open ($opens opens, one at a time)"
