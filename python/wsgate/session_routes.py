"""The Session API of in-process bots: HTTP routes served in the gateway's own process.

An in-process agent may have a ``session_api``: an ASGI application (FastAPI, Starlette, or
:class:`Routes`, the small router of this module). A Session API call for one of its live
sessions is handed to it in-process (:func:`call_app`), never over a socket, with the session
made known two ways, so code written for an upstream bot reads the same:

- the ``X-Daily-Session-Id`` request header, as an upstream bot gets it;
- ``scope["state"]["session_id"]`` (Starlette's ``request.state.session_id``).

An in-process agent without ``session_api`` answers 404, like a route the bot does not have. Only
``http`` scopes are sent: an app's lifespan handlers are not run.

Invariants:
- The request passed on is the one :func:`wsgate.session_api.judge_forward` accepted: its key,
  framing and hop-by-hop fields are not in it (:func:`forward_fields`).
- The app's answer is streamed to the client as the app sends it, like an upstream bot's: it
  starts within ``session_api_timeout`` (else 504) and never pauses longer (else it is cut
  short). An app that raises before its answer began gets 500; its exception is logged once.
- The answer's framing is the gateway's: ``Content-Length`` when the app sends its body in one
  part, else ``Transfer-Encoding: chunked``; ``Connection: close``; the app's own framing
  fields are dropped.
"""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import Awaitable, Callable, Iterable, MutableMapping, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, TypeAlias, TypeVar
from urllib.parse import unquote

import anyio

from ._sockets import Conn, send_all
from ._websocket_state import Headers, QueryParams
from .config import AgentConfig
from .errors import ConfigError, HttpError
from .inprocess import load_bot
from .session_api import forward_fields

__all__ = [
    "ASGIApp",
    "RouteHandler",
    "RouteRequest",
    "RouteResponse",
    "Routes",
    "call_app",
    "session_app_of",
]

log = logging.getLogger("wsgate")

Scope: TypeAlias = MutableMapping[str, Any]
Message: TypeAlias = MutableMapping[str, Any]
Receive: TypeAlias = Callable[[], Awaitable[Message]]
Send: TypeAlias = Callable[[Message], Awaitable[None]]
#: An ASGI 3 application.
ASGIApp: TypeAlias = Callable[[Scope, Receive, Send], Awaitable[None]]


@dataclass(frozen=True, eq=False)
class RouteRequest:
    """What a :class:`Routes` handler is called with: one Session API request and the session
    it is for."""

    #: The live session's id (``sessionId``; the bot's ``BotArguments.session_id``).
    session_id: str
    method: str
    #: The path under the session, decoded: ``/status`` for ``…/sessions/{id}/status``.
    path: str
    query_params: QueryParams
    #: The client's headers, less the key and the request's framing.
    headers: Headers
    body: bytes = field(repr=False)

    def json(self) -> Any:
        """The body decoded from JSON (``ValueError`` if it is not JSON: the client gets 400)."""
        return json.loads(self.body)


@dataclass(frozen=True)
class RouteResponse:
    """A handler's answer when a document is not enough: a status, a body, headers."""

    status: int = 200
    body: bytes | str = b""
    headers: Sequence[tuple[str, str]] = ()
    media_type: str | None = None


#: A route's handler: an async function of the request. It may return a :class:`RouteResponse`,
#: ``bytes`` (``application/octet-stream``), ``str`` (``text/plain``), None (204), or anything
#: else JSON can encode (``application/json``, 200).
RouteHandler: TypeAlias = Callable[[RouteRequest], Awaitable[Any]]
_HandlerT = TypeVar("_HandlerT", bound=RouteHandler)


