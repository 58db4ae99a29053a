"""The Python side of the Rust relay engine: hand sessions over, await their outcomes.

One :class:`_core.Engine` per gateway. Finished sessions queue up in Rust; when the engine's
doorbell descriptor turns readable, every queued outcome is drained at once and each session's
waiter completed (by the event loop's own callback under asyncio, by a task under trio:
:mod:`wsgate.readiness`). A wake-up of the event loop costs 40-60 µs, so there is at most one
per batch of finished sessions and none per frame.

Every session starts with one typed call, :meth:`Relay.start` with a :class:`Handover`. In-process
sessions (a :class:`InProcess` peer) report through the same doorbell: each
``_core.Message`` (a whole client message, or ``data=None``: the send buffer drained) goes to the
session's :class:`Inbox` in order, before its outcome.

Memory given back: once many sessions have ended (a burst over: :data:`TRIM_DROP` fewer live
than at the peak since, and at most half of it), the doorbell task asks the allocator to return
the free heap to the operating system (:func:`_core.release_memory`) at the first quiet moment
(:data:`TRIM_QUIET` without an end, or :data:`TRIM_LATEST` after it became due). Without it the
process keeps the RSS of its busiest moment. A steady churn of sessions never makes it due.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

import anyio
from anyio.abc import TaskStatus

from . import _core, logs
from ._sockets import Conn
from .readiness import Readiness
from .tls import TlsSocket

__all__ = [
    "TRIM_DROP",
    "TRIM_LATEST",
    "TRIM_QUIET",
    "Handover",
    "InProcess",
    "Inbox",
    "Limits",
    "Relay",
    "RelaySession",
    "Upstream",
]


#: What :meth:`_core.Engine.drain` returns items of.
_Item = (
    _core.Message
    | _core.Outcome
    | _core.ToldEnds
    | _core.StoreCalls
    | _core.Unopened
    | _core.Handed
    | _core.AcceptFailed
    | _core.Crowded
)

#: News of the engine's opens and accepts (for :attr:`Relay.on_news`).
News = _core.StoreCalls | _core.Unopened | _core.Handed | _core.AcceptFailed | _core.Crowded

log = logging.getLogger("wsgate")

#: Memory is given back once this many fewer sessions are live than at the peak since it last
#: was (and at most half that peak is left)...
TRIM_DROP = 1000
#: ...at the first moment no session has ended for this many seconds (the burst's ends have all
#: arrived and the engine freed what they held)...
TRIM_QUIET = 0.5
#: ...or this many seconds after it became due, whichever comes first.
TRIM_LATEST = 5.0


class Inbox(Protocol):
    """Where an in-process session's news goes (see :class:`wsgate.inprocess.SessionChannel`)."""

    def deliver(self, data: str | bytes | None) -> None:
        """A whole client message, or None: the session's send buffer drained."""

    def ended(self, outcome: _core.Outcome) -> None:
        """The session is over."""


@dataclass(frozen=True, slots=True)
class Limits:
    """A session's limits, enforced by the engine for every kind of session."""

    #: Largest message (all its fragments), either way; over it the sender gets 1009.
    max_message_size: int = _core.DEFAULT_MAX_MESSAGE_SIZE
    #: Seconds the session may last; then both sides get 1000 "session time limit".
    #: None: no limit.
    time_limit: float | None = None


@dataclass(slots=True)
class Upstream:
    """A bot the gateway dialled: its socket, past its 101, and bytes read past the 101."""

    sock: Conn
    pending: bytes = b""


@dataclass(slots=True)
class InProcess:
    """An in-process bot: where the session's messages and its end go, and its buffers."""

    inbox: Inbox
    inbox_limit: int
    send_buffer_limit: int


