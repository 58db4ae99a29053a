"""Bad upgrade requests get their HTTP status and a one-line reason, and cost nothing else: the
upstream is never dialled, and other sessions go on."""

from __future__ import annotations

import base64
import json
import socket

import anyio
import pytest

from .conftest import Bot, Sentinel, connect, http_exchange, in_thread, serving, upgrade_request

pytestmark = pytest.mark.anyio

B64 = base64.b64encode


def body_of(size: int) -> str:
    """Base64 of a JSON string document of exactly `size` bytes."""
    doc = json.dumps("x" * (size - 2))
    assert len(doc) == size
    return B64(doc.encode()).decode()


CASES = [
    pytest.param(upgrade_request("/ws/other/bot.test"), 404, id="unknown path"),
    pytest.param(upgrade_request("/ws/generic/nobody.test"), 404, id="unknown agent"),
    pytest.param(upgrade_request("/ws/generic/bot.other"), 404, id="unknown org"),
    pytest.param(upgrade_request("/ws/generic"), 400, id="no service host"),
    pytest.param(upgrade_request("/ws/generic/bot"), 400, id="service host without org"),
    pytest.param(upgrade_request("/ws/generic/Bot.test"), 400, id="uppercase service host"),
    pytest.param(
        upgrade_request("/ws/generic/bot.test?serviceHost=bot.test"), 400, id="host twice"
    ),
    pytest.param(
        upgrade_request("/ws/generic?serviceHost=bot.test&serviceHost=bot.test"),
        400,
        id="serviceHost repeated",
    ),
    pytest.param(b"GET /ws/generic/bot.test HTTP/1.1\r\nHost: x\r\n\r\n", 400, id="not an upgrade"),
    pytest.param(
        upgrade_request("/ws/generic/bot.test").replace(b"Version: 13", b"Version: 8"),
        400,
        id="websocket version 8",
    ),
    pytest.param(upgrade_request("/ws/generic/bot.test").replace(b"GET", b"POST"), 400, id="POST"),
    pytest.param(b"\x16\x03\x01\x02\x00garbage\r\n\r\n", 400, id="TLS hello or garbage"),
    pytest.param(upgrade_request("/ws/generic/bot.test?body=%%%"), 400, id="body bad escape"),
    pytest.param(upgrade_request("/ws/generic/bot.test?body=!!!!"), 400, id="body not base64"),
    pytest.param(
        upgrade_request(f"/ws/generic/bot.test?body={B64(b'not json').decode()}"),
        400,
        id="body not json",
    ),
    pytest.param(
        upgrade_request(f"/ws/generic/bot.test?body={B64(bytes([0x22, 0xFF, 0x22])).decode()}"),
        400,
        id="body not utf-8",
    ),
    pytest.param(
        upgrade_request(f"/ws/generic/bot.test?body={body_of(4097)}"), 413, id="body over 4 KB"
    ),
    pytest.param(
        upgrade_request(f"/ws/generic/bot.test?body={B64(b'[' * 2000 + b']' * 2000).decode()}"),
        400,
        id="body nested 2000 deep",
    ),
    pytest.param(upgrade_request("/ws/generic/bot.test?body=e30=&body=e30="), 400, id="body twice"),
    pytest.param(
        upgrade_request("/ws/generic/bot.test", "X-Filler: " + "a" * 9000), 431, id="huge header"
    ),
]


@pytest.mark.parametrize(("request_bytes", "status"), CASES)
async def test_a_bad_request_gets_its_status_and_the_bot_is_never_dialled(
    sentinel: Sentinel, request_bytes: bytes, status: int
) -> None:
    async with serving(sentinel.url) as gw:
        got, body = await http_exchange(gw.port, request_bytes)
    assert got == status
    reason = body.decode()
    assert reason.endswith("\n") and reason.count("\n") == 1 and len(reason) > 1
    assert not sentinel.dialled()


