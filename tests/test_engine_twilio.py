"""Telephony provider endpoints the Rust engine opens by itself: ``/ws/twilio`` streams
(``rust/twilio.rs``), answered and routed by their opening, and Telnyx, Plivo and Exotel calls,
routed by their URL and their opening read for the call's ids. With ``engine_opens`` on or off a
caller sees the same gateway — a 101 naming the session, the bot dialled with that id, the
opening first at the bot, the call in the session's log line — and every stream the engine does
not take is closed with the code and reason the Python path gives."""

from __future__ import annotations

import logging
import socket
from typing import Any

import anyio
import pytest

from wsgate import AgentConfig, Config, Gateway, GatewaySettings, OrgConfig
from wsgate.admission import EVICT_AFTER

from .helpers import (
    Bot,
    Reader,
    Sentinel,
    engine_opens,
    frame,
    header,
    in_thread,
    start_json,
    until,
    upgrade_request,
)
from .telephony import CALL_IDS, media_message, opening_frames, opening_messages, provider_target

pytestmark = pytest.mark.anyio

HOST = "voice.acme"


def config(upstream: str, **settings: Any) -> Config:
    """``voice.acme`` (no auth) and ``secure.acme`` (token) relayed to ``upstream``."""
    max_sessions = settings.pop("max_sessions", 50)
    return Config(
        gateway=GatewaySettings(port=0, secrets=["twilio-secret-0123456789"], **settings),
        orgs=[OrgConfig("acme", public_keys=["pk_acme"])],
        agents=[
            AgentConfig("voice", "acme", upstream=upstream, max_sessions=max_sessions),
            AgentConfig("secure", "acme", websocket_auth="token", upstream=upstream),
        ],
    )


