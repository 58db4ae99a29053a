"""Bot pools (issue 13): ``upstream`` as a list of bots. Sessions spread by live count (ties round
robin), a member that fails is skipped within one ``dial_timeout`` and left out for
``upstream_retry_after``, the client sees 502/504 only when every member failed; ``/readyz`` and
the session log name the members.

The choice itself (:class:`wsgate.pools.Pool`) is tested without sockets; the rest on real
sockets on 127.0.0.1: `websockets` bots, listening sockets that never answer or that close each
connection at once. Synchronisation is on events: an answer, a barrier of client threads, the
gateway's end-of-session log line.
"""

from __future__ import annotations

import logging
import re
import socket
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

import anyio
import pytest
from anyio.abc import SocketAttribute, SocketStream

from wsgate import AgentConfig, Config, Gateway, GatewaySettings, OrgConfig
from wsgate.config import loads_config
from wsgate.errors import ConfigError
from wsgate.pools import Pool
from wsgate.urls import parse_upstream_url

from .conftest import Bot, Sentinel, connect, http_exchange, in_thread, upgrade_request

# --------------------------------------------------------------------------------------------
# Settings

ORG = "[[org]]\nname = 'o'\n"
POOL = ["ws://10.0.0.11:9001/ws", "ws://10.0.0.12:9001/ws"]


def test_upstream_takes_a_list_as_well_as_a_string() -> None:
    config = loads_config(
        ORG + f"[[agent]]\nname = 'pool'\norg = 'o'\nupstream = {POOL!r}\n"
        "[[agent]]\nname = 'one'\norg = 'o'\nupstream = 'ws://10.0.0.11:9001/ws'\n"
    )
    pool, one = config.agents
    assert pool == AgentConfig("pool", "o", upstream=POOL)  # built in code: the same
    assert pool.upstream == tuple(POOL)
    assert [(u.host, u.port, u.resource) for u in pool.upstream_urls] == [
        ("10.0.0.11", 9001, "/ws"),
        ("10.0.0.12", 9001, "/ws"),
    ]
    assert pool.upstream_url == pool.upstream_urls[0]  # the first member
    assert one.upstream == "ws://10.0.0.11:9001/ws"
    assert one.upstream_urls == (one.upstream_url,)
    assert AgentConfig("echo", "o", builtin="echo").upstream_urls == ()


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("[]", "agent 'a.o': upstream must not be an empty list"),
        ("['ws://b/ws', 'http://c/ws']", "agent 'a.o': upstream 'http://c/ws' must be a ws:// URL"),
        ("['ws://b/ws', 'ws://b:x/ws']", "upstream 'ws://b:x/ws' has an invalid port"),
        ("['wss://b/ws']", "wss:// upstreams are not supported yet"),
        ("['ws://b/ws', 'ws://b/ws']", "agent 'a.o': upstream lists a URL twice"),
        ("['ws://b/ws', 7]", "upstream must be a string or a list of strings, got list"),
        ("{ url = 'ws://b/ws' }", "upstream must be a string or a list of strings, got dict"),
        ("7", "upstream must be a string or a list of strings, got int"),
    ],
)
def test_a_bad_upstream_list_in_a_file_is_refused_naming_the_key(value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        loads_config(ORG + f"[[agent]]\nname = 'a'\norg = 'o'\nupstream = {value}\n", source="gw")
    assert "\n" not in str(caught.value)
    assert str(caught.value).startswith("gw: [[agent]] #1: ")


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ([], "upstream must not be an empty list"),
        (("ws://b/ws", "ftp://c/"), "upstream 'ftp://c/' must be a ws:// URL"),
        (["ws://b/ws", b"ws://c/ws"], "upstream must be a string or a list of strings"),
        (["ws://b/ws", "ws://b/ws"], "upstream lists a URL twice"),
        (7, "upstream must be a string or a list of strings"),
    ],
)
def test_a_bad_upstream_list_built_in_code_gets_the_same_checks(value: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=f"agent 'a.o': {message}"):
        AgentConfig("a", "o", upstream=value)


def test_upstream_retry_after_is_a_gateway_setting_of_10_seconds_by_default() -> None:
    assert GatewaySettings().upstream_retry_after == 10
    assert loads_config("[gateway]\nupstream_retry_after = 2.5").gateway.upstream_retry_after == 2.5
    assert GatewaySettings(upstream_retry_after=0).upstream_retry_after == 0  # never left out
    for value, message in (
        ("-1", "upstream_retry_after must be a number of seconds >= 0"),
        ("'10s'", "upstream_retry_after must be a number, got str"),
    ):
        with pytest.raises(ConfigError, match=message):
            loads_config(f"[gateway]\nupstream_retry_after = {value}")


