"""Metrics (issue 14) on a real gateway: sessions of every kind are opened, relayed, refused and
closed, then ``/metrics`` is scraped and parsed with ``prometheus_client.parser``; every counter
moved by exactly what happened. Also: ``promtool check metrics`` accepts the output, a hostile
path adds no label, the metrics listener answers through a drain, JSON log lines parse and hold
no token, the Grafana dashboard names only metrics that exist, and ``wsgate status`` reads it all.
"""

from __future__ import annotations

import io
import json
import logging
import random
import re
import shutil
import signal
import socket
import string
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import anyio
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.exceptions import ConnectionClosed

import wsgate.tokens
from wsgate import AgentConfig, BotArguments, Config, Gateway, GatewaySettings, OrgConfig
from wsgate.cli import main
from wsgate.errors import HttpError, ReplayStoreUnavailable
from wsgate.logs import JsonFormatter
from wsgate.metrics import close_code_label, dial_failure, ended_by
from wsgate.status import parse, quantile, render, status
from wsgate.tokens import TokenAuthority

from .helpers import Bot, Sentinel, connect, http_exchange, in_thread, start_json, upgrade_request
from .processes import TIMEOUT, Wsgate
from .telephony import opening_messages, provider_target

pytestmark = pytest.mark.anyio

SECRET = "metrics-test-secret-0123456789"
DASHBOARD = Path(__file__).parent.parent / "docs" / "grafana" / "wsgate.json"
AGENTS = ("relay.test", "echo.test", "one.test", "talk.test", "dead.test", "inproc.test")
GET_METRICS = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"


class Scrape:
    """One scrape: every sample by name and labels."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.families = {f.name: f for f in text_string_to_metric_families(text)}
        self.samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for f in self.families.values()
            for s in f.samples
        }

    def __call__(self, name: str, **labels: str) -> float:
        """The value of one series; 0 when it does not exist (yet)."""
        return self.samples.get((name, tuple(sorted(labels.items()))), 0.0)

    def series(self, name: str) -> dict[tuple[tuple[str, str], ...], float]:
        """Every series of sample ``name`` that is not zero, by labels."""
        return {labels: v for (n, labels), v in self.samples.items() if n == name and v}

    def label_values(self, label: str) -> set[str]:
        return {v for (_, labels) in self.samples for k, v in labels if k == label}


async def scrape(port: int) -> Scrape:
    status_, body = await http_exchange(port, GET_METRICS)
    assert status_ == 200
    return Scrape(body.decode())


async def scrape_until(port: int, check: Callable[[Scrape], bool]) -> Scrape:
    """Scrape until ``check`` holds: the engine publishes a session's counts right after the
    read that carried them, a moment after the peer may have seen the bytes."""
    with anyio.fail_after(10):
        while not check(found := await scrape(port)):
            await anyio.sleep(0.01)
    return found


async def eventually(check: Callable[[], bool], timeout: float = 10) -> None:
    """Wait for ``check()``: a poll with a deadline, for what is counted when a session ends."""
    with anyio.fail_after(timeout):
        while not check():
            await anyio.sleep(0.01)


@contextmanager
def refused_port() -> Iterator[str]:
    """A ``ws://`` URL whose port is bound and not listening: every connect is refused."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    try:
        yield f"ws://127.0.0.1:{sock.getsockname()[1]}/ws"
    finally:
        sock.close()


class NotABot:
    """An HTTP server that answers every request with 404: a bot URL that is wrong."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.sock.getsockname()[1]}/ws"

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.recv(65536)
                conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")


def config(bot_url: str, dead_url: str, **settings: Any) -> Config:
    settings.setdefault("secrets", [SECRET])
    return Config(
        gateway=GatewaySettings(port=0, **settings),
        orgs=[OrgConfig("test", public_keys=["pk_test"])],
        agents=[
            AgentConfig("relay", "test", upstream=bot_url),
            AgentConfig("echo", "test", builtin="echo"),
            AgentConfig("one", "test", builtin="echo", max_sessions=1),
            AgentConfig("talk", "test", websocket_auth="token", upstream=bot_url),
            AgentConfig("dead", "test", upstream=dead_url),
        ],
    )


async def parrot(args: BotArguments) -> None:
    """An in-process bot: a greeting, two answers, then it ends the session (1000)."""
    await args.websocket.send_text("hello")
    for _ in range(2):
        message = await args.websocket.receive_text()
        await args.websocket.send_text(message.upper())


@asynccontextmanager
async def gateway(bot: Bot, **settings: Any) -> AsyncIterator[Gateway]:
    with refused_port() as dead:
        gw = Gateway(config(bot.url, dead, **settings))
        gw.bot("inproc.test")(parrot)
        async with gw.running():
            yield gw


async def upgrade(gw: Gateway, target: str, *headers: str) -> int:
    status_, _ = await http_exchange(gw.port, upgrade_request(target, *headers))
    return status_


def bearer(token: str) -> str:
    return f"Authorization: Bearer {token}"


@contextmanager
def json_log() -> Iterator[io.StringIO]:
    """Every ``wsgate`` log record of the block, DEBUG included, as JSON lines."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("wsgate")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield out
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


