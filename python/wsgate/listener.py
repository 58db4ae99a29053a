"""The listening socket's accept loop and the count of connections the gateway holds.

:class:`Listener` accepts in batches, holds at most ``max_connections`` (past it, new ones wait
in the kernel's backlog), puts TLS on each new connection when the gateway has a certificate,
runs it through :meth:`~wsgate.connection.Connections.handle`, and counts it until it is over: a
refused request at once, an in-process session when its bot is done (its task supervises it), a
relayed session when the engine reports its end through the doorbell (no task waits on it).
The gateway's drain waits on :meth:`Listener.until_idle`.
"""

from __future__ import annotations

import errno
import logging
import socket
import sys
from collections.abc import Callable

import anyio
from anyio.abc import TaskGroup

from . import _core
from .admission import client_key
from .connection import Connections
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
    ) -> None:
        self.handler = handler
        self.limit = limit
        #: The listener's TLS now (a reload swaps it for new connections).
        self.tls = tls
        #: Connections held: upgrading, or sessions.
        self.count = 0
        self._slot_freed: anyio.Event | None = None
        #: What each relayed session's end calls: one bound method for all of them.
        self._ended = self._session_done
        self._idle: anyio.Event | None = None

    async def accept(self, listener: socket.socket, connections: TaskGroup) -> None:
        """Accept until cancelled; each connection runs in a task of ``connections``."""
        while True:
            while self.count >= self.limit:
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
                self.count += 1
                # Interned: one string per client address, not one per connection (a live
                # session keeps its client's).
                connections.start_soon(self._connection, sock, sys.intern(client_key(address)))
                if self.count >= self.limit:
                    break

    async def _connection(self, sock: socket.socket, client: str) -> None:
        handler = self.handler
        handed_off = False
        try:
            try:
                # TLS: the handshake runs inside the first reads of the request.
                tls = self.tls()
                conn = sock if tls is None else TlsSocket(sock, tls.accept())
                opened = await handler.handle(conn, client)
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

    def _session_done(self, opened: Opened, outcome: _core.Outcome) -> None:
        """A relayed session ended (called from the relay's doorbell task)."""
        self.handler.sessions.ended(opened, outcome)
        self._closed()

    def _closed(self) -> None:
        self.count -= 1
        if self._slot_freed is not None:
            self._slot_freed.set()
        if not self.count:
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
