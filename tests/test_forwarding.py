"""Several gateways (issue 16): two gateways sharing a real redis-server and no balancer; a stop
and a Session API call sent to the one that does not hold the session reach the one that does
(:mod:`wsgate.forwarding`), and a forwarded request is taken only with the shared secret. Both
anyio backends."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

import wsgate
from wsgate import AgentConfig, Config, Gateway, GatewaySettings, OrgConfig, Routes
from wsgate.capacity import SESSION_PREFIX
from wsgate.config import forward_secret, internal_url
from wsgate.errors import ConfigError
from wsgate.forwarding import FORWARD_HEADER, forwarded_head
from wsgate.redis_store import RedisStore
from wsgate.session_api import forward_fields

from .helpers import Bot, call, call_json, closed_with, in_thread, open_ws, session_id, until
from .redis_server import RedisServer, requires_redis

pytestmark = [pytest.mark.anyio, requires_redis]

SECRET = "forward-secret-0123456789"
ORGS = [OrgConfig("test", public_keys=["pk_test"], private_keys=["sk_test"])]

ROUTES = Routes()


@ROUTES.route("/whoami", methods=["GET", "POST"])
async def whoami(request: wsgate.RouteRequest) -> dict[str, Any]:
    return {
        "session": request.session_id,
        "x": request.query_params.get("x"),
        "body": request.json() if request.body else None,
        "secret": request.headers.get(FORWARD_HEADER),
        "key": request.headers.get("authorization"),
    }


async def talker(args: wsgate.BotArguments) -> None:
    async for message in args.websocket:
        await args.websocket.send_text(f"{message}")


def shared_config(redis: RedisServer, bot: Bot, secret: str | None = SECRET) -> Config:
    """``relay.test`` (to ``bot``) and ``talk.test`` (in-process, with routes), capacity and
    sessions in ``redis``."""
    return Config(
        gateway=GatewaySettings(port=0, capacity_store=redis.url, forward_secret=secret),
        orgs=ORGS,
        agents=[
            AgentConfig("relay", "test", upstream=bot.url),
            AgentConfig("talk", "test", bot=talker, session_api=ROUTES),
        ],
    )


@asynccontextmanager
async def store(redis: RedisServer) -> AsyncIterator[RedisStore]:
    probe = RedisStore(redis.url)
    try:
        yield probe
    finally:
        await probe.aclose()


async def registered(probe: RedisStore, sid: str) -> None:
    """Until the session's registry entry is in the store (written within a round trip of its
    101, by the holder's background task)."""

    async def found() -> bool:
        return await probe.execute("GET", SESSION_PREFIX + sid) is not None

    await until(found, within=10, what=f"session {sid} in the registry")


