"""What a gateway holds for its sessions and gives back: nothing left of a session once it
ended (no reference cycle waiting for a collection), and the free heap returned to the operating
system once after a burst of sessions ended, never per session. (How much memory, in bytes, is
for the benches: benches/README.md.)"""

from __future__ import annotations

import gc
import socket
import time
from collections.abc import Iterator
from contextlib import ExitStack

import anyio
import pytest
from websockets.sync.client import ClientConnection

import wsgate.engine
from wsgate import _core
from wsgate.engine import RelaySession
from wsgate.sessions import Opened

from .helpers import Bot, connect, in_thread, serving, until

pytestmark = pytest.mark.anyio


@pytest.fixture
def releases(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Each call of ``_core.release_memory``, recorded (and made for real); memory is due back
    after 4 sessions ended, once 50 ms pass without another end."""
    calls: list[bool] = []
    real = _core.release_memory

    def recorded() -> bool:
        calls.append(real())
        return calls[-1]

    monkeypatch.setattr(_core, "release_memory", recorded)
    monkeypatch.setattr(wsgate.engine, "TRIM_DROP", 4)
    monkeypatch.setattr(wsgate.engine, "TRIM_QUIET", 0.05)
    return calls


@pytest.fixture
def no_collection() -> Iterator[None]:
    """The cyclic garbage collector off: what is left was not freed by reference counting."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def sessions_at_once(url: str, n: int) -> None:
    """``n`` sessions open together, each echoed once, then all closed."""
    with ExitStack() as open_ones:
        clients = [open_ones.enter_context(connect(url)) for _ in range(n)]
        for ws in clients:
            ws.send("x")
            assert ws.recv(timeout=10) == "x"


def sessions_one_by_one(url: str, n: int) -> None:
    """``n`` sessions, each opened, echoed once and closed before the next."""
    for _ in range(n):
        with connect(url) as ws:
            ws.send("x")
            assert ws.recv(timeout=10) == "x"


def tracked(kind: type) -> list[object]:
    """Objects of exactly ``kind`` still tracked (``type()``: a dead weak proxy among them
    would raise on ``isinstance``)."""
    return [o for o in gc.get_objects() if type(o) is kind]


def left(kind: type, before: list[object]) -> int:
    """Objects of ``kind`` tracked now that were not in ``before`` (kept alive by that list,
    so no new object can take the address of one of them)."""
    old = {id(o) for o in before}
    return sum(id(o) not in old for o in tracked(kind))


async def test_nothing_of_an_ended_session_waits_for_a_garbage_collection(
    bot: Bot, no_collection: None
) -> None:
    # Only this test's sessions are judged: another test's gateway, still winding down in the
    # same process, may hold its own a moment longer.
    before = tracked(Opened) + tracked(RelaySession)
    async with serving(bot.url) as gw:
        await in_thread(sessions_at_once, f"{gw.url}/ws/generic/bot.test", 5)
        await until(lambda: _true(gw.sessions() == 0), within=10, what="the sessions end")
        # With the collector off, only reference counting can free them: a cycle would stay.
        await until(
            lambda: _true((left(Opened, before), left(RelaySession, before)) == (0, 0)),
            within=5,
            what="nothing of the ended sessions left",
        )


async def test_memory_is_given_back_once_after_a_burst_of_sessions_ended(
    bot: Bot, releases: list[bool]
) -> None:
    async with serving(bot.url) as gw:
        await in_thread(sessions_at_once, f"{gw.url}/ws/generic/bot.test", 6)
        await until(lambda: _true(bool(releases)), within=10, what="memory given back")
        await anyio.sleep(0.3)
        assert len(releases) == 1, "once for the burst, not per session"


async def test_memory_is_given_back_after_a_burst_that_ended_before_python_heard_of_it(
    bot: Bot, releases: list[bool]
) -> None:
    # The engine keeps the sessions it opens to itself until they end: a burst that ends while
    # the event loop is busy is heard of in one turn, and still makes giving memory back due.
    def open_all(url: str, n: int, stack: ExitStack) -> list[ClientConnection]:
        clients = [stack.enter_context(connect(url)) for _ in range(n)]
        for ws in clients:
            ws.send("x")
            assert ws.recv(timeout=10) == "x"
        return clients

    async with serving(bot.url) as gw:
        with ExitStack() as stack:
            clients = await in_thread(open_all, f"{gw.url}/ws/generic/bot.test", 6, stack)
            assert gw.sessions() == 6
            # The event loop kept busy until the engine has ended all six (it gives their
            # places back itself): their ends reach Python together.
            for ws in clients:
                ws.socket.shutdown(socket.SHUT_RDWR)
            while gw.sessions():
                time.sleep(0.001)
        await until(lambda: _true(bool(releases)), within=10, what="memory given back")


async def test_a_steady_churn_of_sessions_never_makes_giving_memory_back_due(
    bot: Bot, releases: list[bool]
) -> None:
    async with serving(bot.url) as gw:
        await in_thread(sessions_one_by_one, f"{gw.url}/ws/generic/bot.test", 12)
        await until(lambda: _true(gw.sessions() == 0), within=10, what="the sessions end")
        await anyio.sleep(0.3)
        assert releases == []


async def _true(value: bool) -> bool:
    return value
