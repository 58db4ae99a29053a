"""Protocol conformance on both hops, frame by frame, as raw bytes over real sockets (in the
spirit of the Autobahn testsuite's framing, fragmentation, reserved-bit, opcode and close
categories): the violator gets 1002 (1009 for size), the other side 1001, and valid traffic of
every kind passes unchanged."""

from __future__ import annotations

import socket
import struct

import anyio
import pytest

from .helpers import (
    Bot,
    RawUpstream,
    Reader,
    Sentinel,
    accept_upgrade,
    close_payload,
    frame,
    raw_client,
    serving,
    upgrade_request,
)

pytestmark = pytest.mark.anyio

MAX = 1 << 20


class RawBot(RawUpstream):
    """An upstream bot on a raw socket: answers the upgrade, sends `script`, then records
    every frame the gateway sends it until EOF."""

    def __init__(self, script: bytes = b"") -> None:
        self.script = script
        self.frames: list[tuple[int, bytes]] = []
        super().__init__()

    def session(self, conn: socket.socket) -> None:
        conn.settimeout(30)
        accept_upgrade(conn, then=self.script)
        reader = Reader(lambda: conn.recv(65536))
        while (f := reader.next()) is not None:
            self.frames.append(f)
            if f[0] == 8:
                conn.sendall(frame(8, f[1][:2], mask=False))  # the close reply
                break

    def close_code(self) -> int | None:
        assert self.done.wait(30)
        closes = [p for op, p in self.frames if op == 8]
        return struct.unpack("!H", closes[0][:2])[0] if closes else None


CLIENT_VIOLATIONS = [
    pytest.param(frame(1, b"hi", mask=False), 1002, id="unmasked client frame"),
    pytest.param(frame(1, b"hi", rsv=4), 1002, id="rsv1 set"),
    pytest.param(frame(2, b"hi", rsv=1), 1002, id="rsv3 set"),
    pytest.param(frame(3, b"hi"), 1002, id="opcode 3"),
    pytest.param(frame(0xB, b"hi"), 1002, id="opcode 0xB"),
    pytest.param(frame(9, b"p" * 126), 1002, id="ping over 125 bytes"),
    pytest.param(frame(9, b"p", fin=False), 1002, id="fragmented ping"),
    pytest.param(frame(0, b"orphan"), 1002, id="continuation without a start"),
    pytest.param(frame(1, b"a", fin=False) + frame(1, b"b"), 1002, id="new message mid-fragment"),
    pytest.param(frame(2, length=1 << 63), 1002, id="64-bit length with the top bit"),
    pytest.param(frame(2, length=MAX + 1), 1009, id="declared length over the limit"),
    pytest.param(frame(2, length=1 << 62), 1009, id="declared length of 4 EiB"),
    pytest.param(frame(8, b"\x03"), 1002, id="close with 1 byte"),
    pytest.param(frame(8, close_payload(1005)), 1002, id="close code 1005"),
    pytest.param(frame(8, close_payload(1006)), 1002, id="close code 1006"),
    pytest.param(frame(8, close_payload(1015)), 1002, id="close code 1015"),
    pytest.param(frame(8, close_payload(999)), 1002, id="close code 999"),
    pytest.param(frame(8, close_payload(1000, b"\xff\xfe")), 1002, id="close reason not utf-8"),
]


@pytest.mark.parametrize(("violation", "code"), CLIENT_VIOLATIONS)
async def test_a_client_violation_closes_the_client_with_its_code_and_the_bot_1001(
    violation: bytes, code: int
) -> None:
    bot = RawBot()
    async with serving(bot.url) as gw:
        async with raw_client(gw.port) as s:
            await s.send(frame(1, b"before") + violation + frame(1, b"after"))
            assert await s.close_code() == code
        assert await anyio.to_thread.run_sync(bot.close_code) == 1001
    # What came before the violation was relayed; nothing after it.
    assert bot.frames[0] == (1, b"before")
    assert (1, b"after") not in bot.frames