async def test_every_counter_moves_by_exactly_what_happened(bot: Bot) -> None:
    tokens: list[str] = []
    with json_log() as log_lines:
        async with gateway(bot) as gw:
            before = await scrape(gw.port)
            for agent in AGENTS:
                assert before("wsgate_sessions_opened_total", agent=agent) == 0
                for kind in ("upstream", "inprocess", "builtin"):
                    assert ("wsgate_sessions_active", (("agent", agent), ("kind", kind))) in (
                        before.samples
                    ), "every configured agent is there from the start"

            # Sessions of each kind, each ended its own way.
            def relayed() -> None:
                with connect(f"{gw.url}/ws/generic/relay.test") as ws:
                    for message in ("a" * 10, b"b" * 20, "c" * 30):
                        ws.send(message)
                        assert ws.recv() == message

            def echoed() -> None:
                with connect(f"{gw.url}/ws/generic/echo.test") as ws:
                    for _ in range(2):
                        ws.send("x" * 5)
                        ws.recv()
                    ws.close(4001, "bye")

            def in_process() -> None:
                with connect(f"{gw.url}/ws/generic/inproc.test") as ws:
                    assert ws.recv() == "hello"
                    for message in ("ab", "cde"):
                        ws.send(message)
                        assert ws.recv() == message.upper()
                    with pytest.raises(ConnectionClosed) as closed:
                        ws.recv()
                    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1000

            await in_thread(relayed)
            bot.wait_ended()
            await in_thread(echoed)
            await in_thread(in_process)

            # A token session, then its token again (replayed).
            code, started = await start_json(gw, "talk", "pk_test")
            assert code == 200
            token = started["token"]
            tokens.append(token)

            def token_session() -> None:
                with connect(f"{gw.url}/ws/generic/talk.test", additional_headers={
                    "Authorization": f"Bearer {token}"}) as ws:  # fmt: skip
                    ws.send("t")
                    assert ws.recv() == "t"

            await in_thread(token_session)
            bot.wait_ended()

            # Refusals, one of each kind of check.
            later = time.time() - 3600
            bad = {
                "replayed": token,
                "malformed": "not-a-token",
                "bad_signature": wsgate.tokens.mint("another-secret-0123", "talk.test").token,
                "wrong_agent": wsgate.tokens.mint(SECRET, "relay.test").token,
                "expired": wsgate.tokens.mint(SECRET, "talk.test", now=later).token,
                "wrong_body": wsgate.tokens.mint(SECRET, "talk.test", body={"a": 1}).token,
            }
            tokens += bad.values()
            for value in bad.values():
                assert await upgrade(gw, "/ws/generic/talk.test", bearer(value)) == 403
            assert await upgrade(gw, "/ws/generic/talk.test") == 403  # missing
            assert await upgrade(gw, "/ws/generic/nope.test") == 404
            assert await upgrade(gw, "/ws/generic/not_a_host") == 400
            no_key = upgrade_request("/ws/generic/relay.test").replace(b"Sec-WebSocket-Key", b"X")
            assert (await http_exchange(gw.port, no_key))[0] == 400
            assert await upgrade(gw, "/ws/generic/relay.test?body=!!!") == 400
            big = "eyJ" + "A" * 6000
            assert await upgrade(gw, f"/ws/generic/relay.test?body={big}") == 413
            assert await upgrade(gw, "/ws/generic/dead.test") == 502

            holding, release = threading.Event(), threading.Event()

            def hold() -> None:
                with connect(f"{gw.url}/ws/generic/one.test") as ws:
                    ws.send("held")
                    ws.recv()
                    holding.set()
                    release.wait(TIMEOUT)

            async with anyio.create_task_group() as tg:
                tg.start_soon(in_thread, hold)
                assert await in_thread(holding.wait, TIMEOUT)
                live = await scrape_until(
                    gw.port,
                    lambda s: (
                        s("wsgate_bytes_total", agent="one.test", direction="bot_to_client") == 4
                    ),
                )  # counted while the session goes on
                assert live("wsgate_sessions_active", agent="one.test", kind="builtin") == 1
                assert await upgrade(gw, "/ws/generic/one.test") == 503
                release.set()

            # /start answers.
            assert (await start_json(gw, "talk", "pk_wrong"))[0] == 401
            assert (await start_json(gw, "nope", "pk_test"))[0] == 404
            assert (await start_json(gw, "relay", "pk_test", body={"a": 1}))[0] == 400

            await eventually(lambda: gw.sessions() == 0)
            m = await scrape(gw.port)

    served = {"relay.test": "upstream", "talk.test": "upstream", "echo.test": "builtin"}
    served |= {"one.test": "builtin", "inproc.test": "inprocess"}
    for agent in AGENTS:
        assert m("wsgate_sessions_opened_total", agent=agent) == (agent != "dead.test")
        for kind in ("upstream", "inprocess", "builtin"):
            assert m("wsgate_sessions_active", agent=agent, kind=kind) == 0
    traffic = {  # agent: (messages, bytes) client -> bot, then bot -> client
        "relay.test": (3, 60, 3, 60),
        "echo.test": (2, 10, 2, 10),
        "inproc.test": (2, 5, 3, 10),  # the in-process bot's own messages count too
        "talk.test": (1, 1, 1, 1),
        "one.test": (1, 4, 1, 4),
    }
    for agent, (m_in, b_in, m_out, b_out) in traffic.items():
        assert m("wsgate_messages_total", agent=agent, direction="client_to_bot") == m_in
        assert m("wsgate_bytes_total", agent=agent, direction="client_to_bot") == b_in
        assert m("wsgate_messages_total", agent=agent, direction="bot_to_client") == m_out
        assert m("wsgate_bytes_total", agent=agent, direction="bot_to_client") == b_out
        assert m("wsgate_session_duration_seconds_count", agent=agent) == 1
    assert m.series("wsgate_sessions_closed_total") == {
        (("agent", "relay.test"), ("code", "1000"), ("ended_by", "client")): 1,
        (("agent", "echo.test"), ("code", "4xxx"), ("ended_by", "client")): 1,
        (("agent", "inproc.test"), ("code", "1000"), ("ended_by", "bot")): 1,
        (("agent", "talk.test"), ("code", "1000"), ("ended_by", "client")): 1,
        (("agent", "one.test"), ("code", "1000"), ("ended_by", "client")): 1,
    }
    assert m.series("wsgate_upgrades_refused_total") == {
        (("agent", "talk.test"), ("status", "403")): 7,
        (("agent", ""), ("status", "404")): 1,
        (("agent", ""), ("status", "400")): 1,  # a malformed host names no agent
        (("agent", "relay.test"), ("status", "400")): 2,
        (("agent", "relay.test"), ("status", "413")): 1,
        (("agent", "dead.test"), ("status", "502")): 1,
        (("agent", "one.test"), ("status", "503")): 1,
    }
    assert m.series("wsgate_token_rejections_total") == {
        (("reason", reason),): 1 for reason in [*bad, "missing"]
    }
    assert m.series("wsgate_start_requests_total") == {
        (("agent", "talk.test"), ("status", "200")): 1,
        (("agent", ""), ("status", "401")): 1,
        (("agent", ""), ("status", "404")): 1,
        (("agent", "relay.test"), ("status", "400")): 1,
    }
    assert m("wsgate_replay_store_seconds_count") == 2  # the claim, and the replayed one
    assert m("wsgate_replay_store_errors_total") == 0
    assert m("wsgate_upstream_dial_seconds_count", agent="relay.test") == 1
    assert m("wsgate_upstream_dial_seconds_count", agent="talk.test") == 1
    assert m.series("wsgate_upstream_dial_failures_total") == {
        (("agent", "dead.test"), ("reason", "refused")): 1
    }
    assert m("wsgate_upgrades_pending") == 0
    assert m("wsgate_draining") == 0
    assert m("wsgate_build_info", version=m.label_values("version").pop()) == 1
    assert m("process_open_fds") > 0
    assert m.label_values("agent") <= {*AGENTS, ""}

    # The same story in the JSON log lines, and never a token in them.
    lines = log_lines.getvalue().splitlines()
    records = [json.loads(line) for line in lines]
    assert all({"ts", "level", "event", "message"} <= r.keys() for r in records)
    ends = {r["agent"]: r for r in records if r["event"] == "session_end"}
    assert set(ends) == set(traffic)
    inproc = ends["inproc.test"]
    assert (inproc["ended_by"], inproc["code"]) == ("bot", "1000")
    assert (inproc["messages_client_to_bot"], inproc["bytes_client_to_bot"]) == (2, 5)
    assert (inproc["messages_bot_to_client"], inproc["bytes_bot_to_client"]) == (3, 10)
    assert inproc["duration"] >= 0 and re.fullmatch(r"[0-9a-f-]{36}", inproc["session_id"])
    assert "out 3 msgs 10 B" in inproc["message"], "the text line counts the bot's messages"
    assert ends["echo.test"]["code"] == "4xxx"
    for line in lines:
        for value in tokens:
            assert value not in line


