"""How sessions end: closes pass through with their code and reason, drops and limits become the
close codes a client and a bot can act on."""

from __future__ import annotations

import socket
import struct

import pytest
from websockets.sync.server import ServerConnection

from .helpers import (
    Bot,
    RawUpstream,
    Reader,
    Seen,
    accept_upgrade,
    close_payload,
    closed_after,
    closed_with,
    connect,
    frame,
    in_thread,
    raw_client,
    raw_socket,
    send_all_past_the_limit,
    serving,
)

pytestmark = pytest.mark.anyio


async def test_a_client_close_reaches_the_bot_with_its_code_and_reason(bot: Bot) -> None:
    async with serving(bot.url) as gw:

        def client() -> tuple[int, str]:
            with connect(f"{gw.url}/ws/generic/bot.test") as ws:
                ws.send("x")
                ws.recv()
                ws.close(4000, "bye now")
                rcvd = ws.protocol.close_rcvd
                assert rcvd is not None
                return rcvd.code, rcvd.reason

        assert await in_thread(client) == (4000, "bye now")  # the bot's echoed reply
        bot.wait_ended()
    assert bot.sessions[0].close == (4000, "bye now")


async def test_a_bot_close_reaches_the_client_with_its_code_and_reason(bot: Bot) -> None:
    def close_after_one(ws: ServerConnection, seen: Seen) -> None:
        ws.recv()
        ws.close(4001, "done here")

    bot.behaviour = close_after_one
    async with serving(bot.url) as gw:
        assert await in_thread(closed_after, f"{gw.url}/ws/generic/bot.test") == (4001, "done here")
        bot.wait_ended()
    assert bot.sessions[0].close == (4001, "done here")  # the client's reply


class _Streams(RawUpstream):
    """A bot that sends a big message (after a ping, if ``ping``) at once, then answers the
    client's close and leaves, as a server does."""

    size = 256 << 10

    def __init__(self, ping: bool) -> None:
        self.ping = ping
        super().__init__()

    def session(self, conn: socket.socket) -> None:
        accept_upgrade(conn)
        first = frame(0x9, b"hb", mask=False) if self.ping else b""
        conn.sendall(first + frame(0x2, b"a" * self.size, mask=False))
        r = Reader(lambda: conn.recv(65536))
        while (f := r.next()) is not None and f[0] != 0x8:
            pass
        conn.sendall(frame(0x8, close_payload(1000), mask=False))
        conn.shutdown(socket.SHUT_WR)


def _read_all(r: Reader) -> tuple[int, int | None]:
    """Payload bytes of the binary frames, and the close code, to the end of the stream."""
    got, code = 0, None
    while (f := r.next()) is not None:
        if f[0] == 0x2:
            got += len(f[1])
        elif f[0] == 0x8:
            code = struct.unpack("!H", f[1][:2])[0]
    return got, code


@pytest.mark.parametrize(
    ("ping", "after"),
    [(True, 0xA), (False, 0xA), (False, 0x9)],
    ids=["owed-pong", "unsolicited-pong", "ping"],
)
async def test_a_client_sending_a_control_frame_after_its_close_still_gets_the_whole_stream(
    ping: bool, after: int
) -> None:
    # After its close a client may still send control frames: the pong it owes for a ping that
    # came before our close (RFC 6455 §5.5.2), a pong of its own (§5.5.3: a heartbeat), a ping.
    # The gateway reads the client to its EOF after the close handshake: bytes left unread in
    # a socket it closes, or arriving at a socket it had closed, would be answered with a
    # reset that throws away what the client has not read yet. (Stop 16 ended the session at
    # the close handshake when no ping had gone to the client; a review showed the other two.)
    bot = _Streams(ping)
    async with serving(bot.url) as gw:

        def client() -> tuple[int, int | None]:
            with raw_socket(gw.port) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)  # a slow reader
                r = Reader(lambda: sock.recv(65536))
                if ping:
                    assert r.next() == (0x9, b"hb")
                sock.sendall(frame(0x8, close_payload(1000)))
                assert bot.done.wait(20)  # the bot answered the close and left
                sock.sendall(frame(after, b"hb"))
                return _read_all(r)

        assert await in_thread(client) == (bot.size, 1000)