@dataclass(slots=True)
class Handover:
    """Everything one session needs to start (see :meth:`Relay.start`)."""

    session_id: int
    #: The service host (``{agent}.{org}``) the session belongs to.
    agent: str
    #: The client's socket, past the 101 the gateway sent it.
    client: Conn
    #: What serves the client: a dialled bot, an in-process bot, or None for the builtin echo.
    peer: Upstream | InProcess | None
    limits: Limits = Limits()
    #: Bytes already read from the client past its upgrade request.
    client_pending: bytes = b""
    #: Called once with the session's outcome (from the doorbell task).
    on_done: Callable[[_core.Outcome], None] | None = field(default=None, repr=False)


class RelaySession:
    """A session the engine is relaying: close it, wait for its :class:`_core.Outcome`, or have
    ``on_done`` called with it.

    Small on purpose (slots, the waiter's Event made only when someone waits): a gateway holds
    one per live session, and upstream sessions need no Python task while they run.
    """

    __slots__ = ("_done", "_outcome", "agent", "id", "inbox", "on_done", "relay")

    def __init__(self, relay: Relay, id: int, agent: str, inbox: Inbox | None = None) -> None:
        self.relay = relay
        self.id = id
        #: The service host the session belongs to.
        self.agent = agent
        #: For an in-process session: what receives its messages and its end.
        self.inbox = inbox
        #: Called with the outcome when it arrives, from the doorbell task.
        self.on_done: Callable[[_core.Outcome], None] | None = None
        self._done: anyio.Event | None = None
        self._outcome: _core.Outcome | None = None

    async def wait(self) -> _core.Outcome:
        """Wait until the engine reports how the session ended."""
        if self._outcome is None:
            if self._done is None:
                self._done = anyio.Event()
            await self._done.wait()
        assert self._outcome is not None
        return self._outcome

    def close(self, code: int, reason: str) -> bool:
        """Close both sides with ``code`` and ``reason``; False if the session already ended."""
        return self.relay.engine.close(self.id, code, reason)

    @property
    def done(self) -> bool:
        """Whether the outcome has arrived."""
        return self._outcome is not None

    @property
    def outcome(self) -> _core.Outcome | None:
        """The outcome, once it has arrived."""
        return self._outcome

    def _finish(self, outcome: _core.Outcome) -> None:
        self._outcome = outcome
        if self._done is not None:
            self._done.set()
        if self.inbox is not None:
            self.inbox.ended(outcome)
        # Called once, then let go: a callback that holds what holds this session (the
        # gateway's Opened does) would otherwise keep the pair alive as a reference cycle, to
        # be found only by a full collection, long after a burst of sessions ended.
        on_done, self.on_done = self.on_done, None
        if on_done is not None:
            on_done(outcome)


def _tls_of(conn: Conn) -> _core.TlsConnection | None:
    return conn.tls if isinstance(conn, TlsSocket) else None


def _settle(conn: Conn) -> bytes:
    """TLS: the decrypted bytes still in Python's hands (see :meth:`TlsSocket.settle`)."""
    return conn.settle() if isinstance(conn, TlsSocket) else b""