def stream(
    port: int, first: bytes, then: bytes = b"", target: str = "/ws/twilio"
) -> tuple[socket.socket, bytes]:
    """A caller that sends its upgrade and ``first`` in one write (as Twilio sends its request
    and, once answered, its opening back to back), then ``then`` after the 101: the socket and
    the 101's head (read a byte at a time: what follows stays in the socket)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=20)
    sock.sendall(upgrade_request(target) + first)
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        chunk = sock.recv(1)
        assert chunk, f"closed during the handshake: {head!r}"
        head += chunk
    if then:
        sock.sendall(then)
    return sock, head


def opening_frames_of(messages: list[str]) -> bytes:
    return b"".join(frame(1, m.encode()) for m in messages)


def closed_with(sock: socket.socket) -> tuple[int, str]:
    """The close frame the gateway sends, read until it closes."""
    data = b""
    while chunk := sock.recv(4096):
        data += chunk
    chunks = [data]
    first = Reader(lambda: chunks.pop() if chunks else b"").next()
    assert first is not None and first[0] == 8, first
    return int.from_bytes(first[1][:2], "big"), first[1][2:].decode()


@engine_opens
@pytest.mark.parametrize("split", ["with the upgrade", "after the 101"])
async def test_a_call_is_answered_named_and_relayed_the_same(
    bot: Bot, engine_opens: bool, split: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="wsgate")
    opening = opening_frames("twilio", service_host=HOST)
    first, then = (opening, b"") if split == "with the upgrade" else (b"", opening)
    async with Gateway(config(bot.url, engine_opens=engine_opens)).running() as gw:
        sock, head = await in_thread(stream, gw.port, first, then)
        with sock:
            assert head.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
            assert header(head, "Sec-WebSocket-Accept") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
            # The bot echoes the opening: the caller reads it back, then a media message.
            media = media_message("twilio", sequence=3)
            expected = [*opening_messages("twilio", service_host=HOST), media]
            reader = Reader(lambda: sock.recv(4096))
            for message in expected[:2]:
                assert await in_thread(reader.next) == (1, message.encode())
            sock.sendall(opening_frames_of([media]))
            assert await in_thread(reader.next) == (1, media.encode())
        await in_thread(bot.wait_ended)
        await until(lambda: _none_of(gw), within=10, what="its place given back")
    seen = bot.sessions[0]
    assert seen.messages == expected  # the opening first, then the media
    assert seen.path == "/ws"
    assert seen.headers["X-Daily-Session-Id"] == header(head, "X-Session-Id")
    ended = [r.getMessage() for r in caplog.records if "ended by" in r.getMessage()]
    assert len(ended) == 1 and f"via twilio call {CALL_IDS['twilio']}" in ended[0]
    assert f" {header(head, 'X-Session-Id')} " in ended[0]


async def _none_of(gw: Gateway) -> bool:
    return gw.sessions(HOST) == 0


@engine_opens
@pytest.mark.parametrize(
    ("opening", "code", "reason"),
    [
        (opening_frames("twilio", service_host="nobody.acme"), 1008, "unknown service host"),
        (opening_frames("twilio"), 1008, "missing service host"),
        (opening_frames("twilio", service_host="secure.acme"), 1008, "token missing"),
        (opening_frames_of(['{"event": "media"}']), 1008, "unexpected message"),
    ],
    ids=["unknown", "no host", "token agent", "not an opening"],
)
async def test_a_stream_the_engine_does_not_take_is_closed_as_python_closes_it(
    sentinel: Sentinel, engine_opens: bool, opening: bytes, code: int, reason: str
) -> None:
    async with Gateway(config(sentinel.url, engine_opens=engine_opens)).running() as gw:
        sock, head = await in_thread(stream, gw.port, opening)
        with sock:
            assert head.startswith(b"HTTP/1.1 101 ")
            got = await in_thread(closed_with, sock)
        assert got[0] == code and got[1].startswith(reason), got
        assert gw.sessions() == 0
    assert not sentinel.dialled()


@engine_opens
async def test_at_capacity_and_with_its_bot_gone_a_call_is_closed_the_same(
    bot: Bot, engine_opens: bool
) -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        refused = f"ws://127.0.0.1:{unused.getsockname()[1]}/ws"
    opening = opening_frames("twilio", service_host=HOST)
    async with Gateway(config(bot.url, engine_opens=engine_opens, max_sessions=1)).running() as gw:
        held, _ = await in_thread(stream, gw.port, opening)
        with held:
            with anyio.fail_after(20):
                await in_thread(held.recv, 1)  # the bot echoes the opening: the session is live
            sock, _ = await in_thread(stream, gw.port, opening)
            with sock:
                assert await in_thread(closed_with, sock) == (1013, "agent at capacity")
    async with Gateway(config(refused, engine_opens=engine_opens)).running() as gw:
        sock, _ = await in_thread(stream, gw.port, opening)
        with sock:
            got = await in_thread(closed_with, sock)
        assert got == (1011, "bot unreachable: connection refused")
        assert gw.sessions(HOST) == 0


@engine_opens
async def test_an_opening_not_whole_in_time_or_evicted_is_closed_1008(
    sentinel: Sentinel, engine_opens: bool
) -> None:
    connected = opening_frames_of(opening_messages("twilio", service_host=HOST)[:1])
    settings = {"handshake_timeout": 0.5, "engine_opens": engine_opens}
    async with Gateway(config(sentinel.url, **settings)).running() as gw:
        sock, _ = await in_thread(stream, gw.port, connected)
        with sock:
            assert await in_thread(closed_with, sock) == (1008, "no start message in time")
    settings = {"max_pending_upgrades": 1, "engine_opens": engine_opens}
    async with Gateway(config(sentinel.url, **settings)).running() as gw:
        first, _ = await in_thread(stream, gw.port, connected)
        with first:
            await until(lambda: _pending(gw, 1), within=10, what="its opening waited for")
            await anyio.sleep(EVICT_AFTER)  # what is under test: the first had its second
            late = await in_thread(socket.create_connection, ("127.0.0.1", gw.port), 20)
            with late:
                assert await in_thread(closed_with, first) == (1008, "no start message in time")
                await until(lambda: _evicted(gw, 1), within=10, what="the eviction counted")
    assert not sentinel.dialled()


async def _pending(gw: Gateway, n: int) -> bool:
    return gw.pending_upgrades == n


async def _evicted(gw: Gateway, n: int) -> bool:
    return gw.evicted_upgrades == n


@engine_opens
@pytest.mark.parametrize("provider", ["telnyx", "plivo", "exotel"])
async def test_a_url_routed_providers_call_is_relayed_and_logged_the_same(
    bot: Bot, engine_opens: bool, provider: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="wsgate")
    expected = opening_messages(provider, service_host=HOST)
    target = provider_target(provider, HOST)
    async with Gateway(config(bot.url, engine_opens=engine_opens)).running() as gw:
        # The opening after the 101, as a provider sends it.
        sock, head = await in_thread(stream, gw.port, b"", opening_frames_of(expected), target)
        with sock:
            assert head.startswith(b"HTTP/1.1 101 ")
            reader = Reader(lambda: sock.recv(4096))
            for message in expected:
                assert await in_thread(reader.next) == (1, message.encode())
        await in_thread(bot.wait_ended)
    assert bot.sessions[0].messages == expected
    assert bot.sessions[0].headers["X-Daily-Session-Id"] == header(head, "X-Session-Id")
    ended = [r.getMessage() for r in caplog.records if "ended by" in r.getMessage()]
    assert len(ended) == 1 and f"via {provider} call {CALL_IDS[provider]}" in ended[0]


@engine_opens
async def test_a_stream_url_token_names_its_session_once_and_is_used_once_the_same(
    bot: Bot, engine_opens: bool
) -> None:
    opening = opening_frames("twilio", service_host="secure.acme")
    async with Gateway(config(bot.url, engine_opens=engine_opens)).running() as gw:
        status, answer = await start_json(gw, "secure", "pk_acme")
        assert status == 200
        target = f"/ws/twilio/{answer['token']}"
        sock, head = await in_thread(stream, gw.port, opening, b"", target)
        with sock:
            # No id on the 101: the token names the session, once checked.
            assert head.startswith(b"HTTP/1.1 101 ") and header(head, "X-Session-Id") is None
            reader = Reader(lambda: sock.recv(4096))
            for message in opening_messages("twilio", service_host="secure.acme"):
                assert await in_thread(reader.next) == (1, message.encode())
        await in_thread(bot.wait_ended)
        assert bot.sessions[0].headers["X-Daily-Session-Id"] == answer["sessionId"]
        again, _ = await in_thread(stream, gw.port, opening, b"", target)
        with again:
            assert await in_thread(closed_with, again) == (1008, "token already used")
        await until(lambda: _none_of_secure(gw), within=10, what="its place given back")
    assert len(bot.sessions) == 1


async def _none_of_secure(gw: Gateway) -> bool:
    return gw.sessions("secure.acme") == 0
