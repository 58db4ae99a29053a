"""What the tests share, written once: WebSocket clients and upstream bots on real sockets on
127.0.0.1 (port 0), gateways in the test's event loop (asyncio or trio), raw HTTP and raw
WebSocket frames, and a clock a test sets by hand.

Plain functions and classes, imported by the test modules (``from .helpers import ...``); the
fixtures built from them (``bot``, ``sentinel``, ``backend``, ``redis``...) are in
``conftest.py``. Blocking client code (the sync ``websockets`` client, so the same client code runs
under both backends) goes through :func:`in_thread`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import ssl
import struct
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.from_thread
import anyio.to_thread
import pytest
import trustme
import websockets.sync.client as ws_client
import websockets.sync.server as ws_server
from anyio.abc import SocketStream
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.server import ServerConnection

from wsgate import AgentConfig, BotArguments, Config, Gateway, GatewaySettings, OrgConfig
from wsgate.tokens import TokenAuthority

T = TypeVar("T")

#: Tests whose code needs asyncio (Pipecat, the ``websockets`` asyncio client).
asyncio_only = pytest.mark.parametrize("anyio_backend", ["asyncio"])

# --- clients ----------------------------------------------------------------------------------


async def in_thread(fn: Callable[..., T], *args: Any) -> T:
    """Run blocking client code (the sync websockets client) without blocking the gateway."""
    # Enough worker threads for the 200-session tests: each sync client occupies one.
    anyio.to_thread.current_default_thread_limiter().total_tokens = 260
    return await anyio.to_thread.run_sync(fn, *args)


def connect(url: str, **kwargs: Any) -> ws_client.ClientConnection:
    """A plain client: no compression offered, no size limit of its own, short timeouts."""
    kwargs.setdefault("max_size", None)
    kwargs.setdefault("compression", None)
    kwargs.setdefault("open_timeout", 10)
    kwargs.setdefault("close_timeout", 10)
    return ws_client.connect(url, **kwargs)


def closed_with(fn: Callable[..., object], *args: Any) -> tuple[int, str]:
    """Call ``fn(*args)`` (say ``ws.recv`` and a timeout), which must end with the connection
    closed: the close frame the client received, as ``(code, reason)``. Fails when ``fn``
    returns instead (the connection stayed open, or a message came before the close) and when
    the connection ended without a close frame."""
    try:
        result = fn(*args)
    except ConnectionClosed as exc:
        assert exc.rcvd is not None, f"no close frame received: {exc!r}"
        return exc.rcvd.code, exc.rcvd.reason
    raise AssertionError(f"the connection stayed open: {fn.__name__} returned {result!r}")


def echoed(
    url: str, message: str | bytes = "x", headers: dict[str, str] | None = None, **kwargs: Any
) -> str | bytes:
    """One session with an echoing bot at ``url``: send ``message``, return what came back (the
    client then closes, 1000). ``headers`` and ``kwargs`` go to :func:`connect`."""
    with connect(url, additional_headers=headers or {}, **kwargs) as ws:
        ws.send(message)
        return ws.recv(timeout=20)


def closed_after(url: str, message: str | bytes = "x", **kwargs: Any) -> tuple[int, str]:
    """One session that the other side ends: send ``message``; the close the client gets
    (:func:`closed_with`: nothing may come before it). ``kwargs`` go to :func:`connect`."""
    with connect(url, **kwargs) as ws:
        ws.send(message)
        return closed_with(ws.recv, 20)


def upgrade_refused(url: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    """Open a WebSocket that the gateway must refuse: its status and the body of its answer
    (the one-line reason). Fails if the upgrade is accepted."""
    try:
        connect(url, additional_headers=headers or {}).close()
    except InvalidStatus as exc:
        return exc.response.status_code, exc.response.body.decode() if exc.response.body else ""
    raise AssertionError(f"the upgrade to {url} was accepted")


# --- upstream bots ----------------------------------------------------------------------------


@dataclass
class Seen:
    """What the bot saw of one session."""

    path: str
    headers: dict[str, str]
    subprotocol: str | None
    close: tuple[int, str] | None = None
    messages: list[str | bytes] = field(default_factory=list)


Behaviour = Callable[[ServerConnection, Seen], None]


def echo(ws: ServerConnection, seen: Seen) -> None:
    for message in ws:
        seen.messages.append(message)
        ws.send(message)


class Bot:
    """A real upstream bot: a `websockets` server in its own thread, recording each session."""

    def __init__(self, subprotocols: list[str] | None = None) -> None:
        self.subprotocols = subprotocols or []
        self.behaviour: Behaviour = echo
        self.sessions: list[Seen] = []
        self.ended = threading.Semaphore(0)
        self._server = ws_server.serve(
            self._handle,
            "127.0.0.1",
            0,
            max_size=None,
            compression=None,
            select_subprotocol=self._select_subprotocol,
            # As a bot server's (uvicorn's is 2048): the gateway dials 200 sessions at once.
            backlog=1024,
        )
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        port = self._server.socket.getsockname()[1]
        return f"ws://127.0.0.1:{port}/ws"

    def _select_subprotocol(self, ws: ServerConnection, offered: Sequence[str]) -> str | None:
        # The first of ours that the client offered; none offered is fine too.
        return next((p for p in self.subprotocols if p in offered), None)

    def _handle(self, ws: ServerConnection) -> None:
        assert ws.request is not None
        seen = Seen(ws.request.path, dict(ws.request.headers.raw_items()), ws.subprotocol)
        self.sessions.append(seen)
        try:
            self.behaviour(ws, seen)
        except Exception:
            pass  # a behaviour that ends on a closed connection: what the test checks is `seen`
        finally:
            rcvd = ws.protocol.close_rcvd
            seen.close = None if rcvd is None else (rcvd.code, rcvd.reason)
            self.ended.release()

    def wait_ended(self, n: int = 1, timeout: float = 20) -> None:
        """Block until `n` more sessions ended at the bot."""
        for _ in range(n):
            assert self.ended.acquire(timeout=timeout), "the bot session did not end"

    def close(self) -> None:
        self._server.shutdown()
        self._thread.join(5)


class Sentinel:
    """An upstream that must never be dialled: a listening socket nobody accepts on."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.setblocking(False)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.sock.getsockname()[1]}/ws"

    def dialled(self) -> bool:
        try:
            conn, _ = self.sock.accept()
        except BlockingIOError:
            return False
        conn.close()
        return True