async def test_a_scrape_counts_the_end_of_every_session_whose_place_is_given_back(
    bot: Bot,
) -> None:
    # The engine gives back the place of a session it opened as soon as it ends, and tells
    # Python of the end at leisure (within 20 ms, with others): a scrape catches up first, so
    # its gauges and its counts agree with the gateway's count of sessions. (On the metrics
    # port: a request on the gateway's own port is news that the engine tells at once.)
    async with gateway(bot, metrics_port=0) as gw:

        def sessions() -> None:
            for _ in range(8):
                echo_once(f"{gw.url}/ws/generic/relay.test")

        for n in range(8, 40, 8):
            # Eight one after the other: the first end is told at once, the next ones wait.
            await in_thread(sessions)
            await eventually(lambda: gw.sessions() == 0)
            m = await scrape(gw.metrics_port)
            assert m("wsgate_sessions_active", agent="relay.test", kind="upstream") == 0
            closed = m.series("wsgate_sessions_closed_total")
            assert closed == {
                (("agent", "relay.test"), ("code", "1000"), ("ended_by", "client")): n
            }
            assert m("wsgate_session_duration_seconds_count", agent="relay.test") == n


def echo_once(url: str) -> None:
    with connect(url) as ws:
        ws.send("x")
        assert ws.recv() == "x"


