"""Hostile clients: slow upgrades, idle connections, floods of connections and bad tokens do
not stop legitimate sessions from opening, and cost no bot dial and no replay-store trip."""

from __future__ import annotations

import socket
import ssl
from contextlib import AsyncExitStack
from functools import partial
from pathlib import Path

import anyio
import pytest
from anyio.abc import SocketStream

from wsgate import Gateway
from wsgate.admission import EVICT_AFTER
from wsgate.replay import MemoryReplayStore
from wsgate.tokens import TokenAuthority

from .helpers import (
    Sentinel,
    echoed,
    engine_opens,
    http_exchange,
    in_thread,
    serving,
    tls_files,
    token_gateway,
    until,
    upgrade_over_tls,
    upgrade_request,
    upgraded,
)

pytestmark = pytest.mark.anyio


async def open_many(port: int, n: int, first_bytes: bytes, stack: AsyncExitStack) -> None:
    for _ in range(n):
        s: SocketStream = await stack.enter_async_context(
            await anyio.connect_tcp("127.0.0.1", port)
        )
        if first_bytes:
            await s.send(first_bytes)


async def test_slow_upgrade_requests_do_not_crowd_out_a_real_client(sentinel: Sentinel) -> None:
    async with serving(sentinel.url, max_pending_upgrades=20, handshake_timeout=60) as gw:
        async with AsyncExitStack() as stack:
            # 50 slowloris connections: a request line and no end, for a minute if allowed.
            await open_many(gw.port, 50, b"GET /ws/generic/bot.test HTTP/1.1\r\nX-a: ", stack)
            assert await in_thread(echoed, f"{gw.url}/ws/generic/echo.test", "legit") == "legit"
            # Once they have had EVICT_AFTER to finish, the next connection still sending its
            # request evicts the oldest down to the limit (the sleep is what is under test).
            await anyio.sleep(EVICT_AFTER)
            await open_many(gw.port, 1, b"GET /ws/generic/bot.test HTTP/1.1\r\nX-a: ", stack)
            await until(lambda: _evicted_at_least(gw, 30), within=20, what="the evictions")
            assert await in_thread(echoed, f"{gw.url}/ws/generic/echo.test", "legit") == "legit"
    assert not sentinel.dialled()


async def a_real_client_gets_in(gw: Gateway) -> None:
    """A real session opens within 10 s: well before the idle ones' handshake_timeout (30 s in
    these tests), so by eviction, not by their timing out."""
    legit = await in_thread(
        partial(echoed, f"{gw.url}/ws/generic/echo.test", "legit", open_timeout=10)
    )
    assert legit == "legit"


async def _evicted_at_least(gw: Gateway, n: int) -> bool:
    return gw.evicted_upgrades >= n


async def test_idle_connections_that_never_speak_do_not_block_new_sessions(
    sentinel: Sentinel,
) -> None:
    async with serving(sentinel.url, max_pending_upgrades=100, handshake_timeout=60) as gw:
        async with AsyncExitStack() as stack:
            await open_many(gw.port, 300, b"", stack)
            for _ in range(3):
                assert await in_thread(echoed, f"{gw.url}/ws/generic/echo.test", "legit") == "legit"
    assert not sentinel.dialled()


@engine_opens
async def test_idle_connections_opened_at_once_past_max_connections_do_not_lock_out_a_client(
    sentinel: Sentinel, engine_opens: bool
) -> None:
    # All younger than EVICT_AFTER, none is evicted for its age; but once the gateway is full,
    # each connection waiting in the backlog makes the oldest give way (a full gateway would
    # otherwise accept no newcomer, and a real client would wait for handshake_timeout).
    settings = {"max_pending_upgrades": 5, "max_connections": 20, "handshake_timeout": 30}
    async with serving(sentinel.url, engine_opens=engine_opens, **settings) as gw:
        async with AsyncExitStack() as stack:
            await open_many(gw.port, 30, b"", stack)
            # Twenty taken in, each of the ten after them evicted one.
            await until(lambda: _evicted_at_least(gw, 10), within=20, what="the evictions")
            assert gw.pending_upgrades <= 20
            await a_real_client_gets_in(gw)
    assert not sentinel.dialled()


START_HEAD = (
    b"POST /v1/public/echo/start HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer pk_test\r\n"
    b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
)


