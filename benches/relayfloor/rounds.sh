#!/usr/bin/env bash
# The saturated relay's floor (benches/README.md): CPU per relayed message of nginx (1 and 2
# workers), the lean byte relays of this crate (epoll; io_uring with DEFER_TASKRUN; io_uring
# multishot recv with provided buffers and registered files) and wsgate, in alternating rounds of
# `loadgen saturate` (32 x 8 x 256 B) on one echo bot. Prints each run's JSON, then per target
# the median µs per relayed message (relay CPU / 2 round trips) and its ratio to nginx-1w.
#
# usage: benches/relayfloor/rounds.sh [ROUNDS] [SECONDS] [WSGATE_PYTHONPATH]
#   defaults: 5, 8, ./python. loadgen: $LOADGEN, else /tmp/target-loadgen/release/loadgen.
set -euo pipefail
rounds=${1:-5}
secs=${2:-8}
here=$(cd "$(dirname "$0")" && pwd)
benches=$(dirname "$here")
pythonpath=$(realpath "${3:-$benches/../python}")
loadgen=${LOADGEN:-/tmp/target-loadgen/release/loadgen}
[ -x "$loadgen" ] || { echo "no loadgen at $loadgen: run benches/load.py once, or set LOADGEN" >&2; exit 2; }
target_dir=${CARGO_TARGET_DIR:-/tmp/target-relayfloor}
CARGO_TARGET_DIR=$target_dir cargo build -q --release --manifest-path "$here/Cargo.toml"
bin=$target_dir/release

tmp=$(mktemp -d)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$tmp"' EXIT
# shellcheck source=benches/bench_gateway.sh
. "$benches/bench_gateway.sh"
bot=$(free_port)
"$loadgen" echo-server --port "$bot" > "$tmp/bot.log" 2>&1 &
pids+=($!)
declare -A url relay
for w in 1 2; do
  p=$(free_port)
  d=$tmp/ng$w
  nginx_config "$d" "$p" "$bot" "$w"
  nginx -p "$d" -c "$d/nginx.conf" -e "$d/error.log" > "$d/out" 2>&1 &
  pids+=($!)
  for _ in $(seq 100); do [ -s "$d/nginx.pid" ] && break; sleep 0.1; done
  sleep 0.5
  url[nginx-${w}w]="ws://127.0.0.1:$p/ws"
  relay[nginx-${w}w]=$(pgrep -P "$(cat "$d/nginx.pid")" | paste -sd,)  # the workers
done
start() {  # NAME BINARY ARGS...: a relay of this crate
  local name=$1 p
  shift
  p=$(free_port)
  "$@" --listen "$p" --upstream "127.0.0.1:$bot" &
  pids+=($!)
  url[$name]="ws://127.0.0.1:$p/ws"
  relay[$name]=$!
}
start epoll "$bin/epoll"
start uring-defer "$bin/uring" --mode defer
start uring-ms-fixed "$bin/uringms" --mode ms-fixed
gw=$(free_port)
bench_config "$tmp/gw.toml" "$gw" "$bot"
PYTHONPATH=$pythonpath python3 -m wsgate serve --config "$tmp/gw.toml" > "$tmp/gw.log" 2>&1 &
pids+=($!)
url[wsgate]="ws://127.0.0.1:$gw/ws/generic/echo.bench"
relay[wsgate]=$!
for _ in $(seq 100); do grep -q "serving on" "$tmp/gw.log" 2>/dev/null && break; sleep 0.1; done
sleep 1
targets="nginx-1w nginx-2w epoll uring-defer uring-ms-fixed wsgate"
for r in $(seq "$rounds"); do
  for t in $targets; do
    res=$(flock /tmp/bench.lock "$loadgen" saturate --url "${url[$t]}" --conns 32 --inflight 8 \
          --size 256 --seconds "$secs" --relay-pids "${relay[$t]}")
    echo "{\"round\":$r,\"target\":\"$t\",\"res\":$res}" | tee -a "$tmp/runs.jsonl"
  done
done
python3 - "$tmp/runs.jsonl" <<'PY'
import json, statistics, sys
runs = [json.loads(line) for line in open(sys.argv[1])]
us = {}  # (round, target) -> CPU µs per relayed message
for r in runs:
    res = r["res"]
    us[r["round"], r["target"]] = res["relay_cpu_s"] / (2 * res["round_trips"]) * 1e6
rounds = sorted({k[0] for k in us})
print(f"{'target':16} {'us/msg':>7} {'x nginx-1w':>10}  (median of {len(rounds)} rounds; min-max of the ratio)")
for t in dict.fromkeys(r["target"] for r in runs):
    ratios = [us[n, t] / us[n, "nginx-1w"] for n in rounds]
    print(f"{t:16} {statistics.median(us[n, t] for n in rounds):7.3f} "
          f"{statistics.median(ratios):10.3f}  {min(ratios):.3f}-{max(ratios):.3f}")
PY
