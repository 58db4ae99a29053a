"""One client connection's request, from its first byte to a session or a refusal.

The path: read the request head (``handshake_timeout`` for the whole request, evictable while it
is being sent: :class:`~wsgate.admission.PendingReads`) -> parse -> a health check, ``/start``
(:mod:`wsgate.start`), session control and the Session API (:mod:`wsgate.session_calls`, which
answers them whole), ``/ws/twilio`` (answer the upgrade, read the opening, then route), or
:func:`~wsgate.routing.route` -> :meth:`~wsgate.sessions.Sessions.admit`. Every refusal of an
upgrade is answered here, in one place: an ``HttpError`` before the upgrade is a plain-text
response, after it (Twilio) a close frame; nothing is started before every check has passed.
Each refusal and each ``/start`` answer is counted here too (:mod:`wsgate.metrics`), and ``GET
/metrics`` answered unless a metrics listener of its own serves it (``metrics_port``).
"""

from __future__ import annotations

import functools
import logging
import uuid
from collections.abc import Callable, Mapping

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
from .handshake import close_frame, switching_protocols
from .metrics import METRICS_PATH, Metrics
from .providers import Opening, OpeningReader, close_for
from .request import Request, parse_request
from .responses import json_response, plain_lines_response, plain_response
from .routing import TokenCheck, named_agent, precheck, route
from .session_api import CONTROL_PREFIX, SessionKeys, is_forward_path
from .session_calls import SessionCalls
from .sessions import Opened, Sessions
from .start import answer_start, is_start_path, request_body_length
from .tokens import token_from_request
from .upstream import engine_dial_error

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
        #: Session control and the Session API (keys: the organisations' public and private).
        keys = SessionKeys.from_config(config) if keys is None else keys
        self.calls = SessionCalls(config, agents, sessions, pending, self.metrics, keys)

    async def handle(
        self,
        sock: Conn,
        client: str,
        read: bytes = b"",
        waited: float | None = None,
        answered: str | None = None,
    ) -> Opened | None:
        """Run the client's request (``read``: its first bytes, read as it was accepted, or
        its head whole when the engine read it for ``waited`` seconds and did not open it:
        :mod:`wsgate.fastpath`); returns the session it opened, or None if refused.
        ``answered``: a ``/ws/twilio`` stream the engine answered 101 naming this session id
        (``""``: none, it has a token) and read the opening of for ``waited`` seconds (``read``:
        its head, then the frames); it goes on from there, with what is left of
        ``handshake_timeout``."""
        # handshake_timeout covers the whole request from the accept: head, and a /start body.
        timeout = self.config.gateway.handshake_timeout - (waited or 0.0)
        deadline = anyio.current_time() + timeout
        try:
            received: tuple[bytes, bytes] | None = None
            at_once = head_at_once(sock, _core.MAX_HEADER_BYTES, read)
            if isinstance(at_once, tuple):
                received = at_once
            else:
                # Not all there yet: read on as a pending upgrade (evictable, under the deadline).
                with self.pending.reading(deadline):
                    received = await read_head(sock, _core.MAX_HEADER_BYTES, at_once)
            if received is None:
                return None  # too slow, or evicted: dropped without an answer
            return await self._request(sock, *received, deadline, client, answered)
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

    async def unopened(self, sock: Conn, news: _core.Unopened) -> None:
        """Answer a session the engine could not open (:mod:`wsgate.fastpath`): its bot's dial
        failed, counted, logged and answered as a dial of the Python path's."""
        error = engine_dial_error(news)
        self.metrics.store_called(news.store_seconds)
        self.metrics.dial_failed(news.service_host, error)
        what = "twilio session refused" if news.answered else "refused"
        log.warning("%s with %d: %s", what, error.status, error.reason)
        self.metrics.upgrade_refused(news.service_host, error)
        if news.answered:  # a /ws/twilio stream answered 101: its close frame says it
            await _close(sock, *close_for(error))
        else:
            await _respond(sock, error.status, error.reason)

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
        self,
        sock: Conn,
        head: bytes,
        pending: bytes,
        deadline: float,
        client: str,
        answered: str | None = None,
    ) -> Opened | None:
        request = parse_request(head)
        if answered is not None:  # the engine's /ws/twilio stream: on from its 101
            return await self._twilio(sock, request, pending, client, (answered, deadline))
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
            await self.calls.control(sock, request)
            return None
        if is_forward_path(request.path):
            await self.calls.session_api(sock, request, pending, deadline)
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
        self,
        sock: Conn,
        request: Request,
        pending: bytes,
        client: str,
        answered: tuple[str, float] | None = None,
    ) -> Opened | None:
        """``/ws/twilio`` (SPEC §6b): answer the upgrade, read the stream's opening for its
        service host, then route and admit as usual. Every refusal from here on is a close
        frame (:func:`~wsgate.providers.close_for`); nothing is dialled before the route is
        known. ``answered``: the engine answered the upgrade already (``rust/twilio.rs``),
        naming this session id, and the opening is read until this deadline (``pending``: the
        frames it read)."""
        if answered is not None:
            name, deadline = answered
            named: str | None = name or None  # "": a token names it
        else:
            upgrade = precheck(request)  # what the request alone decides is an HTTP answer
            # The session's id, named on the 101 as on every endpoint, is chosen before the
            # session exists. Not with a token: its session has the id /start answered, which
            # cannot be read from the token before its signature is checked, once the opening
            # names the host.
            named = None
            if token_from_request(request, upgrade.path_token) is None:
                named = str(uuid.uuid4())
            await send_all(sock, switching_protocols(upgrade.client_key, None, named))
            deadline = anyio.current_time() + self.config.gateway.handshake_timeout
        reader = OpeningReader("twilio")
        try:
            opening: Opening | None = None
            if answered is not None and deadline <= anyio.current_time():
                # Evicted or too slow in the engine: closed as one of ours would be, without
                # a place among the reads (it would evict another) or a read of what came since.
                raise OpeningError(1008, "no start message in time")
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


async def _close(sock: Conn, code: int, reason: str) -> None:
    """Close an upgraded client with a close frame, then the connection."""
    await send_and_close(sock, close_frame(code, reason))
