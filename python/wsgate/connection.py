"""One client connection's request, from its first byte to a session or a refusal.

The path: read the request head (``handshake_timeout`` for the whole request, evictable while it
is being sent: :class:`~wsgate.admission.PendingReads`) -> parse -> a health check, ``/start``
(:mod:`wsgate.start`), session control and the Session API (:mod:`wsgate.session_api`),
``/ws/twilio`` (answer the upgrade, read the opening, then route), or
:func:`~wsgate.routing.route` -> :meth:`~wsgate.sessions.Sessions.admit`. Every refusal is
answered here, in one place: an ``HttpError`` before the upgrade is a plain-text response, after
it (Twilio) a close frame; nothing is started before every check has passed. Each refusal and
each ``/start`` answer is counted here too (:mod:`wsgate.metrics`), and ``GET /metrics`` answered
unless a metrics listener of its own serves it (``metrics_port``).
"""

from __future__ import annotations

import functools
import logging
import uuid
from collections.abc import Callable, Mapping
from typing import NamedTuple

import anyio

from . import _core
from ._sockets import (
    Conn,
    head_at_once,
    read_exactly,
    read_head,
    read_until,
    send_all,
    send_and_close,
)
from .admission import PendingReads, RateLimiter
from .config import AgentConfig, Config
from .errors import HeadTooLarge, HttpError, OpeningError
from .forwarding import FORWARD_HEADER, Forwarder
from .handshake import close_frame, switching_protocols
from .metrics import METRICS_PATH, Metrics
from .providers import Opening, OpeningReader, close_for
from .request import Request, parse_request
from .responses import json_response, plain_lines_response, plain_response
from .routing import TokenCheck, named_agent, precheck, route
from .session_api import (
    CONTROL_PREFIX,
    Forward,
    ListSessions,
    Refusal,
    SessionKeys,
    Stop,
    forward_head,
    is_forward_path,
    judge_control,
    judge_forward,
    page,
    refusal,
)
from .session_routes import call_app, session_app_of
from .sessions import Opened, Sessions
from .start import answer_start, is_start_path, request_body_length
from .tokens import token_from_request
from .upstream import call_bot
from .urls import UpstreamURL

__all__ = ["HEALTH_PATHS", "Connections"]

log = logging.getLogger("wsgate")

HEALTH_PATHS = frozenset({"/livez", "/readyz"})