async def test_a_stop_and_a_session_api_call_reach_the_gateway_holding_the_session(
    redis: RedisServer, bot: Bot
) -> None:
    async with (
        store(redis) as probe,
        Gateway(shared_config(redis, bot)).running() as holder,
        Gateway(shared_config(redis, bot)).running() as other,
    ):
        talk = await in_thread(open_ws, f"{holder.url}/ws/generic/talk.test")
        relay = await in_thread(open_ws, f"{holder.url}/ws/generic/relay.test")
        try:
            sid, relayed = session_id(talk), session_id(relay)
            await registered(probe, sid)
            entry = await probe.execute("GET", SESSION_PREFIX + sid)
            assert entry.decode() == f"talk.test http://127.0.0.1:{holder.port}"
            # The Session API, through the gateway that does not hold the session.
            base = f"/v1/public/talk/sessions/{sid}/whoami"
            status, answer = await call_json(other, "POST", f"{base}?x=1", "pk_test", b'{"a":1}')
            assert status == 200
            # The bot never sees the key nor the secret.
            assert answer == {"session": sid, "x": "1", "body": {"a": 1}, "secret": None,
                              "key": None}  # fmt: skip
            assert other.sessions() == 0 and holder.sessions() == 2
            # A stop, likewise: both sides of the session get 1000, the holder's place is free.
            await registered(probe, relayed)
            target = f"/v1/agents/relay/sessions/{relayed}"
            status, answer = await call_json(other, "DELETE", target, "sk_test")
            assert (status, answer) == (200, {"status": "stopped", "sessionId": relayed})
            assert await in_thread(closed_with, relay.recv, 20) == (1000, "session stopped")
            await in_thread(bot.wait_ended)
            assert bot.sessions[0].close == (1000, "session stopped")
            assert holder.sessions("relay.test") == 0
            # Gone: 404 from either gateway (from the registry, or from the holder).
            assert (await call(other, "DELETE", target, "sk_test"))[0] == 404
            # Keys are judged before any forward: nothing leaves `other` for a bad one.
            assert (await call(other, "GET", base, "pk_nope"))[0] == 401
            stop = f"/v1/agents/talk/sessions/{sid}"
            assert (await call(other, "DELETE", stop, "pk_test"))[0] == 403
            # Not live anywhere: 404, as on one gateway.
            nowhere = f"/v1/public/talk/sessions/{uuid.uuid4()}/whoami"
            assert (await call(other, "GET", nowhere, "pk_test"))[0] == 404
            talk.send("still talking")
            assert await in_thread(talk.recv, 20) == "still talking"
            # Counted on the gateway asked: answered by another (forwarded) or by itself.
            counted = other.metrics.exposition(None).decode()
            for line in (
                'action="session_api",agent="talk.test",forwarded="yes",status="200"} 1.0',
                'action="stop",agent="relay.test",forwarded="yes",status="200"} 1.0',
                'action="stop",agent="",forwarded="no",status="403"} 1.0',  # refused: no agent yet
            ):
                assert "wsgate_session_control_requests_total{" + line in counted
            mine = holder.metrics.exposition(None).decode()
            assert 'action="stop",agent="relay.test",forwarded="no",status="200"} 1.0' in mine
        finally:
            for ws in (talk, relay):
                await in_thread(ws.close)

        # The session's entry leaves the store when it ends.
        async def gone() -> bool:
            return await probe.execute("GET", SESSION_PREFIX + sid) is None

        await until(gone, within=10, what="the ended session's entry deleted")


async def test_a_forwarded_request_needs_the_secret_and_is_never_forwarded_again(
    redis: RedisServer, bot: Bot
) -> None:
    async with (
        store(redis) as probe,
        Gateway(shared_config(redis, bot)).running() as holder,
        Gateway(shared_config(redis, bot)).running() as other,
        Gateway(shared_config(redis, bot, secret=None)).running() as alone,
    ):
        talk = await in_thread(open_ws, f"{holder.url}/ws/generic/talk.test")
        try:
            sid = session_id(talk)
            await registered(probe, sid)
            base = f"/v1/public/talk/sessions/{sid}/whoami"
            wrong = f"{FORWARD_HEADER}: not-the-secret-at-all"
            right = f"{FORWARD_HEADER}: {SECRET}"
            # A wrong secret: 403 on the holder too, nothing done.
            assert (await call(holder, "GET", base, "pk_test", b"", wrong))[0] == 403
            stop = f"/v1/agents/talk/sessions/{sid}"
            assert (await call(holder, "DELETE", stop, "sk_test", b"", wrong))[0] == 403
            # A gateway without a secret trusts no forward, and forwards nothing.
            assert (await call(alone, "GET", base, "pk_test", b"", right))[0] == 403
            assert (await call(alone, "GET", base, "pk_test"))[0] == 404
            # The right secret on a gateway that does not hold it: no second hop, 404.
            assert (await call(other, "GET", base, "pk_test", b"", right))[0] == 404
            # The right secret on the holder: served (as a forward from `other` would be).
            status, answer = await call_json(holder, "GET", base, "pk_test", b"", right)
            assert (status, answer["session"], answer["secret"]) == (200, sid, None)
            # ...and judged there as a client's: the secret is no key.
            assert (await call(holder, "GET", base, "pk_nope", b"", right))[0] == 401
            assert (await call(holder, "GET", base, None, b"", right))[0] == 401
            assert holder.sessions("talk.test") == 1
        finally:
            await in_thread(talk.close)


