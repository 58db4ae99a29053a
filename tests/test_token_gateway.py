"""Token auth through the real gateway: /start on its listener mints, the upgrade checks, and no
session reaches a bot without a valid, unused token for its own agent (SPEC §3, §5)."""

from __future__ import annotations

import base64
import json
import logging
import os
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import anyio
import pytest

from wsgate import AgentConfig, Config, Gateway, _core
from wsgate.client import connect as client_connect
from wsgate.client import start
from wsgate.tokens import TokenAuthority, session_id_for

from .helpers import (
    TOKEN_SECRET,
    Bot,
    Clock,
    Sentinel,
    asyncio_only,
    connect,
    echoed,
    http_exchange,
    in_thread,
    start_json,
    token_config,
    token_gateway,
    upgrade_refused,
    upgrade_request,
)
from .processes import Wsgate
from .redis_server import RedisServer, requires_redis

pytestmark = pytest.mark.anyio


async def test_start_then_connect_reaches_the_bot_with_the_session_id_and_body(bot: Bot) -> None:
    async with token_gateway(bot.url) as gw:
        result = await start(f"http://127.0.0.1:{gw.port}", "talk", "pk_test", body={"k": "é"})
        assert result.token is not None
        url = f"{gw.url}/ws/generic/talk.test?body={result.body}"
        headers = {"Authorization": f"Bearer {result.token}"}
        assert await in_thread(echoed, url, "hi", headers) == "hi"
        bot.wait_ended()
    seen = bot.sessions[0]
    assert seen.headers["X-Daily-Session-Id"] == result.session_id
    body = parse_qs(urlsplit(seen.path).query)["body"][0]
    assert json.loads(base64.b64decode(body)) == {"k": "é"}


@asyncio_only  # wsgate.client.connect runs on asyncio (the websockets client)
async def test_the_python_client_connects_in_both_auth_modes(bot: Bot) -> None:
    async with token_gateway(bot.url) as gw:
        base = f"http://127.0.0.1:{gw.port}"
        async with client_connect(base, "talk", public_key="pk_test", body={"n": 1}) as ws:
            await ws.send("token mode")
            assert await ws.recv() == "token mode"
        async with client_connect(gw.url, "open.test", body={"n": 2}) as ws:
            await ws.send("none mode")
            assert await ws.recv() == "none mode"
        await in_thread(bot.wait_ended, 2)
    bodies = [parse_qs(urlsplit(s.path).query)["body"][0] for s in bot.sessions]
    assert [json.loads(base64.b64decode(b)) for b in bodies] == [{"n": 1}, {"n": 2}]


@pytest.mark.parametrize("source", ["header", "query", "path"])
async def test_each_token_source_is_accepted(bot: Bot, source: str) -> None:
    async with token_gateway(bot.url) as gw:
        status, answer = await start_json(gw, "talk", "pk_test")
        assert status == 200
        token = answer["token"]
        path, headers = "/ws/generic/talk.test", {}
        if source == "header":
            headers = {"Authorization": f"Bearer {token}"}
        elif source == "query":
            path += f"?token={token}"
        else:
            path += f"/{token}"
        assert await in_thread(echoed, gw.url + path, "ok", headers) == "ok"


async def test_every_bad_token_is_refused_403_and_the_bot_never_dialled(
    sentinel: Sentinel, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="wsgate")
    clock = Clock(1_800_000_000)
    authority = TokenAuthority([TOKEN_SECRET], clock=clock)
    async with token_gateway(sentinel.url, authority=authority, dial_timeout=0.5) as gw:
        good = authority.mint("talk.test").token
        forged = _core.TokenKeys([b"not-our-secret"]).mint("talk.test", int(clock.now) + 300, "n1")
        other_agent = authority.mint("talk.other").token
        expiring = authority.mint("talk.test").token
        url = f"{gw.url}/ws/generic/talk.test"

        def bearer(token: str) -> dict[str, str]:
            return {"Authorization": f"Bearer {token}"}

        # The signature's last character carries 2 padding bits: "E" keeps them zero.
        tampered = good[:-2] + ("AA" if good[-2:] != "AA" else "AE")
        cases = {
            "missing": (None, "token missing"),
            "malformed": (bearer("not.a-token"), "token is malformed"),
            "bad signature": (bearer(forged), "token signature is invalid"),
            "other agent": (bearer(other_agent), "token is for another service host"),
            "tampered": (bearer(tampered), "token signature is invalid"),
        }
        for name, (headers, reason) in cases.items():
            assert await in_thread(upgrade_refused, url, headers) == (403, f"{reason}\n"), name
        clock.now += 301  # the injected clock: no sleeping
        assert await in_thread(upgrade_refused, url, bearer(expiring)) == (
            403,
            "token has expired\n",
        )
        clock.now -= 301

        # A good token reaches the dial; the sentinel never answers, so the session never
        # starts and the token is given back: a retry with it is dialled again, not refused.
        for _ in range(2):
            status, _ = await http_exchange(
                gw.port, upgrade_request("/ws/generic/talk.test", f"Authorization: Bearer {good}")
            )
            assert status == 504  # timed out
            assert sentinel.dialled()
    assert not sentinel.dialled(), "a refused token reached the bot"
    gateway_log = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("wsgate"))
    assert "refused with 403" in gateway_log
    for token in (good, forged, other_agent, expiring):
        assert token not in gateway_log