class Routes:
    """A minimal ASGI app of exact-path routes for an in-process bot's Session API::

        routes = wsgate.Routes()

        @routes.route("/status", methods=["GET"])
        async def status(request: wsgate.RouteRequest) -> dict[str, str]:
            return {"session": request.session_id}

        @gateway.bot("parrot.demo", session_api=routes)
        async def parrot(args: wsgate.BotArguments) -> None: ...

    A path without a route: 404; a method the route does not take: 405 with ``Allow``; a
    handler raising ``ValueError`` (e.g. :meth:`RouteRequest.json` on a bad body): 400.
    """

    def __init__(self) -> None:
        self._routes: dict[str, dict[str, RouteHandler]] = {}

    def __repr__(self) -> str:
        return f"<Routes {sorted(self._routes)}>"

    def route(
        self, path: str, methods: Iterable[str] = ("GET",)
    ) -> Callable[[_HandlerT], _HandlerT]:
        """Serve ``path`` (exact, starting with ``/``) for ``methods`` with the decorated
        async function."""
        if not path.startswith("/"):
            raise ValueError(f"route path {path!r} must start with '/'")
        wanted = [method.upper() for method in methods]
        if not wanted:
            raise ValueError("a route needs at least one method")

        def register(handler: _HandlerT) -> _HandlerT:
            checked: Any = handler  # (iscoroutinefunction would narrow handler's type)
            if not inspect.iscoroutinefunction(checked):
                raise TypeError(f"route {path!r}: the handler must be an async function")
            table = self._routes.setdefault(path, {})
            for method in wanted:
                if method in table:
                    raise ValueError(f"route {method} {path!r} is defined twice")
                table[method] = handler
            return handler

        return register

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # lifespan and websocket scopes: nothing to do
        body = bytearray()
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        table = self._routes.get(scope["path"])
        method = scope["method"]
        if table is None:
            answer = _refused(404, "Not found")
        elif method not in table:
            answer = _refused(405, "Method not allowed", ("allow", ", ".join(sorted(table))))
        else:
            fields = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]
            request = RouteRequest(
                session_id=scope["state"]["session_id"],
                method=method,
                path=scope["path"],
                query_params=QueryParams(scope["query_string"].decode("latin-1")),
                headers=Headers(fields),
                body=bytes(body),
            )
            try:
                answer = _response(await table[method](request))
            except ValueError as exc:
                answer = _refused(400, f"Bad request: {exc}")
        payload = answer.body.encode() if isinstance(answer.body, str) else answer.body
        headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in answer.headers]
        if answer.media_type is not None:
            headers.append((b"content-type", answer.media_type.encode("latin-1")))
        await send({"type": "http.response.start", "status": answer.status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})


def _refused(status: int, reason: str, *headers: tuple[str, str]) -> RouteResponse:
    document = json.dumps({"error": reason, "code": str(status)})
    return RouteResponse(status, document, headers, "application/json")


def _response(value: Any) -> RouteResponse:
    if isinstance(value, RouteResponse):
        return value
    if value is None:
        return RouteResponse(204)
    if isinstance(value, bytes):
        return RouteResponse(200, value, media_type="application/octet-stream")
    if isinstance(value, str):
        return RouteResponse(200, value, media_type="text/plain; charset=utf-8")
    return RouteResponse(200, json.dumps(value), media_type="application/json")


def session_app_of(agent: AgentConfig) -> ASGIApp | None:
    """The agent's ``session_api`` as an app (importing a ``"module:app"`` name), or None.
    Raises :class:`ConfigError` naming the agent if the name cannot be imported."""
    app = agent.session_api
    if app is None or not isinstance(app, str):
        return app
    try:
        loaded: Any = load_bot(app)
    except ConfigError as exc:
        raise ConfigError(f"agent {agent.service_host!r}: session_api: {exc}") from None
    found: ASGIApp = loaded
    return found