@engine_opens
@pytest.mark.parametrize("last", ["session", "start_without_its_body"])
async def test_idle_connections_and_a_last_place_taken_otherwise_do_not_lock_out_a_client(
    sentinel: Sentinel, engine_opens: bool, last: str
) -> None:
    # Idle connections fill all but the last place, and the last goes to a connection that
    # never waited among them: a session, or a /start head whose body never comes (read by
    # Python, alone). A real client that comes next still gets in: the oldest idle one gives
    # way for it, whoever took the last place.
    settings = {"max_pending_upgrades": 100, "max_connections": 20, "handshake_timeout": 30}
    async with serving(sentinel.url, engine_opens=engine_opens, **settings) as gw:
        async with AsyncExitStack() as stack:
            await open_many(gw.port, 19, b"", stack)
            await until(lambda: _pending_at_least(gw, 19), within=10, what="19 pending")
            if last == "session":
                session, _ = await upgraded(gw.port, "/ws/generic/echo.test")
                stack.push_async_callback(session.aclose)
            else:
                await open_many(gw.port, 1, START_HEAD, stack)
                await until(lambda: _pending_at_least(gw, 20), within=10, what="20 pending")
            await a_real_client_gets_in(gw)
            assert gw.evicted_upgrades == 1
    assert not sentinel.dialled()


def connect_at_once(port: int, n: int) -> list[socket.socket]:
    """``n`` connections begun without waiting for each (they reach the backlog together)."""
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.setblocking(False)
        try:
            s.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        socks.append(s)
    return socks


@engine_opens
@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
async def test_a_flood_of_idle_connections_at_once_does_not_lock_a_full_gateway(
    sentinel: Sentinel, engine_opens: bool, tls: bool, tmp_path: Path
) -> None:
    # 60 connections at once into max_connections = 20: a batch of accepts fills the gateway
    # and asks for room before its connections began reading (where Python reads them). The
    # room is still made once they have had a second, one eviction for each connection left
    # waiting in the backlog, and a real client then gets in; none waits for
    # handshake_timeout (30 s).
    settings: dict[str, object] = {
        "max_pending_upgrades": 1000,
        "max_connections": 20,
        "handshake_timeout": 30,
    }
    if tls:
        cert, key, _ = tls_files(tmp_path)
        settings |= {"tls_cert": cert, "tls_key": key}
    async with serving(sentinel.url, engine_opens=engine_opens, **settings) as gw:
        socks = await in_thread(connect_at_once, gw.port, 60)
        try:
            await until(lambda: _evicted_at_least(gw, 40), within=20, what="40 evictions")
            if not tls:
                await a_real_client_gets_in(gw)
        finally:
            for s in socks:
                s.close()
    assert not sentinel.dialled()


@engine_opens
async def test_a_lone_reader_in_the_last_place_gives_way_to_a_connection_waiting(
    sentinel: Sentinel, engine_opens: bool
) -> None:
    # Sessions hold all places but one; two connections come at once: the first takes the last
    # place, alone among the readers, the second waits in the backlog. The first gives way (it
    # is the oldest reader), even where room was asked for before it began reading.
    settings = {"max_pending_upgrades": 1000, "max_connections": 20, "handshake_timeout": 30}
    async with serving(sentinel.url, engine_opens=engine_opens, **settings) as gw:
        async with AsyncExitStack() as stack:
            for _ in range(19):
                session, _ = await upgraded(gw.port, "/ws/generic/echo.test")
                stack.push_async_callback(session.aclose)
            socks = await in_thread(connect_at_once, gw.port, 2)
            try:
                await until(lambda: _evicted_at_least(gw, 1), within=10, what="one eviction")
                await until(lambda: _pending_at_least(gw, 1), within=10, what="the second in")
            finally:
                for s in socks:
                    s.close()


@engine_opens
async def test_honest_tls_clients_at_a_gateway_full_of_sessions_wait_their_turn(
    sentinel: Sentinel, engine_opens: bool, tmp_path: Path
) -> None:
    # Sessions hold every place; TLS clients wait in the backlog, each reading its handshake
    # once it is taken in while the others still wait. None is evicted for the next (each has
    # its second, and needs far less): each opens in turn as a session ends.
    cert, key, context = tls_files(tmp_path)
    settings = {"max_connections": 3, "handshake_timeout": 30, "tls_cert": cert, "tls_key": key}
    async with serving(sentinel.url, engine_opens=engine_opens, **settings) as gw:
        held = [await upgraded_over_tls(gw.port, context) for _ in range(3)]
        raws = await in_thread(connect_at_once, gw.port, 3)
        clients: list[tuple[ssl.SSLSocket, bytes]] = []

        async def client(raw: socket.socket) -> None:
            clients.append(await in_thread(upgrade_over_tls, raw, context))

        try:
            async with anyio.create_task_group() as tg:
                for raw in raws:
                    tg.start_soon(client, raw)
                for n, session in enumerate(held, 1):
                    await in_thread(session.close)  # one place given back: one client opens
                    await until(partial(_at_least, clients, n), within=10, what="opened")
                    assert gw.evicted_upgrades == 0
            assert [head[:13] for _, head in clients] == [b"HTTP/1.1 101 "] * 3
        finally:
            for s in held + [c for c, _ in clients] + raws:
                s.close()