class RawUpstream:
    """An upstream bot on a raw socket, for one session: a thread accepts the gateway's dial
    and hands the connection to :meth:`session` (which answers the upgrade, with
    :func:`accept_upgrade`); ``done`` is set once the session is over and the socket closed.
    Subclasses set their own attributes before calling ``super().__init__()``."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.done = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.listener.getsockname()[1]}/ws"

    def _run(self) -> None:
        conn, _ = self.listener.accept()
        self.listener.close()
        try:
            with conn:
                self.session(conn)
        finally:
            self.done.set()

    def session(self, conn: socket.socket) -> None:
        raise NotImplementedError


def accept_key(key: bytes) -> bytes:
    """RFC 6455 §4.2.2: base64(SHA-1(key + GUID)), written here rather than taken from the
    gateway under test."""
    digest = hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest()
    return base64.b64encode(digest)


def accept_upgrade(conn: socket.socket, then: bytes = b"") -> bytes:
    """The bot's side of an upgrade on a raw socket: read the request head, answer 101 (and
    ``then``, in the same write). Returns the head."""
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = conn.recv(4096)
        assert chunk, f"the gateway closed during its upgrade request: {head!r}"
        head += chunk
    key = next(
        line.split(b":", 1)[1].strip()
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"sec-websocket-key:")
    )
    conn.sendall(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + accept_key(key) + b"\r\n\r\n" + then
    )
    return head


# --- gateways ---------------------------------------------------------------------------------

#: The secret of :func:`token_config`'s gateways.
TOKEN_SECRET = "gateway-secret-0123456789"


def make_config(upstream: str, **settings: Any) -> Config:
    """``bot.test`` relayed to ``upstream`` and the builtin ``echo.test``, in the org ``test``
    (public key ``pk_test``); ``settings`` are the gateway's."""
    max_sessions = settings.pop("max_sessions", 500)
    return Config(
        gateway=GatewaySettings(port=0, **settings),
        orgs=[OrgConfig(name="test", public_keys=["pk_test"])],
        agents=[
            AgentConfig(name="bot", org="test", upstream=upstream, max_sessions=max_sessions),
            AgentConfig(name="echo", org="test", builtin="echo"),
        ],
    )