def held_until_closed(url: str, holding: threading.Event, code: list[int]) -> None:
    """A session that echoes once, sets ``holding``, then waits for the gateway's close and
    adds its code to ``code``."""
    with connect(url) as ws:
        ws.send("x")
        ws.recv()
        holding.set()
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(TIMEOUT)
        assert closed.value.rcvd is not None
        code.append(closed.value.rcvd.code)


async def test_the_engines_own_sessions_are_counted_with_the_gateways_reasons(bot: Bot) -> None:
    # The engine counts the dials and ends of the sessions it opened itself (rust/counters.rs);
    # the scrape names who ended them from the gateway's reason, as for the Python path's own:
    # here a drain's 1001, beside a client's 1000 and the time each lasted. Messages over the
    # limit, each of its own size, are ended by their code alone: their reasons (which name the
    # size a client chose) are not kept apart, so they never crowd out the drain's.
    with refused_port() as dead:
        gw = Gateway(config(bot.url, dead, drain_timeout=60, max_message_size=1000))
    holding, code = threading.Event(), list[int]()

    def too_big(url: str) -> None:
        for size in range(1001, 1071):
            with connect(url) as ws:
                ws.send(b"x" * size)
                with pytest.raises(ConnectionClosed) as closed:
                    ws.recv(TIMEOUT)
                assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009

    async with anyio.create_task_group() as tg:
        await tg.start(gw.serve)
        assert gw._sessions is not None and "relay.test" in gw._sessions.fast, "the engine's"
        url = f"{gw.url}/ws/generic/relay.test"
        await in_thread(echo_once, url)
        await in_thread(too_big, url)
        tg.start_soon(in_thread, held_until_closed, url, holding, code)
        assert await in_thread(holding.wait, TIMEOUT)
        gw.stop()
        gw.stop()  # a second stop: close the rest now (1001)
    assert code == [1001]
    m = Scrape(gw.metrics.exposition().partition(b"\r\n\r\n")[2].decode())
    assert m.series("wsgate_sessions_closed_total") == {
        (("agent", "relay.test"), ("code", "1000"), ("ended_by", "client")): 1,
        (("agent", "relay.test"), ("code", "1009"), ("ended_by", "gateway_limit")): 70,
        (("agent", "relay.test"), ("code", "1001"), ("ended_by", "gateway_drain")): 1,
    }
    assert m("wsgate_session_duration_seconds_count", agent="relay.test") == 72
    assert m("wsgate_session_duration_seconds_bucket", agent="relay.test", le="+Inf") == 72
    les = {dict(labels)["le"] for (name, labels) in m.samples if name.endswith("_bucket")}
    assert les >= {"0.5", "1.0", "14400.0", "0.001", "0.0025", "10.0", "+Inf"}, "as Prometheus's"
    assert m("wsgate_upstream_dial_seconds_count", agent="relay.test") == 72
    assert 0 < m("wsgate_upstream_dial_seconds_sum", agent="relay.test") < 72 * TIMEOUT


async def test_every_session_that_ended_is_counted_and_logged_before_a_stop(bot: Bot) -> None:
    # The ends of the sessions the engine opened are told at leisure: a stop right after a
    # burst of them still logs each one.
    def sessions() -> None:
        for _ in range(8):
            echo_once(f"{gw.url}/ws/generic/relay.test")

    with json_log() as out:
        async with gateway(bot) as gw:
            await in_thread(sessions)
        ends = [json.loads(line) for line in out.getvalue().splitlines()]
    ends = [e for e in ends if e["event"] == "session_end"]
    assert [e["agent"] for e in ends] == ["relay.test"] * 8
    assert all(0 <= e["duration"] < 5 for e in ends)


