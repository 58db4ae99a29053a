"""wsgate.readiness: the callback the listener and the doorbell run at each readiness, on a real
socket pair, on both backends (a loop callback under asyncio, a waiting task under trio)."""

from __future__ import annotations

import itertools
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import anyio
import pytest

from wsgate.readiness import Readiness

pytestmark = pytest.mark.anyio

# A bounded look for a call that must not come.
LOOK = 0.2


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    a.setblocking(False)
    yield a, b
    a.close()
    b.close()


class Reader:
    """A callback that reads what is there and counts its calls."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.calls = 0
        self.read = b""
        self.called = anyio.Event()

    def __call__(self) -> None:
        self.calls += 1
        self.read += self.sock.recv(1024)
        self.called.set()

    async def next_call(self) -> None:
        with anyio.fail_after(5):
            await self.called.wait()
        self.called = anyio.Event()


async def test_called_at_each_readiness_until_cancelled(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    reader = Reader(a)
    async with anyio.create_task_group() as tg:
        readiness = Readiness(a.fileno(), reader)
        tg.start_soon(readiness.run)
        for word in (b"one", b"two", b"three"):
            b.send(word)
            await reader.next_call()
            assert reader.read.endswith(word)
        tg.cancel_scope.cancel()
    calls = reader.calls
    b.send(b"after")  # no longer watched
    await anyio.sleep(LOOK)
    assert reader.calls == calls
    # Watched again by a new run: the first left nothing registered behind it.
    async with anyio.create_task_group() as tg:
        tg.start_soon(Readiness(a.fileno(), reader).run)
        await reader.next_call()
        assert reader.read.endswith(b"after")
        tg.cancel_scope.cancel()


@asynccontextmanager
async def watching(
    pair: tuple[socket.socket, socket.socket],
) -> AsyncIterator[tuple[Reader, Readiness]]:
    """A Readiness running on the pair's first socket, called once already (for b"x")."""
    a, b = pair
    reader = Reader(a)
    readiness = Readiness(a.fileno(), reader)
    async with anyio.create_task_group() as tg:
        tg.start_soon(readiness.run)
        b.send(b"x")
        await reader.next_call()
        yield reader, readiness
        tg.cancel_scope.cancel()


async def test_paused_it_is_not_called_until_resumed(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    async with watching(pair) as (reader, readiness):
        readiness.pause()
        assert readiness.paused
        pair[1].send(b"y")
        await anyio.sleep(LOOK)
        assert reader.calls == 1
        readiness.resume()
        await reader.next_call()
        assert reader.read == b"xy" and not readiness.paused


async def test_a_timed_pause_resumes_by_itself(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    async with watching(pair) as (reader, readiness):
        paused = anyio.current_time()
        readiness.pause(0.3)
        pair[1].send(b"y")
        await reader.next_call()
        assert anyio.current_time() - paused >= 0.25
        assert reader.read == b"xy"


async def test_a_timed_pause_resumed_early_leaves_no_timer_to_cut_the_next_one_short(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    # As the listener out of descriptors: each call pauses 0.3 s (the socket stays readable).
    a, b = pair
    b.send(b"x")
    calls: list[float] = []
    first = anyio.Event()

    def call() -> None:
        calls.append(anyio.current_time())
        first.set()
        readiness.pause(0.3)

    readiness = Readiness(a.fileno(), call)
    async with anyio.create_task_group() as tg:
        tg.start_soon(readiness.run)
        with anyio.fail_after(5):
            await first.wait()
        await anyio.sleep(0.1)  # a third of the pause in, a connection ends:
        readiness.resume()  # resumed early: called again at once, then paused 0.3 s again
        await anyio.sleep(1.0)  # the length of the look: three more pauses
        tg.cancel_scope.cancel()
    gaps = [later - earlier for earlier, later in itertools.pairwise(calls[1:])]
    assert gaps and min(gaps) >= 0.29, gaps


async def test_what_the_callback_raises_ends_run_with_it(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair

    def broken() -> None:
        a.recv(1024)
        raise OSError(5, "broken")

    b.send(b"x")
    with anyio.fail_after(5), pytest.raises(OSError, match="broken"):
        await Readiness(a.fileno(), broken).run()
