"""Session tokens: mint and verify in the Rust core (``_core.TokenKeys``, what the gateway uses)
against a pure-Python implementation with ``hmac``, ``base64`` and ``json``
(``tests/token_reference.py``, the executable spec the tests hold the core to); and one replay
store claim (``SET … NX EX``) round trip to a local redis-server.

    python -m pytest benches/bench_tokens.py --benchmark-only

Plain ``pytest`` does not run this file: ``testpaths`` is ``tests``.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.from_thread
import pytest
from pytest_benchmark.fixture import BenchmarkFixture
from tests import token_reference
from tests.redis_server import RedisServer, requires_redis

from wsgate import _core
from wsgate.replay import MemoryReplayStore, RedisReplayStore

HOST = "my-agent.my-org"
EXP = 1_712_800_300
NOW = EXP - 300
NONCE = "3q2-7wAAAAAAAAAAAAAAAA"
# Rotation in progress: the token is signed with the second secret, so both are tried.
SECRETS = [b"new-secret-0123456789abcdef012345", b"old-secret-0123456789abcdef012345"]
TOKEN = _core.TokenKeys([SECRETS[1]]).mint(HOST, EXP, NONCE)

KEYS = _core.TokenKeys(SECRETS)  # keyed once, as the gateway does


def timed(benchmark: BenchmarkFixture, fn: Any, *args: Any) -> Any:
    """Time ``fn(*args)`` in rounds of 500 calls: for calls of about a microsecond, one timer
    read per call would be a sizeable share of the figure (for both implementations alike)."""
    return benchmark.pedantic(fn, args, iterations=500, rounds=200, warmup_rounds=5)


@pytest.mark.parametrize("implementation", ["rust", "python"])
def test_verifying_a_token(benchmark: BenchmarkFixture, implementation: str) -> None:
    benchmark.group = "verify a token (second of two secrets)"
    if implementation == "rust":
        claims = timed(benchmark, KEYS.verify, TOKEN, HOST, NOW)
        assert (claims.exp, claims.nonce) == (EXP, NONCE)
    else:
        result = timed(benchmark, token_reference.verify, SECRETS, TOKEN, HOST, NOW)
        assert tuple(result)[-2:] == (EXP, NONCE)


@pytest.mark.parametrize("implementation", ["rust", "python"])
def test_minting_a_token(benchmark: BenchmarkFixture, implementation: str) -> None:
    benchmark.group = "mint a token"
    if implementation == "rust":
        token = timed(benchmark, KEYS.mint, HOST, EXP, NONCE)
    else:
        token = timed(benchmark, token_reference.mint, SECRETS[0], HOST, EXP, NONCE)
    assert token == _core.TokenKeys([SECRETS[0]]).mint(HOST, EXP, NONCE)


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


_BATCH = 100


@requires_redis
def test_a_replay_store_claim_round_trip_to_local_redis(
    benchmark: BenchmarkFixture, redis: RedisServer
) -> None:
    """One round is 100 sequential claims on one pooled connection (time per claim: / 100)."""
    benchmark.group = f"replay store: {_BATCH} claims"
    nonces = itertools.count()

    async def batch(store: RedisReplayStore) -> None:
        for _ in range(_BATCH):
            assert await store.claim(f"bench-{next(nonces)}", 2**40)

    with anyio.from_thread.start_blocking_portal() as portal:
        store = RedisReplayStore(redis.url)
        try:
            benchmark(portal.call, batch, store)
        finally:
            portal.call(store.aclose)


def test_a_replay_store_claim_in_memory(benchmark: BenchmarkFixture) -> None:
    """The same 100 claims against the in-memory store, for scale."""
    benchmark.group = f"replay store: {_BATCH} claims"
    nonces = itertools.count()
    store = MemoryReplayStore()

    async def batch() -> None:
        for _ in range(_BATCH):
            assert await store.claim(f"bench-{next(nonces)}", 2**40)

    with anyio.from_thread.start_blocking_portal() as portal:
        benchmark(portal.call, batch)
