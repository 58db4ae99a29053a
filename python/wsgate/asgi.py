"""The ``/start`` service as an ASGI app, for a FastAPI or Starlette project to mount::

    from starlette.applications import Starlette
    from starlette.routing import Mount
    import wsgate, wsgate.asgi

    config = wsgate.load_config("wsgate.toml")
    app = Starlette(routes=[Mount("/", app=wsgate.asgi.start_app(config))])

It answers ``POST /v1/public/{agent}/start`` exactly as the gateway's own listener does
(:func:`wsgate.start.answer_start`: the same checks, statuses and JSON, tokens minted with the
same secrets), so a backend can serve ``/start`` on its own domain while the gateways serve the
WebSocket endpoints. Mounted under a prefix (``Mount("/api", ...)``), it serves
``/api/v1/public/{agent}/start``.

What the app cannot know, since the sessions live on the gateways: their count. It takes a
``capacity_check`` (default: always room; the gateway still refuses a session over
``max_sessions`` with 503 at the upgrade). ``public_url`` (default: the settings'
``public_url``, required) is the gateways' ``wss://`` base that ``wsUrl`` names.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import anyio

from .admission import RateLimiter
from .config import AgentConfig, Config
from .errors import ConfigError, HttpError
from .responses import json_parts
from .start import MAX_REQUEST_BYTES, answer_start, request_body_length
from .tokens import TokenAuthority, authority_for

__all__ = ["start_app"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def start_app(
    config: Config,
    *,
    authority: TokenAuthority | None = None,
    public_url: str | None = None,
    capacity_check: Callable[[AgentConfig], bool] | None = None,
) -> ASGIApp:
    """An ASGI 3 app serving ``/start`` for ``config``'s organisations and agents.

    Raises :class:`~wsgate.ConfigError` without a ``public_url`` (here or in the settings), or
    when an agent uses tokens and no secret is configured.
    """
    url = public_url or config.gateway.public_url
    if not url:
        raise ConfigError("start_app needs public_url (the gateways' wss:// base)")
    tokens = authority_for(config) if authority is None else authority
    agents = config.agents_by_host()
    per_key = config.gateway.start_rate_per_key
    key_rate = RateLimiter(per_key) if per_key else None
    room = capacity_check or (lambda agent: True)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            raise RuntimeError(f"start_app serves HTTP, not {scope['type']}")
        headers = tuple(
            (name.decode("latin-1").lower(), value.decode("latin-1"))
            for name, value in scope["headers"]
        )
        try:
            body = await _read_body(receive, request_body_length(headers))
        except HttpError as exc:
            await _answer(send, exc.status, {"error": exc.reason, "code": str(exc.status)})
            return
        answer = answer_start(
            scope["method"],
            _route_path(scope),
            headers,
            body,
            agents,
            config.orgs,
            tokens,
            room,
            public_url=url,
            key_rate_check=(
                None
                if key_rate is None
                else functools.partial(key_rate.allow, now=anyio.current_time())
            ),
        )
        await _answer(send, answer.status, answer.document)

    return app


def _route_path(scope: Scope) -> str:
    """The path below the mount point (ASGI: ``path`` holds ``root_path`` as its prefix)."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


async def _read_body(receive: Receive, length: int) -> bytes:
    """The request body, at most ``length`` (Content-Length) and :data:`MAX_REQUEST_BYTES`."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > max(length, 0) or size > MAX_REQUEST_BYTES:
            raise HttpError(413 if size > MAX_REQUEST_BYTES else 400, "bad request body")
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


async def _answer(send: Send, status: int, document: Any) -> None:
    extra, payload = json_parts(status, document)
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(payload)).encode()),
        *((name.lower().encode(), value.encode()) for name, value in extra),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
