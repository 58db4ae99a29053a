"""Telephony provider endpoints (SPEC §6b) through the real gateway, with callers that send what
each provider really sends first (tests/telephony.py): the bot gets the opening messages first and
unchanged, media flows both ways, and every failure gets its HTTP status (before the upgrade) or
close code (after it, Twilio) with no bot dialled."""

from __future__ import annotations

import json
import logging
import socket
from functools import partial
from typing import Any

import anyio
import pytest

from wsgate import AgentConfig, BotArguments, Config, Gateway, GatewaySettings, OrgConfig

from .helpers import (
    Bot,
    Reader,
    Sentinel,
    closed_with,
    connect,
    frame,
    http_exchange,
    in_thread,
    raw_client,
    serving,
    start_json,
    upgrade_request,
)
from .telephony import (
    CALL_IDS,
    PROVIDERS,
    media_message,
    opening_frames,
    opening_messages,
    provider_target,
)

pytestmark = pytest.mark.anyio

SECRET = "provider-secret-0123456789"
HOST = "voice.acme"


def provider_config(upstream: str, **settings: Any) -> Config:
    max_sessions = settings.pop("max_sessions", 50)
    settings.setdefault("secrets", [SECRET])
    return Config(
        gateway=GatewaySettings(port=0, **settings),
        orgs=[OrgConfig("acme", public_keys=["pk_acme"])],
        agents=[
            AgentConfig("voice", "acme", upstream=upstream, max_sessions=max_sessions),
            AgentConfig("secure", "acme", websocket_auth="token", upstream=upstream),
            AgentConfig("other", "acme", websocket_auth="token", upstream=upstream),
        ],
    )


#: A gateway in this event loop on :func:`provider_config`.
gateway = partial(serving, config=provider_config)


def call(url: str, provider: str, host: str = HOST, media: int = 3, **kw: Any) -> list[str]:
    """A provider's call: its opening, then ``media`` media messages; returns what came back."""
    opening = opening_messages(provider, service_host=host, **kw)
    sent = [*opening, *(media_message(provider, sequence=i + 3) for i in range(media))]
    with connect(url) as ws:
        for message in sent:
            ws.send(message)
        return [str(ws.recv()) for _ in sent]


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_a_call_reaches_the_bot_opening_first_and_media_flows_both_ways(
    bot: Bot, provider: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="wsgate")
    async with gateway(bot.url) as gw:
        url = gw.url + provider_target(provider, HOST)
        echoed = await in_thread(call, url, provider)
        await in_thread(bot.wait_ended)
    expected = [*opening_messages(provider, service_host=HOST)]
    expected += [media_message(provider, sequence=i + 3) for i in range(3)]
    assert bot.sessions[0].messages == expected  # byte for byte, the opening first
    assert echoed == expected  # and the bot's answers reach the caller
    assert bot.sessions[0].path == "/ws"  # the bot's own endpoint, as for /ws/generic
    ended = [r.getMessage() for r in caplog.records if "ended by" in r.getMessage()]
    assert len(ended) == 1 and f"via {provider} call {CALL_IDS[provider]}" in ended[0]


async def test_a_token_agent_takes_the_token_as_a_twilio_path_segment_once(bot: Bot) -> None:
    async with gateway(bot.url) as gw:
        status, answer = await start_json(gw, "secure", "pk_acme")
        assert status == 200
        url = gw.url + provider_target("twilio", "secure.acme", answer["token"])
        assert len(await in_thread(call, url, "twilio", "secure.acme", 1)) == 3
        # Used up: the same stream URL again is refused after the opening.
        assert await in_thread(refused_after_opening, url, "secure.acme") == (
            1008,
            "token already used",
        )
        # Scoped to the service host that start names.
        _, fresh = await start_json(gw, "secure", "pk_acme")
        url = gw.url + provider_target("twilio", "other.acme", fresh["token"])
        assert await in_thread(refused_after_opening, url, "other.acme") == (
            1008,
            "token is for another service host",
        )
        url = gw.url + provider_target("twilio", "secure.acme", "not-a-token")
        assert await in_thread(refused_after_opening, url, "secure.acme") == (
            1008,
            "token is malformed",
        )
        # Not spent by the refusal above: it still opens its own agent's session.
        url = gw.url + provider_target("twilio", "secure.acme", fresh["token"])
        assert len(await in_thread(call, url, "twilio", "secure.acme", 1)) == 3
    assert len(bot.sessions) == 2