async def test_a_body_of_exactly_4096_bytes_is_accepted(bot: Bot) -> None:
    async with serving(bot.url) as gw:

        def client() -> None:
            with connect(f"{gw.url}/ws/generic/bot.test?body={body_of(4096)}") as ws:
                ws.send("x")
                ws.recv()

        await in_thread(client)
        bot.wait_ended()
    assert "body=" in bot.sessions[0].path


async def test_health_endpoints_answer_200(sentinel: Sentinel) -> None:
    async with serving(sentinel.url) as gw:
        for path in ("/livez", "/readyz"):
            status, body = await http_exchange(
                gw.port, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
            )
            assert (status, body) == (200, b"ok\n")
    assert not sentinel.dialled()


async def test_an_agent_at_capacity_answers_503_without_dialling(bot: Bot) -> None:
    async with serving(bot.url, max_sessions=1) as gw:

        def client() -> int:
            with connect(f"{gw.url}/ws/generic/bot.test") as ws:
                ws.send("first")
                assert ws.recv() == "first"
                try:
                    connect(f"{gw.url}/ws/generic/bot.test").close()
                except Exception as exc:  # websockets' InvalidStatus
                    return int(exc.response.status_code)  # type: ignore[attr-defined]
                return 101

        assert await in_thread(client) == 503
        bot.wait_ended()
    assert len(bot.sessions) == 1


async def test_a_refused_upstream_answers_502() -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now: connection refused
    async with serving(f"ws://127.0.0.1:{port}/ws") as gw:
        status, body = await http_exchange(gw.port, upgrade_request("/ws/generic/bot.test"))
    assert status == 502
    assert body.startswith(b"bot unreachable")


async def test_an_upstream_that_never_answers_its_upgrade_gets_504_after_the_dial_timeout(
    sentinel: Sentinel,
) -> None:
    # The sentinel accepts TCP (in its backlog) but never answers.
    async with serving(sentinel.url, dial_timeout=0.5) as gw:
        status, body = await http_exchange(gw.port, upgrade_request("/ws/generic/bot.test"))
    assert (status, body) == (504, b"bot unreachable: timed out\n")
    assert sentinel.dialled()


async def test_an_upstream_answering_without_101_gets_502() -> None:
    async with await anyio.create_tcp_listener(local_host="127.0.0.1") as listener:
        port = listener.extra(anyio.abc.SocketAttribute.local_port)

        async def answer_404() -> None:
            async def handle(stream: anyio.abc.SocketStream) -> None:
                async with stream:
                    await stream.receive()
                    await stream.send(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")

            await listener.serve(handle)

        async with anyio.create_task_group() as tg:
            tg.start_soon(answer_404)
            async with serving(f"ws://127.0.0.1:{port}/ws") as gw:
                status, body = await http_exchange(gw.port, upgrade_request("/ws/generic/bot.test"))
            tg.cancel_scope.cancel()
    assert status == 502
    assert b"404" in body


async def test_a_slow_upgrade_request_is_dropped_at_the_handshake_timeout(
    sentinel: Sentinel,
) -> None:
    async with serving(sentinel.url, handshake_timeout=0.5) as gw:
        async with await anyio.connect_tcp("127.0.0.1", gw.port) as s:
            await s.send(upgrade_request("/ws/generic/bot.test")[:40])
            with anyio.fail_after(10):
                with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                    await s.receive()
    assert not sentinel.dialled()


async def test_bad_requests_do_not_disturb_a_live_session(bot: Bot) -> None:
    async with serving(bot.url) as gw:

        def client() -> None:
            with connect(f"{gw.url}/ws/generic/bot.test") as ws:
                for request_bytes, status in [
                    (upgrade_request("/ws/generic/nobody.test"), 404),
                    (upgrade_request("/ws/generic/bot.test?body=!!!!"), 400),
                    (b"\x00" * 9000, 431),
                ]:
                    got, _ = anyio.from_thread.run(http_exchange, gw.port, request_bytes)
                    assert got == status
                    ws.send("still fine")
                    assert ws.recv() == "still fine"

        await in_thread(client)
        bot.wait_ended()
    assert len(bot.sessions) == 1