async def test_the_first_token_source_present_is_the_one_judged(sentinel: Sentinel) -> None:
    async with token_gateway(sentinel.url) as gw:
        status, answer = await start_json(gw, "talk", "pk_test")
        good = answer["token"]
        # A bad header with a good query token: the header is judged, and refused.
        target = f"/ws/generic/talk.test?token={good}"
        status, reason = await http_exchange(
            gw.port, upgrade_request(target, "Authorization: Bearer junk")
        )
    assert (status, reason) == (403, b"token is malformed\n")
    assert not sentinel.dialled()


async def test_rotation_old_secret_verifies_new_one_signs(bot: Bot) -> None:
    old_token = TokenAuthority(["old-secret"]).mint("talk.test").token
    async with token_gateway(bot.url, secrets=["new-secret", "old-secret"]) as gw:
        status, answer = await start_json(gw, "talk", "pk_test")
        for token in (old_token, answer["token"]):
            headers = {"Authorization": f"Bearer {token}"}
            assert await in_thread(echoed, f"{gw.url}/ws/generic/talk.test", "x", headers) == "x"
    assert status == 200
    # /start signs with the first secret only: the token it announced, under the new secret.
    claims = _core.TokenKeys([b"new-secret"]).verify(answer["token"], "talk.test", 1)
    assert session_id_for(claims.nonce) == answer["sessionId"]
    with pytest.raises(_core.TokenError, match="token signature is invalid"):
        _core.TokenKeys([b"old-secret"]).verify(answer["token"], "talk.test", 1)


async def test_start_statuses_through_the_gateway(sentinel: Sentinel) -> None:
    async with token_gateway(sentinel.url) as gw:
        status, answer = await start_json(gw, "talk", "pk_test", body={"a": 1})
        assert status == 200
        assert set(answer) == {"token", "wsUrl", "sessionId", "body"}
        assert answer["wsUrl"] == f"{gw.url}/ws/generic/talk.test"
        assert uuid.UUID(answer["sessionId"]).version == 4
        status, answer = await start_json(gw, "open", "pk_test")
        assert status == 200 and set(answer) == {"wsUrl", "sessionId"}
        cases: list[tuple[tuple[Any, ...], int, str]] = [
            (
                ("open", "pk_test", {"a": 1}),
                400,
                "body is not taken for an agent without token auth: send it as ?body=",
            ),
            (("talk", "pk_wrong"), 401, "Invalid public API key"),
            (("nobody", "pk_test"), 404, "Service not found"),
            (
                ("talk", "pk_test", {"x": "y" * 5000}),
                413,
                "body is 5008 bytes after decoding, over the 4096-byte limit",
            ),
        ]
        for args, status, error in cases:
            answer = await start_json(gw, *args)
            assert answer == (status, {"error": error, "code": str(status)}), args
        big = b"{" + b" " * (64 * 1024 + 1) + b"}"
        request = (
            f"POST /v1/public/talk/start HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer pk_test\r\n"
            f"Content-Length: {len(big)}\r\n\r\n"
        ).encode() + big
        status, body = await http_exchange(gw.port, request)
        assert status == 413
        assert json.loads(body) == {"error": "Request too large", "code": "413"}
        # A 200 carries a bearer token: never cached.
        async with await anyio.connect_tcp("127.0.0.1", gw.port) as s:
            data = b'{"transport":"websocket"}'
            await s.send(
                b"POST /v1/public/talk/start HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer pk_test"
                b"\r\nContent-Length: %d\r\n\r\n%s" % (len(data), data)
            )
            head = b""
            with anyio.fail_after(10):
                while b"\r\n\r\n" not in head:
                    head += await s.receive()
        assert b"Cache-Control: no-store" in head
    assert not sentinel.dialled()


