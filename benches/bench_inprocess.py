#!/usr/bin/env python3
"""In-process bots: one echo bot, written against the Starlette WebSocket API, served by wsgate
in-process and by uvicorn + FastAPI (the path Pipecat's runner uses); messages per second.

    python benches/bench_inprocess.py                 # 32 sessions, 64-byte messages, 10 s each
    python benches/bench_inprocess.py --seconds 3     # shorter

Each server runs in its own process (asyncio, Python's default event loop; uvicorn with its
defaults otherwise). The load comes from ``benches/loadgen`` (Rust; built on first use, as
``benches/load.py`` does): ``saturate`` keeps ``--inflight`` messages in flight on each of
``--conns`` sessions and counts round trips. One run of each; the result is a table and the ratio.
Needs the ``pipecat`` test extra (fastapi, uvicorn). Plain ``pytest`` does not run this file.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoint's annotation at run time.
import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
LOADGEN_DIR = HERE / "loadgen"
BOT_HOST = "echo.bench"


async def echo(websocket: Any) -> None:
    """The bot under test, the same code on both servers: every message back, unchanged."""
    from starlette.websockets import WebSocketDisconnect  # wsgate's, too, with Starlette present

    try:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            text = message.get("text")
            if text is not None:
                await websocket.send_text(text)
            else:
                await websocket.send_bytes(message["bytes"])
    except WebSocketDisconnect:
        pass  # the load generator stops with messages in flight


def serve_wsgate(port: int) -> None:
    import anyio

    from wsgate import Config, Gateway, GatewaySettings

    gateway = Gateway(Config(gateway=GatewaySettings(port=port)))

    @gateway.bot(BOT_HOST)
    async def bot(args: Any) -> None:
        await echo(args.websocket)

    async def main() -> None:
        async with gateway.running():
            await anyio.sleep_forever()

    anyio.run(main)


def serve_uvicorn(port: int) -> None:
    import fastapi
    import uvicorn

    app = fastapi.FastAPI()

    @app.websocket(f"/ws/generic/{BOT_HOST}")
    async def endpoint(websocket: fastapi.WebSocket) -> None:
        await websocket.accept()
        await echo(websocket)

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)  # polling a child's port, not synchronising our own code
    raise RuntimeError(f"nothing listens on port {port}")


def build_loadgen() -> Path:
    target = Path(os.environ.get("CARGO_TARGET_DIR", "/tmp/target-loadgen"))
    exe = target / "release" / "loadgen"
    if not exe.exists():
        print(f"building loadgen (CARGO_TARGET_DIR={target})", file=sys.stderr)
        subprocess.run(
            [
                "cargo",
                "build",
                "--release",
                "--quiet",
                "--manifest-path",
                LOADGEN_DIR / "Cargo.toml",
            ],
            check=True,
            env=dict(os.environ, CARGO_TARGET_DIR=str(target)),
        )
    return exe


def measure(kind: str, loadgen: Path, args: argparse.Namespace) -> dict[str, Any]:
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve", kind, "--port", str(port)],
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_port(port, server)
        cmd = [
            str(loadgen),
            "saturate",
            "--url",
            f"ws://127.0.0.1:{port}/ws/generic/{BOT_HOST}",
            "--conns",
            str(args.conns),
            "--inflight",
            str(args.inflight),
            "--size",
            str(args.size),
            "--seconds",
            str(args.seconds),
            "--relay-pids",
            str(server.pid),
        ]
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=args.seconds + 120)
        lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
        if run.returncode or not lines:
            raise RuntimeError(f"loadgen failed ({run.returncode}): {run.stderr[-400:]}")
        result: dict[str, Any] = json.loads(lines[-1])
        return result
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conns", type=int, default=32)
    parser.add_argument("--inflight", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--json", type=Path, help="also write the raw figures here")
    parser.add_argument("--serve", choices=["wsgate", "uvicorn"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve == "wsgate":
        serve_wsgate(args.port)
        return 0
    if args.serve == "uvicorn":
        serve_uvicorn(args.port)
        return 0
    loadgen = build_loadgen()
    results = {kind: measure(kind, loadgen, args) for kind in ("uvicorn", "wsgate")}
    print(
        f"echo bot, {args.conns} sessions x {args.inflight} in flight, {args.size}-byte "
        f"messages, {args.seconds:g} s, {os.cpu_count()} CPUs"
    )
    print(
        f"{'server':<22}{'msgs/s':>10}{'p50 µs':>9}{'p99 µs':>9}{'server CPU s':>14}"
        f"{'CPU µs/msg':>12}{'errors':>8}"
    )
    names = {"uvicorn": "uvicorn + FastAPI", "wsgate": "wsgate in-process"}
    for kind, r in results.items():
        cpu = r["relay_cpu_s"]
        print(
            f"{names[kind]:<22}{r['msgs_per_s']:>10.0f}{r['p50_us']:>9.0f}{r['p99_us']:>9.0f}"
            f"{cpu:>14.1f}{cpu / r['round_trips'] * 1e6:>12.1f}{r['errors']:>8}"
        )
    ratio = results["wsgate"]["msgs_per_s"] / results["uvicorn"]["msgs_per_s"]
    print(f"wsgate / uvicorn: {ratio:.2f}x (target >= 2x)")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, **results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
