"""The Python client (SPEC §7): ``start`` calls ``/start``; ``connect`` opens the session.

    async with wsgate.client.connect(
        "https://gateway.example.com", "my-agent", public_key="pk_...", body={"lang": "en"}
    ) as ws:
        await ws.send("hello")

Errors::

    ClientError
    ├── BodyTooLarge      the body is over 4 KB of JSON: refused before any request
    └── StatusError       an HTTP error answer: .status, .reason
        ├── StartError        from /start (the reason is the answer's "error")
        └── UpgradeRefused    the WebSocket upgrade (the gateway's one-line reason)

Network failures stay the standard ``OSError`` and ``TimeoutError``.

:func:`start` runs on asyncio and trio (a small HTTP/1.1 client on anyio streams, TLS
included). :func:`connect` opens the WebSocket with the ``websockets`` asyncio client, so it
needs asyncio; :func:`connect_sync` is the same for scripts and threads, on websockets' sync
client.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

import anyio
import anyio.abc
from anyio.streams.buffered import BufferedByteReceiveStream

from . import _core
from .body import encode_body
from .errors import (
    BodyTooLarge,
    ClientError,
    SessionControlError,
    StartError,
    StatusError,
    UpgradeRefused,
)
from .names import is_name, is_service_host

if TYPE_CHECKING:
    import websockets.asyncio.client
    import websockets.sync.client

__all__ = [
    "BodyTooLarge",
    "ClientError",
    "SessionControlError",
    "StartError",
    "StartResult",
    "StatusError",
    "UpgradeRefused",
    "connect",
    "connect_sync",
    "connection_target",
    "list_sessions",
    "start",
    "start_sync",
    "stop_session",
]

_MAX_RESPONSE_HEAD = 16 * 1024
_MAX_RESPONSE_BODY = 1024 * 1024


@dataclass(frozen=True)
class StartResult:
    """What ``/start`` answered."""

    #: Where to open the WebSocket (never build it by hand).
    ws_url: str
    #: The id the bot sees for the session (``X-Daily-Session-Id``).
    session_id: str
    #: One-time token for ``Authorization: Bearer``; None for an agent without token auth.
    token: str | None = field(default=None, repr=False)
    #: The session body, encoded, to append as ``?body=``; None without a body.
    body: str | None = field(default=None, repr=False)


async def start(
    base_url: str,
    agent: str,
    public_key: str,
    body: Any = None,
    *,
    timeout: float = 10.0,
    ssl_context: ssl.SSLContext | None = None,
) -> StartResult:
    """``POST {base_url}/v1/public/{agent}/start`` with the organisation's public key.

    ``base_url``: ``http(s)://`` (``ws(s)://`` is read as the same host). ``body``: any JSON
    value, at most 4 KB once encoded (else :class:`BodyTooLarge`, before any request).
    Raises :class:`StartError` for an error answer; ``TimeoutError`` after ``timeout``.
    """
    if not is_name(agent):
        raise ValueError("agent must be 1-63 lowercase letters, digits or '-'")
    request: dict[str, Any] = {"transport": "websocket"}
    if body is not None:
        _checked_body(body)
        request["body"] = body
    payload = json.dumps(request, separators=(",", ":"), ensure_ascii=False).encode()
    with anyio.fail_after(timeout):
        status, response = await _request(
            "POST", base_url, f"/v1/public/{agent}/start", public_key, payload, ssl_context
        )
    return _start_result(status, response)


def start_sync(
    base_url: str, agent: str, public_key: str, body: Any = None, **kwargs: Any
) -> StartResult:
    """:func:`start` for code without an event loop (runs one)."""
    return anyio.run(partial(start, base_url, agent, public_key, body, **kwargs))


async def list_sessions(
    base_url: str,
    agent: str,
    private_key: str,
    *,
    limit: int | None = None,
    after: str | None = None,
    timeout: float = 10.0,
    ssl_context: ssl.SSLContext | None = None,
) -> dict[str, Any]:
    """``GET {base_url}/v1/agents/{agent}/sessions`` with the organisation's private key: one
    page, ``{"sessions": [...], "next": <sessionId> | None}``; pass ``next`` as ``after`` for
    the following one. Each session: ``sessionId``, ``startedAt``, ``seconds``, ``bot``,
    ``provider``, ``callId``, and its traffic so far: ``messagesIn``, ``bytesIn`` (client to
    bot), ``messagesOut``, ``bytesOut``. With several gateways sharing a session registry,
    the sessions of all of them: each also names its ``gateway``, and ``unreachable`` lists the
    gateways whose sessions are missing (not answering). Raises :class:`SessionControlError`
    for an error answer."""
    if not is_name(agent):
        raise ValueError("agent must be 1-63 lowercase letters, digits or '-'")
    query = "&".join(
        f"{name}={quote(str(value), safe='')}"
        for name, value in (("limit", limit), ("after", after))
        if value is not None
    )
    path = f"/v1/agents/{agent}/sessions" + (f"?{query}" if query else "")
    with anyio.fail_after(timeout):
        status, response = await _request("GET", base_url, path, private_key, b"", ssl_context)
    return _control_answer(status, response)


async def stop_session(
    base_url: str,
    agent: str,
    private_key: str,
    session_id: str,
    *,
    timeout: float = 10.0,
    ssl_context: ssl.SSLContext | None = None,
) -> dict[str, Any]:
    """``DELETE {base_url}/v1/agents/{agent}/sessions/{session_id}`` with the organisation's
    private key: both sides of the session get 1000 "session stopped". Returns the answer
    (``{"status": "stopped", "sessionId": …}``); raises :class:`SessionControlError` (404: no
    such live session)."""
    if not is_name(agent):
        raise ValueError("agent must be 1-63 lowercase letters, digits or '-'")
    path = f"/v1/agents/{agent}/sessions/{quote(session_id, safe='')}"
    with anyio.fail_after(timeout):
        status, response = await _request("DELETE", base_url, path, private_key, b"", ssl_context)
    return _control_answer(status, response)


def _control_answer(status: int, response: bytes) -> dict[str, Any]:
    try:
        document = json.loads(response)
    except (ValueError, RecursionError):
        document = None
    if status != 200:
        if isinstance(document, dict) and isinstance(document.get("error"), str):
            raise SessionControlError(status, document["error"])
        raise SessionControlError(status, "error without a reason")
    if not isinstance(document, dict):
        raise SessionControlError(status, "the answer is not a JSON object")
    return document


def connection_target(
    result: StartResult | None, base_url: str, service_host: str, body: Any = None
) -> tuple[str, dict[str, str]]:
    """The WebSocket URL and headers for a session: from ``/start``'s ``result`` when there is
    one (its ``wsUrl``, token and encoded body), else ``{base_url}/ws/generic/{service_host}``
    with ``body`` encoded here. The body is appended percent-encoded."""
    headers: dict[str, str] = {}
    if result is not None:
        url = result.ws_url
        encoded = result.body
        if result.token is not None:
            headers["Authorization"] = f"Bearer {result.token}"
    else:
        if not is_service_host(service_host):
            raise ValueError("service host must be {agent}.{org}")
        url = f"{_ws_base(base_url)}/ws/generic/{service_host}"
        encoded = None if body is None else _checked_body(body)
    if encoded is not None:
        url += ("&" if "?" in url else "?") + "body=" + quote(encoded, safe="")
    return url, headers


@asynccontextmanager
async def connect(
    base_url: str,
    agent: str,
    *,
    public_key: str | None = None,
    body: Any = None,
    timeout: float = 10.0,
    ssl_context: ssl.SSLContext | None = None,
    **ws_options: Any,
) -> AsyncIterator[websockets.asyncio.client.ClientConnection]:
    """Open a session and yield the ``websockets`` connection; closed at exit. Needs asyncio.

    With ``public_key``: ``agent`` is the agent's name, ``/start`` is called at ``base_url``
    (with the body), and the WebSocket opened at its ``wsUrl`` with its token and body. Without:
    ``agent`` is the service host ``{agent}.{org}`` of an agent without token auth, and the
    body is encoded here. ``ws_options`` go to ``websockets.asyncio.client.connect``.

    Raises :class:`BodyTooLarge` (before any request), :class:`StartError`,
    :class:`UpgradeRefused`.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        raise RuntimeError(
            "wsgate.client.connect needs asyncio (the websockets client is asyncio-only); "
            "on trio, use start() and a trio WebSocket client, or connect_sync() in a thread"
        ) from None
    from websockets.asyncio.client import connect as ws_connect
    from websockets.exceptions import InvalidStatus

    url, headers = await _plan(base_url, agent, public_key, body, timeout, ssl_context)
    if ssl_context is not None and url.startswith("wss:"):
        ws_options.setdefault("ssl", ssl_context)
    ws_options.setdefault("open_timeout", timeout)
    try:
        ws = await ws_connect(url, additional_headers=headers, **ws_options)
    except InvalidStatus as exc:
        raise _refused(exc) from None
    try:
        yield ws
    finally:
        await ws.close()


