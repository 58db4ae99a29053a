"""Fixtures on real sockets on 127.0.0.1: upstream bots, a gateway in the test's event loop
(asyncio or trio), WebSocket clients in worker threads (the sync `websockets` client, so the same
client code runs under both backends)."""

from __future__ import annotations

import socket
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio
import pytest
import websockets.sync.client as ws_client
import websockets.sync.server as ws_server
from websockets.sync.server import ServerConnection

from wsgate import AgentConfig, Config, Gateway, GatewaySettings, OrgConfig

T = TypeVar("T")


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def in_thread(fn: Callable[..., T], *args: Any) -> T:
    """Run blocking client code (the sync websockets client) without blocking the gateway."""
    # Enough worker threads for the 200-session test: each sync client occupies one.
    anyio.to_thread.current_default_thread_limiter().total_tokens = 260
    return await anyio.to_thread.run_sync(fn, *args)


def connect(url: str, **kwargs: Any) -> ws_client.ClientConnection:
    """A plain client: no compression offered, no size limit of its own, short timeouts."""
    kwargs.setdefault("max_size", None)
    kwargs.setdefault("compression", None)
    kwargs.setdefault("open_timeout", 10)
    kwargs.setdefault("close_timeout", 10)
    return ws_client.connect(url, **kwargs)


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
            pass
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


@pytest.fixture
def bot() -> Iterator[Bot]:
    b = Bot(subprotocols=["chat.v2"])
    yield b
    b.close()


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


@pytest.fixture
def sentinel() -> Iterator[Sentinel]:
    s = Sentinel()
    yield s
    s.sock.close()


def make_config(upstream: str, **settings: Any) -> Config:
    max_sessions = settings.pop("max_sessions", 500)
    return Config(
        gateway=GatewaySettings(port=0, **settings),
        orgs=[OrgConfig(name="test", public_keys=["pk_test"])],
        agents=[
            AgentConfig(name="bot", org="test", upstream=upstream, max_sessions=max_sessions),
            AgentConfig(name="echo", org="test", builtin="echo"),
        ],
    )


@asynccontextmanager
async def serving(upstream: str, **settings: Any) -> AsyncIterator[Gateway]:
    """A gateway in this event loop relaying `bot.test` to `upstream`; stopped at exit."""
    async with Gateway(make_config(upstream, **settings)).running() as gw:
        yield gw


async def http_exchange(port: int, request: bytes) -> tuple[int, bytes]:
    """Send raw bytes, read the answer to EOF: (status, body)."""
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
    return int(head.split(b" ", 2)[1]), body


def upgrade_request(target: str, *extra: str, host: str = "127.0.0.1") -> bytes:
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
