"""The dial of an upstream bot: TCP connect, its WebSocket upgrade, every failure as one
``HttpError``: 504 when the bot did not answer in time, 502 for anything else.

The bot's socket stays raw and non-blocking (see :mod:`wsgate._sockets`): it is handed to the Rust
engine by file descriptor once the client's upgrade is answered.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field

import anyio

from . import _core
from ._sockets import HeadTooLarge, read_head, send_all
from .errors import HttpError
from .handshake import BotHandshakeError, check_upstream_response, new_key
from .handshake import upstream_request as build_upstream_request
from .urls import UpstreamURL

__all__ = ["BotConnection", "dial"]


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

    Every failure becomes ``HttpError(502, "bot unreachable: <reason>")`` (refused, no route, a
    bad answer), or ``HttpError(504, "bot unreachable: timed out")`` when ``timeout`` ran out,
    with the bot's socket closed: this is the one place that translates dial errors.
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
        raise HttpError(504, "bot unreachable: timed out") from None
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
