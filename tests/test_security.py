"""The findings of a security probe of the running gateway, kept as tests so they stay fixed:

1. idle-connection churn must not cancel upgrades that are past their request (dialling the bot)
   nor burn their tokens; a token is spent only when its session really starts;
2. a token from ``/start`` binds the body it was given: no other ``?body=`` opens a session;
3. ``/start`` applies the upgrade's own body checks, and reads only ``1*DIGIT`` Content-Lengths.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from functools import partial
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import anyio
import pytest
import websockets.sync.server as ws_server
from websockets.datastructures import Headers
from websockets.http11 import Request, Response
from websockets.sync.server import ServerConnection

from wsgate import Gateway
from wsgate.admission import EVICT_AFTER
from wsgate.tokens import TokenAuthority

from .helpers import (
    TOKEN_SECRET,
    Bot,
    Sentinel,
    b64,
    echoed,
    http_exchange,
    in_thread,
    raw_client,
    start_json,
    token_config,
    token_gateway,
    until,
    upgrade_refused,
    upgrade_request,
)
from .redis_server import RedisServer, requires_redis

pytestmark = pytest.mark.anyio


class GatedBot:
    """A real bot whose handshake takes ``delay`` seconds (a cold start), and that refuses its
    upgrade with 503 while ``down`` is set."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.down = threading.Event()
        self.dials = 0
        #: Released once per dial, before the handshake's delay.
        self.dialled = threading.Semaphore(0)
        self.paths: list[str] = []
        self._server = ws_server.serve(
            self._handle, "127.0.0.1", 0, process_request=self._process, compression=None
        )
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self._server.socket.getsockname()[1]}/ws"

    def _process(self, connection: ServerConnection, request: Request) -> Response | None:
        self.dials += 1
        self.dialled.release()
        if self.down.is_set():
            return Response(503, "Service Unavailable", Headers(), b"cold\n")
        # The behaviour under test: a bot slow to answer its handshake.
        time.sleep(self.delay)
        self.paths.append(request.path)
        return None

    def _handle(self, ws: ServerConnection) -> None:
        for message in ws:
            ws.send(message)

    def close(self) -> None:
        self._server.shutdown()
        self._thread.join(5)


@pytest.fixture
def gated_bot() -> Iterator[GatedBot]:
    bot = GatedBot()
    yield bot
    bot.close()


@pytest.fixture
def slow_bot(gated_bot: GatedBot) -> GatedBot:
    gated_bot.delay = 1.0  # a cold start: every handshake takes a second
    return gated_bot


def session(url: str, headers: dict[str, str] | None = None) -> str | bytes:
    return echoed(url, "legit", headers, open_timeout=15)


def open_idle(port: int, n: int, first_bytes: bytes) -> list[socket.socket]:
    """``n`` connections that send ``first_bytes`` (or nothing) and never finish a request."""
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port))
        if first_bytes:
            s.sendall(first_bytes)
        socks.append(s)
    return socks


@pytest.mark.slow
@pytest.mark.parametrize("first_bytes", [b"", b"GET /ws/generic/open.test HTTP/1.1\r\n"])
async def test_connections_flooding_in_evict_no_upgrade_that_is_dialling_its_bot(
    slow_bot: GatedBot, caplog: pytest.LogCaptureFixture, first_bytes: bytes
) -> None:
    caplog.set_level(logging.WARNING, logger="wsgate")
    async with token_gateway(slow_bot.url, max_pending_upgrades=100) as gw:
        authority = gw.authority
        assert authority is not None
        tokens = [authority.mint("talk.test").token for _ in range(5)]
        results: list[str | bytes] = []
        flood: list[socket.socket] = []

        async def open_one(url: str, headers: dict[str, str] | None = None) -> None:
            results.append(await in_thread(session, url, headers))

        try:
            async with anyio.create_task_group() as tg:
                for _ in range(8):
                    tg.start_soon(open_one, f"{gw.url}/ws/generic/open.test")
                for token in tokens:
                    headers = {"Authorization": f"Bearer {token}"}
                    tg.start_soon(open_one, f"{gw.url}/ws/generic/talk.test", headers)
                # Every session is now waiting for the bot's slow handshake (its token
                # claimed): the oldest connections of the gateway. Flood in 300 more that
                # never finish a request, over max_pending_upgrades.
                for _ in range(13):
                    assert await in_thread(slow_bot.dialled.acquire, True, 20)
                # In two waves: the second's newcomers evict the first's, which have had
                # EVICT_AFTER to finish (the sleep is what is under test).
                flood = await in_thread(open_idle, gw.port, 150, first_bytes)
                await until(lambda: _pending_at_least(gw, 150), within=20, what="wave 1 taken")
                await anyio.sleep(EVICT_AFTER)
                flood += await in_thread(open_idle, gw.port, 150, first_bytes)
                # The flood was really evicting (its first wave; counted as Python hears of
                # it), while it was all still open: a connection closed before it was taken in
                # evicts no one.
                await until(lambda: _evicted_at_least(gw, 150 - 13), within=20, what="evictions")
        finally:
            for s in flood:
                s.close()
        assert results == ["legit"] * 13
    evictions = [r.getMessage() for r in caplog.records if "evicted" in r.getMessage()]
    assert evictions, "evictions are logged"
    assert all("max_pending_upgrades (100)" in line for line in evictions)


