"""Gateway(authorize=...): the embedder's say on each checked session (README "Embedding").
It sees the checked claims and headers, may refuse with a status and reason (nothing dialled,
token and capacity given back), or pick this session's bot."""

from __future__ import annotations

import base64
import json
import logging
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosedError, InvalidStatus

import wsgate
from wsgate import AgentConfig, Config, Gateway, GatewaySettings, OrgConfig
from wsgate.client import start

from .helpers import Bot, Sentinel, connect, in_thread
from .telephony import CALL_IDS, opening_messages

pytestmark = pytest.mark.anyio

SECRET = "gateway-secret-0123456789"


def config(upstream: str) -> Config:
    return Config(
        gateway=GatewaySettings(port=0, secrets=[SECRET]),
        orgs=[OrgConfig("acme", public_keys=["pk_acme"])],
        agents=[
            AgentConfig("talk", "acme", websocket_auth="token", upstream=upstream),
            AgentConfig("open", "acme", upstream=upstream),
            AgentConfig("echo", "acme", builtin="echo"),
        ],
    )


API_KEYS = {"key-1": "alice"}


def by_api_key(request: wsgate.SessionRequest) -> None:
    """Refuse sessions without one of our own API keys."""
    if API_KEYS.get(request.header("x-api-key") or "") is None:
        raise wsgate.HttpError(401, "unknown API key")


def status_of(url: str, headers: dict[str, str] | None = None) -> int:
    try:
        with connect(url, additional_headers=headers or {}) as ws:
            ws.send("hi")
            assert ws.recv() == "hi"
            return 101
    except InvalidStatus as refused:
        return refused.response.status_code


async def test_a_refusal_is_answered_with_its_status_and_costs_neither_bot_nor_token(
    bot: Bot,
) -> None:
    gateway = Gateway(config(bot.url), authorize=by_api_key)
    async with gateway.running() as gw:
        started = await start(f"http://127.0.0.1:{gw.port}", "talk", "pk_acme", body={"n": 1})
        url = f"{gw.url}/ws/generic/talk.acme?body={started.body}"
        bearer = {"Authorization": f"Bearer {started.token}"}

        def refused() -> tuple[int, bytes]:
            with pytest.raises(InvalidStatus) as answer:
                connect(url, additional_headers=bearer | {"X-Api-Key": "wrong"}).close()
            return answer.value.response.status_code, answer.value.response.body

        assert await in_thread(refused) == (401, b"unknown API key\n")
        assert gw.sessions() == 0  # the capacity was given back
        assert bot.sessions == []  # nothing dialled
        # The token was not spent: the same one opens the session with the right key.
        assert await in_thread(status_of, url, bearer | {"X-Api-Key": "key-1"}) == 101
        bot.wait_ended()


async def test_authorize_sees_the_checked_claims_and_picks_this_sessions_bot(
    sentinel: Sentinel, bot: Bot
) -> None:
    seen: list[wsgate.SessionRequest] = []

    async def per_session(request: wsgate.SessionRequest) -> str:
        seen.append(request)
        return bot.url + f"?room={request.body['room']}"

    # The agent's own upstream is never dialled: authorize sends every session elsewhere,
    # the builtin echo agent included.
    gateway = Gateway(config(sentinel.url), authorize=per_session)
    async with gateway.running() as gw:
        body = base64.b64encode(json.dumps({"room": "r1"}).encode()).decode()
        url = f"{gw.url}/ws/generic/open.acme?body={body}"
        assert await in_thread(status_of, url, {"X-Trace": "t-1"}) == 101
        bot.wait_ended()
        url = f"{gw.url}/ws/generic/echo.acme?body={body}"
        assert await in_thread(status_of, url) == 101
        bot.wait_ended()
    assert not sentinel.dialled()
    request = seen[0]
    assert (request.service_host, request.agent, request.org) == ("open.acme", "open", "acme")
    assert (request.provider, request.token, request.body) == ("generic", False, {"room": "r1"})
    assert request.header("X-Trace") == "t-1"
    assert request.client == "127.0.0.1"
    assert [s.path.split("&")[0] for s in bot.sessions] == ["/ws?room=r1", "/ws?room=r1"]
    assert bot.sessions[0].headers["X-Daily-Session-Id"] == request.session_id
    # The token is never shown: a SessionRequest's repr leaves out path, headers and body.
    assert "t-1" not in repr(request) and "r1" not in repr(request)


async def test_an_error_in_authorize_is_a_500_with_no_detail_and_logged(
    bot: Bot, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(request: wsgate.SessionRequest) -> Any:
        raise RuntimeError("secret internal detail")

    async with Gateway(config(bot.url), authorize=broken).running() as gw:
        url = f"{gw.url}/ws/generic/open.acme"
        with caplog.at_level(logging.ERROR, logger="wsgate"):

            def refused() -> tuple[int, bytes]:
                with pytest.raises(InvalidStatus) as answer:
                    connect(url).close()
                return answer.value.response.status_code, answer.value.response.body

            assert await in_thread(refused) == (500, b"authorize failed\n")
        assert gw.sessions() == 0
    assert bot.sessions == []
    assert "secret internal detail" in caplog.text  # for the operator, not the client


async def test_a_refusal_after_twilios_opening_is_its_close_code(bot: Bot) -> None:
    calls: list[str | None] = []

    def no_calls(request: wsgate.SessionRequest) -> None:
        calls.append(request.call_id)
        raise wsgate.HttpError(403, "calls are closed")

    async with Gateway(config(bot.url), authorize=no_calls).running() as gw:

        def call() -> tuple[int, str]:
            with connect(f"{gw.url}/ws/twilio") as ws:
                for message in opening_messages("twilio", service_host="open.acme"):
                    ws.send(message)
                with pytest.raises(ConnectionClosedError) as closed:
                    ws.recv()
                assert closed.value.rcvd is not None
                return closed.value.rcvd.code, closed.value.rcvd.reason

        assert await in_thread(call) == (1008, "calls are closed")
    assert calls == [CALL_IDS["twilio"]]
    assert bot.sessions == []


async def test_a_bad_upstream_from_authorize_is_a_500_and_nothing_is_dialled(
    bot: Bot, caplog: pytest.LogCaptureFixture
) -> None:
    def bad(request: wsgate.SessionRequest) -> Any:
        return "http://not-a-websocket/ws"

    async with Gateway(config(bot.url), authorize=bad).running() as gw:
        with caplog.at_level(logging.ERROR, logger="wsgate"):

            def refused() -> tuple[int, bytes]:
                with pytest.raises(InvalidStatus) as answer:
                    connect(f"{gw.url}/ws/generic/open.acme").close()
                return answer.value.response.status_code, answer.value.response.body

            assert await in_thread(refused) == (500, b"authorize failed\n")
        assert gw.sessions() == 0
    assert bot.sessions == []
    assert "must be a ws:// URL" in caplog.text
