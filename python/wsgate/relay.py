"""The Python side of the Rust relay engine: hand sessions over, await their outcomes.

One :class:`_core.Engine` per gateway. Finished sessions queue up in Rust; a single doorbell
task wakes when the engine's doorbell descriptor turns readable, drains every queued outcome at
once and completes each session's waiter. A wake-up of the event loop costs 40-60 µs, so there
is at most one per batch of finished sessions and none per frame.

In-process sessions (:meth:`Relay.start_inprocess`) report through the same doorbell: each
``_core.Message`` (a whole client message, or ``data=None``: the send buffer drained) goes to the
session's :class:`Inbox` in order, before its outcome.
"""

from __future__ import annotations

import itertools
import socket
from collections.abc import Callable
from typing import Protocol

import anyio
from anyio.abc import TaskStatus

from . import _core

__all__ = ["Inbox", "Relay", "RelaySession"]


class Inbox(Protocol):
    """Where an in-process session's news goes (see :class:`wsgate.inprocess.SessionChannel`)."""

    def deliver(self, data: str | bytes | None) -> None:
        """A whole client message, or None: the session's send buffer drained."""

    def ended(self, outcome: _core.Outcome) -> None:
        """The session is over."""


class RelaySession:
    """A session the engine is relaying: close it, wait for its :class:`_core.Outcome`, or have
    ``on_done`` called with it.

    Small on purpose (slots, the waiter's Event made only when someone waits): a gateway holds
    one per live session, and upstream sessions need no Python task while they run.
    """

    __slots__ = ("_done", "_outcome", "id", "inbox", "on_done", "relay")

    def __init__(self, relay: Relay, id: int, inbox: Inbox | None = None) -> None:
        self.relay = relay
        self.id = id
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

    def _finish(self, outcome: _core.Outcome) -> None:
        self._outcome = outcome
        if self._done is not None:
            self._done.set()
        if self.inbox is not None:
            self.inbox.ended(outcome)
        if self.on_done is not None:
            self.on_done(outcome)


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
                    live = self._live.get(item.session_id)
                    if live is not None and live.inbox is not None:
                        live.inbox.deliver(item.data)
                    continue
                session = self._live.pop(item.session_id, None)
                if session is not None:
                    session._finish(item)

    def start_upstream(
        self,
        session_id: int,
        client_sock: socket.socket,
        bot_sock: socket.socket,
        client_pending: bytes,
        bot_pending: bytes,
        max_message_size: int,
        time_limit: float | None = None,
    ) -> RelaySession:
        """Hand a client and its bot to the engine; both sockets are detached (owned by Rust).
        After ``time_limit`` seconds the engine closes both with 1000 "session time limit"."""
        session = self._register(session_id)
        client_fd, bot_fd = client_sock.detach(), bot_sock.detach()
        try:
            self.engine.relay(
                session_id,
                client_fd,
                bot_fd,
                client_pending,
                bot_pending,
                max_message_size,
                time_limit,
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
        time_limit: float | None = None,
    ) -> RelaySession:
        """Hand a client to the engine's built-in echo bot; the socket is detached."""
        session = self._register(session_id)
        try:
            self.engine.echo(
                session_id, client_sock.detach(), client_pending, max_message_size, time_limit
            )
        except BaseException:
            self._live.pop(session_id, None)
            raise
        return session

    def start_inprocess(
        self,
        session_id: int,
        client_sock: socket.socket,
        client_pending: bytes,
        max_message_size: int,
        inbox: Inbox,
        *,
        inbox_limit: int,
        send_buffer_limit: int,
    ) -> RelaySession:
        """Hand a client to the engine for an in-process bot; the socket is detached. The
        session's messages and its end go to ``inbox``."""
        session = self._register(session_id, inbox)
        try:
            self.engine.attach(
                session_id,
                client_sock.detach(),
                client_pending,
                max_message_size,
                inbox_limit,
                send_buffer_limit,
            )
        except BaseException:
            self._live.pop(session_id, None)
            raise
        return session

    def shutdown(self) -> None:
        """Drop every session at once and stop the engine's threads."""
        self.engine.shutdown()

    def _register(self, session_id: int, inbox: Inbox | None = None) -> RelaySession:
        # Registered before the hand-over: the outcome may be queued before relay() returns.
        if session_id in self._live:
            raise ValueError(f"session {session_id} is already live")
        session = RelaySession(self, session_id, inbox)
        self._live[session_id] = session
        return session