async def _pending_at_least(gw: Gateway, n: int) -> bool:
    return gw.pending_upgrades >= n


async def _taken_in(gw: Gateway, n: int) -> bool:
    return gw.pending_upgrades + gw.evicted_upgrades >= n


async def _evicted_at_least(gw: Gateway, n: int) -> bool:
    return gw.evicted_upgrades >= n


async def test_evictions_are_logged_at_most_once_a_second_with_their_count(
    sentinel: Sentinel, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="wsgate")
    async with token_gateway(sentinel.url, max_pending_upgrades=5) as gw:
        started = anyio.current_time()
        flood: list[socket.socket] = []
        try:
            # Three waves of idle connections a second apart (the sleep is what is under
            # test): each wave's newcomers evict the waves before, old enough by then, down to
            # max_pending_upgrades; then a last few evict the third.
            for wave in range(1, 4):
                flood += await in_thread(open_idle, gw.port, 100, b"")
                await until(partial(_taken_in, gw, 100 * wave), within=20, what="wave taken")
                await anyio.sleep(EVICT_AFTER)
            flood += await in_thread(open_idle, gw.port, 5, b"")
            await until(partial(_evicted_at_least, gw, 295), within=20, what="the evictions")
        finally:
            for s in flood:
                s.close()
    # Read once the gateway has stopped: late accepts may still evict (and log) until then.
    evicted = gw.evicted_upgrades
    elapsed = anyio.current_time() - started
    lines = [r.getMessage() for r in caplog.records if "evicted" in r.getMessage()]
    assert 1 <= len(lines) <= elapsed + 1
    logged = sum(int(line.split()[1]) for line in lines)
    assert 0 < logged <= evicted
    assert not sentinel.dialled()


async def test_a_token_whose_dial_fails_gets_502_and_opens_a_session_once_the_bot_is_up(
    gated_bot: GatedBot,
) -> None:
    async with token_gateway(gated_bot.url) as gw:
        status, answer = await start_json(gw, "talk", "pk_test")
        assert status == 200
        url = f"{gw.url}/ws/generic/talk.test"
        headers = {"Authorization": f"Bearer {answer['token']}"}
        gated_bot.down.set()
        cold = (502, "bot unreachable: bot answered 503 instead of 101\n")
        assert await in_thread(upgrade_refused, url, headers) == cold
        assert await in_thread(upgrade_refused, url, headers) == cold  # not "already used"
        gated_bot.down.clear()
        assert await in_thread(session, url, headers) == "legit"
        # Now the session started: the token is spent for good.
        status, reason = await in_thread(upgrade_refused, url, headers)
        assert (status, reason.strip()) == (403, "token already used")
        assert gated_bot.dials == 3


async def concurrent_upgrades(gw: Gateway, token: str, n: int) -> list[int]:
    request = upgrade_request("/ws/generic/talk.test", f"Authorization: Bearer {token}")
    statuses: list[int] = []

    async def one() -> None:
        async with await anyio.connect_tcp("127.0.0.1", gw.port) as s:
            await s.send(request)
            data = b""
            with anyio.fail_after(20):
                while b"\r\n" not in data:
                    data += await s.receive()
            statuses.append(int(data.split(b" ", 2)[1]))

    async with anyio.create_task_group() as tg:
        for _ in range(n):
            tg.start_soon(one)
    return statuses


async def test_twenty_concurrent_uses_of_one_token_open_exactly_one_session(bot: Bot) -> None:
    async with token_gateway(bot.url) as gw:
        _, answer = await start_json(gw, "talk", "pk_test")
        statuses = await concurrent_upgrades(gw, answer["token"], 20)
    assert sorted(statuses) == [101] + [403] * 19


