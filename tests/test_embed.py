"""The embedding API (README "Embedding"): wsgate.relay from a plain asyncio server and from trio
(the shipped examples, run as they are), accept_upgrade, concurrent relays that end out of order,
an unreachable bot, and how many relay threads an engine starts."""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path
from types import ModuleType
from urllib.parse import parse_qs, urlsplit

import anyio
import pytest
import trio
from websockets.exceptions import ConnectionClosedError

import wsgate
from wsgate._sockets import read_head

from .helpers import Bot, connect, in_thread, upgrade_request

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def talk(url: str, messages: list[str | bytes]) -> list[str | bytes]:
    """Send each message, read its echo, close with 1000."""
    with connect(url) as ws:
        answers = []
        for message in messages:
            ws.send(message)
            answers.append(ws.recv())
        return answers


MESSAGES: list[str | bytes] = ["hello", b"\x00\x01binary\xff", "é" * 3000]


def test_the_asyncio_example_relays_through_the_rust_engine(bot: Bot) -> None:
    relay_asyncio = example("relay_asyncio")

    async def main() -> tuple[wsgate.Outcome | None, list[str | bytes]]:
        loop = asyncio.get_running_loop()
        listener = socket.create_server(("127.0.0.1", 0))
        listener.setblocking(False)
        port = listener.getsockname()[1]
        client = asyncio.create_task(asyncio.to_thread(talk, f"ws://127.0.0.1:{port}/", MESSAGES))
        conn, _ = await loop.sock_accept(listener)
        outcome = await relay_asyncio.handle(conn, bot.url)
        listener.close()
        return outcome, await client

    outcome, answers = asyncio.run(main())
    assert answers == MESSAGES
    assert bot.sessions[0].messages == MESSAGES
    assert outcome is not None
    assert (outcome.ended_by, outcome.client_close) == ("client", (1000, ""))
    assert (outcome.messages_in, outcome.messages_out) == (3, 3)
    # The bot gets a session id of its own, as behind the gateway.
    assert "X-Daily-Session-Id" in bot.sessions[0].headers


def test_the_trio_example_serves_sessions_until_cancelled(bot: Bot) -> None:
    relay_trio = example("relay_trio")

    async def main() -> list[list[str | bytes]]:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(relay_trio.serve, bot.url, 0)
            url = f"ws://127.0.0.1:{port}/"
            answers = [await trio.to_thread.run_sync(talk, url, MESSAGES) for _ in range(2)]
            nursery.cancel_scope.cancel()
        return answers

    assert trio.run(main) == [MESSAGES, MESSAGES]
    bot.wait_ended(2)
    assert [s.messages for s in bot.sessions] == [MESSAGES, MESSAGES]


