# Sourced by the open benches' scripts (open_instructions.sh, open_threads.sh): the gateway they
# measure, one `none` agent `echo.bench` relayed to loadgen's echo bot.

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
