"""Hostile clients: slow upgrades, idle connections, floods of connections and bad tokens do
not stop legitimate sessions from opening, and cost no bot dial and no replay-store trip."""

from __future__ import annotations

from contextlib import AsyncExitStack
from functools import partial

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
    token_gateway,
    until,
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
            legit = await in_thread(
                partial(echoed, f"{gw.url}/ws/generic/echo.test", "legit", open_timeout=10)
            )
            assert legit == "legit"
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
            legit = await in_thread(
                partial(echoed, f"{gw.url}/ws/generic/echo.test", "legit", open_timeout=10)
            )
            assert legit == "legit"
            assert gw.evicted_upgrades == 1
    assert not sentinel.dialled()


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