class Relay:
    """Owns the engine and the doorbell task; :meth:`run` must be running in a task group.

    ``counted``: the agents (``Handover.agent`` values) whose sessions the engine counts live
    (:meth:`counters`, the gateway's metrics); sessions of any other agent are not counted, so
    the engine's table holds no more than these.
    """

    def __init__(
        self, threads: int = 0, dead_peer_timeout: float = 60.0, *, counted: Iterable[str] = ()
    ) -> None:
        self.engine = _core.Engine(threads, dead_peer_timeout)
        self._live: dict[int, RelaySession] = {}
        #: What the ends of sessions the engine opened by itself (:mod:`wsgate.fastpath`) and
        #: nothing asked for (by id, in a list, at a drain) go to: all of one turn at once, with
        #: their news. Until then the engine keeps their news (:meth:`adopt`): most end unasked,
        #: and cost Python nothing but a share of a turn (benches/README.md, "Session opens,
        #: rounds 9 and 10").
        self.on_told_ends: Callable[[_core.ToldEnds], None] | None = None
        #: Where the engine's news goes, in order with the outcomes (the ends for
        #: :attr:`on_told_ends` come after a turn's other items): sessions it could not open,
        #: connections it accepted for Python, its failed accepts, its want of room, its replay
        #: store's calls.
        self.on_news: Callable[[News], None] | None = None
        self._counted = {agent: self.engine.register_agent(agent) for agent in counted}
        #: The most sessions live at once since memory was last given back.
        self._peak = 0
        #: When giving memory back became due (``anyio.current_time``), or None.
        self._trim_due: float | None = None
        #: While it is due: when the doorbell last rang, and what wakes run() when it becomes so.
        self._last_ring = 0.0
        self._trim_wanted: anyio.Event | None = None

    def counters(self) -> list[_core.AgentCounts]:
        """The live counters of the ``counted`` agents: sessions, messages and bytes."""
        return self.engine.counters()

    def counted(self, agent: str) -> int | None:
        """The engine's counter index of ``agent``, if its sessions are counted."""
        return self._counted.get(agent)

    def new_session_id(self) -> int:
        """A fresh session id (unique for this gateway's lifetime; the engine's own sessions
        draw from the same count)."""
        return self.engine.next_session_id()

    def told_sessions(self, service_host: str | None = None) -> list[_core.Opened]:
        """The news of the live sessions the engine opened that were not adopted (of
        ``service_host``'s, when given)."""
        return self.engine.told(service_host)

    def told_id(self, session_uuid: str) -> int | None:
        """The id of the live session the engine opened, not adopted, of that UUID."""
        return self.engine.told_id(session_uuid)

    def adopt(self, session_id: int, service_host: str) -> tuple[_core.Opened, RelaySession] | None:
        """A session the engine opened by itself for ``service_host``, now known here like one
        handed over (its outcome to its :class:`RelaySession`, not to :attr:`on_told_ends`);
        None if it is not such a session (adopted already, ended, or another agent's: that one
        is left as it is)."""
        news = self.engine.adopt(session_id, service_host)
        if news is None:
            return None
        session = RelaySession(self, session_id, news.service_host)
        self._live[session_id] = session
        return news, session

    def close_all(self, code: int, reason: str) -> None:
        """Close every session not ended yet with ``code`` and ``reason`` (the drain's end)."""
        self.dispatch()  # the engine's own sessions are told of without a ring: catch up
        for session in list(self._live.values()):
            session.close(code, reason)
        for news in self.told_sessions():
            self.engine.close(news.session_id, code, reason)

    def _count(self) -> int:
        return len(self._live) + self.engine.told_count()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """The doorbell: each ring dispatches everything queued since the last one (called by
        the event loop itself under asyncio: :mod:`wsgate.readiness`). Memory is given back
        from here when it comes due."""
        ring = Readiness(self.engine.doorbell(), self._rang)
        async with anyio.create_task_group() as doorbell:
            doorbell.start_soon(ring.run)
            task_status.started()
            while True:
                if self._trim_due is None:
                    self._trim_wanted = anyio.Event()
                    await self._trim_wanted.wait()
                    continue
                # Given back at the first quiet moment, or at the latest TRIM_LATEST after due.
                at = min(self._last_ring + TRIM_QUIET, self._trim_due + TRIM_LATEST)
                now = anyio.current_time()
                if now < at:
                    await anyio.sleep(at - now)
                else:
                    self.release_memory()

    def _rang(self) -> None:
        self.dispatch()
        if self._trim_due is not None:
            self._last_ring = anyio.current_time()

    def release_memory(self) -> None:
        """Give the free heap back to the operating system now (see the module docs)."""
        live = self._count()
        ended, self._peak = self._peak - live, live
        self._trim_due = None
        released = _core.release_memory()
        log.debug("%d sessions ended: free memory given back (%s)", ended, released)

    def dispatch(self) -> None:
        """Take everything the engine queued and hand each item to its session. News of a
        session the engine opened is queued without ringing the doorbell, and its end rings
        at leisure (``LEISURE_DELAY`` in ``rust/engine.rs``: the engine gave its place and
        connection back itself; nothing waits on it): whoever reads the registry or the
        metrics calls this first to catch up."""
        with logs.batched():  # one write for the session lines of this turn
            self._dispatch(self.engine.drain())
        now_live = self._count()
        # The engine's own sessions are counted by the engine, not here as they open (Python
        # hears of them at their end): the most at once since the last turn.
        busiest = len(self._live) + self.engine.told_peak()  # never fewer than now_live
        self._peak = peak = max(self._peak, busiest)
        if self._trim_due is None and peak - now_live >= TRIM_DROP and now_live <= peak // 2:
            self._trim_due = self._last_ring = anyio.current_time()
            if self._trim_wanted is not None:
                self._trim_wanted.set()

    def _dispatch(self, items: list[_Item]) -> None:
        for item in items:
            if isinstance(item, _core.Message):
                live = self._live.get(item.session_id)
                if live is not None and live.inbox is not None:
                    live.inbox.deliver(item.data)
                continue
            if isinstance(item, _core.Outcome):
                session = self._live.pop(item.session_id, None)
                if session is not None:
                    session._finish(item)
            elif isinstance(item, _core.ToldEnds):  # engine sessions' ends, never adopted
                if self.on_told_ends is not None:
                    self.on_told_ends(item)
            elif self.on_news is not None:
                self.on_news(item)

    def start(self, handover: Handover) -> RelaySession:
        """Hand a session to the engine: the one way every kind of session starts. The sockets
        are detached (owned by Rust from here on, closed by it); ``handover.on_done`` is called
        with the outcome. The engine enforces the time limit for every kind: at it, both sides
        get 1000 "session time limit" (an in-process bot sees its session end)."""
        session = self._register(handover)
        limits = handover.limits
        peer = handover.peer
        client_tls = _tls_of(handover.client)
        agent = self._counted.get(handover.agent)
        try:
            client_pending = handover.client_pending + _settle(handover.client)
            client_fd = handover.client.detach()
            if isinstance(peer, Upstream):
                bot_pending = peer.pending + _settle(peer.sock)
                self.engine.relay(
                    handover.session_id,
                    client_fd,
                    peer.sock.detach(),
                    client_pending,
                    bot_pending,
                    limits.max_message_size,
                    limits.time_limit,
                    client_tls=client_tls,
                    bot_tls=_tls_of(peer.sock),
                    agent=agent,
                )
            elif isinstance(peer, InProcess):
                self.engine.attach(
                    handover.session_id,
                    client_fd,
                    client_pending,
                    limits.max_message_size,
                    peer.inbox_limit,
                    peer.send_buffer_limit,
                    limits.time_limit,
                    client_tls=client_tls,
                    agent=agent,
                )
            else:
                self.engine.echo(
                    handover.session_id,
                    client_fd,
                    client_pending,
                    limits.max_message_size,
                    limits.time_limit,
                    client_tls=client_tls,
                    agent=agent,
                )
        except BaseException:
            self._live.pop(handover.session_id, None)
            raise
        return session

    def shutdown(self) -> None:
        """Drop every session at once and stop the engine's threads."""
        self.engine.shutdown()

    def _register(self, handover: Handover) -> RelaySession:
        # Registered before the hand-over: the outcome may be queued before relay() returns.
        session_id = handover.session_id
        if session_id in self._live:
            raise ValueError(f"session {session_id} is already live")
        peer = handover.peer
        inbox = peer.inbox if isinstance(peer, InProcess) else None
        session = RelaySession(self, session_id, handover.agent, inbox)
        session.on_done = handover.on_done
        self._live[session_id] = session
        self._peak = max(self._peak, self._count())
        return session
