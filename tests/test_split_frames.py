"""A client frame whose header arrives split across reads, while the bot is talking.

The pump keeps a partial header in its ``carry`` buffer while it waits for the rest. The session
``select!``s over both directions, so that wait is dropped whenever the bot speaks first; the
carried bytes must survive it (they once did not: the client got 1002 for a correct frame).
"""

from __future__ import annotations

import pytest

from .helpers import Bot, Reader, frame, in_thread, raw_socket, serving

pytestmark = pytest.mark.anyio

WAIT = 20.0


@pytest.mark.parametrize("split", [1, 2, 5], ids=lambda n: f"{n} bytes first")
async def test_a_header_split_across_reads_survives_the_bot_speaking_meanwhile(
    bot: Bot, split: int
) -> None:
    async with serving(bot.url) as gw:

        def client() -> list[tuple[int, bytes] | None]:
            with raw_socket(gw.port, timeout=WAIT) as sock:
                replies = Reader(lambda: sock.recv(65536))
                second = frame(1, b"second")
                # A whole frame, then the start of the next one's header: the bot's echo of the
                # first comes back while the gateway holds those bytes.
                sock.sendall(frame(1, b"first") + second[:split])
                first_reply = replies.frame()
                sock.sendall(second[split:])
                return [first_reply, replies.frame()]

        replies = await in_thread(client)
    assert replies == [(0x81, b"first"), (0x81, b"second")]  # FIN and text: whole messages
