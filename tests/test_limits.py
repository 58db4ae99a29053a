"""Time limits of a session, in process on both backends: ``max_session_duration`` (through the
Gateway's ``session_time_limit`` keyword, to stay under a second) and ``drain_timeout`` at stop."""

from __future__ import annotations

import math
import socket
import time

import anyio
import pytest

from wsgate import ConfigError, Gateway, GatewaySettings

from .helpers import Bot, closed_with, connect, in_thread, make_config, serving

pytestmark = pytest.mark.anyio

LIMIT = 0.5
WAIT = 20.0


async def test_a_session_over_its_time_limit_is_closed_1000_on_both_sides(bot: Bot) -> None:
    gateway = Gateway(make_config(bot.url), session_time_limit=LIMIT)
    async with gateway.running() as gw:

        def client() -> tuple[tuple[int, str], float]:
            with connect(f"{gw.url}/ws/generic/bot.test") as ws:
                opened = time.monotonic()
                ws.send("hello")
                assert ws.recv(WAIT) == "hello"
                close = closed_with(ws.recv, WAIT)
                return close, time.monotonic() - opened

        close, lasted = await in_thread(client)
        bot.wait_ended()
    assert close == (1000, "session time limit")
    assert bot.sessions[0].close == (1000, "session time limit")
    assert bot.sessions[0].messages == ["hello"]
    assert LIMIT - 0.05 <= lasted < LIMIT + 10


async def test_the_builtin_echo_is_held_to_the_time_limit_too(bot: Bot) -> None:
    async with Gateway(make_config(bot.url), session_time_limit=LIMIT).running() as gw:

        def client() -> tuple[int, str]:
            with connect(f"{gw.url}/ws/generic/echo.test") as ws:
                ws.send(b"ping")
                assert ws.recv(WAIT) == b"ping"
                return closed_with(ws.recv, WAIT)

        assert await in_thread(client) == (1000, "session time limit")


async def test_a_session_shorter_than_the_limit_ends_as_its_peers_decide(bot: Bot) -> None:
    async with Gateway(make_config(bot.url), session_time_limit=WAIT).running() as gw:

        def client() -> None:
            with connect(f"{gw.url}/ws/generic/bot.test") as ws:
                ws.send("bye")
                assert ws.recv(WAIT) == "bye"
                ws.close(4000, "done")

        await in_thread(client)
        bot.wait_ended()
    assert bot.sessions[0].close == (4000, "done")


async def test_a_session_open_at_stop_runs_on_then_gets_1001_after_the_drain_timeout(
    bot: Bot,
) -> None:
    drain = 0.5
    async with serving(bot.url, drain_timeout=drain) as gw:
        connected = anyio.Event()
        stopped = anyio.Event()
        result: list[tuple[tuple[int, str], float]] = []

        def client() -> None:
            with connect(f"{gw.url}/ws/generic/bot.test") as ws:
                ws.send("before")
                assert ws.recv(WAIT) == "before"
                anyio.from_thread.run_sync(connected.set)
                anyio.from_thread.run(stopped.wait)
                stop_seen = time.monotonic()
                ws.send("during the drain")  # still relayed: the drain lets sessions finish
                assert ws.recv(WAIT) == "during the drain"
                result.append((closed_with(ws.recv, WAIT), time.monotonic() - stop_seen))

        async with anyio.create_task_group() as tg:
            tg.start_soon(in_thread, client)
            await connected.wait()
            gw.stop()
            stopped.set()
        bot.wait_ended()
    [(close, waited)] = result
    assert close == (1001, "gateway shutting down")
    assert bot.sessions[0].close == (1001, "gateway shutting down")
    assert bot.sessions[0].messages == ["before", "during the drain"]
    assert drain - 0.1 <= waited < drain + 10


async def test_stop_returns_at_once_when_no_session_is_open(bot: Bot) -> None:
    gateway = Gateway(make_config(bot.url, drain_timeout=WAIT))
    with anyio.fail_after(WAIT / 2):  # the drain would last WAIT: fail well before that
        async with gateway.running() as gw:
            port = gw.port
            stopping = anyio.current_time()
    took = anyio.current_time() - stopping
    assert took < WAIT / 4, f"stop took {took:.1f} s with no session open (drain_timeout {WAIT} s)"
    with pytest.raises(ConnectionRefusedError):  # it has really stopped: nothing listens
        socket.create_connection(("127.0.0.1", port), timeout=WAIT).close()


@pytest.mark.parametrize("bad", [0, -1.0, math.nan, math.inf, True, "60"])
def test_the_session_time_limit_keyword_takes_only_a_positive_number_of_seconds(
    bad: object,
) -> None:
    with pytest.raises(ValueError, match="session_time_limit must be a number of seconds > 0"):
        Gateway(session_time_limit=bad)  # type: ignore[arg-type]


def test_without_the_keyword_the_limit_is_the_setting_which_keeps_its_range() -> None:
    assert Gateway().session_time_limit == GatewaySettings().max_session_duration == 7200
    config = make_config("ws://127.0.0.1:9/ws", max_session_duration=60)
    assert Gateway(config).session_time_limit == 60
    assert Gateway(config, session_time_limit=0.25).session_time_limit == 0.25
    for seconds in (59, 14401):
        with pytest.raises(ConfigError, match="max_session_duration must be 60 to 14400"):
            GatewaySettings(max_session_duration=seconds)
