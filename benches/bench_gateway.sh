# Sourced by the open benches' scripts (open_instructions.sh, open_threads.sh,
# open_beside_nginx.sh, relayfloor/rounds.sh): the gateway they measure, one `none` agent
# `echo.bench` relayed to loadgen's echo bot, and nginx beside it.

# A TCP port free on 127.0.0.1 now.
free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# bench_config FILE PORT BOT_PORT: the gateway's config, listening on PORT, its bot on BOT_PORT.
bench_config() {
  cat > "$1" <<TOML
[gateway]
host = "127.0.0.1"
port = $2
[[org]]
name = "bench"
public_keys = []
[[agent]]
name = "echo"
org = "bench"
upstream = "ws://127.0.0.1:$3/ws"
max_sessions = 100000
TOML
}

# serve_bench DIR PYTHONPATH LOADGEN: loadgen's echo bot and a gateway (PYTHONPATH's wsgate)
# relaying echo.bench to it, logs in DIR; waits until the gateway serves. Sets gw_port,
# bot_port and gw (the gateway's pid), and adds both pids to the caller's `pids` array.
serve_bench() {
  gw_port=$(free_port)
  bot_port=$(free_port)
  bench_config "$1/gw.toml" "$gw_port" "$bot_port"
  "$3" echo-server --port "$bot_port" > "$1/bot.log" 2>&1 &
  pids+=($!)
  PYTHONPATH=$2 python3 -m wsgate serve --config "$1/gw.toml" > "$1/gw.log" 2>&1 &
  gw=$!
  pids+=("$gw")
  for _ in $(seq 100); do
    grep -q "serving on" "$1/gw.log" 2>/dev/null && break
    sleep 0.1
  done
}

# nginx_config DIR PORT BOT_PORT WORKERS: benches/nginx.conf.template filled in as DIR/nginx.conf
# (its temp paths in DIR), nginx listening on PORT with WORKERS workers, relaying /ws to the bot
# on BOT_PORT, plain, 4 KiB buffers (load.py's own nginx). Start it with
# `nginx -p DIR -c DIR/nginx.conf -e DIR/error.log`.
nginx_config() {
  mkdir -p "$1"
  sed -e "s/@@USER_LINE@@//; s/@@WORKERS@@/$4/; s/@@NOFILE@@/4096/; s/@@WORKER_CONNECTIONS@@/4000/" \
      -e "s|@@PREFIX@@|$1|g; s/@@EXTRA_TEMP_PATHS@@//; s/@@PORT@@/$2/; s/@@LISTEN_SSL@@//" \
      -e "s/@@SSL_LINES@@//; s/@@UPSTREAM_PORT@@/$3/; s/@@UPSTREAM_SCHEME@@/http/" \
      -e "s/@@PROXY_SSL_LINES@@//; s/@@BUFFER_SIZE@@/4k/" \
      -e "s|proxy_temp_path .*|proxy_temp_path $1/p; fastcgi_temp_path $1/f; uwsgi_temp_path $1/u; scgi_temp_path $1/s;|" \
      "$(dirname "${BASH_SOURCE[0]}")/nginx.conf.template" > "$1/nginx.conf"
}