@contextmanager
def connect_sync(
    base_url: str,
    agent: str,
    *,
    public_key: str | None = None,
    body: Any = None,
    timeout: float = 10.0,
    ssl_context: ssl.SSLContext | None = None,
    **ws_options: Any,
) -> Iterator[websockets.sync.client.ClientConnection]:
    """:func:`connect` for scripts and threads, on ``websockets.sync.client``."""
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect as ws_connect

    plan = partial(_plan, base_url, agent, public_key, body, timeout, ssl_context)
    url, headers = anyio.run(plan)
    if ssl_context is not None and url.startswith("wss:"):
        ws_options.setdefault("ssl", ssl_context)
    ws_options.setdefault("open_timeout", timeout)
    try:
        ws = ws_connect(url, additional_headers=headers, **ws_options)
    except InvalidStatus as exc:
        raise _refused(exc) from None
    with ws:
        yield ws


async def _plan(
    base_url: str,
    agent: str,
    public_key: str | None,
    body: Any,
    timeout: float,
    ssl_context: ssl.SSLContext | None,
) -> tuple[str, dict[str, str]]:
    if body is not None:
        _checked_body(body)
    if public_key is None:
        return connection_target(None, base_url, agent, body)
    result = await start(
        base_url, agent, public_key, body, timeout=timeout, ssl_context=ssl_context
    )
    return connection_target(result, base_url, agent)


