#!/usr/bin/env bash
# Session opens of one wsgate process and one nginx worker, side by side in alternating rounds
# on the same echo bot: opens per second, open time p50 and p99, and each one's CPU per
# session split into user and system time (/proc/PID/task/*/stat, every thread). A quicker
# look than load.py's open phase, for the question "where does the difference go" (benches/
# README.md, "Session opens, round 8").
#
# usage: benches/open_beside_nginx.sh [PYTHONPATH] [N] [PARALLEL] [ROUNDS]
#   defaults: ./python, 4000, 1, 3. nginx from Debian (benches/nginx.conf.template, 1 worker);
#   loadgen: $LOADGEN, else the one load.py builds (/tmp/target-loadgen/release/loadgen).
set -euo pipefail
pythonpath=$(realpath "${1:-python}")
n=${2:-4000}
parallel=${3:-1}
rounds=${4:-3}
here=$(cd "$(dirname "$0")" && pwd)
loadgen=${LOADGEN:-${CARGO_TARGET_DIR:-/tmp/target-loadgen}/release/loadgen}
[ -x "$loadgen" ] || { echo "no loadgen at $loadgen: run benches/load.py once, or set LOADGEN" >&2; exit 2; }

tmp=$(mktemp -d)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; wait "${pids[@]}" 2>/dev/null || true; rm -rf "$tmp"' EXIT
# shellcheck source=benches/bench_gateway.sh
. "$here/bench_gateway.sh"
serve_bench "$tmp" "$pythonpath" "$loadgen"
ng_port=$(free_port)
nginx_config "$tmp/ng" "$ng_port" "$bot_port" 1
nginx -p "$tmp/ng" -c "$tmp/ng/nginx.conf" -e "$tmp/ng/error.log" > "$tmp/ng.out" 2>&1 &
pids+=($!)
for _ in $(seq 100); do
  [ -s "$tmp/ng/nginx.pid" ] && break
  sleep 0.1
done
worker=""
for _ in $(seq 50); do
  worker=$(pgrep -P "$(cat "$tmp/ng/nginx.pid")" || true)
  [ -n "$worker" ] && break
  sleep 0.1
done
[ -n "$worker" ] || { echo "nginx did not start: $(cat "$tmp/ng/error.log")" >&2; exit 1; }
hz=$(getconf CLK_TCK)

# User and system ticks so far of every thread of process $1.
ticks() {
  local user=0 sys=0 u s
  for t in /proc/"$1"/task/*; do
    read -r u s < <(awk '{print $14, $15}' "$t/stat")
    user=$((user + u))
    sys=$((sys + s))
  done
  echo "$user $sys"
}

for _ in $(seq "$rounds"); do
  for target in "wsgate $gw_port /ws/generic/echo.bench $gw" "nginx $ng_port /ws $worker"; do
    read -r name port path pid <<< "$target"
    url="ws://127.0.0.1:$port$path"
    "$loadgen" opens --url "$url" --conns 200 --parallel "$parallel" --warmup-opens 50 > /dev/null
    read -r u0 s0 < <(ticks "$pid")
    out=$("$loadgen" opens --url "$url" --conns "$n" --parallel "$parallel" --warmup-opens 0)
    read -r u1 s1 < <(ticks "$pid")
    echo "$out" | python3 -c '
import json, sys
d = json.load(sys.stdin)
name, n, hz, du, ds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
def us(t): return t * 1e6 / hz / n
rate, p50, p99 = d["opens_per_s"], d["p50_us"], d["p99_us"]
print(f"{name:7} {rate:7,.0f} opens/s  p50 {p50:5.0f} p99 {p99:5.0f} us"
      f"  cpu {us(du + ds):4.0f} us/session (user {us(du):3.0f}, system {us(ds):3.0f})")
' "$name" "$n" "$hz" $((u1 - u0)) $((s1 - s0))
  done
done