async def call_app(
    app: ASGIApp,
    client: Conn,
    *,
    method: str,
    target: str,
    headers: Sequence[tuple[str, str]],
    body: bytes,
    session_id: str,
    timeout: float,
) -> int:
    """Call an in-process bot's ASGI ``app`` with one judged Session API request (``target``:
    ``/{path}[?query]``, still percent-encoded) and stream its answer to ``client`` as
    HTTP/1.1 (:class:`_Writer`); returns the answer's status.

    The answer must start within ``timeout``, and each later pause of the app (or of the client
    reading) is at most ``timeout`` too. While nothing was sent, a failure raises ``HttpError``:
    504 when the time ran out, 502 for no answer at all, 500 when the app raised (logged).
    Later, the same cuts the answer short (logged)."""
    raw_path, _, query = target.partition("?")
    fields = [*forward_fields(headers), ("x-daily-session-id", session_id)]
    scope: Scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": unquote(raw_path),
        "raw_path": raw_path.encode("latin-1"),
        "query_string": query.encode("latin-1"),
        "root_path": "",
        "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in fields],
        "client": None,
        "server": None,
        "state": {"session_id": session_id},
        "wsgate.session_id": session_id,
    }
    delivered = False

    async def receive() -> Message:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await anyio.sleep_forever()  # a disconnect is never reported: the answer is awaited
        raise AssertionError("unreachable")

    with anyio.CancelScope(deadline=anyio.current_time() + timeout) as pause:
        writer = _Writer(client, method == "HEAD", pause, timeout)
        try:
            await app(scope, receive, writer.send)
            await writer.finish()
        except Exception as exc:
            if writer.sent and isinstance(exc, OSError):  # the client left mid-answer
                log.debug("a Session API answer of an in-process bot was cut short: %s", exc)
            else:
                log.exception("the Session API app of an in-process bot raised")
            if not writer.sent:
                raise HttpError(500, "bot's route failed") from None
            return writer.status or 500
    if writer.status is None:
        if pause.cancelled_caught:
            raise HttpError(504, "bot did not answer in time")
        raise HttpError(502, "bot gave no answer")
    if not writer.sent:  # started, no body in time
        raise HttpError(504, "bot did not answer in time")
    if pause.cancelled_caught:
        log.warning("a Session API answer of an in-process bot was cut short: it paused too long")
    return writer.status


# Framing is the gateway's: these fields of the app's answer are dropped.
_FRAMING = frozenset({b"content-length", b"transfer-encoding", b"connection", b"keep-alive"})


class _Writer:
    """An ASGI app's answer, written to the client as it comes. The head goes with the first
    body part: with ``Content-Length`` when that part is the last (the usual case: one write),
    else with ``Transfer-Encoding: chunked`` and each part as a chunk. Framing is the
    gateway's (the app's own framing fields are dropped), and ``Connection: close``. Each
    message pushes ``pause``'s deadline ``idle`` seconds on."""

    def __init__(self, client: Conn, head_only: bool, pause: anyio.CancelScope, idle: float):
        self.client = client
        self.head_only = head_only
        self.pause = pause
        self.idle = idle
        self.status: int | None = None
        self.headers: list[tuple[bytes, bytes]] = []
        #: The head went to the client.
        self.sent = False
        self.chunked = False
        self.done = False

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            if self.status is not None:
                raise RuntimeError("http.response.start sent twice")
            self.status = int(message["status"])
            self.headers = [(bytes(k).lower(), bytes(v)) for k, v in message.get("headers", ())]
        elif kind == "http.response.body":
            if self.status is None:
                raise RuntimeError("http.response.body before http.response.start")
            more = bool(message.get("more_body", False))
            await self._write(bytes(message.get("body", b"")), more)
        self.pause.deadline = anyio.current_time() + self.idle

    async def finish(self) -> None:
        """The app returned: its answer ends here, if it began."""
        if self.status is not None and not self.done:
            await self._write(b"", False)

    async def _write(self, body: bytes, more: bool) -> None:
        if self.done:
            return
        assert self.status is not None
        has_body = not (self.status < 200 or self.status in (204, 304))
        data = b""
        if not self.sent:
            data = self._head(has_body, None if more else len(body))
            self.sent, self.chunked = True, more
        if has_body and not self.head_only:
            if not self.chunked:
                data += body
            elif body:
                data += b"%x\r\n%b\r\n" % (len(body), body)
            if self.chunked and not more:
                data += b"0\r\n\r\n"
        self.done = not more
        if data:
            await send_all(self.client, data)

    def _head(self, has_body: bool, length: int | None) -> bytes:
        assert self.status is not None
        try:
            phrase = HTTPStatus(self.status).phrase
        except ValueError:
            phrase = ""
        lines = [f"HTTP/1.1 {self.status} {phrase}".encode("latin-1")]
        lines += [k + b": " + v for k, v in self.headers if k not in _FRAMING]
        if has_body:
            framing = b"chunked" if length is None else b"%d" % length
            lines.append(
                (b"Transfer-Encoding: " if length is None else b"Content-Length: ") + framing
            )
        lines.append(b"Connection: close")
        return b"\r\n".join(lines) + b"\r\n\r\n"
