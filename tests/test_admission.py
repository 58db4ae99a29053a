"""Admission on its own: rate limits by key, the key of a client address, and which reading
connection is evicted first."""

from __future__ import annotations

import logging
from functools import partial

import anyio
import pytest

from wsgate.admission import EVICT_AFTER, PendingReads, RateLimiter, client_key

from .helpers import Clock


def test_a_bucket_allows_its_burst_then_refills_at_its_rate() -> None:
    limiter = RateLimiter(2)
    assert [limiter.allow("a", 0.0) for _ in range(3)] == [True, True, False]
    assert limiter.allow("b", 0.0)  # every key has its own bucket
    assert not limiter.allow("a", 0.4)  # 0.8 of a token: not yet
    assert limiter.allow("a", 0.6)
    assert not limiter.allow("a", 0.6)


def test_a_slow_rate_still_allows_one_request() -> None:
    limiter = RateLimiter(0.01)
    assert limiter.allow("a", 0.0)
    assert not limiter.allow("a", 99.0)
    assert limiter.allow("a", 100.0)


def test_buckets_that_refilled_are_forgotten() -> None:
    limiter = RateLimiter(1)
    for i in range(1000):
        limiter.allow(f"client-{i}", 0.0)
    assert len(limiter) == 1000
    for _ in range(24):
        limiter.allow("late", 10.0)  # the 1024th call sweeps: the others refilled long ago
    assert len(limiter) == 1


def test_past_max_keys_new_keys_go_untracked_and_are_allowed() -> None:
    limiter = RateLimiter(0.01, max_keys=2)
    assert limiter.allow("a", 0.0) and limiter.allow("b", 0.0)
    assert limiter.allow("c", 0.0) and limiter.allow("c", 0.0)
    assert len(limiter) == 2
    assert not limiter.allow("a", 0.0)  # tracked keys stay limited


def test_a_rate_must_be_positive() -> None:
    with pytest.raises(ValueError, match="rate must be > 0"):
        RateLimiter(0)


@pytest.mark.parametrize(
    ("address", "key"),
    [
        (("192.0.2.7", 40000), "192.0.2.7"),
        (("2001:db8:1:2:aaaa::1", 40000, 0, 0), "2001:db8:1:2::/64"),
        (("2001:db8:1:2:ffff::9", 1, 0, 0), "2001:db8:1:2::/64"),
        (("::ffff:192.0.2.7", 1, 0, 0), "192.0.2.7"),
        (("fe80::1%eth0", 1, 0, 2), "fe80::/64"),
        ("/run/wsgate.sock", "/run/wsgate.sock"),
        (None, ""),
    ],
)
def test_a_client_is_limited_by_its_address_or_its_ipv6_64(address: object, key: str) -> None:
    assert client_key(address) == key


async def reading(
    pending: PendingReads,
    ended: list[str],
    name: str,
    *,
    task_status: anyio.abc.TaskStatus[None],
) -> None:
    """A connection reading its request for a minute: ``name`` goes into ``ended`` only once
    its reading phase was cancelled (evicted, or all cancelled)."""
    with pending.reading(anyio.current_time() + 60):
        task_status.started()
        await anyio.sleep_forever()
    ended.append(name)


@pytest.mark.anyio
async def test_the_oldest_reading_connection_is_evicted_never_the_newcomer(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="wsgate")
    clock = Clock()
    pending = PendingReads(2, clock)
    ended: list[str] = []
    reader = partial(reading, pending, ended)

    async with anyio.create_task_group() as tg:
        await tg.start(reader, "first")
        await tg.start(reader, "second")
        clock.now += EVICT_AFTER
        await tg.start(reader, "third")  # evicts the first, not itself
        await anyio.wait_all_tasks_blocked()
        assert ended == ["first"]
        await tg.start(reader, "fourth")
        await anyio.wait_all_tasks_blocked()
        assert ended == ["first", "second"]
        assert pending.evicted == 2 and len(pending) == 2
        pending.cancel_all()
    assert sorted(ended[2:]) == ["fourth", "third"]
    assert len(pending) == 0
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "evicted 1 connection(s) still sending their request: more than max_pending_upgrades "
        "(2) at once, or max_connections held and more waiting"
    ]


@pytest.mark.anyio
async def test_a_connection_reading_for_less_than_a_second_is_not_evicted() -> None:
    # A burst of clients connecting at once: their requests may be in their sockets, unread
    # yet. Past the limit none is evicted until it has had EVICT_AFTER to send its request.
    clock = Clock()
    pending = PendingReads(2, clock)
    ended: list[str] = []
    reader = partial(reading, pending, ended)

    async with anyio.create_task_group() as tg:
        for name in ("first", "second", "third", "fourth"):
            await tg.start(reader, name)
            clock.now += EVICT_AFTER / 4
        await anyio.wait_all_tasks_blocked()
        assert ended == [] and len(pending) == 4 and pending.evicted == 0
        # The first has read for EVICT_AFTER now, the second not yet.
        await tg.start(reader, "fifth")
        await anyio.wait_all_tasks_blocked()
        assert ended == ["first"] and pending.evicted == 1
        pending.cancel_all()


@pytest.mark.anyio
async def test_the_young_are_not_evicted_by_newcomers_but_give_way_to_make_room() -> None:
    # However many read at once, none has had a second: no newcomer evicts one (a burst's
    # requests may be on their way). Once the gateway is full and a connection waits for room,
    # the oldest gives way whatever its age, one per call (so idle connections opened at once
    # cannot lock a full gateway).
    clock = Clock()
    pending = PendingReads(2, clock)
    ended: list[str] = []
    reader = partial(reading, pending, ended)
    async with anyio.create_task_group() as tg:
        for n in range(10):
            await tg.start(reader, f"reader {n}")
            clock.now += 0.1
        await anyio.wait_all_tasks_blocked()
        assert ended == [] and len(pending) == 10 and pending.evicted == 0
        assert pending.oldest_age() == pytest.approx(1.0)
        assert pending.make_room()
        await anyio.wait_all_tasks_blocked()
        assert ended == ["reader 0"] and len(pending) == 9 and pending.evicted == 1
        assert pending.oldest_age() == pytest.approx(0.9)
        pending.cancel_all()
    assert pending.oldest_age() is None
    assert not pending.make_room()  # none left to give way