# --------------------------------------------------------------------------------------------
# The choice, without sockets


def pool_of(count: int) -> Pool:
    urls = [parse_upstream_url(f"ws://10.0.0.{i + 1}:9001/ws") for i in range(count)]
    return Pool("pool.o", urls, listed=True)


def test_ties_go_round_robin_and_the_fewest_live_sessions_win() -> None:
    pool = pool_of(3)
    order = []
    for _ in range(6):
        member = pool.plan(0.0)[0][0]
        pool.chosen(member)
        order.append(member.position)
        member.live -= 1  # the session ended before the next one came
    assert order == [1, 2, 3, 1, 2, 3]
    # Sessions that stay open: always the member with the fewest.
    for member, live in zip(pool.members, (4, 1, 2), strict=True):
        member.live = live
    assert [m.position for m in pool.plan(0.0)[0]] == [2, 3, 1]


def test_a_member_that_failed_is_left_out_for_retry_after_then_back() -> None:
    pool = pool_of(2)
    one, two = pool.members
    pool.chosen(one)
    pool.failed(one, now=100.0, retry_after=10.0, reason="connection refused")
    assert one.live == 0
    assert pool.plan(100.0) == ([two], [one])
    assert pool.plan(109.9) == ([two], [one])
    assert pool.plan(110.0) == ([two, one], [])  # back (the tie is member 2's: 1 had its turn)
    assert pool.status(105.0) == [
        "pool.o member 1: 0 sessions; left out for 5.0 s (connection refused)",
        "pool.o member 2: 0 sessions",
    ]
    pool.answered(one)
    assert pool.status(105.0)[0] == "pool.o member 1: 0 sessions"


def test_when_every_member_is_left_out_all_are_tried_the_one_back_soonest_first() -> None:
    pool = pool_of(3)
    for member, at in zip(pool.members, (5.0, 3.0, 4.0), strict=True):
        pool.chosen(member)
        pool.failed(member, now=at, retry_after=10.0, reason="timed out")
    assert pool.plan(6.0) == ([], [pool.members[1], pool.members[2], pool.members[0]])


def test_with_retry_after_0_a_member_that_failed_is_never_left_out() -> None:
    pool = pool_of(2)
    pool.chosen(pool.members[0])
    pool.failed(pool.members[0], now=1.0, retry_after=0.0, reason="connection refused")
    assert pool.plan(1.0) == ([pool.members[1], pool.members[0]], [])


# --------------------------------------------------------------------------------------------
# On real sockets


def pool_config(upstreams: Sequence[str], **settings: Any) -> Config:
    return Config(
        gateway=GatewaySettings(port=0, **settings),
        orgs=[OrgConfig("test")],
        agents=[AgentConfig("pool", "test", upstream=list(upstreams), max_sessions=500)],
    )


@asynccontextmanager
async def pool_gateway(*upstreams: str, **settings: Any) -> AsyncIterator[Gateway]:
    async with Gateway(pool_config(upstreams, **settings)).running() as gw:
        yield gw


def refusing_url() -> str:
    """A URL on which nothing listens: every dial is refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"ws://127.0.0.1:{s.getsockname()[1]}/ws"


class Slammer:
    """An upstream that accepts each connection and closes it at once (the dial fails fast, a
    502), counting them."""

    def __init__(self, port: int) -> None:
        self.url = f"ws://127.0.0.1:{port}/ws"
        self.dials = 0

    async def handle(self, stream: SocketStream) -> None:
        self.dials += 1
        await stream.aclose()


@asynccontextmanager
async def slammer() -> AsyncIterator[Slammer]:
    async with await anyio.create_tcp_listener(local_host="127.0.0.1") as listener:
        s = Slammer(listener.extra(SocketAttribute.local_port))
        async with anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, s.handle)
            yield s
            tg.cancel_scope.cancel()


class SessionLog(logging.Handler):
    """The gateway's end-of-session log lines as they come. The doorbell task logs them in the
    event loop's thread, so an anyio event can wake the test."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.ended: list[str] = []
        self.warnings: list[str] = []
        self._changed = anyio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if record.levelno >= logging.WARNING:
            self.warnings.append(message)
        if " ended by " in message:
            self.ended.append(message)
            self._changed.set()
            self._changed = anyio.Event()

    async def wait_ended(self, count: int) -> None:
        with anyio.fail_after(20):
            while len(self.ended) < count:
                await self._changed.wait()


