"""The listening socket's accept loop and the count of connections the gateway holds.

:class:`Listener` accepts in batches, holds at most ``max_connections`` (past it, new ones wait
in the kernel's backlog, each that comes meanwhile making the oldest connection still sending
its request give way once it has had its second: :meth:`Listener._try_room`), puts TLS on each new
connection when the gateway has a certificate, runs it through
:meth:`~wsgate.connection.Connections.handle`, and counts it until it is over: a refused request
at once, an in-process session when its bot is done (its task supervises it), a relayed session
when the engine reports its end through the doorbell (no task waits on it). The gateway's drain
waits on :meth:`Listener.until_idle`.

When given one, the engine accepts, on a relay thread (``_core.Engine.listen``: nginx's shape;
with one relay thread a session the engine opens starts where it was accepted): it reads each
connection (its TLS handshake too) at once or later on that thread, and opens by itself the
sessions :mod:`wsgate.fastpath` lets it; the others come here as news, with the bytes read (and
their TLS). The engine counts what it accepted against ``max_connections`` (past it, new ones
wait in the backlog and make room as here: a :class:`~wsgate._core.Crowded` says one waits,
and the oldest reader, the engine's or ours, gives way once it has had its second) from the
accept to the end: of its session, of the answer of one it could not open, or of the request
served here (:meth:`Listener.news`); :meth:`Listener._closed` tells it of all but the sessions
the engine opened, which give their connection back themselves.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import sys
from collections.abc import Callable
from functools import partial
from typing import Any

import anyio
from anyio.abc import TaskGroup

from . import _core
from .admission import EVICT_AFTER, client_key
from .connection import Connections
from .engine import News
from .readiness import Readiness
from .sessions import Opened
from .tls import TlsSocket

__all__ = ["Listener"]

log = logging.getLogger("wsgate")

_ACCEPT_BATCH = 64
_ACCEPT_PAUSE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class Listener:
    """Accepts and counts one gateway's connections (see the module docs)."""

    def __init__(
        self,
        handler: Connections,
        limit: int,
        tls: Callable[[], _core.TlsServerContext | None],
        engine: _core.Engine | None = None,
    ) -> None:
        self.handler = handler
        #: The engine that accepts for a listener without TLS (None: Python accepts).
        self.engine = engine
        self._connections: TaskGroup | None = None
        self.limit = limit
        #: The listener's TLS now (a reload swaps it for new connections).
        self.tls = tls
        #: Connections held when accepted here (see :attr:`count`).
        self._count = 0
        #: Why accepting on the engine's relay thread stopped for good (an errno), once it has.
        self._accept_error: int | None = None
        self._accept_stopped: anyio.Event | None = None
        #: Calls a batch of accepts whenever the listening socket is readable (in accept()).
        self._readiness: Readiness | None = None
        #: Paused at ``limit`` connections (resumed when one ends).
        self._at_limit = False
        #: Room was asked for at the limit (Python accepting): no more asked until one ends.
        self._making_room = False
        #: Whether room is still wanted for a connection in the backlog (None: it is not), and
        #: whether a later look for it is due (see :meth:`_try_room`).
        self._room_wanted: Callable[[], bool] | None = None
        self._room_look_due = False
        #: The listening socket (in accept()).
        self._socket: socket.socket | None = None
        #: What each relayed session's end calls: one bound method for all of them.
        self._ended = self.session_done
        self._idle: anyio.Event | None = None

    @property
    def count(self) -> int:
        """Connections held: upgrading, or sessions."""
        return self._count if self.engine is None else self.engine.held()

    async def accept(self, listener: socket.socket, connections: TaskGroup) -> None:
        """Accept until cancelled; each connection runs in a task of ``connections``. Here, a
        batch is taken each time the socket is readable (a callback of the event loop under
        asyncio: :mod:`wsgate.readiness`); at ``limit`` connections held, none until one ends.
        With an engine, its relay thread accepts (see the module docs)."""
        self._connections = connections
        self._socket = listener
        if self.engine is not None:
            await self._accept_in_engine(self.engine, listener)
            return
        take = partial(self._accept_here, listener, connections)
        self._readiness = Readiness(listener.fileno(), take)
        await self._readiness.run()

    async def _accept_in_engine(self, engine: _core.Engine, listener: socket.socket) -> None:
        """The engine accepts until cancelled, or until accepting fails for good (raised here,
        ending the gateway as an error of the accept loop does)."""
        self._accept_stopped = stopped = anyio.Event()
        engine.listen(listener.fileno(), self.limit)
        try:
            await stopped.wait()
        finally:
            engine.unlisten()  # before the listening socket is closed: no accept after it
        errno_ = self._accept_error or errno.EIO
        raise OSError(errno_, os.strerror(errno_))

    def _accept_failed(self, failed: _core.AcceptFailed) -> None:
        """The engine's accept failed: paused for 100 ms (out of descriptors or memory), or
        stopped (any other error ends the gateway)."""
        if failed.paused:
            log.warning("accept failed (%s); pausing 100 ms", os.strerror(failed.errno))
            return
        self._accept_error = failed.errno
        if self._accept_stopped is not None:
            self._accept_stopped.set()

    def _want_room(self, still: Callable[[], bool]) -> None:
        """At the limit with a connection in the backlog: room is wanted while ``still()``."""
        self._room_wanted = still
        self._try_room()

    def _try_room(self) -> None:
        """Evicts the oldest connection still sending its request, the engine's or ours, if it
        has been at it :data:`~wsgate.admission.EVICT_AFTER`; else looks again when it will
        have (a second from now if none reads yet). So idle connections hold a full gateway a
        second at most, and an honest client's TLS handshake, or its request on its way, gets
        that second. Room is no longer wanted once the backlog is empty, or once a connection
        ended (the engine: its count of ends moved; here: :meth:`_closed`)."""
        still = self._room_wanted
        if still is None or not still() or self._socket is None or not _backlog(self._socket):
            self._room_wanted = None
            return
        engine, pending = self.engine, self.handler.pending
        ours = pending.oldest_age()
        theirs = None if engine is None else engine.oldest_wait()
        oldest = max((age for age in (ours, theirs) if age is not None), default=None)
        if oldest is not None and oldest >= EVICT_AFTER:
            engines = theirs is not None and (ours is None or theirs > ours)
            if (engines and engine is not None and engine.make_room()) or pending.make_room():
                self._room_wanted = None
                return
        if not self._room_look_due and self._connections is not None:
            self._room_look_due = True
            later = EVICT_AFTER - (oldest or 0.0)
            self._connections.start_soon(self._look_for_room_later, max(later, 0.01))

    async def _look_for_room_later(self, seconds: float) -> None:
        await anyio.sleep(seconds)
        self._room_look_due = False
        self._try_room()

    def _full(self, listener: socket.socket) -> bool:
        """Accepting here, at the limit: leave new connections in the kernel's backlog until one
        ends (the engine counts its own: ``accepting.rs``). While one waits there, room is
        made for it (:meth:`_try_room`), one at a time; while none waits, the listener is still
        watched, so that the next to come gets its room."""
        if self.count < self.limit:
            return False
        if _backlog(listener):
            if not self._making_room:
                self._making_room = True
                self._want_room(lambda: self._making_room)
            assert self._readiness is not None
            self._readiness.pause()
            self._at_limit = True
        return True

    def _pause(self, error: int) -> None:
        """Accepting here, out of descriptors or memory: try again in 100 ms (any other error
        ends the gateway). The engine pauses its own and tells :meth:`_accept_failed`."""
        if error not in _ACCEPT_PAUSE_ERRNOS:
            raise OSError(error, os.strerror(error))
        log.warning("accept failed (%s); pausing 100 ms", os.strerror(error))
        assert self._readiness is not None
        self._readiness.pause(0.1)
        self._at_limit = False

    def _accept_here(self, listener: socket.socket, connections: TaskGroup) -> None:
        """One batch accepted here: each connection runs in a task."""
        for _ in range(_ACCEPT_BATCH):
            if self._full(listener):
                return
            try:
                sock, address = listener.accept()
            except BlockingIOError:
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                self._pause(exc.errno or errno.EIO)
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._count += 1
            # Interned: one string per client address, not one per connection (a live
            # session keeps its client's).
            connections.start_soon(self._connection, sock, sys.intern(client_key(address)))
        self._full(listener)

    def news(self, news: News) -> None:
        """A session the engine could not open, or a connection it accepted and did not open:
        counted since its accept; one not opened until it is answered, one handed until its
        request is served (one it opened is counted until its end, and the engine gives that
        back itself). Or its accepts failed, or it is full with a connection waiting (room is
        made: :meth:`_try_room`), or its replay store's calls for a session it opened."""
        if isinstance(news, _core.Crowded):
            engine, ends = self.engine, news.ends
            assert engine is not None  # only the engine says so
            self._want_room(lambda: engine.ends() == ends)
        elif isinstance(news, _core.AcceptFailed):
            self._accept_failed(news)
        elif isinstance(news, _core.StoreCalls):
            self.handler.sessions.store_called(news)
        elif isinstance(news, _core.Handed):
            if news.fd < 0:
                if news.evicted:
                    self.handler.pending.note_eviction()
                elif news.tls_error is not None:
                    log.debug("TLS handshake failed: %s", news.tls_error)
                self._closed()  # gone, too slow or evicted: dropped without an answer
                return
            assert self._connections is not None  # the engine accepted it in accept()
            sock, client = _adopt(news.fd, news.address)
            if news.evicted:
                self.handler.pending.note_eviction()  # an answered Twilio stream, out of time
            handed = (news.read, news.waited, news.tls, news.answered)
            self._connections.start_soon(self._connection, sock, client, *handed)
        elif news.fd < 0:
            self.handler.metrics.store_called(news.store_seconds)
            self._closed()  # the client went away before its 101
        else:
            assert self._connections is not None  # the engine accepted it in accept()
            self._connections.start_soon(self._unopened, news)

    async def _unopened(self, news: _core.Unopened) -> None:
        try:
            with socket.socket(fileno=news.fd) as sock:
                sock.setblocking(False)
                conn = sock if news.tls is None else TlsSocket(sock, news.tls)
                await self.handler.unopened(conn, news)
        finally:
            self._closed()

    async def _connection(
        self,
        sock: socket.socket,
        client: str,
        read: bytes = b"",
        waited: float | None = None,
        tls: _core.TlsConnection | None = None,
        answered: str | None = None,
    ) -> None:
        """Run one connection: accepted here, by the engine (``read``: its first bytes), or
        read by the engine for ``waited`` seconds (``read``: its head; ``tls``: its TLS, the
        handshake done; ``answered``: a ``/ws/twilio`` stream it answered 101, see
        :meth:`Connections.handle`)."""
        handler = self.handler
        handed_off = False
        try:
            try:
                # TLS: the handshake runs inside the first reads of the request.
                if tls is None:
                    context = self.tls()
                    tls = None if context is None else context.accept()
                conn = sock if tls is None else TlsSocket(sock, tls)
                opened = await handler.handle(conn, client, read, waited, answered)
            finally:
                # Closes the socket unless it was handed (detached) to the engine.
                sock.close()
            if opened is None:
                return
            if opened.bot is not None:
                await handler.sessions.supervise(opened)  # an in-process bot runs in this task
                return
            # Relayed in Rust: no Python task waits on it. The doorbell task reports its end.
            handed_off = True
            opened.on_end = self._ended
            opened.relay.on_done = opened
        finally:
            if not handed_off:
                self._closed()

    def session_done(self, opened: Opened, outcome: _core.Outcome) -> None:
        """A relayed session ended (called from the relay's doorbell task)."""
        self.handler.sessions.ended(opened, outcome)
        self._closed()

    def told_ended(self, ends: _core.ToldEnds) -> None:
        """Sessions the engine opened ended before anything asked for them (the doorbell's).
        The engine gave their connections back itself."""
        self.handler.sessions.told_ended(ends)
        self._poke_if_idle()

    def adopted_done(self, opened: Opened, outcome: _core.Outcome) -> None:
        """A session the engine opened, adopted since (asked for by id, in a list), ended.
        The engine gave its connection back itself."""
        self.handler.sessions.ended(opened, outcome)
        self._poke_if_idle()

    def _poke_if_idle(self) -> None:
        if self._idle is not None and not self.count:  # a drain waits (until_idle)
            self.poke()

    def _closed(self) -> None:
        if self.engine is not None:
            left = self.engine.closed()  # its relay thread accepts again if it was full
        else:
            self._count -= 1
            self._making_room = False
            left = self._count
            readiness = self._readiness
            if self._at_limit and left < self.limit and readiness is not None:
                # Only the limit's pause: out of descriptors, accepts wait their 100 ms.
                self._at_limit = False
                readiness.resume()
        if not left:
            self.poke()

    async def until_idle(self, stop: Callable[[], bool] = lambda: False) -> None:
        """Wait until no connection is held, or ``stop()`` is true at a :meth:`poke`."""
        while self.count and not stop():
            self._idle = anyio.Event()
            await self._idle.wait()

    def poke(self) -> None:
        """Wake :meth:`until_idle` to look again."""
        if self._idle is not None:
            self._idle.set()


def _backlog(listener: socket.socket) -> bool:
    """Whether a connection waits in ``listener``'s backlog (a look, no accept)."""
    poller = select.poll()
    poller.register(listener, select.POLLIN)
    return bool(poller.poll(0))


def _adopt(fd: int, address: Any) -> tuple[socket.socket, str]:
    """A connection the engine accepted: its socket (non-blocking) and its client key, interned
    (one string per client address, not one per connection: a live session keeps its
    client's)."""
    family = socket.AF_INET6 if len(address) == 4 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, 0, fileno=fd)
    sock.setblocking(False)
    return sock, sys.intern(client_key(address))