def token_config(upstream: str, **settings: Any) -> Config:
    """Token agents and their neighbours, all relayed to ``upstream``: ``talk.test`` (token),
    ``open.test`` (no auth) and ``talk.other`` (token, in another org, public key
    ``pk_other``); secrets ``[TOKEN_SECRET]`` unless ``settings`` say otherwise."""
    settings.setdefault("secrets", [TOKEN_SECRET])
    return Config(
        gateway=GatewaySettings(port=0, **settings),
        orgs=[OrgConfig("test", public_keys=["pk_test"]), OrgConfig("other", ["pk_other"])],
        agents=[
            AgentConfig("talk", "test", websocket_auth="token", upstream=upstream),
            AgentConfig("open", "test", upstream=upstream),
            AgentConfig("talk", "other", websocket_auth="token", upstream=upstream),
        ],
    )


@asynccontextmanager
async def serving(
    upstream: str,
    *,
    config: Callable[..., Config] = make_config,
    authority: TokenAuthority | None = None,
    **settings: Any,
) -> AsyncIterator[Gateway]:
    """A gateway in this event loop on ``config(upstream, **settings)`` (by default
    :func:`make_config`: ``bot.test`` relayed to ``upstream``); stopped at exit."""
    async with Gateway(config(upstream, **settings), authority=authority).running() as gw:
        yield gw


def token_gateway(
    upstream: str, *, authority: TokenAuthority | None = None, **settings: Any
) -> AbstractAsyncContextManager[Gateway]:
    """:func:`serving` on :func:`token_config`: ``talk.test`` takes tokens."""
    return serving(upstream, config=token_config, authority=authority, **settings)


def bot_config(bot: Callable[[BotArguments], Awaitable[None]] | str, **settings: Any) -> Config:
    """``bot.test`` served by the in-process ``bot`` (or ``'package.module:function'``)."""
    return Config(
        gateway=GatewaySettings(port=0, **settings),
        orgs=[OrgConfig(name="test")],
        agents=[AgentConfig(name="bot", org="test", bot=bot, max_sessions=500)],
    )


@asynccontextmanager
async def serving_bot(
    bot: Callable[[BotArguments], Awaitable[None]] | str,
    *,
    session_time_limit: float | None = None,
    **settings: Any,
) -> AsyncIterator[Gateway]:
    """A gateway in this event loop serving ``bot.test`` with the in-process ``bot``."""
    gateway = Gateway(bot_config(bot, **settings), session_time_limit=session_time_limit)
    async with gateway.running() as gw:
        yield gw


async def until(condition: Callable[[], Any], *, within: float, what: str) -> float:
    """Poll an async ``condition`` until it is true; how long that took. Fails past
    ``within`` seconds."""
    started = anyio.current_time()
    while not await condition():
        if anyio.current_time() - started > within:
            pytest.fail(f"{what}: not within {within} s")
        await anyio.sleep(0.02)
    return anyio.current_time() - started


# --- raw HTTP ---------------------------------------------------------------------------------