@pytest.fixture
def session_log() -> Iterator[SessionLog]:
    logger = logging.getLogger("wsgate")
    handler, level = SessionLog(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


def echo_once(url: str, text: str = "hello") -> None:
    with connect(url) as ws:
        ws.send(text)
        assert ws.recv(10) == text


def readyz(port: int) -> str:
    """``GET /readyz`` from a client thread (the gateway's loop stays free to answer)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), head
    return body.decode()


@pytest.mark.anyio
async def test_30_sessions_at_once_spread_over_two_bots_their_counts_differ_by_at_most_1() -> None:
    a, b = Bot(), Bot()
    try:
        async with pool_gateway(a.url, b.url) as gw:
            url = f"{gw.url}/ws/generic/pool.test"
            seen: list[tuple[int, int, str]] = []
            # Every client holds its session open until all 30 are open; then one snapshot.
            everyone_open = threading.Barrier(
                30, action=lambda: seen.append((len(a.sessions), len(b.sessions), readyz(gw.port)))
            )

            def client(i: int) -> None:
                with connect(url) as ws:
                    ws.send(f"client {i}")
                    assert ws.recv(10) == f"client {i}"  # so the bot has seen this session
                    everyone_open.wait(20)

            async with anyio.create_task_group() as tg:
                for i in range(30):
                    tg.start_soon(in_thread, client, i)
        [(at_a, at_b, ready)] = seen
        assert at_a + at_b == 30 and abs(at_a - at_b) <= 1, (at_a, at_b)
        assert ready.splitlines() == [
            "ok",
            f"pool.test member 1: {at_a} sessions",
            f"pool.test member 2: {at_b} sessions",
        ]
    finally:
        a.close()
        b.close()


@pytest.mark.anyio
async def test_a_stopped_bot_is_skipped_and_no_new_session_fails(session_log: SessionLog) -> None:
    a, b = Bot(), Bot()
    member_1, member_2 = (
        f"member {i} (127.0.0.1:{urlsplit(bot.url).port})" for i, bot in ((1, a), (2, b))
    )
    try:
        async with pool_gateway(a.url, b.url) as gw:
            url = f"{gw.url}/ws/generic/pool.test"
            for _ in range(2):
                await in_thread(echo_once, url)
            assert (len(a.sessions), len(b.sessions)) == (1, 1)  # one each, in turn
            await in_thread(b.close)  # bot 2 stops: its port now refuses

            for i in range(10):
                await in_thread(echo_once, url, f"after {i}")
            assert (len(a.sessions), len(b.sessions)) == (11, 1)
            await session_log.wait_ended(12)
            ready = (await in_thread(readyz, gw.port)).splitlines()
        assert ready[:2] == ["ok", "pool.test member 1: 0 sessions"]
        assert ready[2].startswith("pool.test member 2: 0 sessions; left out for ")
        assert ready[2].endswith(" s (connection refused)")
        # The session log names the member that served; bot 2 failed once (a warning) and was
        # left out from then on, so no client was refused.
        assert sum(f" to {member_1} ended by " in line for line in session_log.ended) == 11
        assert sum(f" to {member_2} ended by " in line for line in session_log.ended) == 1
        assert session_log.warnings == [
            f"pool pool.test {member_2} failed (connection refused); left out for 10 s"
        ]
    finally:
        a.close()
        b.close()


@pytest.mark.anyio
async def test_a_member_that_failed_is_left_out_for_upstream_retry_after() -> None:
    bot = Bot()
    try:
        async with slammer() as bad, pool_gateway(bad.url, bot.url) as gw:
            url = f"{gw.url}/ws/generic/pool.test"
            for _ in range(4):
                await in_thread(echo_once, url)
            # Member 1 came first (its turn), failed, and was not dialled again, although every
            # later session found it first in turn (each one on member 2 passed the turn back).
            assert bad.dials == 1
            assert len(bot.sessions) == 4
            ready = (await in_thread(readyz, gw.port)).splitlines()
        # Closed at once: an EOF or a reset, depending on timing.
        assert re.fullmatch(
            r"pool\.test member 1: 0 sessions; left out for \d+\.\d s "
            r"\(connection (closed before its answer|reset by peer)\)",
            ready[1],
        ), ready
    finally:
        bot.close()


@pytest.mark.anyio
async def test_a_member_left_out_is_tried_again_once_upstream_retry_after_has_passed() -> None:
    retry_after = 0.3
    bot = Bot()
    try:
        async with (
            slammer() as bad,
            pool_gateway(bad.url, bot.url, upstream_retry_after=retry_after) as gw,
        ):
            url = f"{gw.url}/ws/generic/pool.test"
            await in_thread(echo_once, url)
            assert (bad.dials, len(bot.sessions)) == (1, 1)
            # The member was left out before this instant, for retry_after on the same clock.
            await anyio.sleep_until(anyio.current_time() + retry_after)
            await in_thread(echo_once, url)
            assert (bad.dials, len(bot.sessions)) == (2, 2)  # tried again, skipped again
    finally:
        bot.close()


@pytest.mark.anyio
async def test_when_every_member_is_down_the_client_gets_502_naming_each_failure() -> None:
    async with pool_gateway(refusing_url(), refusing_url()) as gw:
        status, body = await http_exchange(gw.port, upgrade_request("/ws/generic/pool.test"))
    assert status == 502
    assert body == (
        b"bot unreachable: every member failed (1: connection refused; 2: connection refused)\n"
    )


@pytest.mark.anyio
async def test_when_every_member_is_left_out_every_member_is_tried_again() -> None:
    async with slammer() as one, slammer() as two, pool_gateway(one.url, two.url) as gw:
        for attempt in (1, 2):
            status, _ = await http_exchange(gw.port, upgrade_request("/ws/generic/pool.test"))
            assert status == 502
            assert (one.dials, two.dials) == (attempt, attempt)


@pytest.mark.anyio
async def test_members_that_never_answer_share_one_dial_timeout_and_the_client_gets_504() -> None:
    dial_timeout = 2.0
    quiet, silent = Sentinel(), Sentinel()  # accept TCP, never answer the upgrade
    try:
        async with pool_gateway(quiet.url, silent.url, dial_timeout=dial_timeout) as gw:
            began = anyio.current_time()
            status, body = await http_exchange(gw.port, upgrade_request("/ws/generic/pool.test"))
            elapsed = anyio.current_time() - began
        assert (status, body) == (
            504,
            b"bot unreachable: every member failed (1: timed out; 2: timed out)\n",
        )
        assert quiet.dialled() and silent.dialled()
        # One budget for both (each had half of it), not one dial_timeout each.
        assert dial_timeout - 0.1 <= elapsed < 1.5 * dial_timeout, elapsed
    finally:
        quiet.sock.close()
        silent.sock.close()


@pytest.mark.anyio
async def test_a_member_that_hangs_gets_its_share_of_the_budget_and_the_next_one_serves() -> None:
    quiet, bot = Sentinel(), Bot()
    try:
        async with pool_gateway(quiet.url, bot.url, dial_timeout=2.0) as gw:
            url = f"{gw.url}/ws/generic/pool.test"
            await in_thread(echo_once, url)  # member 1 first: it hangs, member 2 answers
            assert quiet.dialled() and len(bot.sessions) == 1
            await in_thread(echo_once, url)  # member 1 is left out now: straight to member 2
            assert not quiet.dialled() and len(bot.sessions) == 2
    finally:
        quiet.sock.close()
        bot.close()


@pytest.mark.anyio
async def test_a_session_that_ends_frees_its_place_on_its_member(session_log: SessionLog) -> None:
    a, b = Bot(), Bot()
    try:
        async with pool_gateway(a.url, b.url) as gw:
            url = f"{gw.url}/ws/generic/pool.test"
            last_one_done = threading.Event()

            def three_sessions() -> None:
                # In turn: member 1, member 2, member 1 (a tie: its turn). Then the two on
                # member 1 end and the one on member 2 stays open.
                with connect(url) as first, connect(url) as second, connect(url) as third:
                    for ws in (first, second, third):
                        ws.send("hi")
                        assert ws.recv(10) == "hi"
                    first.close()
                    third.close()
                    last_one_done.wait(20)

            async with anyio.create_task_group() as tg:
                tg.start_soon(in_thread, three_sessions)
                await session_log.wait_ended(2)
                assert (len(a.sessions), len(b.sessions)) == (2, 1)
                # Member 1 now has none, member 2 one: the next goes to member 1. (Had the ended
                # sessions kept their places, member 1 would count 2 and member 2 win.)
                await in_thread(echo_once, url)
                assert (len(a.sessions), len(b.sessions)) == (3, 1)
                last_one_done.set()
    finally:
        a.close()
        b.close()


@pytest.mark.anyio
async def test_readyz_keeps_its_answer_for_agents_without_a_pool(sentinel: Sentinel) -> None:
    config = Config(
        gateway=GatewaySettings(port=0),
        orgs=[OrgConfig("test")],
        agents=[AgentConfig("one", "test", upstream=sentinel.url)],
    )
    async with Gateway(config).running() as gw:
        status, body = await http_exchange(gw.port, b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (status, body) == (200, b"ok\n")
    assert not sentinel.dialled()
