"""In-process bots: an async Python callable serves a session, through a Starlette-like WebSocket.

The Rust engine speaks WebSocket with the client (:meth:`_core.Engine.attach`): it reassembles
fragments, checks UTF-8 (else 1007), answers pings and close frames, and reports whole messages
behind the relay's doorbell. This module is what the bot sees of that:

- :class:`SessionChannel` is the session's Python state. The relay's doorbell loop feeds it
  (:meth:`~SessionChannel.deliver` a message or a drained notice, :meth:`~SessionChannel.ended`
  the outcome); the bot's side takes messages from it and sends through the engine.
- :class:`InProcessWebSocket` is the face the bot uses: what Pipecat's
  ``FastAPIWebsocketTransport`` (and FastAPI code in general) uses of a Starlette ``WebSocket``.
- :func:`serve_bot` runs one bot for one session and owns its lifecycle.

Invariants, all kept in this file:

- Backpressure both ways. Messages the bot has taken are reported with
  :meth:`_core.Engine.consumed` in batches of ``inbox_limit / 4`` bytes; the engine stops reading
  the client past ``inbox_limit`` bytes delivered and not reported, so the Python-side queue is
  bounded by that plus one read. A send that leaves more than ``send_buffer_limit`` bytes queued
  waits for the engine's drained notice (the queue emptied to half the limit).
- Lifecycle. The bot returning closes the client with 1000; raising closes it with 1011 and logs
  the exception once; the client leaving gives the bot a ``websocket.disconnect`` message and
  ``bot_grace_period`` seconds to return before it is cancelled; the session time limit cancels
  it at once and closes with 1000 "session time limit". :func:`serve_bot` returns only once the
  bot's task has finished and the engine reported the session's outcome: no bot outlives its
  session.
- Errors as Starlette raises them (under uvicorn). ``send_*`` after the bot's own ``close()``:
  ``RuntimeError``. ``send_*`` once the client has left (or the gateway closed the session):
  ``WebSocketDisconnect(1006)``, which is what Starlette raises when uvicorn's send fails.
  ``receive()`` after the disconnect message was returned: ``RuntimeError``.
"""

from __future__ import annotations

import importlib
import json
import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import anyio

from . import _core
from ._websocket_state import Headers, QueryParams, WebSocketDisconnect, WebSocketState
from .config import (
    DEFAULT_BOT_GRACE_PERIOD,
    DEFAULT_INBOX_LIMIT,
    DEFAULT_SEND_BUFFER_LIMIT,
    AgentConfig,
)
from .errors import ConfigError

__all__ = [
    "DEFAULT_BOT_GRACE_PERIOD",
    "DEFAULT_INBOX_LIMIT",
    "DEFAULT_SEND_BUFFER_LIMIT",
    "Bot",
    "BotArguments",
    "Headers",
    "InProcessWebSocket",
    "QueryParams",
    "SessionChannel",
    "WebSocketDisconnect",
    "WebSocketState",
    "bot_of",
    "load_bot",
    "serve_bot",
]

log = logging.getLogger("wsgate")

# RFC 6455 §7.4: codes an endpoint may send (1004-1006 and 1015 are reserved for reporting).
_SENDABLE_CODES = frozenset({1000, 1001, 1002, 1003, *range(1007, 1015), *range(3000, 5000)})
_MAX_CLOSE_REASON = 123  # a control frame's 125 bytes, less the code's two


@dataclass(eq=False)
class BotArguments:
    """What an in-process bot is called with: the fields of Pipecat's
    ``WebSocketRunnerArguments`` that make sense here, with Pipecat's defaults for the runner's
    knobs so that ``PipelineRunner(handle_sigint=args.handle_sigint)`` reads the same."""

    #: The session's id: the same UUID an upstream bot gets as ``X-Daily-Session-Id``.
    session_id: str
    websocket: InProcessWebSocket
    #: The client's ``?body=`` document, decoded from JSON; None without one.
    body: Any = field(repr=False)
    #: The gateway owns the process's signals: a bot must not install handlers.
    handle_sigint: bool = False
    handle_sigterm: bool = False
    #: Pipecat's runner default, for bots that pass it on to their ``PipelineTask``.
    pipeline_idle_timeout_secs: float | None = 300


#: An in-process bot: an async callable taking :class:`BotArguments`.
Bot: TypeAlias = Callable[[BotArguments], Awaitable[Any]]


