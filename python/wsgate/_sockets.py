"""Raw non-blocking socket I/O of the handshakes: send a whole buffer, read one HTTP head.

Sockets of a session are never wrapped in anyio streams: they end up handed to the Rust engine
by file descriptor, so the event loop may only watch them while we wait, and
``anyio.wait_readable``/``wait_writable`` unregister them when they return. Nothing here reads a
byte past what the caller asks for without handing it back: bytes after an HTTP head are the
start of that side's WebSocket frames.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import TypeVar

import anyio

from .errors import HeadTooLarge
from .tls import TlsSocket

#: A client's or a bot's connection during the handshakes: plain, or with TLS on it.
Conn = socket.socket | TlsSocket

__all__ = [
    "Conn",
    "HeadTooLarge",
    "head_at_once",
    "listen",
    "read_exactly",
    "read_head",
    "read_until",
    "receive",
    "send_all",
    "send_and_close",
]

_RECV_SIZE = 65536
# How long a refused client may take to read its answer before the socket is closed.
_LINGER = 1.0

T = TypeVar("T")


async def send_all(sock: Conn, data: bytes) -> None:
    """Send every byte of ``data`` on a non-blocking socket (with TLS: until every record is
    written, so the socket can be handed over)."""
    view = memoryview(data)
    while view:
        try:
            sent = sock.send(view)
        except BlockingIOError:
            await anyio.wait_writable(sock)
            continue
        view = view[sent:]
    await _flush(sock)


async def _flush(sock: Conn) -> None:
    """With TLS: wait until the records the socket did not take at once are written."""
    while isinstance(sock, TlsSocket) and sock.pending:
        await anyio.wait_writable(sock)
        sock.flush()


async def read_head(sock: Conn, limit: int, already: bytes = b"") -> tuple[bytes, bytes]:
    """Read an HTTP head from a non-blocking socket: returns ``(head, rest)``.

    ``head`` ends with its empty line (``b"\\r\\n\\r\\n"``); ``rest`` holds the bytes read past it
    (the start of that side's WebSocket frames). The head without its final CRLF CRLF may be at
    most ``limit`` bytes, else :class:`HeadTooLarge`; memory stays under ``limit`` plus one read.
    ``already``: bytes of the head read before (see :func:`head_at_once`). Raises ``EOFError``
    if the peer closes first.
    """
    buf = bytearray(already)
    while True:
        split = _split_head(buf, limit)
        if split is not None:
            return split
        buf += await _receive(sock, _RECV_SIZE, "the handshake")


def head_at_once(sock: Conn, limit: int, read: bytes = b"") -> tuple[bytes, bytes] | bytes:
    """One read without waiting (none when ``read`` holds the bytes of one made already, as the
    connection was accepted): ``(head, rest)`` as :func:`read_head` gives them when the whole
    head is there already (a client usually sends its request with its connect), else the bytes
    read so far, for :func:`read_head`'s ``already``. Raises as :func:`read_head` does."""
    first = read
    if not first:
        try:
            first = sock.recv(_RECV_SIZE)
        except BlockingIOError:
            return b""
        if not first:
            raise EOFError("connection closed during the handshake")
    split = _split_head(first, limit)
    return first if split is None else split


def _split_head(buf: bytes | bytearray, limit: int) -> tuple[bytes, bytes] | None:
    """``(head, rest)`` once ``buf`` holds a whole head, None while it may still come."""
    end = buf.find(b"\r\n\r\n")
    if end >= 0:
        if end > limit:
            raise HeadTooLarge
        return bytes(buf[: end + 4]), bytes(buf[end + 4 :])
    if len(buf) >= limit + 4:
        raise HeadTooLarge
    return None


async def read_exactly(sock: Conn, n: int, already: bytes = b"") -> bytes:
    """``n`` bytes of a request body, of which ``already`` arrived with the head. Bytes past
    ``n`` are dropped (a ``/start`` request is answered and closed). Raises ``EOFError``."""
    buf = bytearray(already[:n])
    while len(buf) < n:
        buf += await _receive(sock, min(_RECV_SIZE, n - len(buf)), "the request body")
    return bytes(buf)


async def read_until(
    sock: Conn,
    feed: Callable[[bytes], T | None],
    already: bytes = b"",
) -> T:
    """Give ``already``, then each read from ``sock``, to a Sans-I/O ``feed`` until it returns
    a result (e.g. :meth:`wsgate.providers.OpeningReader.feed`); the feed keeps the bytes.
    Raises ``EOFError`` if the peer closes first, and whatever ``feed`` raises."""
    if already:
        result = feed(already)
        if result is not None:
            return result
    while True:
        result = feed(await _receive(sock, _RECV_SIZE, "the opening"))
        if result is not None:
            return result


async def receive(sock: Conn, during: str) -> bytes:
    """The next bytes from ``sock`` (one read's worth), waiting for them; ``EOFError`` once
    the peer closed."""
    return await _receive(sock, _RECV_SIZE, during)


async def _receive(sock: Conn, size: int, during: str) -> bytes:
    """The next bytes from a non-blocking socket, at most ``size``, waiting for them; raises
    ``EOFError`` naming what was being read if the peer closes."""
    while True:
        try:
            chunk = sock.recv(size)
        except BlockingIOError:
            # TLS: the peer may be waiting for our handshake records before it sends more.
            await _flush(sock)
            await anyio.wait_readable(sock)
            continue
        if not chunk:
            raise EOFError(f"connection closed during {during}")
        return chunk


async def send_and_close(sock: Conn, data: bytes) -> None:
    """Send a refusal (a response or a close frame) and close, without resetting it away."""
    try:
        with anyio.move_on_after(_LINGER):
            await send_all(sock, data)
            sock.shutdown(socket.SHUT_WR)
            await _flush(sock)  # TLS: the close_notify
            # Read until the client closes: closing with unread input would send a RST, which
            # can destroy the answer before the client reads it.
            while True:
                try:
                    if not sock.recv(_RECV_SIZE):
                        break
                except BlockingIOError:
                    await anyio.wait_readable(sock)
    except OSError:
        pass
    finally:
        sock.close()


async def listen(host: str, port: int) -> socket.socket:
    """A non-blocking listening socket bound to ``host:port`` (port 0: any free port)."""
    sock = await bind(host, port)
    try:
        sock.listen(socket.SOMAXCONN)
    except BaseException:
        sock.close()
        raise
    return sock


async def bind(host: str, port: int) -> socket.socket:
    """A non-blocking socket bound to ``host:port`` (port 0: any free port), not listening yet:
    options set before ``listen()`` are inherited by every socket it accepts."""
    infos = await anyio.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock
