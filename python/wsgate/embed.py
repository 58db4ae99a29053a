"""Relay sockets you accepted yourself: the Rust relay inside your own asyncio or trio server.

    conn, _ = await loop.sock_accept(listener)        # or trio's accept, or your framework's
    head, rest = ...                                  # read the upgrade request yourself
    await loop.sock_sendall(conn, wsgate.accept_upgrade(head))
    outcome = await wsgate.relay(conn, "ws://127.0.0.1:9001/ws", pending=rest)

:func:`relay` dials the bot, completes its upgrade and hands both sockets to the same engine the
gateway runs (frames are moved in Rust, the GIL released, per message nothing in Python); it
returns the session's :class:`_core.Outcome` once both sides are closed. The socket may be a
``socket.socket`` or a trio socket: anything with ``detach()`` that gives up its descriptor.

One engine per :class:`Relayer`; :func:`relay` uses a process-wide one made on first use. No
background task is needed: whichever waiting call holds the engine's doorbell drains it for all
(one at a time, in turns), so :func:`relay` works from any task of any event loop, under asyncio
or trio, and needs no task group of yours. A cancelled :func:`relay` closes its session with
1001 "going away" and returns at once; the session's outcome is then dropped.
"""

from __future__ import annotations

import socket
import uuid
from collections.abc import Sequence
from typing import Any, Protocol
from urllib.parse import quote

import anyio
from anyio.lowlevel import RunVar

from . import _core
from ._sockets import send_and_close
from .body import encode_body
from .engine import Handover, Limits, Relay, RelaySession, Upstream
from .errors import HttpError
from .handshake import close_frame, switching_protocols
from .request import parse_request
from .routing import check_upgrade
from .upstream import dial
from .urls import parse_upstream_url

__all__ = ["Detachable", "Relayer", "accept_upgrade", "relay"]


class Detachable(Protocol):
    """A connected socket that can give up its descriptor: a ``socket.socket``, a trio socket."""

    def detach(self) -> int:
        """Stop owning the descriptor and return it."""


def accept_upgrade(head: bytes, subprotocol: str | None = None) -> bytes:
    """The ``101 Switching Protocols`` answer to a WebSocket upgrade request's head (its bytes
    up to and including the blank line). ``subprotocol``: one the client offered, to agree on.

    Raises :class:`~wsgate.HttpError` (400, with a one-line reason) for a head that is not a
    valid upgrade (RFC 6455 §4.2.1), the same checks as the gateway's."""
    request = parse_request(head)
    key, offered = check_upgrade(request)
    if subprotocol is not None and subprotocol not in offered:
        raise ValueError(f"subprotocol {subprotocol!r} was not offered by the client")
    return switching_protocols(key, subprotocol)


class Relayer:
    """A relay engine for sockets accepted by your own server (see the module's docstring).

    ``threads``: the engine's relay threads (0: ``$WSGATE_RELAY_THREADS``, else half the CPUs,
    at least one). ``dead_peer_timeout``: seconds after which a peer gone without a FIN is
    noticed (TCP keepalive and ``TCP_USER_TIMEOUT``, at least 1).
    """

    def __init__(self, *, threads: int = 0, dead_peer_timeout: float = 60.0) -> None:
        self._options = (threads, dead_peer_timeout)
        self._engine: Relay | None = None  # started on first use: threads cost nothing till then
        # Whoever holds this drains the doorbell for every waiting call of this event loop.
        self._turn: RunVar[anyio.Lock] = RunVar(f"wsgate.Relayer.{id(self)}")

    @property
    def _relay(self) -> Relay:
        if self._engine is None:
            self._engine = Relay(*self._options)
        return self._engine

    async def relay(
        self,
        sock: Detachable,
        upstream: str,
        *,
        pending: bytes = b"",
        subprotocols: Sequence[str] = (),
        body: Any = None,
        session_id: str | None = None,
        max_message_size: int = _core.DEFAULT_MAX_MESSAGE_SIZE,
        time_limit: float | None = None,
        dial_timeout: float = 10.0,
    ) -> _core.Outcome:
        """Relay an upgraded client socket to the bot at ``upstream`` (``ws://``) until both
        sides are closed; returns the session's outcome.

        ``pending``: bytes already read from the client past its upgrade request (its first
        frames). ``subprotocols``: offered to the bot. ``body``: a JSON value sent to the bot
        as ``?body=`` (base64 of its JSON). ``session_id``: the bot's ``X-Daily-Session-Id``
        (default: a fresh UUID). ``max_message_size`` and ``time_limit`` as the gateway's.

        The socket is this call's from the start, whatever happens: when the bot cannot be
        reached within ``dial_timeout`` seconds the client gets close 1011 "bot unreachable"
        and :class:`~wsgate.HttpError` 502 is raised (its reason says why). ``ValueError`` for
        a bad ``upstream`` URL, before anything is sent.
        """
        target = parse_upstream_url(upstream)
        body_value = None if body is None else quote(encode_body(body)[1], safe="")
        client = sock if isinstance(sock, socket.socket) else socket.socket(fileno=sock.detach())
        client.setblocking(False)
        try:
            bot = await dial(
                target,
                session_uuid=session_id or str(uuid.uuid4()),
                body_value=body_value,
                subprotocols=tuple(subprotocols),
                timeout=dial_timeout,
            )
        except HttpError:
            with anyio.CancelScope(shield=True):  # bounded: send_and_close lingers briefly
                await send_and_close(client, close_frame(1011, "bot unreachable"))
            raise
        except BaseException:
            client.close()
            raise
        try:
            session = self._relay.start(
                Handover(
                    self._relay.new_session_id(),
                    target.url,
                    client,
                    peer=Upstream(bot.sock, bot.pending),
                    limits=Limits(max_message_size, time_limit),
                    client_pending=pending,
                )
            )
        finally:
            bot.sock.close()  # no-op once detached
        try:
            return await self._wait(session)
        except BaseException:
            session.close(1001, "going away")
            raise

    async def _wait(self, session: RelaySession) -> _core.Outcome:
        try:
            turn = self._turn.get()
        except LookupError:
            turn = anyio.Lock()
            self._turn.set(turn)
        doorbell = self._relay.engine.doorbell()
        while not session.done:
            # One waiter at a time reads the doorbell and finishes every session it reports;
            # the lock is fair, so a waiter whose session was finished meanwhile gets its turn.
            async with turn:
                if session.done:
                    break
                await anyio.wait_readable(doorbell)
                self._relay.dispatch()
        return await session.wait()

    def close(self) -> None:
        """Drop every session of this engine at once and stop its threads."""
        if self._engine is not None:
            self._engine.shutdown()
            self._engine = None


_default = Relayer()

#: :meth:`Relayer.relay` on a process-wide engine, started on first use.
relay = _default.relay
