"""The dial of an upstream bot: TCP connect, its WebSocket upgrade, every failure as one
``HttpError``: 504 when the bot did not answer in time, 502 for anything else.

The bot's socket stays raw and non-blocking (see :mod:`wsgate._sockets`): it is handed to the Rust
engine by file descriptor once the client's upgrade is answered.
"""

from __future__ import annotations

import errno
import functools
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio

from . import _core
from ._sockets import Conn, HeadTooLarge, read_exactly, read_head, read_to_end, send_all
from .errors import HttpError
from .handshake import BotHandshakeError, check_upstream_response, new_key
from .handshake import upstream_request as build_upstream_request
from .session_api import MAX_ANSWER_BYTES, answer_body_length
from .tls import TlsSocket
from .urls import UpstreamURL

__all__ = ["BotConnection", "call_bot", "dial"]


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
        raise HttpError(504, "bot unreachable: timed out") from None
    except BotHandshakeError as exc:
        raise HttpError(502, f"bot unreachable: {exc}") from None
    except _core.TlsError as exc:
        raise HttpError(502, f"bot unreachable: TLS: {exc}") from None
    except HeadTooLarge:
        raise HttpError(502, "bot unreachable: response head too large") from None
    except EOFError:
        raise HttpError(502, "bot unreachable: connection closed before its answer") from None
    except socket.gaierror:
        raise HttpError(502, "bot unreachable: cannot resolve its host") from None
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise HttpError(502, f"bot unreachable: {reason.lower()}") from None
    return BotConnection(sock, subprotocol, pending)


async def call_bot(
    target: UpstreamURL,
    request: bytes,
    *,
    head_only: bool,
    dial_timeout: float,
    answer_timeout: float,
    tls: _core.TlsClientContext | None = None,
) -> bytes:
    """One HTTP exchange with the bot at ``target``'s origin (the Session API): connect within
    ``dial_timeout``, send ``request`` (a whole request asking ``Connection: close``), and
    return its whole answer, head and body as the bot sent them, within ``answer_timeout``.
    ``head_only``: a ``HEAD`` request, whose answer has no body. Buffered: at most
    ``MAX_HEADER_BYTES`` of head and :data:`~wsgate.session_api.MAX_ANSWER_BYTES` of body.

    Every failure is one ``HttpError``: 504 when either time ran out, 502 for anything else
    (refused, reset, a bad or too large answer), with the bot's socket closed.
    """
    try:
        with anyio.fail_after(dial_timeout):
            raw = await _connect(target.host, target.port)
    except TimeoutError:
        raise HttpError(504, "bot unreachable: timed out") from None
    except socket.gaierror:
        raise HttpError(502, "bot unreachable: cannot resolve its host") from None
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise HttpError(502, f"bot unreachable: {reason.lower()}") from None
    sock: Conn = raw
    try:
        if target.tls:
            if tls is None:
                raise RuntimeError("a wss:// upstream needs a TLS client context")
            sock = TlsSocket(raw, tls.connect(target.host))
        with anyio.fail_after(answer_timeout):
            await send_all(sock, request)
            head, rest = await read_head(sock, _core.MAX_HEADER_BYTES)
            length = answer_body_length(head, head_only)
            if length is None:
                body = await read_to_end(sock, MAX_ANSWER_BYTES, rest)
            elif length > MAX_ANSWER_BYTES:
                body = None
            else:
                body = await read_exactly(sock, length, rest)
        if body is None:
            raise HttpError(502, "bot answer too large")
        return head + body
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
    finally:
        sock.close()


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