async def test_the_generic_wsurl_with_the_token_appended_works_as_a_twilio_stream_url(
    bot: Bot,
) -> None:
    # Pipecat Cloud's own advice for token agents: wsUrl from /start plus /<token>.
    async with gateway(bot.url) as gw:
        _, answer = await start_json(gw, "secure", "pk_acme")
        url = f"{gw.url}/ws/generic/secure.acme/{answer['token']}"
        got = await in_thread(call, url, "twilio", "secure.acme", 2)
    opening = opening_messages("twilio", service_host="secure.acme")
    assert got == [*opening, *(media_message("twilio", sequence=i + 3) for i in range(2))]
    assert bot.sessions[0].messages == got  # the opening reached the bot first, unchanged


def refused_after_opening(url: str, host: str | None) -> tuple[int, str]:
    """Open the WebSocket, send a Twilio opening, return the close it gets."""
    with connect(url) as ws:

        def send_opening_then_wait() -> object:
            for message in opening_messages("twilio", service_host=host):
                ws.send(message)
            return ws.recv(timeout=10)

        return closed_with(send_opening_then_wait)


async def raw_twilio(port: int, frames: bytes) -> tuple[int | None, str]:
    """A raw caller: the upgrade, then ``frames`` as they are; the close code and reason."""
    data = b""
    async with raw_client(port, "/ws/twilio") as s:
        if frames:
            await s.send(frames)
        with anyio.fail_after(20):
            while chunk := await s.receive():
                data += chunk
    chunks = [data]
    reader = Reader(lambda: chunks.pop() if chunks else b"")
    first = reader.next()
    if first is None:
        return None, ""
    assert first[0] == 8, first
    return int.from_bytes(first[1][:2], "big"), first[1][2:].decode()


@pytest.mark.parametrize(
    ("frames", "code", "reason"),
    [
        (opening_frames("twilio"), 1008, "missing service host"),
        (opening_frames("twilio", service_host="nobody.acme"), 1008, "unknown service host"),
        (opening_frames("twilio", service_host="Not A Host"), 1008, "malformed service host"),
        (frame(2, b"\x00" * 10), 1008, "binary message before the start message"),
        (frame(1, b"x" * 70_000), 1008, "opening message too large"),
        (frame(1, b"{not json"), 1008, "opening message is not JSON"),
        (frame(1, b'{"event":"media"}'), 1008, "unexpected message in a twilio opening"),
        (
            b"".join(frame(1, b'{"event":"connected"}') for _ in range(10_000)),
            1008,
            "unexpected message in a twilio opening",
        ),
    ],
    ids=["no host", "unknown", "malformed", "binary", "too large", "not json", "media", "10k"],
)
async def test_a_twilio_opening_that_cannot_be_routed_is_closed_1008_and_nothing_dialled(
    sentinel: Sentinel, frames: bytes, code: int, reason: str
) -> None:
    async with gateway(sentinel.url) as gw:
        got = await raw_twilio(gw.port, frames)
        assert got[0] == code and got[1].startswith(reason), got
    assert not sentinel.dialled()


async def test_an_opening_message_that_never_ends_is_refused_from_its_header(
    sentinel: Sentinel,
) -> None:
    header = bytes([0x81, 0xFF]) + (1 << 40).to_bytes(8, "big") + b"mask"
    async with gateway(sentinel.url) as gw:
        assert await raw_twilio(gw.port, header) == (1008, "opening message too large")
    assert not sentinel.dialled()


async def test_a_twilio_stream_without_start_is_closed_1008_at_the_handshake_timeout(
    sentinel: Sentinel,
) -> None:
    connected = frame(1, opening_messages("twilio")[0].encode())
    async with gateway(sentinel.url, handshake_timeout=0.5) as gw:
        assert await raw_twilio(gw.port, connected) == (1008, "no start message in time")
    assert not sentinel.dialled()


