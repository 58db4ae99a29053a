"""A slow reader makes the gateway stop reading the other side: a bot flooding a client that does
not read is held back by TCP, and the gateway's memory stays bounded."""

from __future__ import annotations

import select
import socket
import threading
from pathlib import Path

import pytest
from websockets.exceptions import ConnectionClosedOK

from .helpers import RawUpstream, accept_upgrade, close_payload, connect, frame, in_thread, serving

pytestmark = pytest.mark.anyio

FRAME_PAYLOAD = 60_000
FLOOD_LIMIT = 200 * 1024 * 1024  # what the bot tries to push: far over any socket buffers
# Kernel buffers on two loopback hops (send and receive, autotuned up to ~4-6 MiB each) plus the
# gateway's own read buffer: well under this.
PUSHED_BUDGET = 48 * 1024 * 1024
RSS_BUDGET = 32 * 1024 * 1024


def rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def payload(i: int) -> bytes:
    return bytes([i % 256]) * FRAME_PAYLOAD


class FloodingBot(RawUpstream):
    """A raw upstream bot that writes binary frames as fast as TCP lets it, and notes when TCP
    stops letting it (nothing writable for `stall` seconds)."""

    def __init__(self, stall: float = 1.0) -> None:
        self.stall = stall
        self.pushed = 0
        self.frames = 0
        self.stalled = threading.Event()
        self.resume = threading.Event()
        super().__init__()

    def session(self, conn: socket.socket) -> None:
        accept_upgrade(conn)
        conn.setblocking(False)
        rest = b""
        while self.pushed < FLOOD_LIMIT:
            if not rest:
                rest = frame(2, payload(self.frames), mask=False)
                self.frames += 1
            _, writable, _ = select.select([], [conn], [], self.stall)
            if not writable:
                self.stalled.set()
                break
            n = conn.send(rest)
            self.pushed += n
            rest = rest[n:]
        self.stalled.set()
        self.resume.wait(60)
        conn.setblocking(True)
        conn.sendall(rest + frame(8, close_payload(1000), mask=False))  # finish, close
        while conn.recv(4096):
            pass


@pytest.mark.slow
async def test_a_client_that_does_not_read_holds_a_flooding_bot_back(
    anyio_backend: str,
) -> None:
    bot = FloodingBot()
    async with serving(bot.url) as gw:
        before = rss()

        def client() -> tuple[int, int, list[int]]:
            # max_queue=1: the client library stops reading its socket too, like a slow phone.
            with connect(f"{gw.url}/ws/generic/bot.test", max_queue=1) as ws:
                assert bot.stalled.wait(120), "the bot was never held back"
                grown = rss() - before
                bot.resume.set()
                bad = []
                i = 0
                try:
                    while True:
                        if ws.recv() != payload(i):
                            bad.append(i)
                        i += 1
                except ConnectionClosedOK:
                    pass
                return grown, i, bad

        grown, received, bad = await in_thread(client)
    print(f"pushed {bot.pushed} bytes before the bot was held back; RSS grew {grown} bytes")
    assert bot.pushed < PUSHED_BUDGET, f"{bot.pushed} bytes went in while nobody read"
    assert grown < RSS_BUDGET, f"memory grew by {grown} bytes"
    assert received == bot.frames
    assert bad == []
