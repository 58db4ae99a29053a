"""Replay stores (wsgate.replay): the memory TTL set, and the Redis store against
a real redis-server (two stores standing for two gateway processes; the server stopped and
started again mid-test)."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing, asynccontextmanager
from pathlib import Path

import anyio
import pytest

from wsgate._core import new_nonce
from wsgate.errors import ConfigError, HttpError
from wsgate.replay import (
    MemoryReplayStore,
    RedisReplayStore,
    ReplayStoreUnavailable,
    open_replay_store,
)
from wsgate.tokens import TokenAuthority

from .helpers import T0, Clock
from .redis_server import RedisServer, free_port, requires_redis

# --- memory ------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_nonce_is_claimed_once_and_refused_afterwards() -> None:
    store = MemoryReplayStore(clock=Clock())
    assert await store.claim("n1", T0 + 300)
    assert not await store.claim("n1", T0 + 300)
    assert await store.claim("n2", T0 + 300)


@pytest.mark.anyio
async def test_a_released_claim_may_be_claimed_again_once() -> None:
    store = MemoryReplayStore(clock=Clock())
    assert await store.claim("n1", T0 + 300)
    await store.release("n1")
    assert len(store) == 0
    assert await store.claim("n1", T0 + 300)
    assert not await store.claim("n1", T0 + 300)
    await store.release("never-claimed")  # nothing to give back: no error, nothing kept
    assert len(store) == 1


@pytest.mark.anyio
async def test_claim_release_cycles_keep_one_entry_per_nonce() -> None:
    clock = Clock()
    store = MemoryReplayStore(clock=clock, max_entries=2)
    for _ in range(1000):
        assert await store.claim("retried", T0 + 10)
        await store.release("retried")
    assert store.entries == 1
    assert await store.claim("other", T0 + 10)
    clock.now = T0 + 10
    assert await store.claim("after", T0 + 20)  # the released nonce expired on time
    assert store.entries == 1  # "retried" and "other" expired at T0 + 10


@pytest.mark.anyio
async def test_entries_leave_the_memory_store_when_their_token_expires() -> None:
    clock = Clock()
    store = MemoryReplayStore(clock=clock)
    for i in range(100):
        assert await store.claim(f"early{i}", T0 + 10)
    assert await store.claim("late", T0 + 300)
    assert len(store) == 101
    clock.now = T0 + 10
    assert await store.claim("trigger", T0 + 310)
    assert len(store) == 2
    assert not await store.claim("late", T0 + 300)


@pytest.mark.anyio
async def test_a_full_memory_store_fails_closed_until_entries_expire() -> None:
    clock = Clock()
    store = MemoryReplayStore(clock=clock, max_entries=2)
    assert await store.claim("a", T0 + 5)
    assert await store.claim("b", T0 + 6)
    with pytest.raises(ReplayStoreUnavailable, match="full"):
        await store.claim("c", T0 + 7)
    clock.now = T0 + 5
    assert await store.claim("c", T0 + 7)


@pytest.mark.anyio
async def test_the_memory_store_repr_shows_no_nonce() -> None:
    store = MemoryReplayStore()
    await store.claim("secret-nonce", 2**40)
    assert "secret-nonce" not in repr(store)


# --- Redis -------------------------------------------------------------------------------------


@pytest.fixture
def redis_with_password(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path, password="s3cr3t-pw")
    server.start()
    yield server
    server.stop()


@asynccontextmanager
async def sharing_redis(redis: RedisServer) -> AsyncIterator[tuple[RedisReplayStore, ...]]:
    """Two stores on one Redis, as two gateway processes have; closed at exit."""
    async with aclosing(RedisReplayStore(redis.url)) as one:
        async with aclosing(RedisReplayStore(redis.url)) as two:
            yield one, two


@requires_redis
@pytest.mark.anyio
async def test_a_nonce_claimed_at_one_gateway_is_refused_at_another_sharing_redis(
    redis: RedisServer,
) -> None:
    async with sharing_redis(redis) as (one, two):
        nonce = new_nonce()
        assert await one.claim(nonce, 2**40)
        assert not await two.claim(nonce, 2**40)
        assert not await one.claim(nonce, 2**40)


@requires_redis
@pytest.mark.anyio
async def test_a_token_used_at_one_gateway_is_refused_at_another_sharing_redis(
    redis: RedisServer,
) -> None:
    one = TokenAuthority(["s"], store=RedisReplayStore(redis.url))
    two = TokenAuthority(["s"], store=RedisReplayStore(redis.url))
    try:
        token = one.mint("a.b").token
        await two.verify(token, "a.b")
        with pytest.raises(HttpError, match="already used"):
            await one.verify(token, "a.b")
    finally:
        await one.aclose()
        await two.aclose()


@requires_redis
@pytest.mark.anyio
async def test_a_redis_entry_expires_with_its_token(redis: RedisServer) -> None:
    store = RedisReplayStore(redis.url, clock=Clock())
    try:
        nonce = new_nonce()
        assert await store.claim(nonce, T0 + 120)
        ttl = await store.execute("TTL", f"wsgate:nonce:{nonce}")
        assert isinstance(ttl, int) and 118 <= ttl <= 120
        assert await store.claim("already-expired", T0 - 5)
        assert await store.execute("TTL", "wsgate:nonce:already-expired") in (0, 1, -2)
    finally:
        await store.aclose()


@requires_redis
@pytest.mark.anyio
async def test_a_claim_released_in_redis_may_be_claimed_again_by_another_gateway(
    redis: RedisServer,
) -> None:
    async with sharing_redis(redis) as (one, two):
        nonce = new_nonce()
        assert [await one.claim(nonce, 2**40), await two.claim(nonce, 2**40)] == [True, False]
        await one.release(nonce)
        assert [await two.claim(nonce, 2**40), await one.claim(nonce, 2**40)] == [True, False]


@requires_redis
@pytest.mark.anyio
async def test_concurrent_claims_of_one_nonce_let_exactly_one_through(redis: RedisServer) -> None:
    store = RedisReplayStore(redis.url)
    nonce = new_nonce()
    results: list[bool] = []

    async def claim() -> None:
        results.append(await store.claim(nonce, 2**40))

    try:
        async with anyio.create_task_group() as tg:
            for _ in range(20):
                tg.start_soon(claim)
        assert sorted(results) == [False] * 19 + [True]
    finally:
        await store.aclose()


@requires_redis
@pytest.mark.anyio
async def test_the_password_and_database_come_from_the_url(
    redis_with_password: RedisServer,
) -> None:
    store = RedisReplayStore(redis_with_password.url + "/3")
    probe = RedisReplayStore(redis_with_password.url + "/0")
    try:
        assert await store.claim("n", 2**40)
        assert await store.execute("EXISTS", "wsgate:nonce:n") == 1
        assert await probe.execute("EXISTS", "wsgate:nonce:n") == 0
    finally:
        await store.aclose()
        await probe.aclose()
    assert "s3cr3t-pw" not in repr(store)


@requires_redis
@pytest.mark.anyio
async def test_a_wrong_password_makes_the_store_unavailable_without_showing_it(
    redis_with_password: RedisServer,
) -> None:
    store = RedisReplayStore(f"redis://:wrong-pw@127.0.0.1:{redis_with_password.port}")
    with pytest.raises(ReplayStoreUnavailable, match="AUTH") as info:
        await store.claim("n", 2**40)
    assert "wrong-pw" not in str(info.value)
    missing = RedisReplayStore(f"redis://127.0.0.1:{redis_with_password.port}")
    try:
        with pytest.raises(ReplayStoreUnavailable, match="NOAUTH"):
            await missing.claim("n", 2**40)
    finally:
        await missing.aclose()


@requires_redis
@pytest.mark.anyio
async def test_redis_stopped_mid_test_fails_closed_then_recovers_when_it_is_back(
    redis: RedisServer,
) -> None:
    auth = TokenAuthority(["s"], store=RedisReplayStore(redis.url))
    try:
        await auth.verify(auth.mint("a.b").token, "a.b")
        redis.stop()
        token = auth.mint("a.b").token
        with pytest.raises(HttpError) as info:
            await auth.verify(token, "a.b")
        assert (info.value.status, info.value.reason) == (503, "token store unavailable")
        redis.start()
        await auth.verify(token, "a.b")
    finally:
        await auth.aclose()


@pytest.mark.anyio
async def test_nothing_listening_makes_the_store_unavailable() -> None:
    store = RedisReplayStore(f"redis://127.0.0.1:{free_port()}")
    with pytest.raises(ReplayStoreUnavailable, match="unreachable"):
        await store.claim("n", 2**40)


@pytest.mark.anyio
async def test_a_server_that_never_answers_makes_the_store_unavailable_after_the_timeout() -> None:
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # connections complete in the backlog, and nothing ever answers
        port = silent.getsockname()[1]
        store = RedisReplayStore(f"redis://127.0.0.1:{port}", timeout=0.2)
        with pytest.raises(ReplayStoreUnavailable, match="TimeoutError"):
            await store.claim("n", 2**40)


@pytest.mark.parametrize(
    ("url", "error"),
    [
        ("http://h", r"must start with redis://, rediss://, redis\+sentinel://"),
        ("redis://", "has no host"),
        ("redis://h/x", "the path must be a database number"),
        ("redis://h:99999", "has a bad host or port"),
        ("redis//h", r"must start with redis://, rediss://, redis\+sentinel://"),
    ],
)
def test_a_malformed_store_url_is_refused(url: str, error: str) -> None:
    with pytest.raises(ValueError, match=f"^store URL:? {error}"):
        RedisReplayStore(url)


def test_the_store_repr_hides_the_password() -> None:
    for url in ("redis://user:pw-secret@h:1/2", "redis://pw-secret@h", "rediss://:pw-secret@h"):
        text = repr(RedisReplayStore(url))
        assert "pw-secret" not in text
        assert "***@" in text


def test_the_replay_store_setting_names_memory_or_a_redis_url() -> None:
    assert isinstance(open_replay_store("memory"), MemoryReplayStore)
    assert isinstance(open_replay_store("redis://:pw@127.0.0.1:6379/1"), RedisReplayStore)
    assert isinstance(open_replay_store("valkey://127.0.0.1"), RedisReplayStore)
    for bad in ("Memory", "mysql://h", "redis://h/x"):
        with pytest.raises(ConfigError, match="replay_store"):
            open_replay_store(bad)
    with pytest.raises(ConfigError) as info:
        open_replay_store("redis://:hidden-pw@h/db")
    assert "hidden-pw" not in str(info.value)