def load_bot(spec: str) -> Bot:
    """Import a bot named ``"package.module:function"`` (the attribute may be dotted)."""
    module_name, colon, attr = spec.partition(":")
    if not colon or not module_name or not attr:
        raise ConfigError(f"bot {spec!r} must be written 'package.module:function'")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"bot {spec!r}: cannot import {module_name!r}: {exc}") from exc
    try:
        for part in attr.split("."):
            target = getattr(target, part)
    except AttributeError:
        raise ConfigError(f"bot {spec!r}: {module_name!r} has no {attr!r}") from None
    if not callable(target):
        raise ConfigError(f"bot {spec!r} is not callable")
    bot: Bot = target
    return bot


def bot_of(agent: AgentConfig) -> Bot | None:
    """The agent's in-process bot as a callable (importing a ``"module:function"`` name), or
    None. Raises :class:`ConfigError` naming the agent if the name cannot be imported."""
    if agent.bot is None or not isinstance(agent.bot, str):
        return agent.bot
    try:
        return load_bot(agent.bot)
    except ConfigError as exc:
        raise ConfigError(f"agent {agent.service_host!r}: {exc}") from None


class SessionChannel:
    """One in-process session's Python side, between the relay's doorbell loop and the bot.

    Created before :meth:`_core.Engine.attach` and registered with the relay, which calls
    :meth:`deliver` and :meth:`ended` from the event loop's thread; everything else is called by
    the bot's tasks on the same thread, so no lock is needed.
    """

    def __init__(
        self,
        engine: _core.Engine,
        session_id: int,
        *,
        inbox_limit: int = DEFAULT_INBOX_LIMIT,
        send_buffer_limit: int = DEFAULT_SEND_BUFFER_LIMIT,
    ) -> None:
        if inbox_limit < 1 or send_buffer_limit < 1:
            raise ValueError("inbox_limit and send_buffer_limit must be at least 1 byte")
        self.engine = engine
        self.id = session_id
        self.inbox_limit = inbox_limit
        self.send_buffer_limit = send_buffer_limit
        #: How the session ended, once the engine reported it.
        self.outcome: _core.Outcome | None = None
        self._inbox: deque[str | bytes] = deque()
        self._arrived: anyio.Event | None = None
        self._drained: anyio.Event | None = None
        self._ended = anyio.Event()
        self._taken = 0
        self._report_at = max(1, inbox_limit // 4)
        self._closed = False

    # The relay's side: called by its doorbell loop.

    def deliver(self, data: str | bytes | None) -> None:
        """A whole message from the client, or None: the send buffer drained to half its limit."""
        if data is None:
            if self._drained is not None:
                self._drained.set()
            return
        self._inbox.append(data)
        if self._arrived is not None:
            self._arrived.set()

    def ended(self, outcome: _core.Outcome) -> None:
        """The engine's report that the session is over: wakes every waiting receive and send."""
        self.outcome = outcome
        self._closed = True
        self._ended.set()
        if self._arrived is not None:
            self._arrived.set()
        if self._drained is not None:
            self._drained.set()

    # The bot's side.

    @property
    def done(self) -> bool:
        """Whether the outcome has arrived."""
        return self.outcome is not None

    async def wait(self) -> _core.Outcome:
        """Wait until the engine reports how the session ended."""
        await self._ended.wait()
        assert self.outcome is not None
        return self.outcome

    async def take(self) -> str | bytes | None:
        """The client's next message; None once none is left and the session has ended."""
        inbox = self._inbox
        while not inbox:
            if self.outcome is not None:
                return None
            # Concurrent takers share one event: each wakes, one wins, the others wait again.
            if self._arrived is None or self._arrived.is_set():
                self._arrived = anyio.Event()
            await self._arrived.wait()
        data = inbox.popleft()
        # The engine counts UTF-8 bytes; len() of an ASCII str is that, and O(1) to check.
        n = len(data) if isinstance(data, bytes) or data.isascii() else len(data.encode())
        self._taken += n
        if self._taken >= self._report_at:
            self.engine.consumed(self.id, self._taken)
            self._taken = 0
        return data

    async def send(self, data: str | bytes) -> bool:
        """Queue a message for the client, waiting while the send buffer is over its limit.

        False if the session is closing or over (nothing was sent).
        """
        if self._closed:
            return False
        queued = self.engine.send(self.id, data)
        if queued is None:
            return False
        if queued > self.send_buffer_limit and self.outcome is None:
            # The engine sets its "over" flag inside send(), and its drained notice can only be
            # delivered by the doorbell loop, which cannot run before we wait: none is missed.
            if self._drained is None or self._drained.is_set():
                self._drained = anyio.Event()
            await self._drained.wait()
        return True

    def close(self, code: int, reason: str) -> bool:
        """Close the client with ``code``/``reason`` (once); False if already closing or over."""
        if self._closed:
            return False
        self._closed = True
        return self.engine.close(self.id, code, reason)

    def disconnect_code(self) -> tuple[int, str]:
        """``(code, reason)`` for the bot's ``websocket.disconnect`` message: the client's close
        frame if it sent one, else the gateway's close (1007 for bad UTF-8, …), else 1006."""
        outcome = self.outcome
        if outcome is not None:
            if outcome.client_close is not None:
                return outcome.client_close
            if outcome.bot_close is not None:
                return outcome.bot_close
        return 1006, ""


class InProcessWebSocket:
    """What an in-process bot holds: the parts of Starlette's ``WebSocket`` that Pipecat's
    ``FastAPIWebsocketTransport`` and ordinary FastAPI handlers use.

    The handshake is done when the bot is called: both states start ``CONNECTED`` and
    :meth:`accept` does nothing. ``client_state`` turns ``DISCONNECTED`` once :meth:`receive`
    has returned the disconnect message, ``application_state`` once the bot closed or a send
    found the client gone (as in Starlette). Any attribute may be set on it (Pipecat caches
    parsed telephony data there).
    """

    def __init__(
        self,
        channel: SessionChannel,
        *,
        headers: Iterable[tuple[str, str]] = (),
        query: str = "",
        path: str = "/",
    ) -> None:
        self._channel = channel
        self.headers = Headers(headers)
        self.query_params = QueryParams(query)
        #: The request path the client upgraded on (e.g. ``/ws/generic/my-agent.my-org``).
        self.path = path
        self.client_state = WebSocketState.CONNECTED
        self.application_state = WebSocketState.CONNECTED

    def __repr__(self) -> str:
        return f"<InProcessWebSocket session {self._channel.id} {self.client_state.name}>"

    async def accept(
        self, subprotocol: str | None = None, headers: Iterable[tuple[bytes, bytes]] | None = None
    ) -> None:
        """Nothing to do: the gateway answered the client's upgrade before calling the bot."""

    async def receive(self) -> dict[str, Any]:
        """The next ASGI message: ``{"type": "websocket.receive", "text": str}`` or
        ``{..., "bytes": bytes}``, and finally ``{"type": "websocket.disconnect", "code": int,
        "reason": str}``; after that, ``RuntimeError``."""
        if self.client_state == WebSocketState.DISCONNECTED:
            raise RuntimeError('Cannot call "receive" once a disconnect message has been received.')
        data = await self._channel.take()
        if data is None:
            self.client_state = WebSocketState.DISCONNECTED
            code, reason = self._channel.disconnect_code()
            return {"type": "websocket.disconnect", "code": code, "reason": reason}
        if isinstance(data, str):
            return {"type": "websocket.receive", "text": data}
        return {"type": "websocket.receive", "bytes": data}

    async def receive_text(self) -> str:
        """The next text message (``KeyError`` on a binary one, as in Starlette);
        :class:`WebSocketDisconnect` once the client has left."""
        message = await self._receive_data()
        text: str = message["text"]
        return text

    async def receive_bytes(self) -> bytes:
        """The next binary message (``KeyError`` on a text one, as in Starlette);
        :class:`WebSocketDisconnect` once the client has left."""
        message = await self._receive_data()
        data: bytes = message["bytes"]
        return data

    async def receive_json(self, mode: str = "text") -> Any:
        """The next message decoded from JSON: a text one (``mode="text"``) or a binary one of
        UTF-8 (``mode="binary"``)."""
        if mode not in ("text", "binary"):
            raise RuntimeError('The "mode" argument should be "text" or "binary".')
        message = await self._receive_data()
        if mode == "text":
            return json.loads(message["text"])
        return json.loads(message["bytes"].decode("utf-8"))

    async def iter_text(self) -> AsyncIterator[str]:
        """Text messages until the client leaves."""
        try:
            while True:
                yield await self.receive_text()
        except WebSocketDisconnect:
            pass

    async def iter_bytes(self) -> AsyncIterator[bytes]:
        """Binary messages until the client leaves."""
        try:
            while True:
                yield await self.receive_bytes()
        except WebSocketDisconnect:
            pass

    async def iter_json(self) -> AsyncIterator[Any]:
        """Text messages decoded from JSON until the client leaves."""
        try:
            while True:
                yield await self.receive_json()
        except WebSocketDisconnect:
            pass

    async def __aiter__(self) -> AsyncIterator[str | bytes]:
        """``async for message in websocket``: each message, ``str`` or ``bytes``, until the
        client leaves."""
        while True:
            message = await self.receive()
            if message["type"] == "websocket.disconnect":
                return
            data: str | bytes = message["text"] if "text" in message else message["bytes"]
            yield data

    async def send_text(self, data: str) -> None:
        """Send a text message (waits while the client's send buffer is full)."""
        if not isinstance(data, str):
            raise TypeError(f"send_text() takes str, not {type(data).__name__}")
        await self._send(data)

    async def send_bytes(self, data: bytes | bytearray | memoryview) -> None:
        """Send a binary message (waits while the client's send buffer is full)."""
        if not isinstance(data, bytes):
            if not isinstance(data, (bytearray, memoryview)):
                raise TypeError(f"send_bytes() takes bytes, not {type(data).__name__}")
            data = bytes(data)
        await self._send(data)

    async def send_json(self, data: Any, mode: str = "text") -> None:
        """Send ``data`` as compact JSON, in a text (``mode="text"``) or binary message."""
        if mode not in ("text", "binary"):
            raise RuntimeError('The "mode" argument should be "text" or "binary".')
        text = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
        await self._send(text if mode == "text" else text.encode("utf-8"))

    async def send(self, message: dict[str, Any]) -> None:
        """Send an ASGI message: ``websocket.send`` (with ``text`` or ``bytes``),
        ``websocket.close`` (with optional ``code`` and ``reason``), or ``websocket.accept``."""
        kind = message.get("type")
        if kind == "websocket.send":
            text, data = message.get("text"), message.get("bytes")
            await self._send(text if text is not None else data)
        elif kind == "websocket.close":
            await self.close(message.get("code", 1000), message.get("reason"))
        elif kind != "websocket.accept":
            raise RuntimeError(f"Unexpected ASGI message {kind!r}")

    async def close(self, code: int = 1000, reason: str | None = None) -> None:
        """Close the client with ``code`` and ``reason``; the bot may still receive what the
        client sends until the client's close arrives. A second close is a ``RuntimeError``."""
        self._check_sendable()
        reason = reason or ""
        if code not in _SENDABLE_CODES:
            raise ValueError(f"close code {code!r} may not be sent (RFC 6455 §7.4)")
        if len(reason.encode("utf-8")) > _MAX_CLOSE_REASON:
            raise ValueError(f"a close reason is at most {_MAX_CLOSE_REASON} bytes of UTF-8")
        self.application_state = WebSocketState.DISCONNECTED
        self._channel.close(code, reason)

    async def _receive_data(self) -> dict[str, Any]:
        if self.application_state != WebSocketState.CONNECTED:
            raise RuntimeError('WebSocket is not connected. Need to call "accept" first.')
        message = await self.receive()
        if message["type"] == "websocket.disconnect":
            raise WebSocketDisconnect(message["code"], message.get("reason"))
        return message

    def _check_sendable(self) -> None:
        if self.application_state == WebSocketState.DISCONNECTED:
            raise RuntimeError('Cannot call "send" once a close message has been sent.')

    async def _send(self, data: str | bytes | None) -> None:
        self._check_sendable()
        if not isinstance(data, (str, bytes)):
            raise TypeError("a message is str or bytes")
        if not await self._channel.send(data):
            # Starlette under uvicorn: the server's send fails once the client is gone.
            self.application_state = WebSocketState.DISCONNECTED
            raise WebSocketDisconnect(1006)


async def serve_bot(
    bot: Bot,
    arguments: BotArguments,
    channel: SessionChannel,
    *,
    grace_period: float = DEFAULT_BOT_GRACE_PERIOD,
) -> _core.Outcome:
    """Run ``bot`` for one session attached to the engine, until both the bot and the session
    are over; returns the session's outcome.

    The bot runs in a task of its own. If it ends first, the client is closed (1000 after a
    return, 1011 after an exception, which is logged here once). If the client leaves first,
    the bot has ``grace_period`` seconds to return, then is cancelled. At the session's time limit
    (enforced by the engine, like every session's: :class:`wsgate.engine.Limits`) the client gets
    1000 "session time limit" and the bot is cancelled at once. Cancelling this call closes the
    client with 1001 and cancels the bot; it returns once the bot has finished.
    """
    bot_scope = anyio.CancelScope()
    bot_done = anyio.Event()

    async def run() -> None:
        try:
            with bot_scope:
                await bot(arguments)
            if not bot_scope.cancel_called:
                channel.close(1000, "")
        except WebSocketDisconnect:
            # Raised by a receive_*/send_* once the client left: the usual way for FastAPI-style
            # code to end, not a bot error.
            channel.close(1000, "")
        except Exception:
            log.exception("bot of session %d (%s) raised", channel.id, arguments.session_id)
            channel.close(1011, "")
        finally:
            bot_done.set()

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            outcome = await channel.wait()
            if outcome.ended_by != "gateway" or outcome.detail != _core.TIME_LIMIT_REASON:
                with anyio.move_on_after(grace_period):
                    await bot_done.wait()
            bot_scope.cancel()
    except BaseException:
        channel.close(1001, _core.DRAIN_REASON)
        raise
    return await channel.wait()
