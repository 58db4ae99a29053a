"""The fixtures every test module may ask for: the event loops, upstream bots on real sockets on
127.0.0.1, and a redis-server. What they are built from (and every other shared helper) is in
``helpers.py``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .helpers import Bot, Sentinel
from .redis_server import RedisServer

#: The anyio backends every test runs on.
BACKENDS = ["asyncio", "trio"]


@pytest.fixture(params=BACKENDS)
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """The event loop of the test itself (``pytest.mark.anyio`` tests)."""
    return str(request.param)


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """The event loop of a gateway that runs outside the test's own: a ``wsgate`` process's
    ``--backend``, or a portal thread's. Module-scoped, so a module's gateway may be too."""
    return str(request.param)


@pytest.fixture
def bot() -> Iterator[Bot]:
    """An echoing upstream bot that records each session and picks ``chat.v2`` if offered."""
    b = Bot(subprotocols=["chat.v2"])
    yield b
    b.close()


@pytest.fixture
def sentinel() -> Iterator[Sentinel]:
    """An upstream that must never be dialled (``sentinel.dialled()`` says if it was)."""
    s = Sentinel()
    yield s
    s.sock.close()


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of the test's own (mark the test ``requires_redis``); the test may stop
    and start it again."""
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()