async def test_an_echo_client_sending_a_pong_after_its_close_still_gets_its_echo() -> None:
    size = 1 << 20
    async with serving("ws://127.0.0.1:9/unused") as gw:

        def client() -> tuple[int, int | None]:
            with raw_socket(gw.port, "/ws/generic/echo.test") as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)  # a slow reader
                sock.sendall(frame(0x2, b"e" * size) + frame(0x8, close_payload(1000)))
                sock.sendall(frame(0xA, b"hb"))
                return _read_all(Reader(lambda: sock.recv(65536)))

        assert await in_thread(client) == (size, 1000)


async def test_a_client_that_drops_its_tcp_connection_makes_the_bot_get_1001(bot: Bot) -> None:
    async with serving(bot.url) as gw:
        async with raw_client(gw.port):
            pass  # past its 101, the stream is closed without a close frame
        await in_thread(bot.wait_ended)
    assert bot.sessions[0].close == (1001, "client gone")


async def test_a_bot_that_drops_its_tcp_connection_makes_the_client_get_1011(bot: Bot) -> None:
    def drop(ws: ServerConnection, seen: Seen) -> None:
        ws.recv()
        ws.socket.shutdown(socket.SHUT_RDWR)

    bot.behaviour = drop
    async with serving(bot.url) as gw:
        close = await in_thread(closed_after, f"{gw.url}/ws/generic/bot.test")
    assert close == (1011, "bot lost")


async def test_a_client_message_over_the_limit_closes_it_1009_and_the_bot_1001(bot: Bot) -> None:
    async with serving(bot.url, max_message_size=1000) as gw:

        def client() -> tuple[int, str]:
            with connect(f"{gw.url}/ws/generic/bot.test") as ws:
                ws.send(b"k" * 1000)  # at the limit: passes
                assert ws.recv() == b"k" * 1000
                ws.send(b"k" * 1001)
                return closed_with(ws.recv)

        close = await in_thread(client)
        bot.wait_ended()
    assert close == (1009, "message of 1001 bytes over the 1000-byte limit")
    assert bot.sessions[0].close == (1001, "client error")
    assert bot.sessions[0].messages == [b"k" * 1000]


async def test_a_client_still_sending_past_the_limit_reads_its_1009_before_the_end(
    bot: Bot,
) -> None:
    # The bot answers its 1001 long before the client has sent all of a message refused at
    # its header: the gateway reads on (and drops) to the client's EOF, so closing its socket
    # never answers bytes in flight with a reset, which would take the 1009 with it.
    async with serving(bot.url, max_message_size=1000) as gw:

        def client() -> int | None:
            with raw_socket(gw.port) as sock:
                return send_all_past_the_limit(sock)

        assert await in_thread(client) == 1009
        bot.wait_ended()
    assert bot.sessions[0].close == (1001, "client error")


async def test_fragments_adding_up_over_the_limit_count_as_one_message(bot: Bot) -> None:
    async with serving(bot.url, max_message_size=1000) as gw:

        def client() -> tuple[int, str]:
            with connect(f"{gw.url}/ws/generic/bot.test") as ws:

                def send_then_wait() -> None:
                    # The close may come before websockets sends its final empty fragment.
                    ws.send([b"f" * 600, b"f" * 600])
                    ws.recv()

                return closed_with(send_then_wait)

        close = await in_thread(client)
        bot.wait_ended()
    assert close == (1009, "message of 1200 bytes over the 1000-byte limit")
    assert bot.sessions[0].messages == []


async def test_a_bot_message_over_the_limit_closes_it_1009_and_the_client_1001(bot: Bot) -> None:
    def too_big(ws: ServerConnection, seen: Seen) -> None:
        ws.recv()
        ws.send(b"b" * 2000)
        ws.recv()

    bot.behaviour = too_big
    async with serving(bot.url, max_message_size=1000) as gw:
        close = await in_thread(closed_after, f"{gw.url}/ws/generic/bot.test", "go")
        bot.wait_ended()
    assert close == (1001, "bot error")
    assert bot.sessions[0].close == (1009, "message of 2000 bytes over the 1000-byte limit")


async def test_one_sessions_close_does_not_disturb_another(bot: Bot) -> None:
    async with serving(bot.url, max_message_size=1000) as gw:

        def client() -> None:
            with connect(f"{gw.url}/ws/generic/bot.test") as calm:
                with connect(f"{gw.url}/ws/generic/bot.test") as rude:
                    rude.send(b"x" * 5000)
                    assert closed_with(rude.recv) == (
                        1009,
                        "message of 5000 bytes over the 1000-byte limit",
                    )
                calm.send("still here")
                assert calm.recv() == "still here"

        await in_thread(client)