def upgrade_request(target: str, *extra: str, host: str = "127.0.0.1") -> bytes:
    """A valid WebSocket upgrade request for ``target``, with ``extra`` header lines."""
    lines = [
        f"GET {target} HTTP/1.1",
        f"Host: {host}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Version: 13",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        *extra,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def http_exchange(port: int, request: bytes) -> tuple[int, bytes]:
    """Send raw bytes, read the answer to EOF: (status, body)."""
    status, _, body = await http_answer(port, request)
    return status, body


async def http_answer(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes, read the answer to EOF: (status, header fields by lower-cased name,
    body)."""
    async with await anyio.connect_tcp("127.0.0.1", port) as s:
        await s.send(request)
        data = b""
        with anyio.fail_after(20):
            while True:
                try:
                    chunk = await s.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    break
                data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    fields = dict(line.partition(":")[::2] for line in lines[1:])
    headers = {name.strip().lower(): value.strip() for name, value in fields.items()}
    return int(lines[0].split(" ", 2)[1]), headers, body


async def receive_until(stream: SocketStream, data: bytes, wanted: bytes | None = None) -> bytes:
    """Read from ``stream`` onto ``data`` until ``wanted`` is in it, or (None) the peer closed."""
    while wanted is None or wanted not in data:
        try:
            data += await stream.receive()
        except (anyio.EndOfStream, anyio.BrokenResourceError):
            break
    return data


def dechunk(answer: bytes) -> bytes:
    """The body of a whole HTTP answer (head included) in chunked framing."""
    from wsgate.http_body import ChunkedBody

    _, _, body = answer.partition(b"\r\n\r\n")
    decoded = ChunkedBody(len(body)).feed(body)
    assert decoded is not None, "the chunked body did not end"
    return decoded


async def call(
    gw: Gateway | int, method: str, target: str, key: str | None, body: bytes = b"", *extra: str
) -> tuple[int, bytes]:
    """One HTTP request to a gateway (or a port), with ``key`` as its bearer key: the status and
    the raw body of its answer."""
    lines = [f"{method} {target} HTTP/1.1", "Host: gw"]
    if key is not None:
        lines.append(f"Authorization: Bearer {key}")
    if body:
        lines.append(f"Content-Length: {len(body)}")
    lines += extra
    port = gw if isinstance(gw, int) else gw.port
    return await http_exchange(port, ("\r\n".join(lines) + "\r\n\r\n").encode() + body)


async def call_json(
    gw: Gateway | int, method: str, target: str, key: str | None, body: bytes = b"", *extra: str
) -> tuple[int, Any]:
    """:func:`call`, its answer decoded from JSON."""
    status, answer = await call(gw, method, target, key, body, *extra)
    return status, json.loads(answer)


def open_ws(url: str) -> ws_client.ClientConnection:
    """A client connection kept open across awaits (closed by the test)."""
    return connect(url).__enter__()


def session_id(ws: ws_client.ClientConnection) -> str:
    """The ``X-Session-Id`` the gateway's 101 told the client."""
    assert ws.response is not None
    return str(ws.response.headers["X-Session-Id"])


async def start_json(gw: Gateway, agent: str, key: str, body: Any = None) -> tuple[int, Any]:
    """``POST /v1/public/{agent}/start`` with the public ``key``: the status and the JSON."""
    payload: dict[str, Any] = {"transport": "websocket"}
    if body is not None:
        payload["body"] = body
    data = json.dumps(payload).encode()
    request = (
        f"POST /v1/public/{agent}/start HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    ).encode() + data
    status, answer = await http_exchange(gw.port, request)
    return status, json.loads(answer)


def b64(document: Any) -> str:
    """A JSON document as standard, padded base64 (a ``?body=`` value)."""
    return base64.b64encode(json.dumps(document).encode()).decode()


# --- raw WebSocket ----------------------------------------------------------------------------


def frame(opcode: int, payload: bytes = b"", *, fin: bool = True, mask: bool = True,
          rsv: int = 0, length: int | None = None) -> bytes:  # fmt: skip
    """One frame, masked with a random key unless ``mask`` is false (a server's frame);
    ``length`` declares a length other than the payload's."""
    n = len(payload) if length is None else length
    head = bytes([(0x80 if fin else 0) | rsv << 4 | opcode])
    bit = 0x80 if mask else 0
    if n < 126:
        head += bytes([bit | n])
    elif n < 1 << 16:
        head += bytes([bit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([bit | 127]) + struct.pack("!Q", n)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + _xor(payload, key)


def _xor(data: bytes, key: bytes) -> bytes:
    """``data`` masked (or unmasked) with the 4-byte ``key``, as one big-integer XOR."""
    if not data:
        return b""
    stream = (key * (len(data) // 4 + 1))[: len(data)]
    xored = int.from_bytes(data, "big") ^ int.from_bytes(stream, "big")
    return xored.to_bytes(len(data), "big")


def close_payload(code: int, reason: bytes = b"") -> bytes:
    return struct.pack("!H", code) + reason


class Reader:
    """Reads the frames a peer sends on one of our raw connections (any masking) from
    ``recv``, a callable that returns the next bytes (``b""`` at EOF)."""

    def __init__(self, recv: Callable[[], bytes]) -> None:
        self.recv = recv
        self.buf = b""

    def _need(self, n: int) -> bytes | None:
        while len(self.buf) < n:
            chunk = self.recv()
            if not chunk:
                return None
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def frame(self) -> tuple[int, bytes] | None:
        """(the first byte: FIN, RSV bits and opcode; the unmasked payload), or None at EOF."""
        h = self._need(2)
        if h is None:
            return None
        n = h[1] & 0x7F
        if n == 126:
            n = struct.unpack("!H", self._need(2) or b"\0\0")[0]
        elif n == 127:
            n = struct.unpack("!Q", self._need(8) or b"\0" * 8)[0]
        key = self._need(4) if h[1] & 0x80 else None
        data = self._need(n) or b"" if n else b""
        if key:
            data = _xor(data, key)
        return h[0], data

    def next(self) -> tuple[int, bytes] | None:
        """(opcode, unmasked payload), or None at EOF."""
        f = self.frame()
        return None if f is None else (f[0] & 0x0F, f[1])

    def close_code(self) -> int | None:
        """Skip data frames; the code of the first close frame (None: EOF without one)."""
        while (f := self.next()) is not None:
            if f[0] == 8:
                return struct.unpack("!H", f[1][:2])[0] if len(f[1]) >= 2 else 1005
        return None


async def upgraded(port: int, target: str = "/ws/generic/bot.test") -> tuple[SocketStream, bytes]:
    """A raw client past its 101: the stream, and the bytes that came after the 101's head."""
    s = await anyio.connect_tcp("127.0.0.1", port)
    await s.send(upgrade_request(target))
    head = b""
    with anyio.fail_after(20):
        while b"\r\n\r\n" not in head:
            head += await s.receive()
    answer, _, rest = head.partition(b"\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 101"), answer
    return s, rest


class RawClient:
    """A client on a raw socket past its upgrade; keeps bytes that came with the 101 head."""

    def __init__(self, stream: SocketStream, early: bytes) -> None:
        self.stream = stream
        self.early = early

    async def send(self, data: bytes) -> None:
        await self.stream.send(data)

    async def receive(self) -> bytes:
        """The next bytes; ``b""`` at EOF."""
        if self.early:
            chunk, self.early = self.early, b""
            return chunk
        try:
            return await self.stream.receive()
        except (anyio.EndOfStream, anyio.BrokenResourceError):
            return b""

    async def close_code(self) -> int | None:
        """The code of the first close frame the gateway sends (None: EOF without one)."""

        def blocking_recv() -> bytes:
            return anyio.from_thread.run(self.receive)

        with anyio.fail_after(20):
            return await anyio.to_thread.run_sync(lambda: Reader(blocking_recv).close_code())


@asynccontextmanager
async def raw_client(port: int, target: str = "/ws/generic/bot.test") -> AsyncIterator[RawClient]:
    """A :class:`RawClient` past its 101; the connection is closed (no close frame) at exit."""
    stream, early = await upgraded(port, target)
    async with stream:
        yield RawClient(stream, early)


def raw_socket(
    port: int, target: str = "/ws/generic/bot.test", timeout: float = 20
) -> socket.socket:
    """A blocking socket past its 101, for client code in a thread. The head is read a byte at a
    time, so whatever follows it is still in the socket."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.sendall(upgrade_request(target))
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        chunk = sock.recv(1)
        assert chunk, f"closed during the handshake: {head!r}"
        head += chunk
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


def send_all_past_the_limit(sock: socket.socket, size: int = 8 << 20) -> int | None:
    """On a blocking client's socket past its 101 (for a thread): send a binary message of
    ``size`` bytes whole, however early the gateway refuses it, then read to the first close
    frame: its code (None: EOF without one). A reset while sending fails the call."""
    # The frame's head, masked with a zero key: its payload goes as it is.
    sock.sendall(bytes([0x82, 0x80 | 127]) + struct.pack("!Q", size) + bytes(4))
    chunk = b"k" * 65536
    for _ in range(size // len(chunk)):
        sock.sendall(chunk)
    return Reader(lambda: sock.recv(65536)).close_code()


# --- time -------------------------------------------------------------------------------------

#: A fixed "now" for token and replay-store clocks (Unix seconds).
T0 = 1_712_800_000


class Clock:
    """A clock that stands still at ``now`` until the test moves it."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@contextmanager
def uvicorn_in_thread(app: Any) -> Iterator[int]:
    """Serve the ASGI ``app`` with uvicorn in a thread of its own (its own asyncio loop, so the
    gateway's tests run under trio too); yields its port on 127.0.0.1."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    # Listening before uvicorn starts: connections wait in the backlog until it accepts.
    sock = socket.create_server(("127.0.0.1", 0))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


# --- Pipecat ----------------------------------------------------------------------------------


@asynccontextmanager
async def under_uvicorn(bot: Callable[[Any], Awaitable[None]]) -> AsyncIterator[str]:
    """Pipecat's own path: a FastAPI WebSocket endpoint that accepts and calls ``bot`` with
    Pipecat's ``WebSocketRunnerArguments``, served by uvicorn in this event loop (asyncio) on a
    port of its own. Yields the bot's URL. Needs the ``pipecat`` test extra."""
    import fastapi
    import uvicorn
    from pipecat.runner.types import WebSocketRunnerArguments

    async def endpoint(websocket: Any) -> None:
        await websocket.accept()
        await bot(WebSocketRunnerArguments(websocket=websocket))

    # FastAPI injects the WebSocket by its annotation, which must be the class itself: this
    # module's annotations are strings, and `fastapi` is not one of its globals.
    endpoint.__annotations__["websocket"] = fastapi.WebSocket
    app = fastapi.FastAPI()
    app.add_api_websocket_route("/ws", endpoint)
    server = uvicorn.Server(
        uvicorn.Config(app, ws="websockets-sansio", log_level="warning", lifespan="off")
    )
    with socket.create_server(("127.0.0.1", 0)) as sock:
        async with anyio.create_task_group() as tg:
            tg.start_soon(server.serve, [sock])
            try:
                yield f"ws://127.0.0.1:{sock.getsockname()[1]}/ws"
            finally:
                server.should_exit = True


async def run_pipeline(transport: Any, task: Any, handle_sigint: bool) -> None:
    """Run the Pipecat pipeline ``task`` as Pipecat's examples do: until it ends, or until the
    client of ``transport`` disconnects (which cancels it). Needs the ``pipecat`` test extra."""
    from pipecat.workers.runner import WorkerRunner

    @transport.event_handler("on_client_disconnected")  # type: ignore[untyped-decorator]
    async def on_client_disconnected(transport: Any, websocket: Any) -> None:
        await task.cancel()

    runner = WorkerRunner(handle_sigint=handle_sigint)
    await runner.add_workers(task)
    await runner.run()


def header(head: bytes, name: str) -> str | None:
    """The value of header ``name`` in a response head (None if absent)."""
    for line in head.decode("latin-1").split("\r\n")[1:]:
        field, _, value = line.partition(":")
        if field.lower() == name.lower():
            return value.strip()
    return None


#: Run a test with the engine opening sessions and with Python doing it (``engine_opens``).
engine_opens = pytest.mark.parametrize("engine_opens", [True, False], ids=["engine", "python"])


def tls_files(where: Path) -> tuple[str, str, ssl.SSLContext]:
    """A certificate for 127.0.0.1 from a test CA, its key, and a client context trusting it."""
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1")
    cert, key = where / "cert.pem", where / "key.pem"
    leaf.private_key_and_cert_chain_pem.write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return str(cert), str(key), context


def upgrade_over_tls(
    raw: socket.socket, context: ssl.SSLContext, target: str = "/ws/generic/echo.test"
) -> tuple[ssl.SSLSocket, bytes]:
    """A wss:// client on ``raw`` (connected; blocking from now on) that asks to upgrade on
    ``target``: its TLS socket and the answer's head."""
    raw.setblocking(True)
    raw.settimeout(20)
    s = context.wrap_socket(raw, server_hostname="127.0.0.1")
    s.sendall(upgrade_request(target))
    head = b""
    while not head.endswith(b"\r\n\r\n") and (byte := s.recv(1)):
        head += byte
    return s, head
