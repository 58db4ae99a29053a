"""A client frame whose header arrives split across reads, while the bot is talking.

The pump keeps a partial header in its ``carry`` buffer while it waits for the rest. The session
``select!``s over both directions, so that wait is dropped whenever the bot speaks first; the
carried bytes must survive it (they once did not: the client got 1002 for a correct frame).
"""

from __future__ import annotations

import os
import socket

import pytest

from .conftest import Bot, in_thread, serving, upgrade_request

pytestmark = pytest.mark.anyio

WAIT = 20.0


def masked_text(text: str) -> bytes:
    payload = text.encode()
    key = os.urandom(4)
    body = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return bytes([0x81, 0x80 | len(payload)]) + key + body


def read_frame(sock: socket.socket) -> tuple[int, bytes]:
    """One unmasked server frame of up to 125 bytes: (first byte, payload)."""
    head = sock.recv(2, socket.MSG_WAITALL)
    return head[0], sock.recv(head[1] & 0x7F, socket.MSG_WAITALL)


@pytest.mark.parametrize("split", [1, 2, 5], ids=lambda n: f"{n} bytes first")
async def test_a_header_split_across_reads_survives_the_bot_speaking_meanwhile(
    bot: Bot, split: int
) -> None:
    async with serving(bot.url) as gw:

        def client() -> list[tuple[int, bytes]]:
            with socket.create_connection(("127.0.0.1", gw.port), timeout=WAIT) as sock:
                sock.sendall(upgrade_request("/ws/generic/bot.test"))
                head = b""
                while not head.endswith(b"\r\n\r\n"):
                    head += sock.recv(1)
                assert head.startswith(b"HTTP/1.1 101")
                second = masked_text("second")
                # A whole frame, then the start of the next one's header: the bot's echo of the
                # first comes back while the gateway holds those bytes.
                sock.sendall(masked_text("first") + second[:split])
                replies = [read_frame(sock)]
                sock.sendall(second[split:])
                replies.append(read_frame(sock))
                return replies

        replies = await in_thread(client)
    assert replies == [(0x81, b"first"), (0x81, b"second")]