def _checked_body(body: Any) -> str:
    try:
        document, encoded = encode_body(body)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"body must be a JSON value: {exc}") from None
    if len(document) > _core.MAX_BODY_BYTES:
        raise BodyTooLarge(f"body is {len(document)} bytes of JSON, over {_core.MAX_BODY_BYTES}")
    return encoded


def _refused(exc: Any) -> UpgradeRefused:
    response = exc.response
    reason = bytes(response.body or b"").decode("utf-8", "replace").strip()
    return UpgradeRefused(response.status_code, reason or response.reason_phrase)


def _ws_base(base_url: str) -> str:
    scheme, rest = base_url.split("://", 1) if "://" in base_url else ("", base_url)
    mapped = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}.get(scheme.lower())
    if mapped is None:
        raise ValueError("base URL must start with ws://, wss://, http:// or https://")
    return f"{mapped}://{rest.rstrip('/')}"


def _start_result(status: int, response: bytes) -> StartResult:
    try:
        document = json.loads(response)
    except (ValueError, RecursionError):
        document = None
    if status != 200:
        if isinstance(document, dict) and isinstance(document.get("error"), str):
            raise StartError(status, document["error"])
        text = response.decode("utf-8", "replace").strip().splitlines()
        raise StartError(status, text[0][:200] if text else "error without a reason")
    if not isinstance(document, dict):
        raise StartError(status, "/start answered something that is not a JSON object")
    ws_url, session_id = document.get("wsUrl"), document.get("sessionId")
    token, body = document.get("token"), document.get("body")
    if not isinstance(ws_url, str) or not ws_url.startswith(("ws://", "wss://")):
        raise StartError(status, "/start answered without a ws:// or wss:// wsUrl")
    if not isinstance(session_id, str):
        raise StartError(status, "/start answered without a sessionId")
    if not isinstance(token, (str, type(None))) or not isinstance(body, (str, type(None))):
        raise StartError(status, "/start answered a token or body that is not a string")
    return StartResult(ws_url=ws_url, session_id=session_id, token=token, body=body)