async def test_an_agent_at_capacity_answers_start_429(bot: Bot) -> None:
    config = token_config(bot.url)
    config = Config(
        gateway=config.gateway,
        orgs=config.orgs,
        agents=[AgentConfig("talk", "test", websocket_auth="token", upstream=bot.url,
                            max_sessions=1)],
    )  # fmt: skip
    async with Gateway(config).running() as gw:
        _, answer = await start_json(gw, "talk", "pk_test")

        def client() -> int:
            headers = {"Authorization": f"Bearer {answer['token']}"}
            with connect(f"{gw.url}/ws/generic/talk.test", additional_headers=headers) as ws:
                ws.send("x")
                ws.recv()
                return anyio.from_thread.run(start_json, gw, "talk", "pk_test")[0]

        assert await in_thread(client) == 429


def write_config(path: Path, upstream: str, redis_url: str) -> Path:
    path.write_text(
        f"""
[gateway]
port = 0
replay_store = "{redis_url}"
[[org]]
name = "test"
public_keys = ["pk_test"]
[[agent]]
name = "talk"
org = "test"
websocket_auth = "token"
upstream = "{upstream}"
[[agent]]
name = "open"
org = "test"
upstream = "{upstream}"
"""
    )
    return path


@requires_redis
def test_two_gateway_processes_sharing_redis_refuse_a_token_used_at_the_other(
    bot: Bot, redis: RedisServer, tmp_path: Path
) -> None:
    env_before = os.environ.get("WSGATE_SECRETS")
    os.environ["WSGATE_SECRETS"] = TOKEN_SECRET
    config = write_config(tmp_path / "wsgate.toml", bot.url, redis.url)
    first, second = (
        Wsgate("serve", "--config", str(config)),
        Wsgate("serve", "--config", str(config)),
    )
    try:
        url1, url2 = first.url(), second.url()
        minting = TokenAuthority([TOKEN_SECRET])
        headers = {"Authorization": f"Bearer {minting.mint('talk.test').token}"}
        with connect(f"{url1}/ws/generic/talk.test", additional_headers=headers) as ws:
            ws.send("once")
            assert ws.recv() == "once"
        assert upgrade_refused(f"{url2}/ws/generic/talk.test", headers) == (
            403,
            "token already used\n",
        )

        redis.stop()  # Redis goes away: token sessions fail closed, others go on
        fresh = {"Authorization": f"Bearer {minting.mint('talk.test').token}"}
        assert upgrade_refused(f"{url1}/ws/generic/talk.test", fresh) == (
            503,
            "token store unavailable\n",
        )
        with connect(f"{url2}/ws/generic/open.test") as ws:
            ws.send("unaffected")
            assert ws.recv() == "unaffected"

        redis.start()  # and back: token sessions work again
        with connect(f"{url1}/ws/generic/talk.test", additional_headers=fresh) as ws:
            ws.send("back")
            assert ws.recv() == "back"
    finally:
        first.kill()
        second.kill()
        if env_before is None:
            os.environ.pop("WSGATE_SECRETS", None)
        else:
            os.environ["WSGATE_SECRETS"] = env_before


@pytest.mark.parametrize(
    ("extra", "status", "error"),
    [
        pytest.param("Transfer-Encoding: chunked", 411, "send Content-Length", id="chunked body"),
        pytest.param(
            "Content-Length: abc", 400, "bad Content-Length", id="content-length not a number"
        ),
        pytest.param("Content-Length: -5", 400, "bad Content-Length", id="negative content-length"),
    ],
)
async def test_a_start_request_with_a_body_it_cannot_read_gets_a_json_error(
    sentinel: Sentinel, extra: str, status: int, error: str
) -> None:
    async with token_gateway(sentinel.url) as gw:
        request = (
            f"POST /v1/public/talk/start HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: Bearer pk_test\r\n{extra}\r\n\r\n"
        ).encode()
        got, body = await http_exchange(gw.port, request)
        assert (got, json.loads(body)) == (status, {"error": error, "code": str(status)})
        # The gateway goes on serving /start.
        assert (await start_json(gw, "talk", "pk_test"))[0] == 200
    assert not sentinel.dialled()


async def test_a_start_body_slower_than_the_handshake_timeout_is_cut_off(
    sentinel: Sentinel,
) -> None:
    async with token_gateway(sentinel.url, handshake_timeout=0.5) as gw:
        async with await anyio.connect_tcp("127.0.0.1", gw.port) as s:
            await s.send(
                b"POST /v1/public/talk/start HTTP/1.1\r\nHost: x\r\n"
                b"Authorization: Bearer pk_test\r\nContent-Length: 100\r\n\r\n{"
            )
            with anyio.fail_after(10):
                with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                    await s.receive()  # dropped without an answer, like a slow upgrade
        assert (await start_json(gw, "talk", "pk_test"))[0] == 200
    assert not sentinel.dialled()
