"""Sessions the Rust engine opens by itself (``engine_opens``, :mod:`wsgate.fastpath`): for a
plain agent a client sees the same gateway with the setting on or off — the same 101, the same
request at the bot, its first frames relayed, one count of ``max_sessions`` shared with the
Python path, and every failure of the bot's dial answered in the same words."""

from __future__ import annotations

import errno
import logging
import socket
import ssl
import threading
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import cast

import anyio
import pytest

from wsgate import AgentConfig, Config, Gateway, GatewaySettings, OrgConfig, _core
from wsgate.admission import EVICT_AFTER
from wsgate.connection import Connections
from wsgate.engine import Relay
from wsgate.listener import Listener

from .helpers import (
    TOKEN_SECRET,
    Bot,
    RawUpstream,
    Sentinel,
    accept_upgrade,
    engine_opens,
    frame,
    header,
    in_thread,
    make_config,
    start_json,
    tls_files,
    token_gateway,
    until,
    upgrade_over_tls,
    upgrade_request,
)

pytestmark = pytest.mark.anyio


def sent_whole(port: int, request: bytes, timeout: float = 20) -> tuple[socket.socket, bytes]:
    """A client that sends ``request`` in one write as soon as it is connected, as a telephony
    provider does: the socket, and the answer's head (read a byte at a time)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.sendall(request)
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        chunk = sock.recv(1)
        if not chunk:
            break
        head += chunk
    return sock, head


class Answering(RawUpstream):
    """A bot that answers the upgrade, records the request, then sends ``then`` and echoes the
    first frame it gets."""

    def __init__(self) -> None:
        self.request = b""
        self.first = b""
        super().__init__()

    def session(self, conn: socket.socket) -> None:
        self.request = accept_upgrade(conn, then=frame(0x1, b"from the bot", mask=False))
        conn.settimeout(20)
        self.first = conn.recv(4096)


@engine_opens
async def test_a_request_sent_with_its_connect_is_relayed_the_same(engine_opens: bool) -> None:
    bot = Answering()
    async with Gateway(make_config(bot.url, engine_opens=engine_opens)).running() as gw:
        # The request and the client's first frame in one write.
        first = frame(0x2, b"\x00\x01 first")
        request = upgrade_request("/ws/generic/bot.test?body=eyJhIjoxfQ%3D%3D") + first
        sock, head = await in_thread(sent_whole, gw.port, request)
        with sock:
            assert head.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
            assert header(head, "Sec-WebSocket-Accept") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
            await in_thread(bot.done.wait, 20)
            bot_head = bot.request.decode()
            assert bot_head.startswith("GET /ws?body=eyJhIjoxfQ%3D%3D HTTP/1.1\r\n")
            assert header(bot.request, "X-Daily-Session-Id") == header(head, "X-Session-Id")
            # The frame behind the request reached the bot (masked again, by the gateway).
            assert bot.first[0] == 0x82 and len(bot.first) == len(first)
            expected = frame(0x1, b"from the bot", mask=False)
            assert await in_thread(sock.recv, len(expected), socket.MSG_WAITALL) == expected
        await until(lambda: _zero(gw), within=10, what="the session's place given back")


async def _zero(gw: Gateway) -> bool:
    return await _none_of(gw, "bot.test")


@engine_opens
async def test_max_sessions_is_one_count_for_both_paths(bot: Bot, engine_opens: bool) -> None:
    config = make_config(bot.url, engine_opens=engine_opens, max_sessions=1)
    async with Gateway(config).running() as gw:
        first, head = await in_thread(sent_whole, gw.port, upgrade_request("/ws/generic/bot.test"))
        with first:
            assert head.startswith(b"HTTP/1.1 101")
            assert gw.sessions("bot.test") == 1
            second, refused = await in_thread(
                sent_whole, gw.port, upgrade_request("/ws/generic/bot.test")
            )
            second.close()
            assert refused.startswith(b"HTTP/1.1 503 ")
        await until(lambda: _zero(gw), within=10, what="the first session's end")
        third, head = await in_thread(sent_whole, gw.port, upgrade_request("/ws/generic/bot.test"))
        third.close()
        assert head.startswith(b"HTTP/1.1 101")


class NotABot(RawUpstream):
    """Answers the upgrade with a 404."""

    def session(self, conn: socket.socket) -> None:
        accepted = b""
        while b"\r\n\r\n" not in accepted:
            accepted += conn.recv(4096)
        conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")


@pytest.fixture
def refused_url() -> Iterator[str]:
    """A bot URL whose port refuses connections."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    yield f"ws://127.0.0.1:{port}/ws"


