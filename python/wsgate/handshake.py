"""The bytes of both WebSocket handshakes (RFC 6455 §4), without I/O.

The gateway is the server of the client's handshake and the client of the bot's. Neither hop
negotiates an extension: with no permessage-deflate, frames can be relayed without rewriting
their payloads, so no ``Sec-WebSocket-Extensions`` is ever sent, and a bot that answers with one
is refused.
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Sequence

from .errors import BotHandshakeError, HttpError
from .request import parse_header_lines, split_list
from .responses import plain_response
from .urls import UpstreamURL

__all__ = [
    "BotHandshakeError",
    "accept_key",
    "check_upstream_response",
    "new_key",
    "plain_response",
    "switching_protocols",
    "upstream_request",
]

# RFC 6455 §1.3: the GUID appended to Sec-WebSocket-Key before hashing.
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def accept_key(key: str) -> str:
    """The ``Sec-WebSocket-Accept`` value that answers ``Sec-WebSocket-Key: key``."""
    return base64.b64encode(hashlib.sha1(key.encode("ascii") + _GUID).digest()).decode("ascii")


def new_key() -> str:
    """A fresh random ``Sec-WebSocket-Key`` (16 random bytes, base64)."""
    return base64.b64encode(os.urandom(16)).decode("ascii")


def switching_protocols(
    client_key: str, subprotocol: str | None, session_uuid: str | None = None
) -> bytes:
    """The 101 response that opens the client's WebSocket, with the bot's subprotocol if any,
    and ``X-Session-Id`` (the id the bot receives as ``X-Daily-Session-Id``) when given."""
    lines = [
        "HTTP/1.1 101 Switching Protocols",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Accept: {accept_key(client_key)}",
    ]
    if subprotocol is not None:
        lines.append(f"Sec-WebSocket-Protocol: {subprotocol}")
    if session_uuid is not None:
        lines.append(f"X-Session-Id: {session_uuid}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


def close_frame(code: int, reason: str) -> bytes:
    """A server's close frame (unmasked, RFC 6455 §5.5.1) with ``code`` and ``reason``, the
    reason cut to the 123 bytes a control frame leaves it (at a character boundary)."""
    data = reason.encode()[:123].decode("utf-8", "ignore").encode()
    payload = code.to_bytes(2, "big") + data
    return bytes([0x88, len(payload)]) + payload


def upstream_request(
    target: UpstreamURL,
    *,
    key: str,
    session_uuid: str,
    body_value: str | None,
    subprotocols: Sequence[str],
) -> bytes:
    """The upgrade request sent to the bot (SPEC §6).

    ``body_value`` is the already percent-encoded standard base64 that ``_core.decode_body``
    returned; it is appended to any query the upstream URL already has.
    """
    resource = target.resource
    if body_value is not None:
        resource += ("&" if "?" in resource else "?") + "body=" + body_value
    lines = [
        f"GET {resource} HTTP/1.1",
        f"Host: {target.host_header}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
        f"X-Daily-Session-Id: {session_uuid}",
    ]
    if subprotocols:
        lines.append(f"Sec-WebSocket-Protocol: {', '.join(subprotocols)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


def check_upstream_response(head: bytes, key: str, offered: Sequence[str]) -> str | None:
    """Check the bot's response head to our upgrade; returns the subprotocol it chose, if any.

    Raises :class:`BotHandshakeError` with a short reason (it becomes part of the client's 502).
    """
    if head.endswith(b"\r\n\r\n"):
        head = head[:-4]
    status_line, *field_lines = head.split(b"\r\n")
    version, _, rest = status_line.partition(b" ")
    code = rest[:3]
    if version != b"HTTP/1.1" or not code.isdigit() or rest[3:4] not in (b"", b" "):
        raise BotHandshakeError("malformed response")
    if code != b"101":
        raise BotHandshakeError(f"bot answered {int(code)} instead of 101")
    try:
        fields = parse_header_lines(field_lines)
    except HttpError:
        raise BotHandshakeError("malformed response headers") from None

    def values(name: str) -> list[str]:
        return [value for field, value in fields if field == name]

    upgrade = [v.lower() for v in split_list(values("upgrade"))]
    connection = [v.lower() for v in split_list(values("connection"))]
    if upgrade != ["websocket"] or "upgrade" not in connection:
        raise BotHandshakeError("not a WebSocket upgrade")
    if values("sec-websocket-accept") != [accept_key(key)]:
        raise BotHandshakeError("wrong Sec-WebSocket-Accept")
    if split_list(values("sec-websocket-extensions")):
        raise BotHandshakeError("bot negotiated an extension that was not offered")
    chosen = split_list(values("sec-websocket-protocol"))
    if not chosen:
        return None
    if len(chosen) != 1 or chosen[0] not in offered:
        raise BotHandshakeError("bot chose a subprotocol that was not offered")
    return chosen[0]