class Connections:
    """What every connection of one gateway shares: its settings and the places a request goes
    (agents, the token check, sessions, limits). :meth:`handle` runs one connection."""

    def __init__(
        self,
        config: Config,
        agents: Mapping[str, AgentConfig],
        check_token: TokenCheck,
        sessions: Sessions,
        pending: PendingReads,
        *,
        draining: Callable[[], bool],
        public_url: Callable[[], str],
        metrics: Metrics | None = None,
        keys: SessionKeys | None = None,
    ) -> None:
        self.config = config
        #: Public and private keys of the organisations (session control, the Session API).
        self.keys = SessionKeys.from_config(config) if keys is None else keys
        self.metrics = Metrics(agents) if metrics is None else metrics
        #: The gateway's own mapping (registrations of in-process bots show here).
        self.agents = agents
        self.check_token = check_token
        self.sessions = sessions
        self.pending = pending
        self._draining = draining
        self._public_url = public_url
        settings = config.gateway
        # Per-client limits (off by default; docs/SECURITY.md).
        rate, per_key = settings.client_request_rate, settings.start_rate_per_key
        self._client_rate = RateLimiter(rate) if rate else None
        self._key_rate = RateLimiter(per_key) if per_key else None
        # With a listener of its own (metrics_port), /metrics leaves the clients' port.
        self._serves_metrics = settings.metrics and settings.metrics_port is None
        #: Stops and Session API calls for sessions held by another gateway of the store.
        self.forwarder = Forwarder.of(settings, sessions.capacity)

    async def handle(self, sock: Conn, client: str) -> Opened | None:
        """Run the client's request; returns the session it opened, or None if refused."""
        # handshake_timeout covers the whole request: head, and a /start body.
        deadline = anyio.current_time() + self.config.gateway.handshake_timeout
        try:
            received: tuple[bytes, bytes] | None = None
            at_once = head_at_once(sock, _core.MAX_HEADER_BYTES)
            if isinstance(at_once, tuple):
                received = at_once
            else:
                # Not all there yet: read on as a pending upgrade (evictable, under the deadline).
                with self.pending.reading(deadline):
                    received = await read_head(sock, _core.MAX_HEADER_BYTES, at_once)
            if received is None:
                return None  # too slow, or evicted: dropped without an answer
            return await self._request(sock, *received, deadline, client)
        except HeadTooLarge:
            self.metrics.refused(None, 431)
            await _respond(sock, 431, "request header fields too large")
        except HttpError as exc:
            # 5xx is the gateway's or the bot's trouble: worth an operator's attention.
            level = logging.WARNING if exc.status >= 500 else logging.DEBUG
            log.log(level, "refused with %d: %s", exc.status, exc.reason)
            self.metrics.upgrade_refused(self._named_agent(received), exc)
            await _respond(sock, exc.status, exc.reason)
        except _core.TlsError as exc:
            # Plain HTTP on the TLS port, no common version or cipher, a bad record: no session.
            log.debug("TLS handshake failed: %s", exc)
        except (EOFError, OSError):
            pass  # the client went away during its handshake
        except Exception:
            # A bug must cost this one connection, never the gateway's task group.
            log.exception("unexpected error during an upgrade; connection dropped")
            self.metrics.refused(None, 500)
            await _respond(sock, 500, "internal error")
        return None

    def health(self, path: str) -> bytes:
        """``/livez`` (200 while the process serves) or ``/readyz`` (503 "draining" once a
        stop began; its first line notes a capacity store out of reach, then a line per pool
        member). The metrics listener answers the same."""
        ready = path == "/livez" or not self._draining()
        lines = ["ok" if ready else "draining"]
        if path == "/readyz":
            note = self.sessions.capacity.status
            if note is not None and ready:
                lines[0] = f"ok; {note}"  # still ready: sessions go on, limits counted here
            lines += self.sessions.pools.status(self.agents.values())  # a line per member
        return plain_lines_response(200 if ready else 503, lines)

    async def _request(
        self, sock: Conn, head: bytes, pending: bytes, deadline: float, client: str
    ) -> Opened | None:
        request = parse_request(head)
        if request.path in HEALTH_PATHS and request.method == "GET":
            await send_and_close(sock, self.health(request.path))
            return None
        if request.path == METRICS_PATH and request.method == "GET" and self._serves_metrics:
            await send_and_close(sock, self.metrics.exposition(request.header("accept")))
            return None
        limited = self._client_rate is not None and not self._client_rate.allow(
            client, anyio.current_time()
        )
        if request.path.startswith(CONTROL_PREFIX):
            action = "list" if request.path.rstrip("/").endswith("/sessions") else "stop"
            await self._reply(sock, action, await self._control(request))
            return None
        if is_forward_path(request.path):
            answer = await self._session_api(sock, request, pending, deadline)
            await self._reply(sock, "session_api", answer)
            return None
        if is_start_path(request.path):
            if limited:
                self.metrics.start_answered(None, 429)
                await _respond_json(sock, 429, "Too many requests from this address")
            else:
                await self._start_service(sock, request, pending, deadline)
            return None
        if limited:
            raise HttpError(429, "too many requests from this address")
        if request.path == "/ws/twilio" or request.path.startswith("/ws/twilio/"):
            return await self._twilio(sock, request, pending, client)
        # Bad tokens and bodies the token does not bind are refused here (403, stateless: no
        # replay store round trip).
        target = route(request, self.agents, self.check_token)
        return await self.sessions.admit(sock, pending, target, request, client, None)

    async def _twilio(
        self, sock: Conn, request: Request, pending: bytes, client: str
    ) -> Opened | None:
        """``/ws/twilio`` (SPEC §6b): answer the upgrade, read the stream's opening for its
        service host, then route and admit as usual. Every refusal from here on is a close
        frame (:func:`~wsgate.providers.close_for`); nothing is dialled before the route is
        known."""
        upgrade = precheck(request)  # what the request alone decides is still an HTTP answer
        # The session's id, named on the 101 as on every endpoint, is chosen before the session
        # exists. Not with a token: its session has the id /start answered, which cannot be
        # read from the token before its signature is checked, once the opening names the host.
        named = None
        if token_from_request(request, upgrade.path_token) is None:
            named = str(uuid.uuid4())
        await send_all(sock, switching_protocols(upgrade.client_key, None, named))
        reader = OpeningReader("twilio")
        try:
            opening: Opening | None = None
            deadline = anyio.current_time() + self.config.gateway.handshake_timeout
            # Still sending its request, in effect: evictable like a head being read.
            with self.pending.reading(deadline):
                opening = await read_until(sock, reader.feed, pending)
            if opening is None:
                raise OpeningError(1008, "no start message in time")
            target = route(
                request, self.agents, self.check_token, opening_host=opening.service_host
            )
            return await self.sessions.admit(
                sock, reader.raw, target, request, client, opening, session_uuid=named
            )
        except OpeningError as exc:
            log.debug("twilio opening refused with %d: %s", exc.code, exc.reason)
            self.metrics.upgrade_refused(None, exc)
            await _close(sock, exc.code, exc.reason)
        except HttpError as exc:
            level = logging.WARNING if exc.status >= 500 else logging.DEBUG
            log.log(level, "twilio session refused with %d: %s", exc.status, exc.reason)
            host = None if opening is None else opening.service_host
            self.metrics.upgrade_refused(named_agent(request, self.agents, host), exc)
            await _close(sock, *close_for(exc))
        return None

    async def _start_service(
        self, sock: Conn, request: Request, pending: bytes, deadline: float
    ) -> None:
        """``POST /v1/public/{agent}/start`` (SPEC §5) on the same listener."""
        try:
            length = request_body_length(request.headers)
        except HttpError as exc:
            self.metrics.start_answered(None, exc.status)
            await _respond_json(sock, exc.status, exc.reason)
            return
        body: bytes | None = None
        with self.pending.reading(deadline):
            body = await read_exactly(sock, length, pending)
        if body is None:
            return  # too slow, or evicted: dropped like a slow upgrade request
        sessions = self.sessions
        answer = answer_start(
            request.method,
            request.path,
            request.headers,
            body,
            self.agents,
            self.config.orgs,
            sessions.authority,
            lambda agent: sessions.count(agent.service_host) < agent.max_sessions,
            key_rate_check=(
                None
                if self._key_rate is None
                else functools.partial(self._key_rate.allow, now=anyio.current_time())
            ),
            public_url=self._public_url(),
        )
        agent = None if answer.agent is None else answer.agent.service_host
        self.metrics.start_answered(agent, answer.status)
        await send_and_close(sock, json_response(answer.status, answer.document))

    async def _control(self, request: Request) -> _Answer:
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
            document = page(sessions.listed(host), judged.limit, judged.after)
            return _Answer(json_response(200, document), judged.agent)
        opened = sessions.find(judged.session_id, host)
        if opened is None:
            answer = None if hop else await self._elsewhere(request, b"", judged)
            if answer is not None:
                return _Answer(answer, judged.agent, forwarded=True)
            return _Answer(_refusal_bytes(_not_live()), judged.agent)
        sessions.stop(opened)
        log.info("session %s %s stopped through the API", host, opened.session_uuid)
        document = {"status": "stopped", "sessionId": opened.session_uuid}
        return _Answer(json_response(200, document), judged.agent)

    async def _session_api(
        self, sock: Conn, request: Request, pending: bytes, deadline: float
    ) -> _Answer:
        """``/v1/public/{agent}/sessions/{id}/{path}`` with a public key: the request goes to
        the HTTP origin of the bot that holds the session, its answer comes back as it is.
        Buffered both ways (bounded: ``/start``'s body limit, ``MAX_ANSWER_BYTES``). A
        session held by another gateway of the store: forwarded there."""
        hop = self._hop(request)
        if hop is False:
            return _Answer(_refusal_bytes(_untrusted()))
        judged = judge_forward(
            request.method, request.path, request.query, request.headers, self.agents, self.keys
        )
        if isinstance(judged, Refusal):
            return _Answer(_refusal_bytes(judged), judged.agent)
        try:
            length = request_body_length(request.headers)
        except HttpError as exc:
            return _Answer(_refusal_bytes(refusal(exc.status, exc.reason)), judged.agent)
        return await self._forward(sock, request, judged, length, pending, deadline, hop)

    async def _forward(
        self,
        sock: Conn,
        request: Request,
        judged: Forward,
        length: int,
        pending: bytes,
        deadline: float,
        hop: bool | None,
    ) -> _Answer:
        """The bot's answer to a judged Session API request, or a refusal's; none when the
        client was too slow with its body (dropped, like a slow ``/start``)."""
        agent = judged.agent
        opened = self.sessions.find(judged.session_id, agent.service_host)
        if opened is None:
            if hop or self.forwarder is None:
                return _Answer(_refusal_bytes(_not_live()), agent)
            body = await self._body(sock, request, length, pending, deadline)
            if body is None:
                return _Answer(None, agent)
            answer = await self._elsewhere(request, body, judged)
            if answer is None:
                return _Answer(_refusal_bytes(_not_live()), agent)
            return _Answer(answer, agent, forwarded=True)
        app = None if opened.bot is None else session_app_of(agent)
        origin = agent.session_api_url or opened.upstream
        if app is None and (origin is None or opened.bot is not None):
            no_routes = refusal(404, "Not found: this session's bot serves no routes")
            return _Answer(_refusal_bytes(no_routes), agent)
        body = await self._body(sock, request, length, pending, deadline)
        if body is None:
            return _Answer(None, agent)
        settings = self.config.gateway
        try:
            if app is not None:
                answer = await call_app(
                    app,
                    method=request.method,
                    target=judged.target,
                    headers=request.headers,
                    body=body,
                    session_id=opened.session_uuid,
                    timeout=settings.session_api_timeout,
                )
            else:
                assert origin is not None
                session = opened.session_uuid
                answer = await self._call_upstream(origin, request, judged, session, body)
        except HttpError as exc:
            level = logging.WARNING if exc.status >= 500 else logging.DEBUG
            log.log(level, "session API call to %s refused with %d: %s",
                    agent.service_host, exc.status, exc.reason)  # fmt: skip
            answer = _refusal_bytes(refusal(exc.status, exc.reason))
        return _Answer(answer, agent)

    async def _reply(self, sock: Conn, action: str, answer: _Answer) -> None:
        """Send a session control or Session API answer (none: the client was dropped), and
        count it."""
        if answer.data is None:
            return
        host = None if answer.agent is None else answer.agent.service_host
        self.metrics.session_control(host, action, _status_of(answer.data), answer.forwarded)
        await send_and_close(sock, answer.data)

    async def _call_upstream(
        self, origin: UpstreamURL, request: Request, judged: Forward, session: str, body: bytes
    ) -> bytes:
        """One exchange with an upstream bot's HTTP origin (``origin.resource`` is the path of
        a ``session_api_upstream``, empty for the WebSocket URL's origin)."""
        base = origin.resource if judged.agent.session_api_url is not None else ""
        head = forward_head(
            request.method, base + judged.target, origin.host_header, request.headers, session,
            len(body),
        )  # fmt: skip
        sessions, settings = self.sessions, self.config.gateway
        tls = None
        if origin.tls and sessions.bot_tls is not None:
            tls = sessions.bot_tls(judged.agent)
        return await call_bot(
            origin,
            head + body,
            head_only=request.method == "HEAD",
            dial_timeout=settings.dial_timeout,
            answer_timeout=settings.session_api_timeout,
            tls=tls,
        )

    async def _body(
        self, sock: Conn, request: Request, length: int, pending: bytes, deadline: float
    ) -> bytes | None:
        """The request's body (None: too slow, or evicted), after a ``100 Continue`` if the
        client asked for one."""
        if length and any(v.lower() == "100-continue" for v in request.headers_all("expect")):
            await send_all(sock, b"HTTP/1.1 100 Continue\r\n\r\n")
        body: bytes | None = None
        with self.pending.reading(deadline):
            body = await read_exactly(sock, length, pending)
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
        self, request: Request, body: bytes, judged: Stop | Forward
    ) -> bytes | None:
        """The answer of the gateway holding the session (or a refusal's: 502/503/504), or
        None when no other gateway holds it."""
        if self.forwarder is None:
            return None
        agent, bot_tls = judged.agent, self.sessions.bot_tls
        try:
            return await self.forwarder.forward(
                request.method,
                request.target,
                request.headers,
                body,
                judged.session_id,
                agent.service_host,
                tls=None if bot_tls is None else lambda: bot_tls(agent),
            )
        except HttpError as exc:
            return _refusal_bytes(refusal(exc.status, exc.reason))

    def _named_agent(self, received: tuple[bytes, bytes] | None) -> str | None:
        """The configured service host a refused request named, if any (its head parsed
        again: refusals only)."""
        if received is None:
            return None
        try:
            return named_agent(parse_request(received[0]), self.agents)
        except HttpError:
            return None


