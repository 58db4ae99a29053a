"""Token auth through the real gateway: /start on its listener mints, the upgrade checks, and no
session reaches a bot without a valid, unused token for its own agent (SPEC §3, §5)."""

from __future__ import annotations

import base64
import json
import logging
import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import anyio
import pytest
from websockets.exceptions import InvalidStatus

from wsgate import AgentConfig, Config, Gateway, GatewaySettings, OrgConfig, _core
from wsgate.client import connect as client_connect
from wsgate.client import start
from wsgate.tokens import TokenAuthority

from .conftest import Bot, Sentinel, connect, http_exchange, in_thread, upgrade_request
from .processes import Wsgate
from .redis_server import RedisServer, requires_redis

pytestmark = pytest.mark.anyio

SECRET = "gateway-secret-0123456789"


def token_config(upstream: str, **settings: Any) -> Config:
    settings.setdefault("secrets", [SECRET])
    return Config(
        gateway=GatewaySettings(port=0, **settings),
        orgs=[OrgConfig("test", public_keys=["pk_test"]), OrgConfig("other", ["pk_other"])],
        agents=[
            AgentConfig("talk", "test", websocket_auth="token", upstream=upstream, max_sessions=5),
            AgentConfig("open", "test", upstream=upstream),
            AgentConfig("talk", "other", websocket_auth="token", upstream=upstream),
        ],
    )


@asynccontextmanager
async def gateway(upstream: str, *, authority: TokenAuthority | None = None,
                  **settings: Any) -> AsyncIterator[Gateway]:  # fmt: skip
    async with Gateway(token_config(upstream, **settings), authority=authority).running() as gw:
        yield gw