async def test_a_twilio_call_to_an_agent_at_capacity_is_closed_1013(bot: Bot) -> None:
    async with gateway(bot.url, max_sessions=1) as gw:
        frames = opening_frames("twilio", service_host=HOST)
        async with raw_client(gw.port, "/ws/twilio") as held:
            await held.send(frames)
            with anyio.fail_after(20):
                await held.receive()  # the bot echoes the opening: the session is live
            assert await raw_twilio(gw.port, frames) == (1013, "agent at capacity")


async def test_a_twilio_call_whose_bot_is_unreachable_is_closed_1011() -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]  # closed: connections are refused
    async with gateway(f"ws://127.0.0.1:{port}/ws") as gw:
        frames = opening_frames("twilio", service_host=HOST)
        code, reason = await raw_twilio(gw.port, frames)
    assert (code, reason) == (1011, "bot unreachable: connection refused")


async def test_twilio_takes_no_service_host_in_its_url(sentinel: Sentinel) -> None:
    async with gateway(sentinel.url) as gw:
        request = upgrade_request(f"/ws/twilio?serviceHost={HOST}")
        status, body = await http_exchange(gw.port, request)
    assert status == 400 and b"serviceHost is not taken on /ws/twilio" in body
    assert not sentinel.dialled()


@pytest.mark.parametrize("provider", ["telnyx", "plivo", "exotel"])
@pytest.mark.parametrize(
    ("query", "status", "reason"),
    [
        ("", 400, "missing service host (/ws/{p}?serviceHost={{agent}}.{{org}})"),
        ("?serviceHost=Bad_Host", 400, "malformed service host (expected {{agent}}.{{org}})"),
        ("?serviceHost=nobody.acme", 404, "unknown service host nobody.acme"),
        ("?serviceHost=secure.acme", 403, "token missing"),
        (f"?serviceHost={HOST}&body=!!", 400, "body is not base64"),
    ],
)
async def test_url_routed_providers_answer_every_check_before_the_upgrade(
    sentinel: Sentinel, provider: str, query: str, status: int, reason: str
) -> None:
    async with gateway(sentinel.url) as gw:
        got = await http_exchange(gw.port, upgrade_request(f"/ws/{provider}{query}"))
    expected = reason.format(p=provider).replace("{{", "{").replace("}}", "}")
    assert got == (status, (expected + "\n").encode())
    assert not sentinel.dialled()


async def test_a_provider_endpoint_relays_a_caller_that_sends_no_opening(bot: Bot) -> None:
    # Telnyx, Plivo, Exotel route from the URL and judge no payload: a client that sends
    # something else first (or nothing for a while) is relayed like on /ws/generic.
    async with gateway(bot.url) as gw:

        def client() -> list[str | bytes]:
            with connect(gw.url + provider_target("telnyx", HOST)) as ws:
                ws.send(b"\x00\x01binary first")
                ws.send("then text")
                return [ws.recv(), ws.recv()]

        assert await in_thread(client) == [b"\x00\x01binary first", "then text"]


@pytest.mark.parametrize("provider", ["twilio", "plivo"])
async def test_an_in_process_bot_behind_a_provider_reads_the_opening_first(provider: str) -> None:
    seen: list[Any] = []
    gw = Gateway(provider_config("ws://127.0.0.1:9/ws"))

    @gw.bot(HOST)
    async def bot(args: BotArguments) -> None:
        # What parse_telephony_websocket does: read the first messages as text.
        first = json.loads(await args.websocket.receive_text())
        if first["event"] == "connected":
            first = json.loads(await args.websocket.receive_text())
        seen.append(first)
        async for message in args.websocket:
            await args.websocket.send_text(f"bot heard {json.loads(message)['event']}")

    async with gw.running():

        def client() -> str:
            with connect(gw.url + provider_target(provider, HOST)) as ws:
                for message in opening_messages(provider, service_host=HOST):
                    ws.send(message)
                ws.send(media_message(provider))
                return str(ws.recv())

        assert await in_thread(client) == "bot heard media"
    assert seen[0]["event"] == "start"
    assert json.loads(opening_messages(provider, service_host=HOST)[-1]) == seen[0]
