"""The gateway: its settings made into parts, served until a stop, drained.

The accept loop and the count of connections are :class:`~wsgate.listener.Listener`'s; a
connection's request is :class:`~wsgate.connection.Connections`' (head, checks, refusals); its
session is :class:`~wsgate.sessions.Sessions`' (capacity, token, dial, the handover to the Rust
engine); TLS is :class:`~wsgate.tls.Certificates`'. What stays here is the gateway's life: the
listening socket, the relay engine and its doorbell task, the metrics (and their listener,
``metrics_port``), and the graceful stop.

Sockets stay raw and non-blocking (no anyio streams) because they are finally detached and owned
by Rust; see :mod:`wsgate.upstream`.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from math import inf
from pathlib import Path
from typing import TypeVar

import anyio
from anyio.abc import TaskStatus

from . import _core
from ._sockets import bind, listen
from .admission import PendingReads
from .authorize import Authorize
from .capacity import LocalCapacity, open_capacity
from .config import Config, SessionApp, default_config, internal_url, load_config
from .connection import Connections
from .engine import Relay
from .fastpath import fast_agents, fast_routes
from .inprocess import Bot, bot_of
from .listener import Listener
from .metrics import GatewayState, Metrics
from .metrics_listener import serve_metrics
from .names import check_name
from .routing import no_token_auth_yet
from .session_api import SessionKeys
from .session_routes import session_app_of
from .sessions import Sessions
from .tls import Certificates
from .tokens import TokenAuthority, authority_for

__all__ = ["Gateway"]

_BotT = TypeVar("_BotT", bound=Bot)

log = logging.getLogger("wsgate")

# After the drain timeout, sessions get a close frame; this is how long their peers may take to
# answer it before the engine drops them.
_CLOSE_GRACE = 5.0


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

    ``authorize`` is called for each session once it passed every check, before its bot is
    reached: it may refuse it (raise ``HttpError``) or pick its upstream (return a ``ws://``
    URL); see :mod:`wsgate.authorize`.

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
        authorize: Authorize | None = None,
    ) -> None:
        self.config = default_config() if config is None else config
        self._authorize = authorize
        #: The listener's certificate and the roots for wss:// bots.
        self._certs = Certificates(self.config)
        self._own_authority = authority is None
        self.authority = authority_for(self.config) if authority is None else authority
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
        self._keys = SessionKeys.from_config(self.config)  # read now: a bad source fails here
        # Imported now, so that a bad "module:function" fails here, not at the first session.
        self._bots: dict[str, Bot] = {}
        for agent in self.config.agents:
            bot = bot_of(agent)
            session_app_of(agent)  # likewise its Session API app
            if bot is not None:
                self._bots[agent.service_host] = bot
        self._check_token = (
            no_token_auth_yet if self.authority is None else self.authority.check_request
        )
        self._sessions: Sessions | None = None
        #: The engine, when it does the listener's TLS handshakes (a reload goes to it too).
        self._engine_tls: _core.Engine | None = None
        # Connections still sending their request: the only ones that may be evicted.
        self._pending = PendingReads(self.config.gateway.max_pending_upgrades)
        self._listener: Listener | None = None
        self._port: int | None = None
        self._served = False
        self._stop_requested = False
        self._drain_now = False
        self._stop_event: anyio.Event | None = None
        #: This gateway's metrics (``GET /metrics``); ``metrics.registry`` takes collectors of
        #: an embedder's own.
        self.metrics = Metrics(self._agents)
        self._metrics_port: int | None = None

    @classmethod
    def from_file(cls, path: str | Path) -> Gateway:
        """A gateway serving the settings of a TOML file (see :func:`wsgate.load_config`)."""
        return cls(load_config(path))

    def bot(
        self, service_host: str, *, session_api: SessionApp | str | None = None
    ) -> Callable[[_BotT], _BotT]:
        """Serve ``service_host`` (``"agent.org"``) with an in-process bot, as a decorator::

            @gateway.bot("my-agent.my-org")
            async def my_bot(args: wsgate.BotArguments) -> None:
                async for message in args.websocket:
                    await args.websocket.send_text(f"you said {message!r}")

        ``session_api``: the bot's HTTP routes for the Session API, an ASGI app
        (:class:`wsgate.Routes`, FastAPI, …; :mod:`wsgate.session_routes`). An agent of that
        name in the settings keeps its other settings and is served by the bot from now on;
        otherwise the agent (and its organisation, if new) is added. Only before :meth:`serve`.
        """
        name, _, org = service_host.partition(".")
        check_name("agent", name)
        check_name("organisation", org)

        def register(bot: _BotT) -> _BotT:
            if self._served:
                raise RuntimeError("register bots before the gateway serves")
            self.config = self.config.with_bot(service_host, bot, session_api)
            session_app_of(self.config.agents_by_host()[service_host])  # fails here, not later
            self._agents.clear()  # in place: connections share this mapping
            self._agents.update(self.config.agents_by_host())
            self._bots[service_host] = bot
            return bot

        return register

    @property
    def pending_upgrades(self) -> int:
        """Connections still sending their request, read here or waited for by the engine
        (``max_pending_upgrades`` bounds those of each)."""
        sessions = self._sessions
        waiting = 0 if sessions is None else sessions.relay.engine.waiting()
        return len(self._pending) + waiting

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
    def metrics_port(self) -> int:
        """The bound port of the metrics listener (``metrics_port``, maybe 0), once serving."""
        if self._metrics_port is None:
            raise RuntimeError("no metrics listener (metrics_port unset, or not serving yet)")
        return self._metrics_port

    @property
    def url(self) -> str:
        """``ws://host:port`` of this gateway (``wss://`` with TLS), for local clients (a
        wildcard host shows as loopback)."""
        host = self.config.gateway.host
        host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
        if ":" in host:
            host = f"[{host}]"
        scheme = "ws" if self._certs.listener is None else "wss"
        return f"{scheme}://{host}:{self.port}"

    def reload_tls(self) -> bool:
        """Read ``tls_cert`` and ``tls_key`` again (SIGHUP does this): new connections get the
        new certificate, live sessions keep theirs. A file that cannot be used keeps the old
        certificate and is logged; returns whether the new one was taken."""
        taken = self._certs.reload()
        if taken and self._engine_tls is not None:
            self._engine_tls.set_tls(self._certs.listener)
        return taken

    def sessions(self, service_host: str | None = None) -> int:
        """Sessions open or being opened (past routing): of one service host, or in all."""
        return 0 if self._sessions is None else self._sessions.count(service_host)

    def stop(self) -> None:
        """Begin a graceful stop: stop accepting, let sessions run up to ``drain_timeout``,
        then close the rest with 1001. A second call ends the wait at once. :meth:`serve`
        returns when done. Call it from the event loop's thread."""
        if self._stop_requested:
            self._drain_now = True
        self._stop_requested = True
        if self._stop_event is not None:
            self._stop_event.set()
        if self._listener is not None:
            self._listener.poke()

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
        listener = await bind(settings.host, settings.port)  # listens once the engine is up
        relay: Relay | None = None
        # This gateway's address in the session registry (internal_url, or where it listens).
        capacity = open_capacity(settings, lambda: internal_url(settings, self.url))
        metrics_listener: socket.socket | None = None
        try:
            self._port = listener.getsockname()[1]
            if settings.metrics and settings.metrics_port is not None:
                metrics_listener = await listen(settings.metrics_host, settings.metrics_port)
                self._metrics_port = metrics_listener.getsockname()[1]
            # Only the configured agents are counted (bounded labels), and nothing when off.
            counted = self._agents if settings.metrics else ()
            relay = Relay(settings.relay_threads, settings.dead_peer_timeout, counted=counted)
            # Before it listens: every connection inherits the relayed sockets' options.
            relay.engine.prepare_listener(listener.fileno())
            listener.listen(socket.SOMAXCONN)
            authority = self.authority
            if authority is not None:
                authority = authority.with_store(self.metrics.timed(authority.store))
            sessions = self._sessions = Sessions(
                settings,
                relay,
                self._bots,
                authority,
                self.session_time_limit,
                capacity,
                self._authorize,
                self._certs.for_bots,
                metrics=self.metrics,
            )
            handler = Connections(
                self.config,
                self._agents,
                self._check_token,
                sessions,
                self._pending,
                draining=lambda: self._stop_requested,
                # Unset: the address this gateway listens on (right for local use only).
                public_url=lambda: settings.public_url or self.url,
                metrics=self.metrics,
                keys=self._keys,
            )
            # The plainest agents' sessions, opened by the engine without Python per step.
            hooks = self._authorize is not None or not isinstance(capacity, LocalCapacity)
            fast = fast_agents(settings, self._agents, self._bots, hooks=hooks,
                               authority=self.authority)  # fmt: skip
            sessions.fast = fast
            tls_listener = self._certs.listener is not None
            # The engine accepts, except on a TLS listener when it opens nothing: Python then
            # does each handshake itself, as the engine would hand each one over.
            accepts = not tls_listener or bool(fast)
            accepted = self._listener = Listener(
                handler,
                settings.max_connections,
                lambda: self._certs.listener,
                engine=relay.engine if accepts else None,
            )
            relay.on_news = accepted.news
            relay.on_told_ends = accepted.told_ended
            sessions.on_adopted_end = accepted.adopted_done
            relay.engine.set_routes(
                fast_routes(settings, fast, self.session_time_limit, relay.counted, self.authority)
            )
            if fast:
                log.info("the engine opens the sessions of %s by itself", ", ".join(sorted(fast)))
                # A request not there at the accept is read on a relay thread, under the limits
                # of one read here (reading.rs).
                relay.engine.set_wait(settings.handshake_timeout, settings.max_pending_upgrades)
                if tls_listener:
                    # Handshakes too, with the request (its handshake_timeout covers both).
                    relay.engine.set_tls(self._certs.listener)
                    self._engine_tls = relay.engine
            state = GatewayState(lambda: accepted.count, lambda: self.pending_upgrades,
                                 lambda: self._stop_requested)  # fmt: skip
            self.metrics.watch(relay.counters, state, relay.dispatch)
            async with anyio.create_task_group() as engine_tasks:
                await engine_tasks.start(relay.run)
                await engine_tasks.start(capacity.run)
                if metrics_listener is not None:
                    # Runs on through the drain: /readyz says 503 there meanwhile.
                    await engine_tasks.start(
                        serve_metrics,
                        metrics_listener,
                        self.metrics,
                        handler.health,
                        settings.handshake_timeout,
                    )
                async with anyio.create_task_group() as connections:
                    async with anyio.create_task_group() as accepting:
                        accepting.start_soon(accepted.accept, listener, connections)
                        log.info("wsgate listening on %s", self.url)
                        if metrics_listener is not None:
                            log.info("metrics on port %d: /metrics, /livez, /readyz",
                                     self._metrics_port)  # fmt: skip
                        task_status.started()
                        await self._stop_event.wait()
                        accepting.cancel_scope.cancel()
                    listener.close()
                    await self._drain(relay, accepted)
                    connections.cancel_scope.cancel()
                engine_tasks.cancel_scope.cancel()
        finally:
            listener.close()
            if metrics_listener is not None:
                metrics_listener.close()
            if relay is not None:
                relay.shutdown()
            with anyio.CancelScope(shield=True):
                await capacity.aclose()
            if self.authority is not None and self._own_authority:
                with anyio.CancelScope(shield=True):
                    await self.authority.aclose()
        log.info("wsgate stopped")

    async def _drain(self, relay: Relay, accepted: Listener) -> None:
        try:
            await self._drain_connections(relay, accepted)
        finally:
            # The ends the engine has yet to tell (it tells those of its own sessions at
            # leisure): counted and logged before the doorbell task stops.
            relay.dispatch()

    async def _drain_connections(self, relay: Relay, accepted: Listener) -> None:
        settings = self.config.gateway
        if accepted.count:
            log.info(
                "draining %d connection(s), up to %g s", accepted.count, settings.drain_timeout
            )
        with anyio.move_on_after(settings.drain_timeout):
            await accepted.until_idle(stop=lambda: self._drain_now)
        if not accepted.count:
            return
        log.info("closing %d connection(s) with 1001", accepted.count)
        self._pending.cancel_all()
        relay.engine.stop_waiting()
        relay.close_all(1001, _core.DRAIN_REASON)
        with anyio.move_on_after(_CLOSE_GRACE):
            await accepted.until_idle()
