"""The Session API of in-process bots (issue 16): :class:`wsgate.Routes` and any ASGI app
(FastAPI, in-process, no server) as an agent's ``session_api``, called with the session's id.
Real sockets on 127.0.0.1, both anyio backends."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest

import wsgate
from wsgate import AgentConfig, Config, Gateway, GatewaySettings, OrgConfig, RouteResponse, Routes
from wsgate.errors import ConfigError

from .helpers import (
    call,
    call_json,
    dechunk,
    http_answer,
    in_thread,
    open_ws,
    receive_until,
    session_id,
)

pytestmark = pytest.mark.anyio

ORGS = [OrgConfig("test", public_keys=["pk_test"], private_keys=["sk_test"])]

ROUTES = Routes()


@ROUTES.route("/status", methods=["GET", "HEAD"])
async def status(request: wsgate.RouteRequest) -> dict[str, Any]:
    return {
        "session": request.session_id,
        "path": request.path,
        "q": request.query_params.get("q"),
        "trace": request.headers.get("x-trace"),
        "authorization": request.headers.get("authorization"),
    }


@ROUTES.route("/update-context", methods=["POST"])
async def update_context(request: wsgate.RouteRequest) -> RouteResponse:
    document = json.dumps({"updated": request.json(), "session": request.session_id})
    return RouteResponse(201, document, media_type="application/json")


@ROUTES.route("/fail")
async def fail(request: wsgate.RouteRequest) -> None:
    raise RuntimeError("a bug in the bot's route")


@ROUTES.route("/lost")
async def lost(request: wsgate.RouteRequest) -> None:
    raise ConnectionResetError("a connection of the bot's own")


@ROUTES.route("/hang")
async def hang(request: wsgate.RouteRequest) -> None:
    await anyio.sleep_forever()


@ROUTES.route("/nothing", methods=["DELETE"])
async def nothing(request: wsgate.RouteRequest) -> None:
    return None


async def parrot(args: wsgate.BotArguments) -> None:
    async for message in args.websocket:
        await args.websocket.send_text(f"{message}")


def routes_config(session_api: Any = ROUTES, **settings: Any) -> Config:
    """``bot.test`` (in-process, with ``session_api``) and ``plain.test`` (in-process, no
    routes)."""
    return Config(
        gateway=GatewaySettings(port=0, **settings),
        orgs=ORGS,
        agents=[
            AgentConfig("bot", "test", bot=parrot, session_api=session_api),
            AgentConfig("plain", "test", bot=parrot),
        ],
    )


@asynccontextmanager
async def live_session(gw: Gateway, agent: str = "bot") -> AsyncIterator[str]:
    """A live session of ``agent``.test on ``gw``: its id."""
    ws = await in_thread(open_ws, f"{gw.url}/ws/generic/{agent}.test")
    try:
        yield session_id(ws)
    finally:
        await in_thread(ws.close)


async def test_routes_answer_with_the_session_id() -> None:
    async with Gateway(routes_config()).running() as gw, live_session(gw) as sid:
        base = f"/v1/public/bot/sessions/{sid}"
        status, answer = await call_json(
            gw, "GET", f"{base}/status?q=a%20b", "pk_test", b"", "X-Trace: t-1"
        )
        assert status == 200
        # The key never reaches the bot; the client's own headers do.
        assert answer == {
            "session": sid,
            "path": "/status",
            "q": "a b",
            "trace": "t-1",
            "authorization": None,
        }
        body = json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode()
        status, answer = await call_json(gw, "POST", f"{base}/update-context", "pk_test", body)
        assert status == 201
        assert answer == {"updated": json.loads(body), "session": sid}
        head = f"HEAD {base}/status HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer pk_test\r\n\r\n"
        status, headers, rest = await http_answer(gw.port, head.encode())
        assert (status, rest) == (200, b"")
        assert int(headers["content-length"]) > 0
        status, headers, rest = await http_answer(
            gw.port,
            f"DELETE {base}/nothing HTTP/1.1\r\nAuthorization: Bearer pk_test\r\n\r\n".encode(),
        )
        assert (status, rest) == (204, b"")


async def test_routes_refuse_unknown_paths_methods_and_bad_bodies(caplog: Any) -> None:
    async with (
        Gateway(routes_config(session_api_timeout=0.5)).running() as gw,
        live_session(gw) as sid,
    ):
        base = f"/v1/public/bot/sessions/{sid}"
        assert (await call(gw, "GET", f"{base}/nope", "pk_test"))[0] == 404
        request = f"PUT {base}/status HTTP/1.1\r\nAuthorization: Bearer pk_test\r\n\r\n"
        status, headers, _ = await http_answer(gw.port, request.encode())
        assert (status, headers["allow"]) == (405, "GET, HEAD")
        status, answer = await call_json(gw, "POST", f"{base}/update-context", "pk_test", b"{")
        assert status == 400 and answer["code"] == "400"
        # A route that raises: 500, logged; one that never answers: 504.
        status, answer = await call_json(gw, "GET", f"{base}/fail", "pk_test")
        assert (status, answer["error"]) == (500, "bot's route failed")
        assert "a bug in the bot's route" in caplog.text
        # An OSError of its own too: nothing was answered yet, so the client gets the 500.
        status, answer = await call_json(gw, "GET", f"{base}/lost", "pk_test")
        assert (status, answer["error"]) == (500, "bot's route failed")
        status, answer = await call_json(gw, "GET", f"{base}/hang", "pk_test")
        assert status == 504
        # The key's checks come first, as for upstream bots.
        assert (await call(gw, "GET", f"{base}/status", "sk_test"))[0] == 403
        assert (await call(gw, "GET", f"{base}/status", None))[0] == 401


async def test_a_bot_without_routes_answers_404() -> None:
    async with Gateway(routes_config()).running() as gw, live_session(gw, "plain") as sid:
        status, answer = await call_json(
            gw, "GET", f"/v1/public/plain/sessions/{sid}/status", "pk_test"
        )
        assert status == 404 and "serves no routes" in answer["error"]
        # The session is bot.test's to call, not plain.test's, and the other way round.
        status, _ = await call(gw, "GET", f"/v1/public/bot/sessions/{sid}/status", "pk_test")
        assert status == 404


async def test_a_stopped_session_is_no_longer_called() -> None:
    async with Gateway(routes_config()).running() as gw, live_session(gw) as sid:
        target = f"/v1/public/bot/sessions/{sid}/status"
        assert (await call(gw, "GET", target, "pk_test"))[0] == 200
        stopped = await call(gw, "DELETE", f"/v1/agents/bot/sessions/{sid}", "sk_test")
        assert stopped[0] == 200
        assert (await call(gw, "GET", target, "pk_test"))[0] == 404


async def test_a_fastapi_app_is_called_in_process() -> None:
    import fastapi

    app = fastapi.FastAPI()

    async def seen(request: fastapi.Request) -> dict[str, Any]:
        return {
            "header": request.headers.get("x-daily-session-id"),
            "state": request.state.session_id,
            "body": (await request.json()) if await request.body() else None,
        }

    seen.__annotations__["request"] = fastapi.Request  # (annotations are strings here)
    app.add_api_route("/seen", seen, methods=["GET", "POST"])
    gateway = Gateway(Config(gateway=GatewaySettings(port=0), orgs=ORGS))
    gateway.bot("bot.test", session_api=app)(parrot)
    async with gateway.running() as gw, live_session(gw) as sid:
        base = f"/v1/public/bot/sessions/{sid}"
        status, answer = await call_json(gw, "POST", f"{base}/seen", "pk_test", b'{"a": 1}')
        assert (status, answer) == (200, {"header": sid, "state": sid, "body": {"a": 1}})
        status, _ = await call(gw, "GET", f"{base}/missing", "pk_test")
        assert status == 404


async def test_an_apps_answer_is_streamed_as_the_app_sends_it() -> None:
    """Parts of an ASGI answer reach the caller as they are sent (chunked: the gateway frames
    it); an answer that pauses longer than ``session_api_timeout`` is cut short."""
    second_part = anyio.Event()
    fields = [(b"content-type", b"text/plain"), (b"content-length", b"999")]
    start = {"type": "http.response.start", "status": 200, "headers": fields}

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send(start)
        await send({"type": "http.response.body", "body": b"part-1\n", "more_body": True})
        if scope["path"] == "/stalls":
            await anyio.sleep_forever()
        await second_part.wait()  # only once the caller holds part 1
        await send({"type": "http.response.body", "body": b"part-2\n", "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    config = routes_config(session_api=app, session_api_timeout=1.0)
    async with Gateway(config).running() as gw, live_session(gw) as sid:
        base = f"/v1/public/bot/sessions/{sid}"
        request = f"GET {base}/parts HTTP/1.1\r\nAuthorization: Bearer pk_test\r\n\r\n"
        async with await anyio.connect_tcp("127.0.0.1", gw.port) as s:
            await s.send(request.encode())
            with anyio.fail_after(20):
                data = await receive_until(s, b"", b"part-1\n")
                assert b"part-2" not in data
                second_part.set()
                data = await receive_until(s, data)
        head = data.partition(b"\r\n\r\n")[0].lower().split(b"\r\n")
        assert head[0] == b"http/1.1 200 ok"
        # The app's own length is not the gateway's framing: dropped.
        assert b"transfer-encoding: chunked" in head and b"content-length: 999" not in head
        assert dechunk(data) == b"part-1\npart-2\n"
        stalls = f"GET {base}/stalls HTTP/1.1\r\nAuthorization: Bearer pk_test\r\n\r\n"
        status, headers, body = await http_answer(gw.port, stalls.encode())
        # Its head and first part went; then the connection ended without the last chunk.
        assert (status, headers["transfer-encoding"], body) == (
            200,
            "chunked",
            b"7\r\npart-1\n\r\n",
        )


def test_routes_check_what_they_are_given() -> None:
    routes = Routes()
    with pytest.raises(ValueError, match="must start with '/'"):
        routes.route("status")
    with pytest.raises(TypeError, match="async function"):
        routes.route("/x")(lambda request: None)  # type: ignore[arg-type,return-value]
    routes.route("/x", methods=["get"])(status)
    with pytest.raises(ValueError, match="defined twice"):
        routes.route("/x")(status)


def test_session_api_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="session_api is for in-process bots"):
        AgentConfig("a", "test", upstream="ws://127.0.0.1:1/ws", session_api=ROUTES)
    with pytest.raises(ConfigError, match=r"must be written 'package\.module:app'"):
        AgentConfig("a", "test", bot=parrot, session_api="no colon")
    with pytest.raises(ConfigError, match="session_api_upstream is for upstream bots"):
        AgentConfig("a", "test", bot=parrot, session_api_upstream="http://127.0.0.1:1")
    with pytest.raises(ConfigError, match="must be an http:// URL"):
        AgentConfig("a", "test", upstream="ws://127.0.0.1:1/ws", session_api_upstream="ws://h:1")
    agent = AgentConfig(
        "a", "test", upstream="ws://127.0.0.1:1/ws", session_api_upstream="https://h/api/"
    )
    assert agent.session_api_url is not None
    assert (agent.session_api_url.host_header, agent.session_api_url.resource) == ("h", "/api")
    assert agent.session_api_url.tls


def test_a_named_app_is_imported_when_the_gateway_is_built() -> None:
    from wsgate.config import loads_config

    config = loads_config(
        '[[org]]\nname = "test"\n[[agent]]\nname = "bot"\norg = "test"\n'
        'bot = "tests.test_session_routes:parrot"\n'
        'session_api = "tests.test_session_routes:ROUTES"\n'
    )
    Gateway(config)
    broken = Config(
        orgs=ORGS, agents=[AgentConfig("bot", "test", bot=parrot, session_api="tests.nope:app")]
    )
    with pytest.raises(ConfigError, match=r"session_api: .*cannot import"):
        Gateway(broken)