async def test_promtool_accepts_the_exposition(bot: Bot) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian's prometheus package; .ci/run installs it)")
    async with gateway(bot) as gw:

        def session() -> None:
            with connect(f"{gw.url}/ws/generic/echo.test") as ws:
                ws.send("x")
                ws.recv()

        await in_thread(session)
        assert await upgrade(gw, "/ws/generic/talk.test") == 403
        assert await upgrade(gw, "/ws/generic/dead.test") == 502
        await eventually(lambda: gw.sessions() == 0)
        _, body = await http_exchange(gw.port, GET_METRICS)
    checked = subprocess.run(
        [promtool, "check", "metrics"], input=body, capture_output=True, timeout=TIMEOUT
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


async def test_a_hostile_path_adds_no_label(bot: Bot) -> None:
    rng = random.Random(14)

    def name() -> str:
        return "".join(rng.choices(string.ascii_lowercase + string.digits, k=12))

    async with gateway(bot) as gw:
        before = await scrape(gw.port)
        names = [name() for _ in range(10_000)]
        shapes = (
            "/ws/generic/{}.test",
            "/ws/generic/{}.{}",
            "/ws/generic?serviceHost={}.test",
            "/ws/telnyx?serviceHost={}.{}",
            "/ws/generic/{}.test/{}",
            "/ws/{}",
        )
        requests = [
            upgrade_request(shapes[i % len(shapes)].format(n, n[::-1])) for i, n in enumerate(names)
        ]
        requests += [
            b"POST /v1/public/%s/start HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer pk_test\r\n"
            b"Content-Length: 0\r\n\r\n" % n.encode()
            for n in names[:500]
        ]

        async def worker(batch: list[bytes]) -> None:
            for request in batch:
                assert (await http_exchange(gw.port, request))[0] == 404

        async with anyio.create_task_group() as tg:
            for i in range(50):
                tg.start_soon(worker, requests[i::50])
        after = await scrape(gw.port)
    assert after.label_values("agent") <= {*AGENTS, ""}
    new = set(after.samples) - set(before.samples)
    assert {n for n, _ in new} <= {
        "wsgate_upgrades_refused_total",
        "wsgate_upgrades_refused_created",
        "wsgate_start_requests_total",
        "wsgate_start_requests_created",
    }
    assert len(new) == 4, "one series for refusals and one for /start, with agent=''"
    assert after("wsgate_upgrades_refused_total", agent="", status="404") == 10_000
    assert after("wsgate_start_requests_total", agent="", status="404") == 500
    for value in after.label_values("agent") | after.label_values("status"):
        assert value not in names


async def test_the_metrics_listener_answers_through_a_drain(bot: Bot) -> None:
    with refused_port() as dead:
        gw = Gateway(config(bot.url, dead, metrics_port=0, drain_timeout=60))
    holding, code = threading.Event(), list[int]()

    async with anyio.create_task_group() as tg:
        await tg.start(gw.serve)
        port = gw.metrics_port
        assert port != gw.port
        assert (await http_exchange(gw.port, GET_METRICS))[0] == 404, "not on the clients' port"
        assert (await scrape(port))("wsgate_draining") == 0
        for path, expected in (("/livez", 200), ("/readyz", 200), ("/nope", 404)):
            request = f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
            assert (await http_exchange(port, request))[0] == expected
        post = b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
        assert (await http_exchange(port, post))[0] == 405
        tg.start_soon(in_thread, held_until_closed, f"{gw.url}/ws/generic/echo.test", holding, code)
        assert await in_thread(holding.wait, TIMEOUT)

        gw.stop()  # the clients' listener closes; sessions drain
        readyz = b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n"
        status_, body = await http_exchange(port, readyz)
        assert (status_, body) == (503, b"draining\n")
        livez = b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n"
        assert (await http_exchange(port, livez))[0] == 200
        during = await scrape(port)
        assert during("wsgate_draining") == 1
        assert during("wsgate_sessions_active", agent="echo.test", kind="builtin") == 1
        with pytest.raises(OSError):
            await anyio.connect_tcp("127.0.0.1", gw.port)
        gw.stop()  # a second stop: close the rest now (1001)
    assert code == [1001]
    with pytest.raises(OSError):
        await anyio.connect_tcp("127.0.0.1", port)
    after = Scrape(gw.metrics.exposition().partition(b"\r\n\r\n")[2].decode())
    assert after.series("wsgate_sessions_closed_total") == {
        (("agent", "echo.test"), ("code", "1001"), ("ended_by", "gateway_drain")): 1
    }


async def test_the_metrics_listener_gives_readyz_the_same_answer_as_the_gateways_port(
    bot: Bot,
) -> None:
    with refused_port() as dead:
        settings = config(bot.url, dead, metrics_port=0)
    pooled = AgentConfig("pool", "test", upstream=[bot.url, dead])
    settings = Config(settings.gateway, settings.orgs, [*settings.agents, pooled])
    async with Gateway(settings).running() as gw:
        readyz = b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n"
        own = await http_exchange(gw.port, readyz)
        assert own[0] == 200 and b"pool.test member 2" in own[1]
        assert await http_exchange(gw.metrics_port, readyz) == own


async def test_with_metrics_off_there_is_no_metrics_path_and_the_engine_counts_nothing(
    bot: Bot,
) -> None:
    async with gateway(bot, metrics=False) as gw:

        def session() -> None:
            with connect(f"{gw.url}/ws/generic/echo.test") as ws:
                ws.send("x")
                ws.recv()

        await in_thread(session)
        await eventually(lambda: gw.sessions() == 0)
        assert (await http_exchange(gw.port, GET_METRICS))[0] == 404
        assert gw._sessions is not None and gw._sessions.relay.counters() == []


async def test_the_bot_dial_failures_are_counted_by_reason(bot: Bot, sentinel: Sentinel) -> None:
    wrong = NotABot()
    with refused_port() as dead:
        cfg = Config(
            gateway=GatewaySettings(port=0, dial_timeout=0.3),
            orgs=[OrgConfig("test")],
            agents=[
                AgentConfig("dead", "test", upstream=dead),
                AgentConfig("mute", "test", upstream=sentinel.url),
                AgentConfig("wrong", "test", upstream=wrong.url),
            ],
        )
        async with Gateway(cfg).running() as gw:
            for agent in ("dead", "mute", "wrong"):
                # 504 for the one that timed out, where the dial tells timeouts apart
                assert await upgrade(gw, f"/ws/generic/{agent}.test") in (502, 504)
            m = await scrape(gw.port)
    wrong.sock.close()
    assert m.series("wsgate_upstream_dial_failures_total") == {
        (("agent", "dead.test"), ("reason", "refused")): 1,
        (("agent", "mute.test"), ("reason", "timeout")): 1,
        (("agent", "wrong.test"), ("reason", "bad_answer")): 1,
    }
    assert m.series("wsgate_upstream_dial_seconds_count") == {}


async def test_rate_limited_requests_and_twilio_refusals_are_counted(bot: Bot) -> None:
    async with gateway(bot, client_request_rate=0.001) as gw:
        assert await upgrade(gw, "/ws/generic/nope.test") == 404  # the one request allowed
        assert await upgrade(gw, "/ws/generic/echo.test") == 429
        assert (await start_json(gw, "talk", "pk_test"))[0] == 429
        m = await scrape(gw.port)
    assert m("wsgate_upgrades_refused_total", agent="echo.test", status="429") == 1
    assert m("wsgate_start_requests_total", agent="", status="429") == 1

    async with gateway(bot) as gw:

        def twilio(host: str) -> int:
            with connect(gw.url + provider_target("twilio", host)) as ws:
                opening = opening_messages("twilio", service_host=host)
                for message in opening if host else ["not JSON"]:
                    ws.send(message)
                with pytest.raises(ConnectionClosed) as closed:
                    ws.recv(TIMEOUT)
            assert closed.value.rcvd is not None
            return closed.value.rcvd.code

        assert await in_thread(twilio, "nope.test") == 1008
        assert await in_thread(twilio, "talk.test") == 1008  # no token
        assert await in_thread(twilio, "") == 1008  # an opening refused: counted as 400
        m = await scrape(gw.port)
    assert m.series("wsgate_upgrades_refused_total") == {
        (("agent", ""), ("status", "404")): 1,
        (("agent", "talk.test"), ("status", "403")): 1,
        (("agent", ""), ("status", "400")): 1,
    }
    assert m.series("wsgate_token_rejections_total") == {(("reason", "missing"),): 1}


async def test_sessions_ended_by_the_gateways_limits_are_gateway_limit(bot: Bot) -> None:
    with refused_port() as dead:
        cfg = config(bot.url, dead, max_message_size=100)
    async with Gateway(cfg, session_time_limit=0.3).running() as gw:

        def closed_with(message: str | None) -> int:
            with connect(f"{gw.url}/ws/generic/relay.test") as ws:
                if message is not None:
                    ws.send(message)
                with pytest.raises(ConnectionClosed) as closed:
                    ws.recv(TIMEOUT)
            assert closed.value.rcvd is not None
            return closed.value.rcvd.code

        assert await in_thread(closed_with, "x" * 101) == 1009
        assert await in_thread(closed_with, None) == 1000  # the time limit
        bot.wait_ended(2)
        await eventually(lambda: gw.sessions() == 0)
        m = await scrape(gw.port)
    assert m.series("wsgate_sessions_closed_total") == {
        (("agent", "relay.test"), ("code", "1009"), ("ended_by", "gateway_limit")): 1,
        (("agent", "relay.test"), ("code", "1000"), ("ended_by", "gateway_limit")): 1,
    }


class FailingStore:
    """A replay store that cannot answer."""

    async def claim(self, nonce: str, exp: int) -> bool:
        raise ReplayStoreUnavailable("replay store down")

    async def release(self, nonce: str) -> None:
        raise ReplayStoreUnavailable("replay store down")

    async def aclose(self) -> None:
        pass


async def test_replay_store_failures_are_counted_and_refused_with_503(bot: Bot) -> None:
    authority = TokenAuthority([SECRET], store=FailingStore())
    with refused_port() as dead:
        cfg = config(bot.url, dead)
    async with Gateway(cfg, authority=authority).running() as gw:
        token = wsgate.tokens.mint(SECRET, "talk.test").token
        assert await upgrade(gw, "/ws/generic/talk.test", bearer(token)) == 503
        m = await scrape(gw.port)
    assert isinstance(authority.store, FailingStore), "the caller's authority is left as it was"
    assert m("wsgate_replay_store_errors_total") == 1
    assert m("wsgate_replay_store_seconds_count") == 1
    assert m("wsgate_upgrades_refused_total", agent="talk.test", status="503") == 1


def test_json_log_lines_of_wsgate_serve_parse_and_hold_the_session_fields(
    tmp_path: Path,
) -> None:
    settings = tmp_path / "wsgate.toml"
    settings.write_text(
        '[gateway]\nport = 0\nlog_format = "json"\nsecrets = ["' + SECRET + '"]\n'
        '[[org]]\nname = "test"\npublic_keys = ["pk_test"]\n'
        '[[agent]]\nname = "echo"\norg = "test"\nbuiltin = "echo"\n'
        '[[agent]]\nname = "talk"\norg = "test"\nbuiltin = "echo"\nwebsocket_auth = "token"\n'
    )
    gateway = Wsgate("serve", "--config", str(settings), "--log-level", "DEBUG")
    try:
        url = gateway.url()
        token = wsgate.tokens.mint(SECRET, "talk.test").token
        forged = wsgate.tokens.mint("some-other-secret", "talk.test").token
        with connect(f"{url}/ws/telnyx?serviceHost=echo.test") as ws:
            opening = opening_messages("telnyx")
            for message in opening:  # both first: the gateway reads them before it relays
                ws.send(message)
            assert [ws.recv(TIMEOUT) for _ in opening] == opening
        with connect(
            f"{url}/ws/generic/talk.test", additional_headers={"Authorization": f"Bearer {token}"}
        ) as ws:
            ws.send("hi")
            ws.recv(TIMEOUT)
        with pytest.raises(Exception, match="403"):
            connect(f"{url}/ws/generic/talk.test/{forged}")
        gateway.proc.send_signal(signal.SIGTERM)
        code, rest = gateway.finish()
    finally:
        gateway.kill()
    assert code == 0
    lines = rest.splitlines()
    records = [json.loads(line) for line in lines]
    assert {r["event"] for r in records} >= {"log", "session_end"}
    ends = [r for r in records if r["event"] == "session_end"]
    assert len(ends) == 2
    telnyx = next(r for r in ends if r["agent"] == "echo.test")
    assert telnyx["provider"] == "telnyx" and telnyx["call_id"]
    assert telnyx["messages_client_to_bot"] == 2 == telnyx["messages_bot_to_client"]
    for record in ends:
        assert record["ended_by"] == "client" and record["code"] == "1000"
        assert record["level"] == "info" and record["ts"].endswith("Z")
    assert any("refused with 403" in r["message"] for r in records)
    for line in lines:
        assert token not in line and forged not in line


async def test_wsgate_status_prints_a_table_per_agent(
    bot: Bot, capsys: pytest.CaptureFixture[str]
) -> None:
    async with gateway(bot) as gw:
        holding, release = threading.Event(), threading.Event()

        def hold() -> None:
            with connect(f"{gw.url}/ws/generic/echo.test") as ws:
                ws.send("x")
                ws.recv()
                holding.set()
                release.wait(TIMEOUT)

        async with anyio.create_task_group() as tg:
            tg.start_soon(in_thread, hold)
            assert await in_thread(holding.wait, TIMEOUT)
            assert await upgrade(gw, "/ws/generic/one.test?body=!!!") == 400
            assert await upgrade(gw, "/ws/generic/nope.test") == 404
            url = f"http://127.0.0.1:{gw.port}"
            table = await in_thread(status, url, 0.05)
            exit_code = await in_thread(main, ["status", "--url", url, "--interval", "0"])
            release.set()
    lines = table.splitlines()
    assert re.match(r"wsgate \S+, serving: \d+ connections, 0 upgrades pending", lines[0])
    assert lines[2].split() == ["agent", "active", "opened", "refused", "p50", "p99", "msgs/s"]
    rows = {line.split()[0]: line.split() for line in lines[3:]}
    assert set(rows) == {*AGENTS, "(unknown)"}
    assert rows["echo.test"][1:4] == ["1", "1", "-"]
    assert rows["one.test"][3] == "400:1"
    assert rows["(unknown)"][3] == "404:1"
    assert exit_code == 0
    assert "echo.test" in capsys.readouterr().out
    assert main(["status", "--url", "http://127.0.0.1:1", "--interval", "0"]) == 1


async def test_the_grafana_dashboard_queries_only_metrics_that_exist(bot: Bot) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    async with gateway(bot) as gw:
        families = set((await scrape(gw.port)).families)

    def panels(node: Any) -> Iterator[Any]:
        for panel in node.get("panels", []):
            yield panel
            yield from panels(panel)

    queried = set()
    all_panels = list(panels(dashboard))
    assert len(all_panels) >= 6
    for panel in all_panels:
        if panel.get("type") == "row":
            continue
        assert panel.get("targets"), f"panel {panel.get('title')!r} queries nothing"
        for target in panel["targets"]:
            for name in re.findall(r"\b(?:wsgate|process)_[a-z_]+", target["expr"]):
                base = re.sub(r"_(total|bucket|sum|count|info)$", "", name)
                assert base in families, f"{panel['title']!r} queries {name}, which is not exposed"
                queried.add(base)
    for needed in ("wsgate_sessions_active", "wsgate_upgrades_refused", "wsgate_sessions_closed",
                   "wsgate_session_duration_seconds", "wsgate_messages"):  # fmt: skip
        assert needed in queried


def outcome(by: str, code: int, detail: str = "") -> Any:
    return SimpleNamespace(ended_by=by, code=code, detail=detail)


def test_ended_by_names_who_or_what_ended_a_session() -> None:
    assert ended_by(outcome("client", 1000), False) == "client"
    assert ended_by(outcome("bot", 1006), False) == "bot"
    limit = wsgate._core.TIME_LIMIT_REASON
    assert ended_by(outcome("gateway", 1000, limit), False) == "gateway_limit"
    assert ended_by(outcome("gateway", 1009, "client: message too big"), False) == "gateway_limit"
    assert ended_by(outcome("gateway", 1001, "gateway shutting down"), True) == "gateway_drain"
    assert ended_by(outcome("gateway", 1002, "bot: reserved bits set"), False) == "error"
    assert ended_by(outcome("gateway", 1006, "engine stopped"), True) == "error"
    # The gateway sends an in-process bot's own close for it.
    assert ended_by(outcome("gateway", 1000, ""), True) == "bot"
    assert ended_by(outcome("gateway", 1011, ""), True) == "bot"
    assert ended_by(outcome("gateway", 1007, "client: invalid UTF-8"), True) == "error"


def test_close_codes_and_dial_reasons_are_bounded_labels() -> None:
    labels = {close_code_label(code) for code in range(0, 70_000)}
    assert labels == {*(str(c) for c in range(1000, 1016)), "3xxx", "4xxx", "other"}
    assert dial_failure(HttpError(504, "bot unreachable: timed out")) == "timeout"
    assert dial_failure(HttpError(502, "bot unreachable: connection refused")) == "refused"
    assert dial_failure(HttpError(502, "bot unreachable: no route to host")) == "unreachable"
    assert dial_failure(HttpError(502, "bot unreachable: bot answered 404 instead of 101")) == (
        "bad_answer"
    )
    assert dial_failure(HttpError(502, "bot unreachable: something new")) == "other"


def test_quantiles_are_interpolated_within_their_bucket() -> None:
    buckets = {1.0: 50.0, 5.0: 90.0, 15.0: 100.0, float("inf"): 100.0}
    assert quantile(0.5, buckets) == 1.0
    assert quantile(0.7, buckets) == pytest.approx(3.0)
    assert quantile(0.99, buckets) == pytest.approx(14.0)
    assert quantile(0.5, {1.0: 0.0, float("inf"): 0.0}) is None
    assert quantile(0.5, {1.0: 0.0, float("inf"): 4.0}) == 1.0, "past the last bound: that bound"
    table = render(parse(""), None, 0)
    assert table.splitlines()[2].split()[0] == "agent"
