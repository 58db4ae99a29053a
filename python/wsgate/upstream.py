"""The dial of an upstream bot: TCP connect, its WebSocket upgrade, every failure as one
``HttpError``: 504 when the bot did not answer in time, 502 for anything else.

The bot's socket stays raw and non-blocking (see :mod:`wsgate._sockets`): it is handed to the Rust
engine by file descriptor once the client's upgrade is answered. The Session API's one HTTP
exchange with a bot's origin (:func:`pass_answer`) is here too, its answer streamed to the
client, and a whole exchange with another gateway (:func:`fetch`, for the list).
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio

from . import _core
from ._sockets import Conn, HeadTooLarge, read_head, receive, send_all
from .errors import HttpError
from .handshake import BotHandshakeError, check_upstream_response, new_key
from .handshake import upstream_request as build_upstream_request
from .session_api import answer_framing
from .tls import TlsSocket
from .urls import UpstreamURL

__all__ = ["BotConnection", "dial", "engine_dial_error", "fetch", "is_ip_literal", "pass_answer"]

log = logging.getLogger("wsgate")


@dataclass
class BotConnection:
    """A bot that accepted our upgrade: its socket, its chosen subprotocol, bytes read past its
    101 (the start of its frames)."""

    sock: Conn
    subprotocol: str | None
    pending: bytes = field(repr=False)


async def dial(
    target: UpstreamURL,
    *,
    session_uuid: str,
    body_value: str | None,
    subprotocols: Sequence[str],
    timeout: float,
    tls: _core.TlsClientContext | None = None,
) -> BotConnection:
    """Connect to the bot and complete its WebSocket upgrade within ``timeout`` seconds.

    Every failure becomes ``HttpError(502, "bot unreachable: <reason>")`` (refused, no route, a
    bad answer), or ``HttpError(504, "bot unreachable: timed out")`` when ``timeout`` ran out,
    with the bot's socket closed: this is the one place that translates dial errors.
    """
    try:
        with anyio.fail_after(timeout):
            # Plain: the upgrade request is sent as soon as the connection is up (send_all
            # waits for it), which saves a turn of the event loop on a nearby bot.
            raw = await _connect(target.host, target.port, established=target.tls)
            sock: Conn = raw
            if target.tls:
                if tls is None:
                    raw.close()
                    raise RuntimeError("a wss:// upstream needs a TLS client context")
                # The handshake runs inside the request's send and the 101's read below.
                sock = TlsSocket(raw, tls.connect(target.host))
            try:
                key = new_key()
                request = build_upstream_request(
                    target,
                    key=key,
                    session_uuid=session_uuid,
                    body_value=body_value,
                    subprotocols=subprotocols,
                )
                await send_all(sock, request)
                head, pending = await read_head(sock, _core.MAX_HEADER_BYTES)
                subprotocol = check_upstream_response(head, key, subprotocols)
            except BaseException:
                sock.close()
                raise
    except TimeoutError:
        raise _timed_out() from None
    except BotHandshakeError as exc:
        raise HttpError(502, f"bot unreachable: {exc}") from None
    except _core.TlsError as exc:
        raise HttpError(502, f"bot unreachable: TLS: {exc}") from None
    except HeadTooLarge:
        raise _too_large() from None
    except EOFError:
        raise _closed() from None
    except socket.gaierror:
        raise HttpError(502, "bot unreachable: cannot resolve its host") from None
    except OSError as exc:
        raise _os_error(exc.strerror or type(exc).__name__) from None
    return BotConnection(sock, subprotocol, pending)


# Each a function: an exception object is raised once (raising one again would chain it).
def _timed_out() -> HttpError:
    return HttpError(504, "bot unreachable: timed out")


def _too_large() -> HttpError:
    return HttpError(502, "bot unreachable: response head too large")


def _closed() -> HttpError:
    return HttpError(502, "bot unreachable: connection closed before its answer")


def _os_error(reason: str) -> HttpError:
    return HttpError(502, f"bot unreachable: {reason.lower()}")


def engine_dial_error(unopened: _core.Unopened) -> HttpError:
    """What :func:`dial` says of the failure of a dial the engine made
    (:mod:`wsgate.fastpath`): the same status and words."""
    failure = unopened.failure
    if failure == "timed_out":
        return _timed_out()
    if failure == "too_large":
        return _too_large()
    if failure == "closed":
        return _closed()
    if failure == "answer":
        try:
            check_upstream_response(unopened.head, unopened.key, ())
        except BotHandshakeError as exc:
            return HttpError(502, f"bot unreachable: {exc}")
        # The engine's check is stricter than this one: refused all the same.
        return HttpError(502, "bot unreachable: malformed response")
    return _os_error(os.strerror(unopened.errno))


def is_ip_literal(host: str) -> bool:
    """Whether ``host`` is an IPv4 or IPv6 address (not a name to resolve)."""
    return _numeric(host) is not None


async def pass_answer(
    client: Conn,
    target: UpstreamURL,
    request: bytes,
    *,
    head_only: bool,
    dial_timeout: float,
    answer_timeout: float,
    tls: _core.TlsClientContext | None = None,
) -> int:
    """One HTTP exchange with the bot at ``target``'s origin (the Session API), its answer
    streamed to ``client``: connect within ``dial_timeout``, send ``request`` (a whole request
    asking ``Connection: close``), read the answer's head (at most ``MAX_HEADER_BYTES``) within
    ``answer_timeout`` and pass it on, then the body as the bot sends it, read by read: the
    ``Content-Length``'s worth, or up to the bot's close (chunked, or no length); none after
    ``HEAD``, 1xx, 204 and 304 (``head_only``: a ``HEAD`` request). Head and body go on as the
    bot sent them. Returns the answer's status.

    Until the head is passed on, every failure is one ``HttpError`` and ``client`` got
    nothing: 504 when either time ran out, 502 for anything else (refused, reset, a bad
    answer). After it, a pause of the bot (or of the client reading) longer than
    ``answer_timeout``, or either side failing, cuts the answer short: the client sees a body
    shorter than its framing said (logged). The bot's socket is closed either way.
    """
    bot = await _connect_origin(target, dial_timeout, tls)
    try:
        try:
            with anyio.fail_after(answer_timeout):
                await send_all(bot, request)
                head, rest = await read_head(bot, _core.MAX_HEADER_BYTES)
            status, length = answer_framing(head, head_only)
        except TimeoutError:
            raise HttpError(504, "bot did not answer in time") from None
        except ValueError as exc:
            raise HttpError(502, f"bot gave a bad answer: {exc}") from None
        except HeadTooLarge:
            raise HttpError(502, "bot answer head too large") from None
        except EOFError:
            raise HttpError(502, "bot closed the connection before its answer") from None
        except _core.TlsError as exc:
            raise HttpError(502, f"bot unreachable: TLS: {exc}") from None
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            raise HttpError(502, f"bot connection failed: {reason.lower()}") from None
        if not await _pass_body(client, bot, head, rest, length, answer_timeout):
            log.warning("a Session API answer (status %d) was cut short", status)
        return status
    finally:
        bot.close()


async def fetch(
    target: UpstreamURL,
    request: bytes,
    *,
    dial_timeout: float,
    limit: int,
    tls: _core.TlsClientContext | None = None,
) -> tuple[int, bytes]:
    """One whole HTTP exchange with ``target``'s origin (another gateway of the store): send
    ``request`` (asking ``Connection: close``), read the answer's head and its body (its
    ``Content-Length``, or up to the peer's close; at most ``limit`` bytes). The connect takes
    at most ``dial_timeout``; the rest is the caller's to bound. Returns ``(status, body)``;
    raises ``HttpError`` 504 (connect timed out) or 502 (anything else)."""
    conn = await _connect_origin(target, dial_timeout, tls)
    try:
        await send_all(conn, request)
        head, rest = await read_head(conn, _core.MAX_HEADER_BYTES)
        status, length = answer_framing(head, False)
        body = bytearray(rest)
        while length is None or len(body) < length:
            if len(body) > limit:
                raise ValueError(f"answer over {limit} bytes")
            try:
                body += await receive(conn, "the answer")
            except EOFError:
                if length is not None:
                    raise
                break
        return status, bytes(body if length is None else body[:length])
    except (ValueError, HeadTooLarge) as exc:
        raise HttpError(502, f"bad answer: {exc or type(exc).__name__}") from None
    except EOFError:
        raise HttpError(502, "closed before its whole answer") from None
    except OSError as exc:  # a TLS failure too
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise HttpError(502, f"connection failed: {reason.lower()}") from None
    finally:
        conn.close()


async def _pass_body(
    client: Conn, bot: Conn, head: bytes, rest: bytes, length: int | None, idle: float
) -> bool:
    """Send ``head`` and the body behind it to ``client``: ``rest`` (read with the head), then
    each read of ``bot``, ``length`` bytes in all or up to the bot's close (None). Each step
    (a write to the client and the next read of the bot) takes at most ``idle`` seconds.
    Whether the whole body went."""
    left = length
    data = head + (rest if left is None else rest[:left])
    if left is not None:
        left -= len(data) - len(head)
    try:
        while True:
            with anyio.move_on_after(idle) as pause:
                await send_all(client, data)
                if left == 0:
                    return True
                data = await receive(bot, "the answer")
                if left is not None:
                    data = data[:left]
                    left -= len(data)
            if pause.cancelled_caught:
                return False
    except EOFError:
        return left is None  # a body without a length ends with the bot's close
    except OSError:  # either side reset (a TLS failure too)
        return False


async def _connect_origin(
    target: UpstreamURL, timeout: float, tls: _core.TlsClientContext | None
) -> Conn:
    """A connection to ``target``'s origin within ``timeout`` (TLS begun for ``https://``):
    ``HttpError`` 504 when the time ran out, 502 for anything else."""
    try:
        with anyio.fail_after(timeout):
            raw = await _connect(target.host, target.port)
    except TimeoutError:
        raise HttpError(504, "bot unreachable: timed out") from None
    except socket.gaierror:
        raise HttpError(502, "bot unreachable: cannot resolve its host") from None
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise HttpError(502, f"bot unreachable: {reason.lower()}") from None
    if not target.tls:
        return raw
    if tls is None:
        raw.close()
        raise RuntimeError("a wss:// upstream needs a TLS client context")
    try:
        # The handshake runs inside the request's send and the answer's read.
        return TlsSocket(raw, tls.connect(target.host))
    except BaseException:
        raw.close()
        raise


async def _connect(host: str, port: int, *, established: bool = True) -> socket.socket:
    """Non-blocking TCP connect to the first address of ``host`` that accepts.

    ``established=False`` may return a socket whose connect is still in progress when the host
    has one address (an IP literal): the first send waits for it (``EAGAIN`` until it is up)
    and raises the connect's error (``ECONNREFUSED``...), as a wait here would."""
    infos = await _addresses(host, port)
    error: OSError = OSError(errno.EHOSTUNREACH, os.strerror(errno.EHOSTUNREACH))
    for family, address in infos:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            code = sock.connect_ex(address)
            if code == errno.EINPROGRESS:
                if not established and len(infos) == 1:
                    return sock
                await anyio.wait_writable(sock)
                code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        except BaseException:
            sock.close()
            raise
        if code == 0:
            return sock
        sock.close()
        error = OSError(code, os.strerror(code))
    raise error


async def _addresses(host: str, port: int) -> list[tuple[int, Any]]:
    """``(family, address)`` of ``host``: an IP literal as it is (no resolver call, which
    anyio runs in a worker thread: a thread hop per dial), a name through the resolver, asked
    at every dial so that DNS changes are followed."""
    numeric = _numeric(host)
    if numeric is not None:
        family = numeric
        return [(family, (host, port) if family == socket.AF_INET else (host, port, 0, 0))]
    infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [(family, address) for family, _, _, _, address in infos]


@functools.lru_cache(maxsize=256)
def _numeric(host: str) -> int | None:
    """The address family of an IP literal, None for a name."""
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
        except OSError:
            continue
        return family
    return None
