"""The Python side of the Rust relay engine: hand sessions over, await their outcomes.

One :class:`_core.Engine` per gateway. Finished sessions queue up in Rust; a single doorbell
task wakes when the engine's doorbell descriptor turns readable, drains every queued outcome at
once and completes each session's waiter. A wake-up of the event loop costs 40-60 µs, so there
is at most one per batch of finished sessions and none per frame.
"""

from __future__ import annotations

import itertools
import socket
from dataclasses import dataclass, field

import anyio
from anyio.abc import TaskStatus

from . import _core

__all__ = ["Relay", "RelaySession"]


@dataclass(eq=False)
class RelaySession:
    """A session the engine is relaying: close it, or wait for its :class:`_core.Outcome`."""

    relay: Relay
    id: int
    _done: anyio.Event = field(default_factory=anyio.Event, repr=False)
    _outcome: _core.Outcome | None = field(default=None, repr=False)

    async def wait(self) -> _core.Outcome:
        """Wait until the engine reports how the session ended."""
        await self._done.wait()
        assert self._outcome is not None
        return self._outcome

    def close(self, code: int, reason: str) -> bool:
        """Close both sides with ``code`` and ``reason``; False if the session already ended."""
        return self.relay.engine.close(self.id, code, reason)

    @property
    def done(self) -> bool:
        """Whether the outcome has arrived."""
        return self._done.is_set()


class Relay:
    """Owns the engine and the doorbell task; :meth:`run` must be running in a task group."""

    def __init__(self, threads: int = 0, dead_peer_timeout: float = 60.0) -> None:
        self.engine = _core.Engine(threads, dead_peer_timeout)
        self._ids = itertools.count(1)
        self._live: dict[int, RelaySession] = {}

    def new_session_id(self) -> int:
        """A fresh session id (a counter: unique for this gateway's lifetime)."""
        return next(self._ids)

    @property
    def live(self) -> list[RelaySession]:
        """Sessions handed to the engine whose outcome has not arrived."""
        return list(self._live.values())

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """The doorbell loop: one wake-up drains every outcome queued since the last one."""
        doorbell = self.engine.doorbell()
        task_status.started()
        while True:
            await anyio.wait_readable(doorbell)
            for item in self.engine.drain():
                if isinstance(item, _core.Message):
                    continue  # in-process sessions: not served yet
                session = self._live.pop(item.session_id, None)
                if session is not None:
                    session._outcome = item
                    session._done.set()

    def start_upstream(
        self,
        session_id: int,
        client_sock: socket.socket,
        bot_sock: socket.socket,
        client_pending: bytes,
        bot_pending: bytes,
        max_message_size: int,
    ) -> RelaySession:
        """Hand a client and its bot to the engine; both sockets are detached (owned by Rust)."""
        session = self._register(session_id)
        client_fd, bot_fd = client_sock.detach(), bot_sock.detach()
        try:
            self.engine.relay(
                session_id, client_fd, bot_fd, client_pending, bot_pending, max_message_size
            )
        except BaseException:
            self._live.pop(session_id, None)
            raise
        return session

    def start_echo(
        self,
        session_id: int,
        client_sock: socket.socket,
        client_pending: bytes,
        max_message_size: int,
    ) -> RelaySession:
        """Hand a client to the engine's built-in echo bot; the socket is detached."""
        session = self._register(session_id)
        try:
            self.engine.echo(session_id, client_sock.detach(), client_pending, max_message_size)
        except BaseException:
            self._live.pop(session_id, None)
            raise
        return session

    async def run_upstream(
        self,
        client_sock: socket.socket,
        bot_sock: socket.socket,
        client_pending: bytes,
        bot_pending: bytes,
        max_message_size: int,
    ) -> _core.Outcome:
        """Relay a client and its bot until the session ends; cancelling closes it with 1001."""
        session = self.start_upstream(
            self.new_session_id(),
            client_sock,
            bot_sock,
            client_pending,
            bot_pending,
            max_message_size,
        )
        return await self._wait_or_close(session)

    async def run_echo(
        self, client_sock: socket.socket, client_pending: bytes, max_message_size: int
    ) -> _core.Outcome:
        """Serve a client with the echo bot until it ends; cancelling closes it with 1001."""
        session = self.start_echo(
            self.new_session_id(), client_sock, client_pending, max_message_size
        )
        return await self._wait_or_close(session)

    def shutdown(self) -> None:
        """Drop every session at once and stop the engine's threads."""
        self.engine.shutdown()

    def _register(self, session_id: int) -> RelaySession:
        # Registered before the hand-over: the outcome may be queued before relay() returns.
        if session_id in self._live:
            raise ValueError(f"session {session_id} is already live")
        session = RelaySession(self, session_id)
        self._live[session_id] = session
        return session

    async def _wait_or_close(self, session: RelaySession) -> _core.Outcome:
        try:
            return await session.wait()
        except BaseException:
            session.close(1001, "gateway shutting down")
            raise