# --- a minimal HTTP/1.1 POST over anyio ---------------------------------------------------


async def _request(
    method: str,
    base_url: str,
    path: str,
    bearer: str,
    payload: bytes,
    ssl_context: ssl.SSLContext | None,
) -> tuple[int, bytes]:
    """``method`` with ``payload`` as JSON; ``(status, response body)``."""
    parts = urlsplit(_ws_base(base_url))
    tls = parts.scheme == "wss"
    host = parts.hostname
    if not host:
        raise ValueError("base URL has no host")
    port = parts.port or (443 if tls else 80)
    authority = f"[{host}]" if ":" in host else host
    if parts.port is not None:
        authority += f":{parts.port}"
    if any(c in bearer for c in "\r\n"):
        raise ValueError("a key must not hold a line break")
    head = (
        f"{method} {parts.path.rstrip('/')}{path} HTTP/1.1\r\n"
        f"Host: {authority}\r\n"
        f"Authorization: Bearer {bearer}\r\n"
        "Content-Type: application/json\r\n"
        "Accept: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n"
        "Connection: close\r\n"
        "User-Agent: wsgate-client\r\n\r\n"
    ).encode("latin-1")
    stream: anyio.abc.ByteStream
    if tls:
        stream = await anyio.connect_tcp(
            host,
            port,
            tls=True,
            ssl_context=ssl_context or ssl.create_default_context(),
            tls_hostname=host,
            tls_standard_compatible=False,
        )
    else:
        stream = await anyio.connect_tcp(host, port)
    async with stream:
        await stream.send(head + payload)
        return await _read_response(BufferedByteReceiveStream(stream))


async def _read_response(reader: BufferedByteReceiveStream) -> tuple[int, bytes]:
    try:
        head = await reader.receive_until(b"\r\n\r\n", _MAX_RESPONSE_HEAD)
    except (anyio.IncompleteRead, anyio.DelimiterNotFound):
        raise StartError(502, "incomplete HTTP response from /start") from None
    lines = head.decode("latin-1").split("\r\n")
    status_line = lines[0].split(" ", 2)
    if (
        len(status_line) < 2
        or not status_line[0].startswith("HTTP/1.")
        or not (status_line[1].isdigit() and len(status_line[1]) == 3)
    ):
        raise StartError(502, "malformed HTTP response from /start")
    status = int(status_line[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    try:
        if "chunked" in headers.get("transfer-encoding", "").lower():
            return status, await _read_chunked(reader)
        if "content-length" in headers:
            length = int(headers["content-length"])
            if not 0 <= length <= _MAX_RESPONSE_BODY:
                raise StartError(502, "HTTP response from /start too large")
            return status, await reader.receive_exactly(length)
    except (anyio.IncompleteRead, anyio.DelimiterNotFound, ValueError):
        raise StartError(502, "incomplete HTTP response from /start") from None
    data = bytearray()
    while len(data) <= _MAX_RESPONSE_BODY:
        try:
            data += await reader.receive()
        except (anyio.EndOfStream, anyio.BrokenResourceError):
            return status, bytes(data)
    raise StartError(502, "HTTP response from /start too large")


async def _read_chunked(reader: BufferedByteReceiveStream) -> bytes:
    data = bytearray()
    while True:
        size_line = await reader.receive_until(b"\r\n", 1024)
        size = int(size_line.split(b";", 1)[0].strip(), 16)
        if size == 0:
            while await reader.receive_until(b"\r\n", _MAX_RESPONSE_HEAD):
                pass  # trailer fields
            return bytes(data)
        if len(data) + size > _MAX_RESPONSE_BODY:
            raise StartError(502, "HTTP response from /start too large")
        data += await reader.receive_exactly(size)
        if await reader.receive_exactly(2) != b"\r\n":
            raise ValueError("chunk not followed by CRLF")