BOT_VIOLATIONS = [
    pytest.param(frame(1, b"hi", mask=True), 1002, id="masked bot frame"),
    pytest.param(frame(1, b"hi", mask=False, rsv=2), 1002, id="rsv2 set"),
    pytest.param(frame(7, b"", mask=False), 1002, id="opcode 7"),
    pytest.param(frame(10, b"p" * 126, mask=False), 1002, id="pong over 125 bytes"),
    pytest.param(frame(0, b"x", mask=False), 1002, id="continuation without a start"),
    pytest.param(frame(2, length=MAX + 1, mask=False), 1009, id="declared length over the limit"),
    pytest.param(frame(8, b"\x03", mask=False), 1002, id="close with 1 byte"),
]


@pytest.mark.parametrize(("violation", "code"), BOT_VIOLATIONS)
async def test_a_bot_violation_closes_the_bot_with_its_code_and_the_client_1001(
    violation: bytes, code: int
) -> None:
    bot = RawBot(script=frame(1, b"hello", mask=False) + violation)
    async with serving(bot.url) as gw:
        async with raw_client(gw.port) as s:
            assert await s.close_code() == 1001
        assert await anyio.to_thread.run_sync(bot.close_code) == code


async def test_valid_traffic_of_every_kind_passes_unchanged() -> None:
    messages = [
        frame(1, b"plain text"),
        frame(2, bytes(range(256))),
        frame(1, b"fr", fin=False) + frame(9, b"ping mid-message") + frame(0, b"ag"),
        frame(2, b"", fin=False) + frame(0, b"", fin=False) + frame(0, b"z"),
        frame(1, b"\xff\xfe not utf-8"),  # the relay does not judge text: the bot's business
        frame(10, b"unsolicited pong"),
        frame(2, b"m" * 70000),
    ]
    bot = RawBot()
    async with serving(bot.url) as gw:
        async with raw_client(gw.port) as s:
            await s.send(b"".join(messages) + frame(8, close_payload(4321, "ciao ✓".encode())))
            assert await s.close_code() == 4321
        assert await anyio.to_thread.run_sync(bot.close_code) == 4321
    assert bot.frames == [
        (1, b"plain text"),
        (2, bytes(range(256))),
        (1, b"fr"),
        (9, b"ping mid-message"),
        (0, b"ag"),
        (2, b""),
        (0, b""),
        (0, b"z"),
        (1, b"\xff\xfe not utf-8"),
        (10, b"unsolicited pong"),
        (2, b"m" * 70000),
        (8, close_payload(4321, "ciao ✓".encode())),
    ]


async def test_a_first_frame_sent_with_the_upgrade_request_is_relayed(bot: Bot) -> None:
    async with serving(bot.url) as gw:
        async with await anyio.connect_tcp("127.0.0.1", gw.port) as s:
            await s.send(upgrade_request("/ws/generic/bot.test") + frame(1, b"eager"))
            reader_buf = b""
            with anyio.fail_after(10):
                while b"eager" not in reader_buf:
                    reader_buf += await s.receive()
            assert reader_buf.startswith(b"HTTP/1.1 101")
            await s.send(frame(8, close_payload(1000)))
    assert bot.sessions[0].messages == ["eager"]


async def test_a_violation_in_one_session_leaves_another_untouched(sentinel: Sentinel) -> None:
    async with serving(sentinel.url) as gw:
        path = "/ws/generic/echo.test"
        async with raw_client(gw.port, path) as calm, raw_client(gw.port, path) as bad:
            await bad.send(frame(3, b"bad"))
            assert await bad.close_code() == 1002
            await calm.send(frame(2, b"ok"))
            got = b""
            with anyio.fail_after(10):
                while len(got) < 4:
                    got += await calm.receive()
            assert got == b"\x82\x02ok"
    assert not sentinel.dialled()