async def _respond(sock: Conn, status: int, text: str) -> None:
    """Answer with a plain-text response, then close."""
    await send_and_close(sock, plain_response(status, text))


async def _respond_json(sock: Conn, status: int, reason: str) -> None:
    """Answer ``/start`` with its JSON error, then close."""
    await send_and_close(sock, json_response(status, {"error": reason, "code": str(status)}))


def _not_live() -> Refusal:
    return refusal(404, "Session not found: not live on this gateway, or not this agent's")


def _untrusted() -> Refusal:
    return refusal(403, "Forwarded request not trusted")


def _refusal_bytes(judged: Refusal) -> bytes:
    return json_response(judged.status, judged.document, judged.allow or "POST")


class _Answer(NamedTuple):
    """A session control or Session API answer: its bytes (None: the client was dropped), the
    agent once known, and whether another gateway gave it (:mod:`wsgate.forwarding`)."""

    data: bytes | None
    agent: AgentConfig | None = None
    forwarded: bool = False


def _status_of(answer: bytes) -> int:
    """The status of a whole HTTP/1.x answer (``HTTP/1.1 200 OK``: 200)."""
    code = answer[9:12]
    return int(code) if code.isdigit() else 502


async def _close(sock: Conn, code: int, reason: str) -> None:
    """Close an upgraded client with a close frame, then the connection."""
    await send_and_close(sock, close_frame(code, reason))
