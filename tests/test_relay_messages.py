"""Messages through the gateway to a real upstream bot arrive unchanged, both ways."""

from __future__ import annotations

import base64
import json
import urllib.parse
import uuid

import pytest
from websockets.sync.server import ServerConnection

from .helpers import Bot, Seen, connect, echoed, in_thread, serving

pytestmark = pytest.mark.anyio

SIZES = [0, 125, 126, 65535, 65536, 1 << 20]


async def test_text_and_binary_of_every_length_class_come_back_unchanged(bot: Bot) -> None:
    async with serving(bot.url, max_message_size=2 << 20) as gw:

        def client() -> None:
            with connect(f"{gw.url}/ws/generic/bot.test") as ws:
                for n in SIZES:
                    blob = bytes(i % 251 for i in range(n))
                    ws.send(blob)
                    assert ws.recv() == blob
                    text = ("aé€😀" * (n // 10 + 1))[: n // 4]
                    ws.send(text)
                    assert ws.recv() == text

        await in_thread(client)
        bot.wait_ended()
    seen = bot.sessions[0].messages
    assert [type(m) for m in seen] == [bytes, str] * len(SIZES)
    assert [len(m) for m in seen[::2]] == SIZES


async def test_the_serviceHost_query_form_reaches_the_same_bot(bot: Bot) -> None:
    async with serving(bot.url) as gw:
        assert await in_thread(echoed, f"{gw.url}/ws/generic?serviceHost=bot.test") == "x"
        bot.wait_ended()
    assert [(s.path, s.messages) for s in bot.sessions] == [("/ws", ["x"])]


async def test_a_fragmented_message_reaches_the_bot_whole_and_unchanged(bot: Bot) -> None:
    async with serving(bot.url) as gw:

        def client() -> None:
            with connect(f"{gw.url}/ws/generic/bot.test") as ws:
                ws.send(["frag", "mented ", "text"])
                assert ws.recv() == "fragmented text"
                ws.send([b"\x00\x01", b"", b"\x02" * 70000])
                assert ws.recv() == b"\x00\x01" + b"\x02" * 70000

        await in_thread(client)
        bot.wait_ended()
    assert bot.sessions[0].messages == ["fragmented text", b"\x00\x01" + b"\x02" * 70000]


async def test_a_bot_sending_fragments_reaches_the_client_as_the_same_message(bot: Bot) -> None:
    def fragments(ws: ServerConnection, seen: Seen) -> None:
        ws.recv()
        ws.send(["one ", "two ", "three"])
        ws.send([b"a" * 10, b"b" * 100000])
        ws.recv()

    bot.behaviour = fragments
    async with serving(bot.url) as gw:

        def client() -> None:
            with connect(f"{gw.url}/ws/generic/bot.test") as ws:
                ws.send("go")
                assert ws.recv() == "one two three"
                assert ws.recv() == b"a" * 10 + b"b" * 100000
                ws.send("done")

        await in_thread(client)


async def test_pings_cross_the_gateway_and_their_pongs_come_back(bot: Bot) -> None:
    async with serving(bot.url) as gw:

        def client() -> None:
            with connect(f"{gw.url}/ws/generic/bot.test") as ws:
                assert ws.ping(b"are you there").wait(10)

        await in_thread(client)


async def test_the_bot_chooses_among_the_clients_subprotocols(bot: Bot) -> None:
    async with serving(bot.url) as gw:

        def client() -> str | None:
            url = f"{gw.url}/ws/generic/bot.test"
            with connect(url, subprotocols=["chat.v1", "chat.v2"]) as ws:  # type: ignore[list-item]
                ws.send("x")
                ws.recv()
                return ws.subprotocol

        assert await in_thread(client) == "chat.v2"
        bot.wait_ended()
    assert bot.sessions[0].subprotocol == "chat.v2"


async def test_the_bot_sees_the_clients_exact_body_json_and_a_session_id(bot: Bot) -> None:
    document = '{"caller_id": "abc123", "n": [1, 2.5, null], "é": "+/="}'
    # URL-safe, unpadded, as a browser might send it: the bot still gets standard base64.
    encoded = base64.urlsafe_b64encode(document.encode()).decode().rstrip("=")
    async with serving(bot.url) as gw:
        assert await in_thread(echoed, f"{gw.url}/ws/generic/bot.test?body={encoded}") == "x"
        bot.wait_ended()
    seen = bot.sessions[0]
    path, _, query = seen.path.partition("?")
    assert path == "/ws"
    (value,) = urllib.parse.parse_qs(query)["body"]
    assert base64.b64decode(value, validate=True).decode() == document
    assert json.loads(base64.b64decode(value)) == json.loads(document)
    assert uuid.UUID(seen.headers["X-Daily-Session-Id"]).version == 4


async def test_each_session_gets_its_own_session_id(bot: Bot) -> None:
    async with serving(bot.url) as gw:
        for _ in range(2):
            assert await in_thread(echoed, f"{gw.url}/ws/generic/bot.test") == "x"
        bot.wait_ended(2)
    ids = {s.headers["X-Daily-Session-Id"] for s in bot.sessions}
    assert len(ids) == 2


@pytest.mark.slow
async def test_two_hundred_concurrent_sessions_keep_their_own_data(bot: Bot) -> None:
    import anyio

    async with serving(bot.url) as gw:
        results: dict[int, list[bytes]] = {}

        def client(i: int) -> None:
            with connect(f"{gw.url}/ws/generic/bot.test") as ws:
                got = []
                for j in range(20):
                    payload = f"{i}:{j}:".encode() + bytes([i % 256]) * (i * 7 % 300)
                    ws.send(payload)
                    got.append((payload, ws.recv()))
                results[i] = [p for p, r in got if p == r]

        async with anyio.create_task_group() as tg:
            for i in range(200):
                tg.start_soon(in_thread, client, i)
    assert sorted(results) == list(range(200))
    assert all(len(v) == 20 for v in results.values())


async def test_the_builtin_echo_agent_answers_without_any_upstream() -> None:
    async with serving("ws://127.0.0.1:9/ws") as gw:

        def client() -> None:
            with connect(f"{gw.url}/ws/generic/echo.test") as ws:
                for n in SIZES:
                    ws.send(b"e" * n)
                    assert ws.recv() == b"e" * n
                ws.send(["a", "b"])
                assert ws.recv() == "ab"
                assert ws.ping().wait(10)

        await in_thread(client)