async def test_registry_entries_that_cannot_be_used(redis: RedisServer, bot: Bot) -> None:
    """Out-of-date or foreign entries are 404; a holder that is gone, 502."""
    async with store(redis) as probe, Gateway(shared_config(redis, bot)).running() as gw:
        dead, foreign, own = (str(uuid.uuid4()) for _ in range(3))
        await probe.execute("SET", SESSION_PREFIX + dead, "talk.test http://127.0.0.1:9")
        await probe.execute("SET", SESSION_PREFIX + foreign, "relay.test http://127.0.0.1:9")
        await probe.execute("SET", SESSION_PREFIX + own, f"talk.test http://127.0.0.1:{gw.port}")
        status, answer = await call_json(gw, "GET", f"/v1/public/talk/sessions/{dead}/x", "pk_test")
        assert (status, answer["error"]) == (502, "gateway holding the session unreachable")
        for sid in (foreign, own):
            status, _ = await call(gw, "GET", f"/v1/public/talk/sessions/{sid}/x", "pk_test")
            assert status == 404


async def test_the_registry_store_down_is_a_503(redis: RedisServer, bot: Bot) -> None:
    async with Gateway(shared_config(redis, bot)).running() as gw:
        redis.stop()
        target = f"/v1/agents/relay/sessions/{uuid.uuid4()}"
        status, answer = await call_json(gw, "DELETE", target, "sk_test")
        assert (status, answer["error"]) == (503, "session registry unreachable")


def test_the_forwarded_head_keeps_the_key_and_the_secret_never_reaches_a_bot() -> None:
    headers = [("authorization", "Bearer pk_test"), ("x-trace", "t"), ("host", "lb"),
               ("content-length", "3"), (FORWARD_HEADER, "old")]  # fmt: skip
    head = forwarded_head("POST", "/v1/x?y=1", "10.0.0.2:8765", headers, SECRET, 2).decode()
    assert head == (
        "POST /v1/x?y=1 HTTP/1.1\r\nHost: 10.0.0.2:8765\r\nauthorization: Bearer pk_test\r\n"
        f"x-trace: t\r\n{FORWARD_HEADER}: {SECRET}\r\nContent-Length: 2\r\n"
        "Connection: close\r\n\r\n"
    )
    assert forward_fields(headers) == [("x-trace", "t")]


def test_the_forward_secret_comes_from_the_settings_or_the_environment() -> None:
    assert forward_secret(GatewaySettings(), {}) is None
    assert forward_secret(GatewaySettings(), {"WSGATE_FORWARD_SECRET": SECRET}) == SECRET
    assert forward_secret(GatewaySettings(forward_secret=SECRET), {}) == SECRET
    with pytest.raises(ConfigError, match="at least 16"):
        GatewaySettings(forward_secret="short")
    with pytest.raises(ConfigError, match="at least 16"):
        forward_secret(GatewaySettings(), {"WSGATE_FORWARD_SECRET": "short"})
    # It travels in a header: a newline (a file read with its last line) would end the field.
    with pytest.raises(ConfigError, match="visible ASCII") as refused:
        forward_secret(GatewaySettings(), {"WSGATE_FORWARD_SECRET": SECRET + "\n"})
    assert SECRET not in str(refused.value)
    assert SECRET not in repr(GatewaySettings(forward_secret=SECRET))
    with pytest.raises(ConfigError, match="internal_url"):
        GatewaySettings(internal_url="ws://10.0.0.2:8765")
    here = "ws://127.0.0.1:8765"
    assert internal_url(GatewaySettings(), here, {}) == "http://127.0.0.1:8765"
    assert internal_url(GatewaySettings(), "wss://h:1", {}) == "https://h:1"
    pod = {"WSGATE_INTERNAL_URL": "http://10.1.2.3:8765"}
    assert internal_url(GatewaySettings(), here, pod) == "http://10.1.2.3:8765"
    given = GatewaySettings(internal_url="http://gw-1.internal:8765")
    assert internal_url(given, here, pod) == "http://gw-1.internal:8765"
    with pytest.raises(ConfigError, match="WSGATE_INTERNAL_URL"):
        internal_url(GatewaySettings(), here, {"WSGATE_INTERNAL_URL": "10.1.2.3"})