async def start_json(gw: Gateway, agent: str, key: str, body: Any = None) -> tuple[int, Any]:
    payload: dict[str, Any] = {"transport": "websocket"}
    if body is not None:
        payload["body"] = body
    data = json.dumps(payload).encode()
    request = (
        f"POST /v1/public/{agent}/start HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    ).encode() + data
    status, answer = await http_exchange(gw.port, request)
    return status, json.loads(answer)


async def test_start_then_connect_reaches_the_bot_with_the_session_id_and_body(bot: Bot) -> None:
    async with gateway(bot.url) as gw:
        result = await start(f"http://127.0.0.1:{gw.port}", "talk", "pk_test", body={"k": "é"})
        assert result.token is not None

        def client() -> None:
            url = f"{gw.url}/ws/generic/talk.test?body={result.body}"
            headers = {"Authorization": f"Bearer {result.token}"}
            with connect(url, additional_headers=headers) as ws:
                ws.send("hi")
                assert ws.recv() == "hi"

        await in_thread(client)
        bot.wait_ended()
    seen = bot.sessions[0]
    assert seen.headers["X-Daily-Session-Id"] == result.session_id
    body = parse_qs(urlsplit(seen.path).query)["body"][0]
    assert json.loads(base64.b64decode(body)) == {"k": "é"}


async def test_the_python_client_connects_in_both_auth_modes(bot: Bot, anyio_backend: str) -> None:
    if anyio_backend != "asyncio":
        pytest.skip("wsgate.client.connect runs on asyncio (the websockets client)")
    async with gateway(bot.url) as gw:
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
    async with gateway(bot.url) as gw:
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

        def client() -> None:
            with connect(gw.url + path, additional_headers=headers) as ws:
                ws.send("ok")
                assert ws.recv() == "ok"

        await in_thread(client)


def refused(url: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    try:
        connect(url, additional_headers=headers or {}).close()
    except InvalidStatus as exc:
        return exc.response.status_code, exc.response.body.decode() if exc.response.body else ""
    raise AssertionError("the upgrade was accepted")


async def test_every_bad_token_is_refused_403_and_the_bot_never_dialled(
    sentinel: Sentinel, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="wsgate")
    clock = [1_800_000_000.0]
    authority = TokenAuthority([SECRET], clock=lambda: clock[0])
    async with gateway(sentinel.url, authority=authority, dial_timeout=0.5) as gw:
        good = authority.mint("talk.test").token
        forged = _core.TokenKeys([b"not-our-secret"]).mint("talk.test", int(clock[0]) + 300, "n1")
        other_agent = authority.mint("talk.other").token
        expiring = authority.mint("talk.test").token
        url = f"{gw.url}/ws/generic/talk.test"

        def bearer(token: str) -> dict[str, str]:
            return {"Authorization": f"Bearer {token}"}

        cases = {
            "missing": (url, None),
            "malformed": (url, bearer("not.a-token")),
            "bad signature": (url, bearer(forged)),
            "other agent": (url, bearer(other_agent)),
            "tampered": (url, bearer(good[:-2] + ("AA" if good[-2:] != "AA" else "BB"))),
        }
        for name, (target, headers) in cases.items():
            status, reason = await in_thread(refused, target, headers)
            assert status == 403, name
            assert reason and "\n" not in reason.rstrip("\n"), name
        clock[0] += 301  # the injected clock: no sleeping
        assert (await in_thread(refused, url, bearer(expiring)))[0] == 403
        clock[0] -= 301

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
    async with gateway(sentinel.url) as gw:
        status, answer = await start_json(gw, "talk", "pk_test")
        good = answer["token"]
        # A bad header with a good query token: the header is judged, and refused.
        target = f"/ws/generic/talk.test?token={good}"
        status, _ = await http_exchange(
            gw.port, upgrade_request(target, "Authorization: Bearer junk")
        )
    assert status == 403
    assert not sentinel.dialled()


async def test_rotation_old_secret_verifies_new_one_signs(bot: Bot) -> None:
    old_token = TokenAuthority(["old-secret"]).mint("talk.test").token
    async with gateway(bot.url, secrets=["new-secret", "old-secret"]) as gw:
        status, answer = await start_json(gw, "talk", "pk_test")

        def client(token: str) -> None:
            headers = {"Authorization": f"Bearer {token}"}
            with connect(f"{gw.url}/ws/generic/talk.test", additional_headers=headers) as ws:
                ws.send("x")
                ws.recv()

        await in_thread(client, old_token)
        await in_thread(client, answer["token"])
    assert status == 200
    # /start signs with the first secret only.
    assert _core.TokenKeys([b"new-secret"]).verify(answer["token"], "talk.test", 1).exp
    with pytest.raises(_core.TokenError):
        _core.TokenKeys([b"old-secret"]).verify(answer["token"], "talk.test", 1)


async def test_start_statuses_through_the_gateway(sentinel: Sentinel) -> None:
    async with gateway(sentinel.url) as gw:
        status, answer = await start_json(gw, "talk", "pk_test", body={"a": 1})
        assert status == 200
        assert set(answer) == {"token", "wsUrl", "sessionId", "body"}
        assert answer["wsUrl"] == f"{gw.url}/ws/generic/talk.test"
        assert uuid.UUID(answer["sessionId"]).version == 4
        status, answer = await start_json(gw, "open", "pk_test")
        assert status == 200 and set(answer) == {"wsUrl", "sessionId"}
        assert (await start_json(gw, "open", "pk_test", body={"a": 1}))[0] == 400
        assert (await start_json(gw, "talk", "pk_wrong"))[0] == 401
        assert (await start_json(gw, "nobody", "pk_test"))[0] == 404
        assert (await start_json(gw, "talk", "pk_test", body={"x": "y" * 5000}))[0] == 413
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
    bot: Bot, tmp_path: Path
) -> None:
    redis = RedisServer(tmp_path)
    redis.start()
    env_before = os.environ.get("WSGATE_SECRETS")
    os.environ["WSGATE_SECRETS"] = SECRET
    config = write_config(tmp_path / "wsgate.toml", bot.url, redis.url)
    first, second = (
        Wsgate("serve", "--config", str(config)),
        Wsgate("serve", "--config", str(config)),
    )
    try:
        url1, url2 = first.url(), second.url()
        token = TokenAuthority([SECRET]).mint("talk.test").token
        headers = {"Authorization": f"Bearer {token}"}
        with connect(f"{url1}/ws/generic/talk.test", additional_headers=headers) as ws:
            ws.send("once")
            assert ws.recv() == "once"
        assert refused(f"{url2}/ws/generic/talk.test", headers)[0] == 403

        redis.stop()  # Redis goes away: token sessions fail closed, others go on
        fresh = {"Authorization": f"Bearer {TokenAuthority([SECRET]).mint('talk.test').token}"}
        assert refused(f"{url1}/ws/generic/talk.test", fresh)[0] == 503
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
        redis.stop()
        if env_before is None:
            os.environ.pop("WSGATE_SECRETS", None)
        else:
            os.environ["WSGATE_SECRETS"] = env_before


@pytest.mark.parametrize(
    ("extra", "status"),
    [
        pytest.param("Transfer-Encoding: chunked", 411, id="chunked body"),
        pytest.param("Content-Length: abc", 400, id="content-length not a number"),
        pytest.param("Content-Length: -5", 400, id="negative content-length"),
    ],
)
async def test_a_start_request_with_a_body_it_cannot_read_gets_a_json_error(
    sentinel: Sentinel, extra: str, status: int
) -> None:
    async with gateway(sentinel.url) as gw:
        request = (
            f"POST /v1/public/talk/start HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: Bearer pk_test\r\n{extra}\r\n\r\n"
        ).encode()
        got, body = await http_exchange(gw.port, request)
        assert got == status
        assert json.loads(body)["code"] == str(status)
        # The gateway goes on serving /start.
        assert (await start_json(gw, "talk", "pk_test"))[0] == 200
    assert not sentinel.dialled()


async def test_a_start_body_slower_than_the_handshake_timeout_is_cut_off(
    sentinel: Sentinel,
) -> None:
    async with gateway(sentinel.url, handshake_timeout=0.5) as gw:
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