def test_accept_upgrade_answers_101_or_refuses_with_400() -> None:
    head = upgrade_request("/anything", "Sec-WebSocket-Protocol: chat.v2")
    answer = wsgate.accept_upgrade(head, subprotocol="chat.v2")
    assert answer.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert b"Sec-WebSocket-Protocol: chat.v2\r\n" in answer
    with pytest.raises(wsgate.HttpError) as refused:
        wsgate.accept_upgrade(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert refused.value.status == 400
    assert refused.value.response().startswith(b"HTTP/1.1 400 Bad Request\r\n")
    with pytest.raises(ValueError, match="not offered"):
        wsgate.accept_upgrade(head, subprotocol="other")


async def accept_upgraded(listener: socket.socket) -> tuple[socket.socket, bytes]:
    """Accept one client on a raw listener and answer its upgrade, as an embedder would."""
    await anyio.wait_readable(listener)
    conn, _ = listener.accept()
    conn.setblocking(False)
    head, rest = await read_head(conn, 8192)
    conn.sendall(wsgate.accept_upgrade(head))
    return conn, rest


def long_client(url: str, release: threading.Event) -> None:
    with connect(url) as ws:
        ws.send("hi")
        assert ws.recv() == "hi"
        assert release.wait(10)
        ws.close(4000, "done")


@pytest.mark.anyio
async def test_concurrent_relays_each_return_their_own_outcome_in_any_order(bot: Bot) -> None:
    relayer = wsgate.Relayer(threads=1)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    url = f"ws://127.0.0.1:{listener.getsockname()[1]}/"
    outcomes: dict[str, wsgate.Outcome] = {}
    short_done = anyio.Event()
    release_long = threading.Event()
    try:
        async with anyio.create_task_group() as tg:

            async def session(name: str, body: object, conn: socket.socket, rest: bytes) -> None:
                outcomes[name] = await relayer.relay(conn, bot.url, pending=rest, body=body)
                if name == "short":
                    short_done.set()

            tg.start_soon(in_thread, long_client, url, release_long)
            tg.start_soon(session, "long", {"n": 1}, *await accept_upgraded(listener))

            async def short_client() -> None:
                assert await in_thread(talk, url, ["bye"]) == ["bye"]

            tg.start_soon(short_client)
            tg.start_soon(session, "short", {"n": 2}, *await accept_upgraded(listener))
            # The session that started second ends first: its relay returns while the other
            # call holds the engine's doorbell.
            with anyio.fail_after(10):
                await short_done.wait()
            assert "long" not in outcomes
            release_long.set()
    finally:
        listener.close()
        relayer.close()
    assert outcomes["short"].client_close == (1000, "")
    assert outcomes["long"].client_close == (4000, "done")
    # Each bot got its session's body as ?body= (base64 of the JSON), as behind the gateway.
    bodies = [parse_qs(urlsplit(s.path).query)["body"][0] for s in bot.sessions]
    assert sorted(json.loads(base64.b64decode(b))["n"] for b in bodies) == [1, 2]


@pytest.mark.anyio
async def test_an_unreachable_bot_closes_the_client_1011_and_raises_502() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    url = f"ws://127.0.0.1:{listener.getsockname()[1]}/"
    refused = socket.create_server(("127.0.0.1", 0))
    dead = f"ws://127.0.0.1:{refused.getsockname()[1]}/ws"
    refused.close()  # nothing listens there now: the dial is refused

    def client() -> tuple[int, str]:
        with connect(url) as ws:
            with pytest.raises(ConnectionClosedError) as closed:
                ws.recv()
            assert closed.value.rcvd is not None
            return closed.value.rcvd.code, closed.value.rcvd.reason

    try:
        async with anyio.create_task_group() as tg:
            result: list[tuple[int, str]] = []

            async def run_client() -> None:
                result.append(await in_thread(client))

            tg.start_soon(run_client)
            conn, rest = await accept_upgraded(listener)
            with pytest.raises(wsgate.HttpError) as error:
                await wsgate.relay(conn, dead, pending=rest, dial_timeout=5)
    finally:
        listener.close()
    assert error.value.status == 502
    assert error.value.reason.startswith("bot unreachable")
    assert result == [(1011, "bot unreachable")]


@pytest.mark.anyio
async def test_a_bad_upstream_url_is_refused_before_anything_is_sent() -> None:
    left, right = socket.socketpair()
    try:
        with pytest.raises(ValueError, match="must be a ws:// URL"):
            await wsgate.relay(left, "http://bot/ws")
        right.setblocking(False)
        with pytest.raises(BlockingIOError):
            right.recv(1)  # nothing was sent to the client, which is still the caller's
        assert left.fileno() != -1
    finally:
        left.close()
        right.close()


RELAY_THREADS = """
import os, sys, time
import wsgate._core as core

def relay_threads():
    names = [open(f"/proc/self/task/{t}/comm").read() for t in os.listdir("/proc/self/task")]
    return sum(n.startswith("wsgate-relay-") for n in names)

try:
    engine = core.Engine(int(sys.argv[1]), 60.0)
except OSError as exc:
    print(exc)
else:
    # Each thread names itself once it runs: count until the count holds for 0.2 s.
    seen, since = relay_threads(), time.monotonic()
    while time.monotonic() - since < 0.2:
        time.sleep(0.01)
        if (n := relay_threads()) != seen:
            seen, since = n, time.monotonic()
    print(seen)
"""


@pytest.mark.parametrize(
    ("threads", "variable", "started"),
    [
        (3, "5", "3"),  # the setting, when it says a number
        (0, "5", "5"),  # else $WSGATE_RELAY_THREADS
        (0, None, str(max(1, len(os.sched_getaffinity(0)) // 2))),  # else half the CPUs
        (0, "0", 'WSGATE_RELAY_THREADS must be a positive integer, not "0"'),
    ],
)
def test_an_engine_starts_its_setting_else_the_variable_else_half_the_cpus_in_relay_threads(
    threads: int, variable: str | None, started: str
) -> None:
    env = {k: v for k, v in os.environ.items() if k != "WSGATE_RELAY_THREADS"}
    if variable is not None:
        env["WSGATE_RELAY_THREADS"] = variable
    run = subprocess.run(
        [sys.executable, "-c", RELAY_THREADS, str(threads)],
        env=env, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert run.stdout.strip() == started, run.stderr
