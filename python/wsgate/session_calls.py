"""Session control and the Session API on one connection: the I/O around the judgements of
:mod:`wsgate.session_api`, from a parsed request to its answer sent and counted
(:mod:`wsgate.metrics`). A stop or a Session API call for a session that another gateway of the
store holds goes there (:mod:`wsgate.forwarding`).

- ``GET /v1/agents/{agent}/sessions``: a page of the agent's live sessions, each with its
  messages and bytes each way so far (:meth:`wsgate.sessions.Sessions.listed`); with a
  session registry, those of every gateway of the store (:meth:`SessionCalls._list`).
- ``DELETE /v1/agents/{agent}/sessions/{id}``: the session stopped.
- ``/v1/public/{agent}/sessions/{id}/{path}``: the request passed to the session's bot and its
  answer streamed back. The request's body is read whole first (``Content-Length`` or chunked,
  at most ``/start``'s :data:`~wsgate.start.MAX_REQUEST_BYTES`, by ``handshake_timeout``:
  :mod:`wsgate.http_body`), so a body refused (400, 413, 501) or too slow (408) never reaches
  the bot; the answer (the bot's, an in-process app's, or the holding gateway's) goes to the
  client as it comes (:func:`wsgate.upstream.pass_answer`,
  :func:`wsgate.session_routes.call_app`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import NamedTuple

import anyio

from ._sockets import Conn, read_exactly, read_until, send_all, send_and_close
from .admission import PendingReads
from .config import AgentConfig, Config
from .errors import HttpError
from .forwarding import FORWARD_HEADER, Forwarder
from .http_body import ChunkedBody, body_framing
from .metrics import Metrics
from .request import Request
from .responses import json_response
from .session_api import (
    JSON,
    Forward,
    ListSessions,
    Refusal,
    SessionKeys,
    Stop,
    forward_head,
    judge_control,
    judge_forward,
    merge_pages,
    page,
    refusal,
)
from .session_routes import call_app, session_app_of
from .sessions import Sessions
from .start import MAX_REQUEST_BYTES
from .upstream import pass_answer
from .urls import UpstreamURL

__all__ = ["SessionCalls"]

log = logging.getLogger("wsgate")


class SessionCalls:
    """Session control and the Session API of one gateway: what they need of it, and one
    method per door."""

    def __init__(
        self,
        config: Config,
        agents: Mapping[str, AgentConfig],
        sessions: Sessions,
        pending: PendingReads,
        metrics: Metrics,
        keys: SessionKeys,
    ) -> None:
        self.config = config
        #: The gateway's own mapping (registrations of in-process bots show here).
        self.agents = agents
        self.sessions = sessions
        self.pending = pending
        self.metrics = metrics
        #: Public and private keys of the organisations.
        self.keys = keys
        #: Stops and Session API calls for sessions held by another gateway of the store.
        self.forwarder = Forwarder.of(config.gateway, sessions.capacity)

    async def control(self, sock: Conn, request: Request) -> None:
        """Answer a request under ``/v1/agents/`` (list, stop) and close."""
        action = "list" if request.path.rstrip("/").endswith("/sessions") else "stop"
        await self._reply(sock, action, await self._control(sock, request))

    async def session_api(
        self, sock: Conn, request: Request, pending: bytes, deadline: float
    ) -> None:
        """Answer a Session API request (``pending``: bytes read past its head; ``deadline``:
        when its body must be in) and close."""
        answer = await self._session_api(sock, request, pending, deadline)
        await self._reply(sock, "session_api", answer)

    async def _control(self, sock: Conn, request: Request) -> _Answer:
        """``DELETE /v1/agents/{agent}/sessions/{id}`` (stop) and ``GET
        /v1/agents/{agent}/sessions`` (list), with a private key. A stop of a session held
        by another gateway of the store is forwarded there (:mod:`wsgate.forwarding`)."""
        hop = self._hop(request)
        if hop is False:
            return _Answer(_refusal_bytes(_untrusted()))
        judged = judge_control(
            request.method,
            request.path,
            request.query_params(),
            request.headers,
            self.agents,
            self.keys,
        )
        if isinstance(judged, Refusal):
            return _Answer(_refusal_bytes(judged), judged.agent)
        sessions = self.sessions
        host = judged.agent.service_host
        if isinstance(judged, ListSessions):
            try:
                document = await self._list(request, judged, hop)
            except HttpError as exc:
                return _Answer(_refusal_bytes(refusal(exc.status, exc.reason)), judged.agent)
            return _Answer(json_response(200, document), judged.agent)
        opened = sessions.find(judged.session_id, host)
        if opened is None:
            forwarded = None if hop else await self._elsewhere(sock, request, b"", judged)
            return forwarded or _Answer(_refusal_bytes(_not_live()), judged.agent)
        sessions.stop(opened)
        log.info("session %s %s stopped through the API", host, opened.session_uuid)
        document = {"status": "stopped", "sessionId": opened.session_uuid}
        return _Answer(json_response(200, document), judged.agent)

    async def _list(self, request: Request, judged: ListSessions, hop: bool | None) -> JSON:
        """A page of the agent's live sessions: this gateway's alone without a registry (or
        for a hop: it is never fanned out again); else every gateway's of the store, each
        entry naming its ``gateway``, and ``unreachable`` the gateways whose sessions are not
        in it (:meth:`wsgate.forwarding.Forwarder.lists`). Raises ``HttpError`` 503."""
        agent, forwarder = judged.agent, self.forwarder
        mine = self.sessions.listed(agent.service_host)
        if forwarder is None:
            return page(mine, judged.limit, judged.after)
        own = forwarder.own_url
        for entry in mine:
            entry["gateway"] = own
        document = page(mine, judged.limit, judged.after)
        if hop:
            return document
        bot_tls = self.sessions.bot_tls
        tls = None if bot_tls is None else lambda: bot_tls(agent)
        pages, unreachable = await forwarder.lists(
            request.target, request.headers, agent.service_host, tls
        )
        merged = merge_pages([document, *pages], judged.limit, judged.after)
        return {**merged, "unreachable": unreachable}

    async def _session_api(
        self, sock: Conn, request: Request, pending: bytes, deadline: float
    ) -> _Answer:
        """``/v1/public/{agent}/sessions/{id}/{path}`` with a public key: the request goes to
        the HTTP origin of the bot that holds the session (or its in-process app), its answer
        comes back as it is, streamed. The body is read whole first (``/start``'s limit,
        ``Content-Length`` or chunked, by ``handshake_timeout``: :mod:`wsgate.http_body`), so
        a body refused or too slow never reaches the bot. A session held by another gateway
        of the store: forwarded there."""
        hop = self._hop(request)
        if hop is False:
            return _Answer(_refusal_bytes(_untrusted()))
        judged = judge_forward(
            request.method, request.path, request.query, request.headers, self.agents, self.keys
        )
        if isinstance(judged, Refusal):
            return _Answer(_refusal_bytes(judged), judged.agent)
        try:
            framing = body_framing(request.headers, MAX_REQUEST_BYTES)
        except HttpError as exc:
            return _Answer(_refusal_bytes(refusal(exc.status, exc.reason)), judged.agent)
        return await self._forward(sock, request, judged, framing, pending, deadline, hop)

    async def _forward(
        self,
        sock: Conn,
        request: Request,
        judged: Forward,
        framing: int | None,
        pending: bytes,
        deadline: float,
        hop: bool | None,
    ) -> _Answer:
        """Pass a judged Session API request to its session's bot (or to the gateway holding
        the session), the answer streamed to the client; or a refusal's bytes; or nothing when
        the client was evicted while sending its body."""
        agent = judged.agent
        opened = self.sessions.find(judged.session_id, agent.service_host)
        if opened is None and (hop or self.forwarder is None):
            return _Answer(_refusal_bytes(_not_live()), agent)
        app = None if opened is None or opened.bot is None else session_app_of(agent)
        origin = None if opened is None else agent.session_api_url or opened.upstream
        if opened is not None and app is None and (origin is None or opened.bot is not None):
            no_routes = refusal(404, "Not found: this session's bot serves no routes")
            return _Answer(_refusal_bytes(no_routes), agent)
        try:
            body = await self._body(sock, request, framing, pending, deadline)
            if body is None:
                return _Answer(None, agent)
            if opened is None:
                forwarded = await self._elsewhere(sock, request, body, judged)
                return forwarded or _Answer(_refusal_bytes(_not_live()), agent)
            if app is not None:
                status = await call_app(
                    app,
                    sock,
                    method=request.method,
                    target=judged.target,
                    headers=request.headers,
                    body=body,
                    session_id=opened.session_uuid,
                    timeout=self.config.gateway.session_api_timeout,
                )
            else:
                assert origin is not None
                session = opened.session_uuid
                status = await self._call_upstream(sock, origin, request, judged, session, body)
        except HttpError as exc:
            level = logging.WARNING if exc.status >= 500 else logging.DEBUG
            log.log(level, "session API call to %s refused with %d: %s",
                    agent.service_host, exc.status, exc.reason)  # fmt: skip
            return _Answer(_refusal_bytes(refusal(exc.status, exc.reason)), agent)
        return _Answer(None, agent, streamed=status)

    async def _reply(self, sock: Conn, action: str, answer: _Answer) -> None:
        """Send a session control or Session API answer (none: the client was dropped; one
        streamed already: only the connection's end), and count it."""
        host = None if answer.agent is None else answer.agent.service_host
        if answer.streamed is not None:
            self.metrics.session_control(host, action, answer.streamed, answer.forwarded)
            await send_and_close(sock, b"")
            return
        if answer.data is None:
            return
        self.metrics.session_control(host, action, _status_of(answer.data), answer.forwarded)
        await send_and_close(sock, answer.data)

    async def _call_upstream(
        self,
        sock: Conn,
        origin: UpstreamURL,
        request: Request,
        judged: Forward,
        session: str,
        body: bytes,
    ) -> int:
        """One exchange with an upstream bot's HTTP origin (``origin.resource`` is the path of
        a ``session_api_upstream``, empty for the WebSocket URL's origin), its answer streamed
        to the client: the answer's status."""
        base = origin.resource if judged.agent.session_api_url is not None else ""
        head = forward_head(
            request.method, base + judged.target, origin.host_header, request.headers, session,
            len(body),
        )  # fmt: skip
        sessions, settings = self.sessions, self.config.gateway
        tls = None
        if origin.tls and sessions.bot_tls is not None:
            tls = sessions.bot_tls(judged.agent)
        return await pass_answer(
            sock,
            origin,
            head + body,
            head_only=request.method == "HEAD",
            dial_timeout=settings.dial_timeout,
            answer_timeout=settings.session_api_timeout,
            tls=tls,
        )

    async def _body(
        self, sock: Conn, request: Request, framing: int | None, pending: bytes, deadline: float
    ) -> bytes | None:
        """The request's body, read whole (``framing``: its length, or None: chunked), after a
        ``100 Continue`` if the client asked for one; None when the connection was evicted to
        make room (dropped, like a slow head). Raises ``HttpError``: 408 when it is not all in
        by ``deadline``, 400 or 413 for its chunked framing."""
        if framing != 0 and any(v.lower() == "100-continue" for v in request.headers_all("expect")):
            await send_all(sock, b"HTTP/1.1 100 Continue\r\n\r\n")
        body: bytes | None = None
        with self.pending.reading(deadline):
            if framing is None:
                body = await read_until(sock, ChunkedBody(MAX_REQUEST_BYTES).feed, pending)
            else:
                body = await read_exactly(sock, framing, pending)
        if body is None and anyio.current_time() >= deadline:
            raise HttpError(408, "Request body not received in time")
        return body

    def _hop(self, request: Request) -> bool | None:
        """None: a client's request; True: forwarded by a gateway of the store (the right
        secret); False: it claims to be, but is not to be trusted."""
        values = request.headers_all(FORWARD_HEADER)
        if not values:
            return None
        forwarder = self.forwarder
        return forwarder is not None and len(values) == 1 and forwarder.trusts(values[0])

    async def _elsewhere(
        self, sock: Conn, request: Request, body: bytes, judged: Stop | Forward
    ) -> _Answer | None:
        """The answer of the gateway holding the session, streamed to the client (or a
        refusal's: 502/503/504), or None when no other gateway holds it."""
        if self.forwarder is None:
            return None
        agent, bot_tls = judged.agent, self.sessions.bot_tls
        try:
            status = await self.forwarder.forward(
                sock,
                request.method,
                request.target,
                request.headers,
                body,
                judged.session_id,
                agent.service_host,
                tls=None if bot_tls is None else lambda: bot_tls(agent),
            )
        except HttpError as exc:
            return _Answer(_refusal_bytes(refusal(exc.status, exc.reason)), agent, forwarded=True)
        return None if status is None else _Answer(None, agent, forwarded=True, streamed=status)


def _not_live() -> Refusal:
    return refusal(404, "Session not found: not live on this gateway, or not this agent's")


def _untrusted() -> Refusal:
    return refusal(403, "Forwarded request not trusted")


def _refusal_bytes(judged: Refusal) -> bytes:
    return json_response(judged.status, judged.document, judged.allow or "POST")


class _Answer(NamedTuple):
    """A session control or Session API answer: its bytes (None: nothing to send), the agent
    once known, whether another gateway gave it (:mod:`wsgate.forwarding`), and the status of
    an answer streamed to the client already."""

    data: bytes | None
    agent: AgentConfig | None = None
    forwarded: bool = False
    streamed: int | None = None


def _status_of(answer: bytes) -> int:
    """The status of a whole HTTP/1.x answer (``HTTP/1.1 200 OK``: 200)."""
    code = answer[9:12]
    return int(code) if code.isdigit() else 502