async def upgraded_over_tls(port: int, context: ssl.SSLContext) -> ssl.SSLSocket:
    """A wss:// session past its 101, on a blocking socket (close it in a thread)."""
    raw = await in_thread(partial(socket.create_connection, ("127.0.0.1", port), timeout=20))
    s, head = await in_thread(upgrade_over_tls, raw, context)
    assert head.startswith(b"HTTP/1.1 101 "), head
    return s


async def _at_least(items: list[tuple[ssl.SSLSocket, bytes]], n: int) -> bool:
    return len(items) >= n


@pytest.mark.parametrize("older", ["python", "engine"])
async def test_the_oldest_reader_gives_way_whether_the_engine_or_python_reads_it(
    sentinel: Sentinel, older: str
) -> None:
    # Python reads /start heads (their bodies never come); the engine reads an idle connection,
    # opened before them or after them. The gateway full, a newcomer evicts the oldest of all,
    # whichever plane reads it.
    settings = {"max_pending_upgrades": 1000, "max_connections": 20, "handshake_timeout": 30}
    async with serving(sentinel.url, engine_opens=True, **settings) as gw:
        async with AsyncExitStack() as stack:

            async def reader(first_bytes: bytes) -> SocketStream:
                s = await stack.enter_async_context(await anyio.connect_tcp("127.0.0.1", gw.port))
                await s.send(first_bytes)
                await until(lambda: _pending_at_least(gw, n + 1), within=10, what="pending")
                return s

            readers = []
            for n in range(20):
                engine_turn = n == (0 if older == "engine" else 19)
                readers.append(await reader(b"" if engine_turn else START_HEAD))
            await open_many(gw.port, 1, b"", stack)  # waits in the backlog
            with anyio.fail_after(10):
                with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                    await readers[0].receive()  # the oldest, evicted: closed unanswered
            # Counted once Python hears of it (the engine's eviction comes as news): one only.
            await until(lambda: _evicted_at_least(gw, 1), within=10, what="counted")
            assert gw.evicted_upgrades == 1


async def _pending_at_least(gw: Gateway, n: int) -> bool:
    return gw.pending_upgrades >= n


async def test_past_max_connections_new_ones_wait_until_a_session_ends(
    sentinel: Sentinel,
) -> None:
    async with serving(sentinel.url, max_connections=2) as gw:
        held = [(await upgraded(gw.port, "/ws/generic/echo.test"))[0] for _ in range(2)]
        async with await anyio.connect_tcp("127.0.0.1", gw.port) as waiting:
            await waiting.send(upgrade_request("/ws/generic/echo.test"))
            with anyio.move_on_after(0.5):  # a bounded look for an answer that must not come
                await waiting.receive()
                pytest.fail("a connection past max_connections was served")
            await held.pop().aclose()  # one session ends: the waiting one is accepted
            head = b""
            with anyio.fail_after(10):
                while b"\r\n\r\n" not in head:
                    head += await waiting.receive()
            assert head.startswith(b"HTTP/1.1 101")
        for s in held:
            await s.aclose()


class CountingStore(MemoryReplayStore):
    """The in-memory replay store, counting its claims."""

    claims = 0

    async def claim(self, nonce: str, exp: int) -> bool:
        CountingStore.claims += 1
        return await super().claim(nonce, exp)


async def test_a_flood_of_bad_tokens_costs_no_store_trip_and_no_dial(sentinel: Sentinel) -> None:
    CountingStore.claims = 0
    authority = TokenAuthority(["s3cret"], store=CountingStore())
    forged = TokenAuthority(["not-ours"]).mint("talk.test").token
    async with token_gateway(sentinel.url, authority=authority) as gw:
        for token in [forged, "x" * 3000, "a.b", ""] * 25:
            status, _ = await http_exchange(
                gw.port, upgrade_request(f"/ws/generic/talk.test?token={token}")
            )
            assert status == 403
    assert CountingStore.claims == 0
    assert not sentinel.dialled()
