"""The Session API streamed (issue 16): a bot's answer reaches the caller as the bot sends it (a
part before the bot has sent the next; larger than any buffer), a chunked request body is taken
and reaches the bot with a ``Content-Length``, and a body that is refused or too slow never
reaches the bot while other sessions go on. A FastAPI + uvicorn bot in a thread of its own, real
sockets on 127.0.0.1, both anyio backends."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import pytest

from wsgate import AgentConfig, Config, Gateway, GatewaySettings, OrgConfig
from wsgate.start import MAX_REQUEST_BYTES

from .helpers import (
    accept_upgrade,
    call,
    dechunk,
    http_answer,
    in_thread,
    open_ws,
    receive_until,
    session_id,
    uvicorn_in_thread,
)

pytestmark = pytest.mark.anyio

BIG = 3 * 1024 * 1024  # over the 1 MiB the answer was once buffered to


@dataclass
class StreamingBot:
    """``/ws`` (echo), ``GET /stream`` (``part-1``, then ``part-2`` once ``release`` is set),
    ``GET /big`` (:data:`BIG` bytes), ``POST /update-context`` (records each call)."""

    url: str
    calls: list[dict[str, Any]]
    release: threading.Event = field(default_factory=threading.Event)


@pytest.fixture
def streaming_bot() -> Iterator[StreamingBot]:
    import fastapi
    from fastapi.responses import JSONResponse, Response, StreamingResponse

    app = fastapi.FastAPI()
    calls: list[dict[str, Any]] = []
    release = threading.Event()

    async def ws_endpoint(websocket: fastapi.WebSocket) -> None:
        await websocket.accept()
        try:
            while True:
                await websocket.send_text(await websocket.receive_text())
        except fastapi.WebSocketDisconnect:
            pass

    async def parts() -> AsyncIterator[bytes]:
        yield b"part-1\n"
        # Only once the caller holds part 1: a gateway that buffered would never release it.
        await asyncio.to_thread(release.wait, 30)
        yield b"part-2\n"

    async def stream(request: fastapi.Request) -> fastapi.Response:
        return StreamingResponse(parts(), media_type="text/plain")

    async def big(request: fastapi.Request) -> fastapi.Response:
        return Response(b"b" * BIG, media_type="application/octet-stream")

    async def update_context(request: fastapi.Request) -> fastapi.Response:
        seen = {
            "body": await request.json(),
            "content-length": request.headers.get("content-length"),
            "transfer-encoding": request.headers.get("transfer-encoding"),
            "session": request.headers.get("x-daily-session-id"),
        }
        calls.append(seen)
        return JSONResponse({"updated": seen["body"]}, status_code=201)

    # FastAPI reads the parameters' classes from their annotations, which are strings here.
    ws_endpoint.__annotations__["websocket"] = fastapi.WebSocket
    for route in (stream, big, update_context):
        route.__annotations__.update({"request": fastapi.Request, "return": fastapi.Response})
    app.add_api_websocket_route("/ws", ws_endpoint)
    app.add_api_route("/stream", stream, methods=["GET"])
    app.add_api_route("/big", big, methods=["GET"])
    app.add_api_route("/update-context", update_context, methods=["POST"])
    try:
        with uvicorn_in_thread(app) as port:
            yield StreamingBot(f"ws://127.0.0.1:{port}/ws", calls, release)
    finally:
        release.set()


@asynccontextmanager
async def live_session(upstream: str, **settings: Any) -> AsyncIterator[tuple[Gateway, Any, str]]:
    """A gateway relaying ``bot.test`` to ``upstream``, with one live session: the gateway, the
    session's client and the Session API's base path for it."""
    config = Config(
        gateway=GatewaySettings(port=0, **settings),
        orgs=[OrgConfig("test", public_keys=["pk_test"])],
        agents=[AgentConfig("bot", "test", upstream=upstream)],
    )
    async with Gateway(config).running() as gw:
        ws = await in_thread(open_ws, f"{gw.url}/ws/generic/bot.test")
        try:
            yield gw, ws, f"/v1/public/bot/sessions/{session_id(ws)}"
        finally:
            await in_thread(ws.close)


def request_head(method: str, target: str, *fields: str) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: gw", "Authorization: Bearer pk_test", *fields]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


async def test_the_bots_answer_reaches_the_caller_as_the_bot_sends_it(
    streaming_bot: StreamingBot,
) -> None:
    async with live_session(streaming_bot.url) as (gw, ws, base):
        async with await anyio.connect_tcp("127.0.0.1", gw.port) as s:
            await s.send(request_head("GET", f"{base}/stream"))
            with anyio.fail_after(20):
                data = await receive_until(s, b"", b"part-1\n")
                assert b"part-2" not in data  # the bot has not sent it yet
                streaming_bot.release.set()
                data = await receive_until(s, data, b"\r\n0\r\n\r\n")
        assert status_of(data) == 200
        assert b"transfer-encoding: chunked" in data.lower()  # the bot's own framing, as it is
        assert dechunk(data) == b"part-1\npart-2\n"
        # Larger than any buffer the gateway keeps: passed on read by read.
        status, body = await call(gw, "GET", f"{base}/big", "pk_test")
        assert (status, len(body), body.strip(b"b")) == (200, BIG, b"")
        ws.send("the session goes on")
        assert await in_thread(ws.recv, 20) == "the session goes on"


async def test_a_chunked_body_reaches_the_bot_with_a_content_length(
    streaming_bot: StreamingBot,
) -> None:
    document = {"messages": [{"role": "system", "content": "be brief"}]}
    text = json.dumps(document).encode()
    # Two chunks, a chunk extension and a trailer field: all framing, none of it for the bot.
    body = b"%x;note=1\r\n%b\r\n%x\r\n%b\r\n0\r\nX-Checksum: 7\r\n\r\n" % (
        10, text[:10], len(text) - 10, text[10:]
    )  # fmt: skip
    async with live_session(streaming_bot.url) as (gw, _, base):
        head = request_head(
            "POST", f"{base}/update-context", "Content-Type: application/json",
            "Transfer-Encoding: chunked",
        )  # fmt: skip
        async with await anyio.connect_tcp("127.0.0.1", gw.port) as s:
            await s.send(head + body)
            with anyio.fail_after(20):
                answer = await receive_until(s, b"", None)
    assert status_of(answer) == 201
    assert json.loads(answer.partition(b"\r\n\r\n")[2]) == {"updated": document}
    (seen,) = streaming_bot.calls
    assert (seen["body"], seen["content-length"], seen["transfer-encoding"]) == (
        document,
        str(len(text)),
        None,
    )


@pytest.mark.parametrize(
    ("fields", "body", "status"),
    [
        # A chunk that would pass the limit: refused on its size line, its data never read.
        (["Transfer-Encoding: chunked"], b"%x\r\n" % (MAX_REQUEST_BYTES + 1), 413),
        (["Transfer-Encoding: chunked"], b"4\r\nabcd\r\n" * 16 + b"fffff\r\n", 413),
        (["Transfer-Encoding: chunked"], b"zz\r\nabcd\r\n0\r\n\r\n", 400),
        (["Transfer-Encoding: chunked"], b"4\r\nabcdXY0\r\n\r\n", 400),
        (["Transfer-Encoding: chunked", "Content-Length: 4"], b"abcd", 400),
        (["Transfer-Encoding: gzip"], b"", 501),
        ([f"Content-Length: {MAX_REQUEST_BYTES + 1}"], b"", 413),
    ],
)
async def test_a_body_refused_for_its_framing_or_size_never_reaches_the_bot(
    streaming_bot: StreamingBot, fields: list[str], body: bytes, status: int
) -> None:
    async with live_session(streaming_bot.url) as (gw, _, base):
        async with await anyio.connect_tcp("127.0.0.1", gw.port) as s:
            await s.send(request_head("POST", f"{base}/update-context", *fields) + body)
            with anyio.fail_after(20):
                answer = await receive_until(s, b"", None)
    assert status_of(answer) == status
    reason = json.loads(answer.partition(b"\r\n\r\n")[2])
    assert reason["code"] == str(status) and "\n" not in reason["error"]
    assert streaming_bot.calls == []


async def test_a_slow_body_is_answered_408_in_time_and_never_reaches_the_bot(
    streaming_bot: StreamingBot,
) -> None:
    """One client stalls in a body of known length, one in a chunked body: each gets 408 once
    ``handshake_timeout`` (the whole request's) is over; meanwhile the session and another
    Session API call go on; the bot never hears of the slow ones."""
    timeout = 1.0
    async with live_session(streaming_bot.url, handshake_timeout=timeout) as (gw, ws, base):
        target = f"{base}/update-context"
        stalled = [
            request_head("POST", target, "Content-Length: 100") + b'{"messages": ',
            request_head("POST", target, "Transfer-Encoding: chunked") + b'20\r\n{"mess',
        ]
        slow = [await anyio.connect_tcp("127.0.0.1", gw.port) for _ in stalled]
        try:
            started = anyio.current_time()
            for s, data in zip(slow, stalled, strict=True):
                await s.send(data)
            # Others are undisturbed while they stall.
            ok = json.dumps({"messages": []}).encode()
            status, _ = await call(gw, "POST", target, "pk_test", ok)
            assert status == 201
            ws.send("still here")
            assert await in_thread(ws.recv, 20) == "still here"
            for s in slow:
                with anyio.fail_after(timeout + 10):
                    answer = await receive_until(s, b"", None)
                assert status_of(answer) == 408
                document = json.loads(answer.partition(b"\r\n\r\n")[2])
                assert document == {"error": "Request body not received in time", "code": "408"}
            assert anyio.current_time() - started < timeout + 10
        finally:
            for s in slow:
                await s.aclose()
    assert [c["body"] for c in streaming_bot.calls] == [{"messages": []}]


class StallingOrigin:
    """A bot whose WebSocket opens (its first connection: the gateway's dial, answered 101)
    and whose HTTP origin sends the head and 6 of 100 bytes of body, then nothing."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._run, daemon=True).start()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.listener.getsockname()[1]}/ws"

    def _run(self) -> None:
        for answer in (None, b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npart-1"):
            conn, _ = self.listener.accept()
            self.conns.append(conn)
            if answer is None:
                accept_upgrade(conn)
            else:
                conn.recv(65536)  # the request (small: it comes in one read here)
                conn.sendall(answer)

    def close(self) -> None:
        for conn in self.conns:
            conn.close()
        self.listener.close()


async def test_an_answer_that_stalls_midway_is_cut_short(caplog: pytest.LogCaptureFixture) -> None:
    origin = StallingOrigin()
    try:
        async with live_session(origin.url, session_api_timeout=1.0) as (gw, _, base):
            status, headers, body = await http_answer(gw.port, request_head("GET", f"{base}/x"))
            origin.close()  # the session ends with its bot
        # The head went on at once; the client sees a body shorter than its length said.
        assert (status, headers["content-length"], body) == (200, "100", b"part-1")
        assert "a Session API answer (status 200) was cut short" in caplog.text
    finally:
        origin.close()
