"""The Python client (wsgate.client) on real sockets: start() against a /start service on
127.0.0.1 (both backends), connect() through a real gateway to a real upstream bot (asyncio,
and the sync wrapper in a thread)."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import parse_qs, urlsplit

import anyio
import anyio.abc
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream

from wsgate import Config, Gateway
from wsgate.client import (
    BodyTooLarge,
    StartError,
    StartResult,
    UpgradeRefused,
    connect,
    connect_sync,
    connection_target,
    start,
)
from wsgate.request import parse_request
from wsgate.start import answer_start, render_response
from wsgate.tokens import TokenAuthority

from .helpers import Bot, asyncio_only, in_thread, token_config

Handler = Callable[[anyio.abc.SocketStream], Awaitable[None]]
TOO_LARGE = r"^body is \d+ bytes of JSON, over 4096$"


@asynccontextmanager
async def tcp_server(handler: Handler) -> AsyncIterator[tuple[int, list[int]]]:
    """Serve `handler` on 127.0.0.1 (port 0): yields the port and a list of connection counts."""
    seen: list[int] = []

    async def on_connection(stream: anyio.abc.SocketStream) -> None:
        seen.append(1)
        async with stream:
            await handler(stream)

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, on_connection)
        yield listener.extra(anyio.abc.SocketAttribute.local_port), seen
        tg.cancel_scope.cancel()


def start_handler(config: Config, authority: TokenAuthority, public_url: str) -> Handler:
    """A /start service on anyio streams around wsgate.start.answer_start."""

    async def handle(stream: anyio.abc.SocketStream) -> None:
        reader = BufferedByteReceiveStream(stream)
        head = await reader.receive_until(b"\r\n\r\n", 8192)
        request = parse_request(head)
        length = int(request.header("content-length") or 0)
        body = await reader.receive_exactly(length) if length else b""
        answer = answer_start(
            request.method,
            request.path,
            request.headers,
            body,
            config.agents_by_host(),
            config.orgs,
            authority,
            lambda agent: True,
            public_url=public_url,
        )
        await stream.send(render_response(answer.status, answer.document))

    return handle


@asynccontextmanager
async def stack(
    upstream: str, *, start_secret: str = "secret"
) -> AsyncIterator[tuple[Gateway, str, list[int]]]:
    """A gateway that checks tokens (stateless part) and a /start service minting for it."""
    config = token_config(upstream)
    gateway_auth = TokenAuthority(["secret"])
    async with Gateway(config, authority=gateway_auth).running() as gateway:
        minting = TokenAuthority([start_secret])
        async with tcp_server(start_handler(config, minting, gateway.url)) as (port, seen):
            yield gateway, f"http://127.0.0.1:{port}", seen


def bot_body(bot: Bot) -> Any:
    query = parse_qs(urlsplit(bot.sessions[-1].path).query)
    return json.loads(base64.b64decode(query["body"][0], validate=True))


# --- start() on both backends ----------------------------------------------------------------


@pytest.mark.anyio
async def test_start_returns_a_typed_result_with_token_ws_url_session_id_and_body() -> None:
    config = token_config("ws://127.0.0.1:1/ws")
    auth = TokenAuthority(["secret"])
    async with tcp_server(start_handler(config, auth, "wss://gw.example")) as (port, _):
        result = await start(f"http://127.0.0.1:{port}", "talk", "pk_test", body={"k": "é"})
    assert isinstance(result, StartResult)
    assert result.ws_url == "wss://gw.example/ws/generic/talk.test"
    assert result.token is not None and result.body is not None
    assert json.loads(base64.b64decode(result.body)) == {"k": "é"}
    bound = base64.b64decode(result.body)  # the token binds the body it was minted for
    assert (await auth.verify(result.token, "talk.test", bound)).session_id == result.session_id
    assert result.token not in repr(result)


@pytest.mark.anyio
async def test_start_accepts_a_ws_base_url_with_a_path_prefix() -> None:
    targets: list[str] = []

    async def handler(stream: anyio.abc.SocketStream) -> None:
        reader = BufferedByteReceiveStream(stream)
        request = parse_request(await reader.receive_until(b"\r\n\r\n", 8192))
        targets.append(request.target)
        await reader.receive_exactly(int(request.header("content-length") or 0))
        await stream.send(
            render_response(200, {"wsUrl": "ws://x/ws/generic/a.b", "sessionId": "s"})
        )

    async with tcp_server(handler) as (port, _):
        result = await start(f"ws://127.0.0.1:{port}/prefix/", "open", "pk")
    assert targets == ["/prefix/v1/public/open/start"]
    assert result == StartResult(ws_url="ws://x/ws/generic/a.b", session_id="s")


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("agent", "key", "body", "status", "reason"),
    [
        ("talk", "pk_wrong", None, 401, "Invalid public API key"),
        ("nobody", "pk_test", None, 404, "Service not found"),
        ("open", "pk_test", {"a": 1}, 400, "?body="),
    ],
)
async def test_an_error_answer_is_a_start_error_with_status_and_reason(
    agent: str, key: str, body: Any, status: int, reason: str
) -> None:
    config = token_config("ws://127.0.0.1:1/ws")
    handler = start_handler(config, TokenAuthority(["s"]), "ws://x")
    async with tcp_server(handler) as (port, _):
        with pytest.raises(StartError) as info:
            await start(f"http://127.0.0.1:{port}", agent, key, body=body)
    assert info.value.status == status
    assert reason in info.value.reason


@pytest.mark.anyio
async def test_a_body_over_4_kb_fails_before_any_request() -> None:
    config = token_config("ws://127.0.0.1:1/ws")
    async with tcp_server(start_handler(config, TokenAuthority(["s"]), "ws://x")) as (port, seen):
        with pytest.raises(BodyTooLarge, match=TOO_LARGE):
            await start(f"http://127.0.0.1:{port}", "talk", "pk_test", body={"a": "x" * 4096})
    assert seen == []


@pytest.mark.anyio
@pytest.mark.parametrize(
    "response",
    [
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b'5\r\n{"wsU\r\n1f;ext=1\r\nrl":"ws://h/x","sessionId":"s"}\r\n0\r\n\r\n',
        b'HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n{"wsUrl":"ws://h/x","sessionId":"s"}',
    ],
)
async def test_chunked_and_close_delimited_answers_are_read(response: bytes) -> None:
    async def handler(stream: anyio.abc.SocketStream) -> None:
        await BufferedByteReceiveStream(stream).receive_until(b"\r\n\r\n", 8192)
        await stream.send(response)

    async with tcp_server(handler) as (port, _):
        result = await start(f"http://127.0.0.1:{port}", "a", "pk")
    assert result == StartResult(ws_url="ws://h/x", session_id="s")


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("response", "status", "reason"),
    [
        (b"garbage\r\n\r\n", 502, "malformed HTTP response"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", 502, "incomplete"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n[]", 200, "not a JSON object"),
        (b'HTTP/1.1 200 OK\r\nContent-Length: 17\r\n\r\n{"wsUrl":"http:"}', 200, "wsUrl"),
        (b"HTTP/1.1 500 Oops\r\nContent-Length: 5\r\n\r\nboom\n", 500, "boom"),
    ],
)
async def test_an_answer_that_is_not_start_json_is_a_start_error(
    response: bytes, status: int, reason: str
) -> None:
    async def handler(stream: anyio.abc.SocketStream) -> None:
        await BufferedByteReceiveStream(stream).receive_until(b"\r\n\r\n", 8192)
        await stream.send(response)

    async with tcp_server(handler) as (port, _):
        with pytest.raises(StartError) as info:
            await start(f"http://127.0.0.1:{port}", "a", "pk")
    assert (info.value.status, reason in info.value.reason) == (status, True)


@pytest.mark.anyio
async def test_a_start_service_that_never_answers_times_out() -> None:
    async def handler(stream: anyio.abc.SocketStream) -> None:
        await anyio.sleep_forever()

    async with tcp_server(handler) as (port, _):
        with pytest.raises(TimeoutError):
            await start(f"http://127.0.0.1:{port}", "a", "pk", timeout=0.2)


# --- connect() ---------------------------------------------------------------------------------


@pytest.mark.anyio
@asyncio_only
async def test_connect_runs_start_and_opens_a_token_session_with_its_body(bot: Bot) -> None:
    async with stack(bot.url) as (_, start_url, seen):
        async with connect(start_url, "talk", public_key="pk_test", body={"hi": [1]}) as ws:
            await ws.send("ping")
            assert await ws.recv() == "ping"
            await ws.send(b"\x00\xff")
            assert await ws.recv() == b"\x00\xff"
        bot.wait_ended()
    assert seen == [1]
    assert bot_body(bot) == {"hi": [1]}


@pytest.mark.anyio
@asyncio_only
async def test_connect_without_a_key_opens_a_none_agent_and_encodes_the_body(bot: Bot) -> None:
    async with stack(bot.url) as (gateway, _, seen):
        async with connect(gateway.url, "open.test", body=["a+b/c=", "é"]) as ws:
            await ws.send("x")
            assert await ws.recv() == "x"
        bot.wait_ended()
    assert seen == []
    assert bot_body(bot) == ["a+b/c=", "é"]


@pytest.mark.anyio
@asyncio_only
async def test_a_refused_upgrade_is_a_typed_error_and_the_bot_is_never_dialled(bot: Bot) -> None:
    async with stack(bot.url, start_secret="not-the-gateways") as (_, start_url, _seen):
        with pytest.raises(UpgradeRefused) as info:
            async with connect(start_url, "talk", public_key="pk_test"):
                pass
    assert (info.value.status, info.value.reason) == (403, "token signature is invalid")
    assert bot.sessions == []


@pytest.mark.anyio
@asyncio_only
async def test_connect_with_a_body_over_4_kb_fails_before_any_request(bot: Bot) -> None:
    async with stack(bot.url) as (gateway, start_url, seen):
        with pytest.raises(BodyTooLarge, match=TOO_LARGE):
            async with connect(start_url, "talk", public_key="pk_test", body="x" * 5000):
                pass
        with pytest.raises(BodyTooLarge, match=TOO_LARGE):
            async with connect(gateway.url, "open.test", body="x" * 5000):
                pass
    assert seen == []
    assert bot.sessions == []


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_connect_on_trio_says_it_needs_asyncio_before_any_request(bot: Bot) -> None:
    async with stack(bot.url) as (_, start_url, seen):
        with pytest.raises(RuntimeError, match="needs asyncio"):
            async with connect(start_url, "talk", public_key="pk_test"):
                pass
    assert seen == []


@pytest.mark.anyio
async def test_the_sync_wrapper_opens_a_token_session_from_a_thread(bot: Bot) -> None:
    def session(start_url: str) -> str | bytes:
        with connect_sync(start_url, "talk", public_key="pk_test", body={"n": 1}) as ws:
            ws.send("sync")
            return ws.recv(timeout=10)

    async with stack(bot.url) as (_, start_url, _seen):
        assert await in_thread(session, start_url) == "sync"
        await in_thread(bot.wait_ended)
    assert bot_body(bot) == {"n": 1}


def test_the_connection_target_comes_from_the_start_result_never_from_the_base_url() -> None:
    result = StartResult("wss://gw/ws/generic/a.b?x=1", "sid", token="t.k", body="e+/=")
    url, headers = connection_target(result, "https://elsewhere", "ignored")
    assert url == "wss://gw/ws/generic/a.b?x=1&body=e%2B%2F%3D"
    assert headers == {"Authorization": "Bearer t.k"}
    url, headers = connection_target(None, "https://gw/base/", "a.b", body={"k": 1})
    assert url == "wss://gw/base/ws/generic/a.b?body=eyJrIjoxfQ%3D%3D"
    assert headers == {}
