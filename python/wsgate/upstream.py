"""Raw non-blocking socket I/O of the handshakes, and the dial of an upstream bot.

Sockets of a session are never wrapped in anyio streams: they end up handed to the Rust engine
by file descriptor, so the event loop may only watch them while we wait
(``anyio.wait_readable``/``wait_writable`` unregister when they return).
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field

import anyio

from . import _core
from .errors import HttpError
from .handshake import BotHandshakeError, UpstreamURL, check_upstream_response, new_key
from .handshake import upstream_request as build_upstream_request

__all__ = ["BotConnection", "HeadTooLarge", "dial", "read_head", "send_all"]

_RECV_SIZE = 65536


class HeadTooLarge(Exception):
    """An HTTP head longer than the limit (the client gets 431)."""


async def send_all(sock: socket.socket, data: bytes) -> None:
    """Send every byte of ``data`` on a non-blocking socket."""
    view = memoryview(data)
    while view:
        try:
            sent = sock.send(view)
        except BlockingIOError:
            await anyio.wait_writable(sock)
            continue
        view = view[sent:]


async def read_head(sock: socket.socket, limit: int) -> tuple[bytes, bytes]:
    """Read an HTTP head from a non-blocking socket: returns ``(head, rest)``.

    ``head`` ends with its empty line (``b"\\r\\n\\r\\n"``); ``rest`` holds the bytes read past it
    (the start of that side's WebSocket frames). The head without its final CRLF CRLF may be at
    most ``limit`` bytes, else :class:`HeadTooLarge`; memory stays under ``limit`` plus one read.
    Raises ``EOFError`` if the peer closes first.
    """
    buf = bytearray()
    while True:
        end = buf.find(b"\r\n\r\n")
        if end >= 0:
            if end > limit:
                raise HeadTooLarge
            return bytes(buf[: end + 4]), bytes(buf[end + 4 :])
        if len(buf) >= limit + 4:
            raise HeadTooLarge
        try:
            chunk = sock.recv(_RECV_SIZE)
        except BlockingIOError:
            await anyio.wait_readable(sock)
            continue
        if not chunk:
            raise EOFError("connection closed during the handshake")
        buf += chunk


@dataclass
class BotConnection:
    """A bot that accepted our upgrade: its socket, its chosen subprotocol, bytes read past its
    101 (the start of its frames)."""

    sock: socket.socket
    subprotocol: str | None
    pending: bytes = field(repr=False)


async def dial(
    target: UpstreamURL,
    *,
    session_uuid: str,
    body_value: str | None,
    subprotocols: Sequence[str],
    timeout: float,
) -> BotConnection:
    """Connect to the bot and complete its WebSocket upgrade within ``timeout`` seconds.

    Every failure becomes ``HttpError(502, "bot unreachable: <reason>")``, with the bot's socket
    closed: this is the one place that translates dial errors.
    """
    try:
        with anyio.fail_after(timeout):
            sock = await _connect(target.host, target.port)
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
        raise HttpError(502, "bot unreachable: timed out") from None
    except BotHandshakeError as exc:
        raise HttpError(502, f"bot unreachable: {exc}") from None
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


async def _connect(host: str, port: int) -> socket.socket:
    """Non-blocking TCP connect to the first address of ``host`` that accepts."""
    infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    error: OSError = OSError(errno.EHOSTUNREACH, os.strerror(errno.EHOSTUNREACH))
    for family, kind, proto, _, address in infos:
        sock = socket.socket(family, kind, proto)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            code = sock.connect_ex(address)
            if code == errno.EINPROGRESS:
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