@requires_redis
async def test_twenty_concurrent_uses_of_one_token_open_one_session_with_redis(
    bot: Bot, redis: RedisServer
) -> None:
    async with token_gateway(bot.url, replay_store=redis.url) as gw:
        _, answer = await start_json(gw, "talk", "pk_test")
        statuses = await concurrent_upgrades(gw, answer["token"], 20)
    assert sorted(statuses) == [101] + [403] * 19


# --- 2. the body is bound to the token -------------------------------------------------------


async def test_a_token_opens_a_session_only_with_the_body_start_was_given(
    gated_bot: GatedBot,
) -> None:
    async with token_gateway(gated_bot.url) as gw:
        _, answer = await start_json(gw, "talk", "pk_test", body={"who": "A"})
        url = f"{gw.url}/ws/generic/talk.test"
        headers = {"Authorization": f"Bearer {answer['token']}"}
        forged = b64({"who": "EVIL", "admin": True})
        for target, reason in [
            (
                f"{url}?body={quote(forged)}",
                "?body= differs from the body the token was issued with",
            ),
            (url, "token was issued with a body: ?body= is missing"),
        ]:
            assert await in_thread(upgrade_refused, target, headers) == (403, reason + "\n")
        assert gated_bot.dials == 0, "a forged body reached the bot"
        # Not spent by those refusals: the body /start returned opens the session, exactly.
        target = f"{url}?body={quote(answer['body'])}"
        assert await in_thread(session, target, headers) == "legit"
    seen = parse_qs(urlsplit(gated_bot.paths[0]).query)["body"][0]
    assert json.loads(base64.b64decode(seen)) == {"who": "A"}


async def test_the_bound_body_may_come_in_any_base64_spelling(gated_bot: GatedBot) -> None:
    async with token_gateway(gated_bot.url) as gw:
        _, answer = await start_json(gw, "talk", "pk_test", body={"k": "?>~é"})
        urlsafe = answer["body"].replace("+", "-").replace("/", "_").rstrip("=")
        headers = {"Authorization": f"Bearer {answer['token']}"}
        target = f"{gw.url}/ws/generic/talk.test?body={urlsafe}"
        assert await in_thread(session, target, headers) == "legit"


async def test_a_token_minted_without_a_body_is_refused_with_any_body(
    gated_bot: GatedBot,
) -> None:
    async with token_gateway(gated_bot.url) as gw:
        _, answer = await start_json(gw, "talk", "pk_test")
        headers = {"Authorization": f"Bearer {answer['token']}"}
        target = f"{gw.url}/ws/generic/talk.test?body={b64({'admin': True})}"
        status, reason = await in_thread(upgrade_refused, target, headers)
        assert (status, reason) == (403, "token was issued without a body: ?body= is not allowed\n")
        assert gated_bot.dials == 0
        assert await in_thread(session, f"{gw.url}/ws/generic/talk.test", headers) == "legit"


async def test_a_token_from_the_token_api_binds_the_body_it_was_minted_with(
    gated_bot: GatedBot,
) -> None:
    authority = TokenAuthority([TOKEN_SECRET])
    body = json.dumps({"caller": "+15550100"}, separators=(",", ":")).encode()
    bound = authority.mint("talk.test", body).token
    async with token_gateway(gated_bot.url) as gw:
        url = f"{gw.url}/ws/generic/talk.test"
        encoded = quote(base64.b64encode(body).decode())
        headers = {"Authorization": f"Bearer {bound}"}
        assert await in_thread(upgrade_refused, url, headers) == (
            403,
            "token was issued with a body: ?body= is missing\n",
        )
        assert await in_thread(session, f"{url}?body={encoded}", headers) == "legit"


# --- 3. /start checks as strict as the upgrade's ---------------------------------------------


async def test_start_refuses_a_body_the_upgrade_would_refuse(sentinel: Sentinel) -> None:
    deep: Any = 1
    for _ in range(102):
        deep = [deep]
    async with token_gateway(sentinel.url) as gw:
        status, answer = await start_json(gw, "talk", "pk_test", body=deep)
        assert (status, answer) == (
            400,
            {"error": "body nests deeper than 64 levels", "code": "400"},
        )
        status, answer = await start_json(gw, "talk", "pk_test", body="x" * 4095)
        assert (
            status == 413
            and answer["error"] == "body is 4097 bytes after decoding, over the 4096-byte limit"
        )
        # The same deep body at the upgrade: the same answer.
        status, reason = await http_exchange(
            gw.port, upgrade_request(f"/ws/generic/open.test?body={b64(deep)}")
        )
        assert (status, reason) == (400, b"body nests deeper than 64 levels\n")
    assert not sentinel.dialled()


