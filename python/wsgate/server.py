"""The gateway: accept TCP, run both handshakes, hand sessions to the Rust engine, drain on stop.

A connection's path: read the request head (``handshake_timeout``, ``MAX_HEADER_BYTES``) ->
parse -> health check or :func:`~wsgate.routing.route` -> capacity -> dial the bot (or the builtin
echo) -> 101 to the client -> :class:`~wsgate.relay.Relay` until the outcome. An agent served by an
in-process bot gets its 101 without a dial; the engine attaches the client and
:func:`~wsgate.inprocess.serve_bot` runs the bot until the outcome. Every refusal is an
``HttpError`` answered here, in one place, before anything is started.

Sockets stay raw and non-blocking (no anyio streams) because they are finally detached and owned
by Rust; see :mod:`wsgate.upstream`.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import json
import logging
import socket
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from math import inf
from pathlib import Path
from typing import TypeVar

import anyio
from anyio.abc import TaskGroup, TaskStatus

from . import _core
from ._sockets import HeadTooLarge, read_exactly, read_head, read_until, send_all
from .admission import PendingReads, RateLimiter, client_key
from .config import AgentConfig, Config, OrgConfig, check_name, default_config, load_config
from .errors import HttpError
from .handshake import close_frame, plain_response, switching_protocols
from .inprocess import Bot, BotArguments, InProcessWebSocket, SessionChannel, serve_bot
from .providers import Opening, OpeningError, OpeningReader, close_for
from .relay import Relay, RelaySession
from .replay import open_replay_store
from .request import Request, parse_request
from .routing import Route, no_token_auth_yet, precheck, route
from .start import handle_start, is_start_path, render_response, request_body_length
from .tokens import TokenAuthority, VerifiedToken, load_secrets
from .upstream import dial

__all__ = ["Gateway"]

_BotT = TypeVar("_BotT", bound=Bot)

log = logging.getLogger("wsgate")

HEALTH_PATHS = frozenset({"/livez", "/readyz"})
# After the drain timeout, sessions get a close frame; this is how long their peers may take to
# answer it before the engine drops them.
_CLOSE_GRACE = 5.0
# How long a refused client may take to read its error response before the socket is closed.
_LINGER = 1.0
# How long the gateway waits for a Telnyx, Plivo or Exotel opening to learn the call's id; the
# bot's first messages wait as long at most. Providers send it at once.
_PEEK_TIME = 1.0
_ACCEPT_BATCH = 64
_ACCEPT_PAUSE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


@dataclass(slots=True)
class _Opened:
    """A session handed to the engine, with what its end-of-session log line needs."""

    relay: RelaySession
    service_host: str
    session_uuid: str
    started: float
    #: A telephony provider's opening (provider, call and stream ids), when one was read.
    opening: Opening | None = None
    #: For an in-process bot: the bot, its arguments and the session's channel.
    bot: tuple[Bot, BotArguments, SessionChannel] | None = None
    #: The client's address key (see :func:`~wsgate.admission.client_key`).
    client: str = ""


class Gateway:
    """A wsgate server. Embed it in an anyio (asyncio or trio) program::

        gateway = Gateway(config)
        async with anyio.create_task_group() as tg:
            await tg.start(gateway.serve)
            print(gateway.url)
            ...
            gateway.stop()  # serve() returns once sessions are drained

    ``authority`` judges and mints session tokens; by default it is built from the settings
    (``secrets``/``secrets_file``/``WSGATE_SECRETS``, ``token_ttl``, ``replay_store``) when an
    agent uses ``websocket_auth = "token"``. Pass one to share it or to inject a clock.

    ``session_time_limit`` (seconds) replaces ``config.gateway.max_session_duration`` for this
    gateway *without* that setting's 60-14400 s range, which stays the rule for settings (SPEC §6).
    It exists for tests and embedders that need sessions shorter than a minute; any number > 0 is
    taken. Sessions over it are closed like those over the setting: 1000 "session time limit".
    """

    def __init__(
        self,
        config: Config | None = None,
        *,
        authority: TokenAuthority | None = None,
        session_time_limit: float | None = None,
    ) -> None:
        self.config = default_config() if config is None else config
        self._own_authority = authority is None
        self.authority = _authority_for(self.config) if authority is None else authority
        if session_time_limit is None:
            session_time_limit = self.config.gateway.max_session_duration
        elif (
            isinstance(session_time_limit, bool)
            or not isinstance(session_time_limit, (int, float))
            or not 0 < session_time_limit < inf
        ):
            raise ValueError(
                f"session_time_limit must be a number of seconds > 0, got {session_time_limit!r}"
            )
        #: Seconds a session may last on this gateway (see ``session_time_limit``).
        self.session_time_limit: float = session_time_limit
        self._agents = self.config.agents_by_host()
        # Imported now, so that a bad "module:function" fails here, not at the first session.
        self._bots: dict[str, Bot] = {}
        for agent in self.config.agents:
            bot = agent.load_bot()
            if bot is not None:
                self._bots[agent.service_host] = bot
        self._check_token = (
            no_token_auth_yet if self.authority is None else self.authority.check_request
        )
        self._reserved: dict[str, int] = {}
        settings = self.config.gateway
        # Per-client limits (off by default; docs/SECURITY.md).
        self._client_sessions: dict[str, int] = {}
        self._client_rate = (
            RateLimiter(settings.client_request_rate) if settings.client_request_rate else None
        )
        self._key_rate = (
            RateLimiter(settings.start_rate_per_key) if settings.start_rate_per_key else None
        )
        # Connections still sending their request: the only ones that may be evicted.
        self._pending = PendingReads(self.config.gateway.max_pending_upgrades)
        self._connections = 0
        self._slot_freed: anyio.Event | None = None
        self._port: int | None = None
        self._served = False
        self._stop_requested = False
        self._drain_now = False
        self._stop_event: anyio.Event | None = None
        self._wake: anyio.Event | None = None

    @classmethod
    def from_file(cls, path: str | Path) -> Gateway:
        """A gateway serving the settings of a TOML file (see :func:`wsgate.load_config`)."""
        return cls(load_config(path))

    def bot(self, service_host: str) -> Callable[[_BotT], _BotT]:
        """Serve ``service_host`` (``"agent.org"``) with an in-process bot, as a decorator::

            @gateway.bot("my-agent.my-org")
            async def my_bot(args: wsgate.BotArguments) -> None:
                async for message in args.websocket:
                    await args.websocket.send_text(f"you said {message!r}")

        An agent of that name in the settings keeps its other settings and is served by the bot
        from now on; otherwise the agent (and its organisation, if new) is added. Only before
        :meth:`serve`.
        """
        name, _, org = service_host.partition(".")
        check_name("agent", name)
        check_name("organisation", org)

        def register(bot: _BotT) -> _BotT:
            if self._served:
                raise RuntimeError("register bots before the gateway serves")
            agents = list(self.config.agents)
            orgs = list(self.config.orgs)
            existing = self._agents.get(service_host)
            if existing is not None:
                agent = dataclasses.replace(existing, upstream=None, builtin=None, bot=bot)
                agents[agents.index(existing)] = agent
            else:
                agents.append(AgentConfig(name, org, bot=bot))
                if all(o.name != org for o in orgs):
                    orgs.append(OrgConfig(org))
            self.config = dataclasses.replace(self.config, orgs=orgs, agents=agents)
            self._agents = self.config.agents_by_host()
            self._bots[service_host] = bot
            return bot

        return register

    @property
    def evicted_upgrades(self) -> int:
        """Connections dropped while still sending their request, to make room for newer ones
        (see ``max_pending_upgrades``)."""
        return self._pending.evicted

    @property
    def bound(self) -> bool:
        """Whether :meth:`serve` has bound its listening socket (so :attr:`port` is known)."""
        return self._port is not None

    @property
    def port(self) -> int:
        """The bound TCP port (useful with ``port = 0``); only once :meth:`serve` has started."""
        if self._port is None:
            raise RuntimeError("the gateway is not listening yet")
        return self._port

    @property
    def url(self) -> str:
        """``ws://host:port`` of this gateway, for local clients (a wildcard host shows as
        loopback)."""
        host = self.config.gateway.host
        host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
        if ":" in host:
            host = f"[{host}]"
        return f"ws://{host}:{self.port}"

    def sessions(self, service_host: str | None = None) -> int:
        """Sessions open or being opened (past routing): of one service host, or in all."""
        if service_host is not None:
            return self._reserved.get(service_host, 0)
        return sum(self._reserved.values())

    def stop(self) -> None:
        """Begin a graceful stop: stop accepting, let sessions run up to ``drain_timeout``,
        then close the rest with 1001. A second call ends the wait at once. :meth:`serve`
        returns when done. Call it from the event loop's thread."""
        if self._stop_requested:
            self._drain_now = True
        self._stop_requested = True
        if self._stop_event is not None:
            self._stop_event.set()
        self._poke()

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Gateway]:
        """Serve for the duration of an ``async with`` block, then stop and drain."""
        async with anyio.create_task_group() as tg:
            await tg.start(self.serve)
            try:
                yield self
            finally:
                self.stop()

    async def serve(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Listen, report started through ``task_status``, and serve until :meth:`stop`."""
        if self._served:
            raise RuntimeError("a Gateway serves only once; create a new one")
        self._served = True
        settings = self.config.gateway
        self._stop_event = anyio.Event()
        if self._stop_requested:
            self._stop_event.set()
        listener = await _listen(settings.host, settings.port)
        relay: Relay | None = None
        try:
            self._port = listener.getsockname()[1]
            relay = Relay(settings.relay_threads, settings.dead_peer_timeout)
            async with anyio.create_task_group() as engine_tasks:
                await engine_tasks.start(relay.run)
                async with anyio.create_task_group() as connections:
                    async with anyio.create_task_group() as accepting:
                        accepting.start_soon(self._accept, listener, connections, relay)
                        log.info("wsgate listening on %s", self.url)
                        task_status.started()
                        await self._stop_event.wait()
                        accepting.cancel_scope.cancel()
                    listener.close()
                    await self._drain(relay)
                    connections.cancel_scope.cancel()
                engine_tasks.cancel_scope.cancel()
        finally:
            listener.close()
            if relay is not None:
                relay.shutdown()
            if self.authority is not None and self._own_authority:
                with anyio.CancelScope(shield=True):
                    await self.authority.aclose()
        log.info("wsgate stopped")

    async def _drain(self, relay: Relay) -> None:
        settings = self.config.gateway
        live = self._connections
        if live:
            log.info("draining %d connection(s), up to %g s", live, settings.drain_timeout)
        with anyio.move_on_after(settings.drain_timeout):
            await self._until_idle(stop_on_drain_now=True)
        if not self._connections:
            return
        log.info("closing %d connection(s) with 1001", self._connections)
        self._pending.cancel_all()
        for session in relay.live:
            session.close(1001, "gateway shutting down")
        with anyio.move_on_after(_CLOSE_GRACE):
            await self._until_idle(stop_on_drain_now=False)

    async def _until_idle(self, *, stop_on_drain_now: bool) -> None:
        while self._connections and not (stop_on_drain_now and self._drain_now):
            self._wake = anyio.Event()
            await self._wake.wait()

    def _poke(self) -> None:
        if self._wake is not None:
            self._wake.set()

    async def _accept(self, listener: socket.socket, connections: TaskGroup, relay: Relay) -> None:
        limit = self.config.gateway.max_connections
        while True:
            while self._connections >= limit:
                # Full: leave new connections in the kernel's backlog until one ends.
                self._slot_freed = anyio.Event()
                await self._slot_freed.wait()
            await anyio.wait_readable(listener)
            for _ in range(_ACCEPT_BATCH):
                try:
                    sock, address = listener.accept()
                except BlockingIOError:
                    break
                except ConnectionAbortedError:
                    continue
                except OSError as exc:
                    if exc.errno not in _ACCEPT_PAUSE_ERRNOS:
                        raise
                    log.warning("accept failed (%s); pausing 100 ms", exc.strerror)
                    await anyio.sleep(0.1)
                    break
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self._connections += 1
                connections.start_soon(self._connection, sock, relay, client_key(address))
                if self._connections >= limit:
                    break

    async def _connection(self, sock: socket.socket, relay: Relay, client: str) -> None:
        handed_off = False
        try:
            try:
                opened = await self._open(sock, relay, client)
            finally:
                # Closes the socket unless it was handed (detached) to the engine.
                sock.close()
            if opened is None:
                return
            if opened.bot is not None:
                await self._supervise(opened)  # an in-process bot runs in this task
                return
            # Relayed in Rust: no Python task waits on it. The doorbell task reports its end.
            handed_off = True
            opened.relay.on_done = functools.partial(self._session_done, opened)
        finally:
            if not handed_off:
                self._connection_closed()

    def _session_done(self, opened: _Opened, outcome: _core.Outcome) -> None:
        """A relayed session ended (called from the relay's doorbell task)."""
        self._release(opened.service_host, opened.client)
        _log_outcome(opened, outcome)
        self._connection_closed()

    def _connection_closed(self) -> None:
        self._connections -= 1
        if self._slot_freed is not None:
            self._slot_freed.set()
        if not self._connections:
            self._poke()

    async def _open(self, sock: socket.socket, relay: Relay, client: str) -> _Opened | None:
        """Run the client's upgrade; returns the relayed session, or None if refused."""
        # handshake_timeout covers the whole request: head, and a /start body.
        deadline = anyio.current_time() + self.config.gateway.handshake_timeout
        try:
            received: tuple[bytes, bytes] | None = None
            with self._pending.reading(deadline) as reading:
                received = await read_head(sock, _core.MAX_HEADER_BYTES, reading.progress)
            if received is None:
                return None  # too slow, or evicted: dropped without an answer
            return await self._upgrade(sock, *received, relay, deadline, client)
        except HeadTooLarge:
            await _respond(sock, 431, "request header fields too large")
        except HttpError as exc:
            # 5xx is the gateway's or the bot's trouble: worth an operator's attention.
            level = logging.WARNING if exc.status >= 500 else logging.DEBUG
            log.log(level, "refused with %d: %s", exc.status, exc.reason)
            await _respond(sock, exc.status, exc.reason)
        except (EOFError, OSError):
            pass  # the client went away during its handshake
        except Exception:
            # A bug must cost this one connection, never the gateway's task group.
            log.exception("unexpected error during an upgrade; connection dropped")
            await _respond(sock, 500, "internal error")
        return None

    async def _upgrade(
        self,
        sock: socket.socket,
        head: bytes,
        pending: bytes,
        relay: Relay,
        deadline: float,
        client: str,
    ) -> _Opened | None:
        request = parse_request(head)
        if request.path in HEALTH_PATHS and request.method == "GET":
            ready = request.path == "/livez" or not self._stop_requested
            await _respond(sock, *((200, "ok") if ready else (503, "draining")))
            return None
        limited = self._client_rate is not None and not self._client_rate.allow(
            client, anyio.current_time()
        )
        if is_start_path(request.path):
            if limited:
                error = _json_error(429, "Too many requests from this address")
                await _respond_with(sock, render_response(429, error))
            else:
                await self._start_service(sock, request, pending, deadline)
            return None
        if limited:
            raise HttpError(429, "too many requests from this address")
        if request.path == "/ws/twilio" or request.path.startswith("/ws/twilio/"):
            return await self._twilio(sock, request, pending, relay, client)
        # Bad tokens and bodies the token does not bind are refused here (403, stateless: no
        # replay store round trip).
        target = route(request, self._agents, self._check_token)
        return await self._admit(sock, pending, target, relay, request, client, None)

    async def _twilio(
        self, sock: socket.socket, request: Request, pending: bytes, relay: Relay, client: str
    ) -> _Opened | None:
        """``/ws/twilio`` (SPEC §6b): answer the upgrade, read the stream's opening for its
        service host, then route and admit as usual. Every refusal from here on is a close
        frame (:func:`~wsgate.providers.close_for`); nothing is dialled before the route is
        known."""
        upgrade = precheck(request)  # what the request alone decides is still an HTTP answer
        await send_all(sock, switching_protocols(upgrade.client_key, None))
        reader = OpeningReader("twilio")
        try:
            opening: Opening | None = None
            deadline = anyio.current_time() + self.config.gateway.handshake_timeout
            # Still sending its request, in effect: evictable like a head being read.
            with self._pending.reading(deadline, started=bool(pending)) as reading:
                opening = await read_until(sock, reader.feed, pending, reading.progress)
            if opening is None:
                raise OpeningError(1008, "no start message in time")
            target = route(
                request, self._agents, self._check_token, opening_host=opening.service_host
            )
            return await self._admit(sock, reader.raw, target, relay, request, client, opening)
        except OpeningError as exc:
            log.debug("twilio opening refused with %d: %s", exc.code, exc.reason)
            await _close(sock, exc.code, exc.reason)
        except HttpError as exc:
            level = logging.WARNING if exc.status >= 500 else logging.DEBUG
            log.log(level, "twilio session refused with %d: %s", exc.status, exc.reason)
            await _close(sock, *close_for(exc))
        return None

    async def _admit(
        self,
        sock: socket.socket,
        pending: bytes,
        target: Route,
        relay: Relay,
        request: Request,
        client: str,
        opening: Opening | None,
    ) -> _Opened:
        """Capacity, the token's claim, then :meth:`_start`; on any failure the capacity and
        the token are given back."""
        self._reserve(target.agent, client)
        try:
            session_uuid = str(uuid.uuid4())
            authority = self.authority
            verified: VerifiedToken | None = None
            if target.token is not None:
                assert authority is not None  # routing checked the token with it
                # Uses the token up; after the capacity check, so a 503 does not burn it.
                verified = await authority.claim(target.token, target.service_host)
                session_uuid = verified.session_id  # the sessionId /start returned
            try:
                opened = await self._start(
                    sock, pending, target, relay, session_uuid, request, opening
                )
            except BaseException:
                if authority is not None and verified is not None:
                    # The session did not start: the client may retry with the same token.
                    with anyio.CancelScope(shield=True):
                        await authority.release(verified)
                raise
        except BaseException:
            self._release(target.service_host, client)
            raise
        opened.client = client
        return opened

    async def _start_service(
        self, sock: socket.socket, request: Request, pending: bytes, deadline: float
    ) -> None:
        """``POST /v1/public/{agent}/start`` (SPEC §5) on the same listener."""
        settings = self.config.gateway
        try:
            length = request_body_length(request.headers)
        except HttpError as exc:
            document = _json_error(exc.status, exc.reason)
            await _respond_with(sock, render_response(exc.status, document))
            return
        body: bytes | None = None
        with self._pending.reading(deadline, started=True):
            body = await read_exactly(sock, length, pending)
        if body is None:
            return  # too slow, or evicted: dropped like a slow upgrade request
        status, document = handle_start(
            request.method,
            request.path,
            request.headers,
            body,
            self._agents,
            self.config.orgs,
            self.authority,
            lambda agent: self.sessions(agent.service_host) < agent.max_sessions,
            key_rate_check=(
                None
                if self._key_rate is None
                else functools.partial(self._key_rate.allow, now=anyio.current_time())
            ),
            # Unset: the address this gateway listens on (right for local use only).
            public_url=settings.public_url or self.url,
        )
        await _respond_with(sock, render_response(status, document))

    async def _start(
        self,
        sock: socket.socket,
        pending: bytes,
        target: Route,
        relay: Relay,
        session_uuid: str,
        request: Request,
        opening: Opening | None,
    ) -> _Opened:
        """Dial the bot (or pick the builtin or in-process bot), answer 101 unless the opening
        was read after it already, and hand the client (and bot) sockets to the engine."""
        settings = self.config.gateway
        session_id = relay.new_session_id()
        answered = opening is not None
        inprocess = self._bots.get(target.service_host)
        upstream = None if inprocess is not None else target.agent.upstream_url
        bot = None
        if upstream is not None:
            bot = await dial(
                upstream,
                session_uuid=session_uuid,
                body_value=target.upstream_body,
                # After a 101 already sent (Twilio), there is no subprotocol left to agree on.
                subprotocols=() if answered else target.subprotocols,
                timeout=settings.dial_timeout,
            )
        try:
            if not answered:
                chosen = None if bot is None else bot.subprotocol
                await send_all(sock, switching_protocols(target.client_key, chosen))
                if target.provider != "generic":
                    opening, pending = await _peek_opening(sock, pending, target.provider)
            started = anyio.current_time()
            where = (target.service_host, session_uuid, started, opening)
            if inprocess is not None:
                return self._attach_inprocess(
                    sock, pending, target, relay, request, inprocess, session_id, where
                )
            if bot is None:  # builtin echo
                session = relay.start_echo(
                    session_id, sock, pending, settings.max_message_size, self.session_time_limit
                )
            else:
                session = relay.start_upstream(
                    session_id,
                    sock,
                    bot.sock,
                    pending,
                    bot.pending,
                    settings.max_message_size,
                    self.session_time_limit,
                )
        finally:
            if bot is not None:
                bot.sock.close()  # no-op once detached
        return _Opened(session, *where)

    def _attach_inprocess(
        self,
        sock: socket.socket,
        pending: bytes,
        target: Route,
        relay: Relay,
        request: Request,
        bot: Bot,
        session_id: int,
        where: tuple[str, str, float, Opening | None],
    ) -> _Opened:
        """Attach the client to the engine; the bot is called by _supervise."""
        settings = self.config.gateway
        body = None if target.body_json is None else json.loads(target.body_json)
        channel = SessionChannel(
            relay.engine,
            session_id,
            inbox_limit=settings.inbox_limit,
            send_buffer_limit=settings.send_buffer_limit,
        )
        websocket = InProcessWebSocket(
            channel, headers=request.headers, query=request.query, path=request.path
        )
        session = relay.start_inprocess(
            session_id,
            sock,
            pending,
            settings.max_message_size,
            channel,
            inbox_limit=settings.inbox_limit,
            send_buffer_limit=settings.send_buffer_limit,
        )
        arguments = BotArguments(where[1], websocket, body)
        return _Opened(session, *where, bot=(bot, arguments, channel))

    async def _supervise(self, opened: _Opened) -> None:
        """Run an in-process bot until its session ends (time limit included); log its end."""
        session = opened.relay
        assert opened.bot is not None
        bot, arguments, channel = opened.bot
        try:
            outcome = await serve_bot(
                bot,
                arguments,
                channel,
                grace_period=self.config.gateway.bot_grace_period,
                time_limit=self.session_time_limit,
            )
        except BaseException:
            session.close(1001, "gateway shutting down")
            raise
        finally:
            self._release(opened.service_host, opened.client)
        _log_outcome(opened, outcome)

    def _reserve(self, agent: AgentConfig, client: str) -> None:
        count = self._reserved.get(agent.service_host, 0)
        if count >= agent.max_sessions:
            raise HttpError(503, "agent at capacity")
        limit = self.config.gateway.client_max_sessions
        mine = self._client_sessions.get(client, 0)
        if limit and mine >= limit:
            raise HttpError(429, "too many sessions from this address")
        self._reserved[agent.service_host] = count + 1
        self._client_sessions[client] = mine + 1

    def _release(self, service_host: str, client: str) -> None:
        for counts, key in ((self._reserved, service_host), (self._client_sessions, client)):
            count = counts[key] - 1
            if count:
                counts[key] = count
            else:
                del counts[key]


async def _listen(host: str, port: int) -> socket.socket:
    """A non-blocking listening socket bound to ``host:port`` (port 0: any free port)."""
    infos = await anyio.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(socket.SOMAXCONN)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _authority_for(config: Config) -> TokenAuthority | None:
    """The token authority the settings describe, if an agent uses token auth."""
    if not any(agent.websocket_auth == "token" for agent in config.agents):
        return None
    settings = config.gateway
    secrets = load_secrets(settings.secrets, secrets_file=settings.secrets_file)
    store = open_replay_store(settings.replay_store)
    return TokenAuthority(secrets, settings.token_ttl, store=store)


def _json_error(status: int, reason: str) -> dict[str, str]:
    return {"error": reason, "code": str(status)}


async def _peek_opening(
    sock: socket.socket, pending: bytes, provider: str
) -> tuple[Opening | None, bytes]:
    """Telnyx, Plivo, Exotel: read the opening messages that follow the upgrade, only to learn
    the call's ids for the log. Whatever arrives (or not, within :data:`_PEEK_TIME`) is relayed
    unchanged: these endpoints route from the URL and judge no payload, like the generic one."""
    reader = OpeningReader(provider)
    opening: Opening | None = None
    try:
        with anyio.move_on_after(_PEEK_TIME):
            opening = await read_until(sock, reader.feed, pending)
    except (OpeningError, EOFError):
        pass  # not an opening we know (or the client left): the relay takes it from here
    return opening, reader.raw


async def _close(sock: socket.socket, code: int, reason: str) -> None:
    """Close an upgraded client with a close frame, then the connection."""
    try:
        with anyio.move_on_after(_LINGER):
            await send_all(sock, close_frame(code, reason))
    except OSError:
        pass
    await _respond_with(sock, b"")


async def _respond(sock: socket.socket, status: int, text: str) -> None:
    """Answer with a plain-text response, then close without resetting the answer away."""
    await _respond_with(sock, plain_response(status, text))


async def _respond_with(sock: socket.socket, response: bytes) -> None:
    """Send a whole response, then close without resetting the answer away."""
    try:
        with anyio.move_on_after(_LINGER):
            await send_all(sock, response)
            sock.shutdown(socket.SHUT_WR)
            # Read until the client closes: closing with unread input would send a RST, which
            # can destroy the response before the client reads it.
            while True:
                try:
                    if not sock.recv(65536):
                        break
                except BlockingIOError:
                    await anyio.wait_readable(sock)
    except OSError:
        pass
    finally:
        sock.close()


def _log_outcome(opened: _Opened, outcome: _core.Outcome) -> None:
    # Codes only: close reasons, bodies and tokens come from users and stay out of the log.
    def code(close: tuple[int, str] | None) -> str:
        return "-" if close is None else str(close[0])

    call = opened.opening
    via = "" if call is None else f" via {call.provider} call {call.call_id or '-'}"
    log.info(
        "session %d %s %s%s ended by %s (%s) after %.1f s; client close %s, bot close %s; "
        "in %d msgs %d B, out %d msgs %d B",
        outcome.session_id,
        opened.service_host,
        opened.session_uuid,
        via,
        outcome.ended_by,
        outcome.detail,
        anyio.current_time() - opened.started,
        code(outcome.client_close),
        code(outcome.bot_close),
        outcome.messages_in,
        outcome.bytes_in,
        outcome.messages_out,
        outcome.bytes_out,
    )