@engine_opens
async def test_a_failed_dial_is_answered_in_the_same_words(
    engine_opens: bool, refused_url: str, sentinel: Sentinel
) -> None:
    wrong = NotABot()
    cfg = Config(
        gateway=GatewaySettings(port=0, dial_timeout=0.3, engine_opens=engine_opens),
        orgs=[OrgConfig("test")],
        agents=[
            AgentConfig("dead", "test", upstream=refused_url),
            AgentConfig("mute", "test", upstream=sentinel.url),
            AgentConfig("wrong", "test", upstream=wrong.url),
        ],
    )
    expected = {
        "dead": (502, "bot unreachable: connection refused"),
        "mute": (504, "bot unreachable: timed out"),
        "wrong": (502, "bot unreachable: bot answered 404 instead of 101"),
    }
    async with Gateway(cfg).running() as gw:
        for agent, (status, reason) in expected.items():
            request = upgrade_request(f"/ws/generic/{agent}.test")
            sock, head = await in_thread(sent_whole, gw.port, request)
            with sock:
                body = await in_thread(sock.recv, 4096)
            assert head.startswith(f"HTTP/1.1 {status} ".encode()), (agent, head)
            assert body.decode().strip() == reason
            assert gw.sessions(f"{agent}.test") == 0


async def test_the_gateway_says_which_agents_the_engine_opens(
    bot: Bot, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = Config(
        gateway=GatewaySettings(port=0, secrets=["s" * 32]),
        orgs=[OrgConfig("test")],
        agents=[
            AgentConfig("plain", "test", upstream=bot.url),
            AgentConfig("named", "test", upstream=bot.url.replace("127.0.0.1", "localhost")),
            AgentConfig("talk", "test", upstream=bot.url, websocket_auth="token"),
            AgentConfig("echo", "test", builtin="echo"),
        ],
    )
    with caplog.at_level(logging.INFO, logger="wsgate"):
        async with Gateway(cfg).running():
            pass
        off = Config(
            gateway=GatewaySettings(port=0, engine_opens=False),
            orgs=cfg.orgs,
            agents=cfg.agents[:1],
        )
        async with Gateway(off).running():
            pass
    lines = [r.getMessage() for r in caplog.records if "engine opens" in r.getMessage()]
    assert lines == ["the engine opens the sessions of plain.test, talk.test by itself"]


async def test_many_sessions_at_once_each_get_their_own_bot_session(bot: Bot) -> None:
    # Opened on the relay threads while others are being opened: each client's 101 names the
    # id its bot session was given, and every one relays.
    async with Gateway(make_config(bot.url)).running() as gw:
        ids: list[tuple[str | None, bytes]] = []
        lock = threading.Lock()

        def one(i: int) -> None:
            sock, head = sent_whole(gw.port, upgrade_request("/ws/generic/bot.test"))
            with sock:
                sock.sendall(frame(0x1, f"n{i}".encode()))
                echo = sock.recv(64)
            with lock:
                ids.append((header(head, "X-Session-Id"), echo))

        async with anyio.create_task_group() as tg:
            for i in range(50):
                tg.start_soon(in_thread, one, i)
    sent = {header for header, _ in ids}
    assert len(sent) == 50 and None not in sent
    assert sorted(echo for _, echo in ids) == sorted(frame(0x1, f"n{i}".encode(), mask=False)
                                                     for i in range(50))  # fmt: skip
    assert {s.headers.get("X-Daily-Session-Id") for s in bot.sessions} == sent


async def _token(gw: Gateway, agent: str = "talk") -> tuple[str, str]:
    """A token minted by the gateway's /start for ``agent``.test, and its session id."""
    status, answer = await start_json(gw, agent, "pk_test")
    assert status == 200, answer
    return answer["token"], answer["sessionId"]


@engine_opens
async def test_a_token_opens_one_session_named_by_start(bot: Bot, engine_opens: bool) -> None:
    async with token_gateway(bot.url, engine_opens=engine_opens) as gw:
        token, session_id = await _token(gw)
        request = upgrade_request(f"/ws/generic/talk.test?token={token}")
        sock, head = await in_thread(sent_whole, gw.port, request)
        sock.close()
        assert head.startswith(b"HTTP/1.1 101 ")
        assert header(head, "X-Session-Id") == session_id
        await in_thread(bot.wait_ended)
        assert bot.sessions[0].headers["X-Daily-Session-Id"] == session_id
        # Used up, whichever path opened it.
        sock, head = await in_thread(sent_whole, gw.port, request)
        with sock:
            body = await in_thread(sock.recv, 4096)
        assert head.startswith(b"HTTP/1.1 403 ") and body.strip() == b"token already used"


@engine_opens
async def test_a_token_whose_session_did_not_open_may_be_used_again(
    engine_opens: bool, refused_url: str
) -> None:
    async with token_gateway(refused_url, engine_opens=engine_opens) as gw:
        token, _ = await _token(gw)
        for _ in range(2):  # 502 both times: the failed dial gave the token back
            sock, head = await in_thread(
                sent_whole,
                gw.port,
                upgrade_request("/ws/generic/talk.test", f"Authorization: Bearer {token}"),
            )
            sock.close()
            assert head.startswith(b"HTTP/1.1 502 "), head


@engine_opens
async def test_a_token_refused_for_capacity_is_not_used_up(bot: Bot, engine_opens: bool) -> None:
    cfg = Config(
        gateway=GatewaySettings(port=0, secrets=[TOKEN_SECRET], engine_opens=engine_opens),
        orgs=[OrgConfig("test", public_keys=["pk_test"])],
        agents=[
            AgentConfig("talk", "test", websocket_auth="token", upstream=bot.url, max_sessions=1)
        ],
    )
    async with Gateway(cfg).running() as gw:
        first, _ = await _token(gw)
        second, _ = await _token(gw)
        held, head = await in_thread(
            sent_whole, gw.port, upgrade_request(f"/ws/generic/talk.test/{first}")
        )
        with held:
            assert head.startswith(b"HTTP/1.1 101 ")
            sock, refused = await in_thread(
                sent_whole, gw.port, upgrade_request(f"/ws/generic/talk.test/{second}")
            )
            sock.close()
            assert refused.startswith(b"HTTP/1.1 503 ")
        await until(lambda: _none_of(gw, "talk.test"), within=10, what="the first session's end")
        sock, head = await in_thread(
            sent_whole, gw.port, upgrade_request(f"/ws/generic/talk.test/{second}")
        )
        sock.close()
        assert head.startswith(b"HTTP/1.1 101 ")


async def _none_of(gw: Gateway, agent: str) -> bool:
    return gw.sessions(agent) == 0


@engine_opens
async def test_a_sessions_length_counts_from_its_opening(
    bot: Bot, engine_opens: bool, caplog: pytest.LogCaptureFixture
) -> None:
    # The engine tells of an opened session without a wake-up of its own (maybe only with its
    # end): its length still counts from its 101, in the log line and the list alike.
    with caplog.at_level(logging.INFO, logger="wsgate"):
        async with Gateway(make_config(bot.url, engine_opens=engine_opens)).running() as gw:
            sock, head = await in_thread(
                sent_whole, gw.port, upgrade_request("/ws/generic/bot.test")
            )
            with sock:
                assert head.startswith(b"HTTP/1.1 101 ")
                await anyio.sleep(0.4)  # the session's length under test, not a wait for an event
                assert gw._sessions is not None
                (listed,) = gw._sessions.listed("bot.test")
                assert listed["seconds"] >= 0.4
            await until(lambda: _zero(gw), within=10, what="the session's end")
    (ended,) = [r for r in caplog.records if getattr(r, "event", None) == "session_end"]
    assert ended.fields["duration"] >= 0.4  # type: ignore[attr-defined]


@engine_opens
async def test_an_empty_line_before_the_request_is_refused_either_way(
    bot: Bot, engine_opens: bool
) -> None:
    async with Gateway(make_config(bot.url, engine_opens=engine_opens)).running() as gw:
        request = b"\r\n" + upgrade_request("/ws/generic/bot.test")
        sock, head = await in_thread(sent_whole, gw.port, request)
        sock.close()
        assert head.startswith(b"HTTP/1.1 400 ")
        assert bot.sessions == []


async def _pending(gw: Gateway, n: int) -> bool:
    return gw.pending_upgrades == n


async def _evicted(gw: Gateway, n: int) -> bool:
    return gw.evicted_upgrades == n


@engine_opens
async def test_a_request_sent_after_the_connect_in_pieces_is_relayed_the_same(
    engine_opens: bool,
) -> None:
    # Over a real network the request arrives a round trip after the connect: with the engine
    # opening, a relay thread reads it as it comes (reading.rs) and opens the session there.
    bot = Answering()
    async with Gateway(make_config(bot.url, engine_opens=engine_opens)).running() as gw:
        sock = await in_thread(socket.create_connection, ("127.0.0.1", gw.port), 20)
        with sock:
            await until(lambda: _pending(gw, 1), within=10, what="the connection pending")
            request = upgrade_request("/ws/generic/bot.test")
            for piece in (request[:25], request[25:]):
                await in_thread(sock.sendall, piece)
            head = b""
            while not head.endswith(b"\r\n\r\n"):
                head += await in_thread(sock.recv, 1)
            assert head.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
            assert gw.pending_upgrades == 0
            expected = frame(0x1, b"from the bot", mask=False)
            assert await in_thread(sock.recv, len(expected), socket.MSG_WAITALL) == expected
            first = frame(0x2, b"from the client")
            await in_thread(sock.sendall, first)
            await in_thread(bot.done.wait, 20)
            assert header(bot.request, "X-Daily-Session-Id") == header(head, "X-Session-Id")
            assert bot.first[0] == 0x82 and len(bot.first) == len(first)


@engine_opens
async def test_a_request_not_all_sent_within_the_handshake_timeout_is_dropped(
    engine_opens: bool, sentinel: Sentinel
) -> None:
    config = make_config(sentinel.url, engine_opens=engine_opens, handshake_timeout=0.5)
    async with Gateway(config).running() as gw:
        sock = await in_thread(socket.create_connection, ("127.0.0.1", gw.port), 20)
        with sock:
            await in_thread(sock.sendall, b"GET /ws/generic/bot.test HTTP/1.1\r\n")
            await until(lambda: _pending(gw, 1), within=10, what="the connection pending")
            # Closed without an answer, once the timeout (counted from the accept) is over.
            assert await in_thread(sock.recv, 4096) == b""
        await until(lambda: _pending(gw, 0), within=10, what="no connection pending")
    assert not sentinel.dialled()


@engine_opens
async def test_past_max_pending_upgrades_the_oldest_connection_is_evicted(
    engine_opens: bool, sentinel: Sentinel
) -> None:
    config = make_config(sentinel.url, engine_opens=engine_opens, max_pending_upgrades=2)
    async with Gateway(config).running() as gw:
        socks = []
        try:
            for n in (1, 2):
                socks.append(await in_thread(socket.create_connection, ("127.0.0.1", gw.port)))
                await until(lambda n=n: _pending(gw, n), within=10, what=f"{n} pending")
            await anyio.sleep(EVICT_AFTER)  # what is under test: the oldest had its second
            socks.append(await in_thread(socket.create_connection, ("127.0.0.1", gw.port)))
            # The oldest is closed unanswered; the two others wait on.
            socks[0].settimeout(20)
            assert await in_thread(socks[0].recv, 4096) == b""
            await until(lambda: _pending(gw, 2), within=10, what="two pending")
            await until(lambda: _evicted(gw, 1), within=10, what="the eviction counted")
        finally:
            for s in socks:
                s.close()
    assert not sentinel.dialled()


@engine_opens
@pytest.mark.parametrize("max_connections", [10_000, 15])
async def test_a_burst_past_max_pending_upgrades_is_not_evicted_while_its_requests_come(
    bot: Bot, engine_opens: bool, max_connections: int
) -> None:
    # Clients connecting at once (a reconnection storm): each is accepted before its request
    # is read, so many more wait than max_pending_upgrades, past twice as many. None has had a
    # second to send its request and nobody waits for room (the burst fits max_connections,
    # however exactly): none is evicted, and every one opens.
    config = make_config(
        bot.url, engine_opens=engine_opens, max_pending_upgrades=5, max_connections=max_connections
    )
    async with Gateway(config).running() as gw:
        socks = []
        try:
            for _ in range(15):
                socks.append(await in_thread(socket.create_connection, ("127.0.0.1", gw.port)))
            await until(lambda: _pending(gw, 15), within=10, what="all 15 pending")
            for sock in socks:
                await in_thread(sock.sendall, upgrade_request("/ws/generic/bot.test"))
            for sock in socks:
                sock.settimeout(20)
                head = b""
                while not head.endswith(b"\r\n\r\n"):
                    head += await in_thread(sock.recv, 1)
                assert head.startswith(b"HTTP/1.1 101 "), head
            assert gw.evicted_upgrades == 0
        finally:
            for sock in socks:
                sock.close()


@engine_opens
async def test_a_burst_of_tls_clients_that_fills_max_connections_all_open(
    bot: Bot, engine_opens: bool, tmp_path: Path
) -> None:
    # Over TLS without the engine's sessions, Python accepts and does each handshake; with
    # them, the engine does. Either way a burst that fits max_connections exactly evicts no one.
    cert, key, context = tls_files(tmp_path)
    n = 12
    settings = {"max_pending_upgrades": 5, "max_connections": n, "tls_cert": cert, "tls_key": key}
    config = make_config(bot.url, engine_opens=engine_opens, **settings)
    async with Gateway(config).running() as gw:
        raws = [
            await in_thread(partial(socket.create_connection, ("127.0.0.1", gw.port), timeout=20))
            for _ in range(n)
        ]
        try:
            await until(lambda: _pending(gw, n), within=10, what=f"all {n} pending")

            def upgrade(raw: socket.socket) -> bytes:
                s, head = upgrade_over_tls(raw, context, "/ws/generic/bot.test")
                s.close()
                return head

            async with anyio.create_task_group() as tg:
                heads: list[bytes] = []

                async def one(raw: socket.socket) -> None:
                    heads.append(await in_thread(upgrade, raw))

                for raw in raws:
                    tg.start_soon(one, raw)
            assert [h[:13] for h in heads] == [b"HTTP/1.1 101 "] * n, heads
            assert gw.evicted_upgrades == 0
        finally:
            for raw in raws:
                raw.close()


def _over_tls(port: int, context: ssl.SSLContext, request: bytes, then: bytes = b"") -> bytes:
    """What a wss:// client that sends ``request`` (and ``then`` after the answer's head) reads
    until the gateway closes or 20 s pass."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as s:
            s.sendall(request)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = s.recv(4096)
                if not chunk:
                    return data
                data += chunk
            if then:
                s.sendall(then)
            while chunk := s.recv(4096):
                data += chunk
                if then and data.endswith(frame(0x1, b"from the bot", mask=False)):
                    return data  # a session: the bot's first frame came
            return data


@engine_opens
async def test_over_tls_a_session_and_a_failed_dial_are_answered_the_same(
    engine_opens: bool, refused_url: str, tmp_path: Path
) -> None:
    # The engine does the TLS handshake on a relay thread with the request; a dial that fails
    # is answered 502 through the client's TLS, as Python answers it.
    cert, key, context = tls_files(tmp_path)
    bot = Answering()
    settings = GatewaySettings(port=0, tls_cert=cert, tls_key=key,
                               engine_opens=engine_opens)  # fmt: skip
    agents = [AgentConfig("bot", "test", upstream=bot.url),
              AgentConfig("dead", "test", upstream=refused_url)]  # fmt: skip
    async with Gateway(
        Config(gateway=settings, orgs=[OrgConfig("test")], agents=agents)
    ).running() as gw:
        first = frame(0x2, b"over tls")
        got = await in_thread(
            _over_tls, gw.port, context, upgrade_request("/ws/generic/bot.test"), first
        )
        assert got.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
        assert got.endswith(frame(0x1, b"from the bot", mask=False))
        await in_thread(bot.done.wait, 20)
        # The client's frame (its close may follow in the same read).
        assert bot.first[0] == 0x82 and bot.first[1] & 0x7F == len(b"over tls")
        refused = await in_thread(
            _over_tls, gw.port, context, upgrade_request("/ws/generic/dead.test")
        )
        assert refused.startswith(b"HTTP/1.1 502 ")
        assert refused.endswith(b"bot unreachable: connection refused\n")
        assert gw.sessions() == 0


@engine_opens
async def test_plain_text_on_the_tls_port_is_closed_and_logged_at_debug(
    engine_opens: bool, sentinel: Sentinel, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cert, key, _ = tls_files(tmp_path)
    settings = GatewaySettings(port=0, tls_cert=cert, tls_key=key, engine_opens=engine_opens)
    agents = [AgentConfig("bot", "test", upstream=sentinel.url)]
    caplog.set_level(logging.DEBUG, logger="wsgate")
    async with Gateway(
        Config(gateway=settings, orgs=[OrgConfig("test")], agents=agents)
    ).running() as gw:
        sock, answer = await in_thread(sent_whole, gw.port, upgrade_request("/ws/generic/bot.test"))
        sock.close()
        assert not answer.startswith(b"HTTP/")  # closed (with a TLS alert at most)
        await until(lambda: _pending(gw, 0), within=10, what="nothing pending")
    assert any("TLS handshake failed" in r.getMessage() for r in caplog.records)
    assert not sentinel.dialled()


@engine_opens
async def test_a_connection_still_sending_at_a_forced_stop_is_not_counted_evicted(
    engine_opens: bool, sentinel: Sentinel, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="wsgate")
    gw = Gateway(make_config(sentinel.url, engine_opens=engine_opens, drain_timeout=0.2))
    async with gw.running():
        sock = await in_thread(socket.create_connection, ("127.0.0.1", gw.port), 20)
        with sock:
            await in_thread(sock.sendall, b"GET /ws/generic/bot.test HTTP/1.1\r\n")
            await until(lambda: _pending(gw, 1), within=10, what="the connection pending")
            gw.stop()
            gw.stop()  # a second stop: drop what is left now
    assert gw.evicted_upgrades == 0
    assert not [r for r in caplog.records if "evicted" in r.getMessage()]


def test_giving_back_a_place_the_engine_does_not_hold_changes_nothing() -> None:
    # Engine.give_back_place is for a live session the engine opened (a Session API stop);
    # any other id is refused without touching a count.
    engine = _core.Engine(1, 60.0)
    try:
        assert engine.take_place("a.test", 5)
        for session_id in (0, 1, 2**64 - 1, engine.next_session_id()):
            assert engine.give_back_place(session_id) is False
        assert engine.places("a.test") == 1
        for bad in (-1, 2**64):
            with pytest.raises(OverflowError):
                engine.give_back_place(bad)
        assert engine.places("a.test") == 1
    finally:
        engine.shutdown()


def test_the_engines_wait_and_listener_settings_refuse_what_cannot_work() -> None:
    engine = _core.Engine(1, 60.0)
    try:
        for timeout in (0.0, -1.0, float("nan"), float("inf")):
            with pytest.raises(ValueError, match="timeout must be positive"):
                engine.set_wait(timeout, 10)
        for call in (engine.prepare_listener, lambda fd: engine.listen(fd, 8)):
            with pytest.raises(ValueError, match="invalid file descriptor"):
                call(-1)
        with open(__file__, "rb") as not_a_socket:
            with pytest.raises(OSError):
                engine.prepare_listener(not_a_socket.fileno())
            with pytest.raises(OSError):  # the relay thread's epoll takes no regular file
                engine.listen(not_a_socket.fileno(), 8)
        engine.set_wait(5.0, 10)
        assert engine.waiting() == 0
        engine.set_tls(None)
    finally:
        engine.shutdown()


async def test_an_accept_that_fails_for_good_ends_the_accept_loop_with_its_error() -> None:
    relay = Relay(1)
    # Only the accept is looked at: no connection ever reaches the handler.
    listener = Listener(cast(Connections, None), 8, lambda: None, relay.engine)
    relay.on_news = listener.news
    try:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))  # bound, not listening: its accept fails with EINVAL
            async with anyio.create_task_group() as tg:
                await tg.start(relay.run)
                with pytest.raises(OSError) as raised, anyio.fail_after(10):
                    await listener.accept(sock, tg)
                tg.cancel_scope.cancel()
        assert raised.value.errno == errno.EINVAL
        assert listener.count == 0
    finally:
        relay.engine.shutdown()