@pytest.mark.parametrize(
    "length",
    ["+25", "2_5", "-25", "0x19", "25 25", "٢٥", "25.0", "", "99999999999999999999999999999"],
)
async def test_start_reads_only_a_content_length_of_digits(sentinel: Sentinel, length: str) -> None:
    body = b'{"transport":"websocket"}'
    assert len(body) == 25
    async with token_gateway(sentinel.url) as gw:
        request = (
            "POST /v1/public/talk/start HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer pk_test\r\n"
            f"Content-Length: {length}\r\n\r\n"
        ).encode() + body
        status, answer = await http_exchange(gw.port, request)
        expected = 413 if length.startswith("9999") else 400
        assert status == expected
        assert json.loads(answer)["code"] == str(expected)
        # The gateway keeps serving.
        assert (await start_json(gw, "talk", "pk_test"))[0] == 200


async def test_start_refuses_repeated_content_lengths_that_differ(sentinel: Sentinel) -> None:
    async with token_gateway(sentinel.url) as gw:
        request = (
            b"POST /v1/public/talk/start HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer pk_test\r\n"
            b"Content-Length: 25\r\nContent-Length: 26\r\n\r\n" + b'{"transport":"websocket"} '
        )
        status, answer = await http_exchange(gw.port, request)
        assert (status, json.loads(answer)) == (400, {"error": "bad Content-Length", "code": "400"})


# --- per-client limits (off by default) ------------------------------------------------------


async def status_from(port: int, request: bytes, source: str = "127.0.0.1") -> tuple[int, bytes]:
    """Send ``request`` from the local address ``source`` (any of 127.0.0.0/8); the answer."""
    async with await anyio.connect_tcp("127.0.0.1", port, local_host=source) as s:
        await s.send(request)
        data = b""
        with anyio.fail_after(20):
            while b"\r\n\r\n" not in data:
                data += await s.receive()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


async def test_client_request_rate_answers_429_per_address(gated_bot: GatedBot) -> None:
    # 0.01 per second: one request, then the bucket takes 100 s to refill.
    async with token_gateway(gated_bot.url, client_request_rate=0.01) as gw:
        upgrade = upgrade_request("/ws/generic/open.test")
        assert (await status_from(gw.port, upgrade))[0] == 101
        assert await status_from(gw.port, upgrade) == (
            429,
            b"too many requests from this address\n",
        )
        start = (
            b"POST /v1/public/talk/start HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer pk_test\r\n"
            b"Content-Length: 0\r\n\r\n"
        )
        status, body = await status_from(gw.port, start)
        assert status == 429 and json.loads(body)["code"] == "429"
        # Another address is not affected, and health checks never are.
        assert (await status_from(gw.port, upgrade, "127.0.0.2"))[0] == 101
        assert (await status_from(gw.port, b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n"))[0] == 200
    assert gated_bot.dials == 2


async def test_client_max_sessions_answers_429_past_the_sessions_of_one_address(
    gated_bot: GatedBot,
) -> None:
    async with token_gateway(gated_bot.url, client_max_sessions=1) as gw:
        upgrade = upgrade_request("/ws/generic/open.test")
        async with raw_client(gw.port, "/ws/generic/open.test"):  # one session held open
            assert await status_from(gw.port, upgrade) == (
                429,
                b"too many sessions from this address\n",
            )
            assert (await status_from(gw.port, upgrade, "127.0.0.3"))[0] == 101
    assert gated_bot.dials == 2


async def test_start_rate_per_key_answers_429_for_that_key_only(sentinel: Sentinel) -> None:
    config = token_config(sentinel.url, start_rate_per_key=0.01)
    test, other = config.orgs
    orgs = [dataclasses.replace(test, public_keys=["pk_test", "pk_two"]), other]
    async with Gateway(dataclasses.replace(config, orgs=orgs)).running() as gw:
        assert (await start_json(gw, "talk", "pk_test"))[0] == 200
        assert await start_json(gw, "talk", "pk_test") == (
            429,
            {"error": "Too many requests for this key", "code": "429"},
        )
        assert (await start_json(gw, "talk", "pk_two"))[0] == 200
        # A wrong key is refused as before (401), not counted against anyone.
        assert (await start_json(gw, "talk", "pk_wrong"))[0] == 401
    assert not sentinel.dialled()
