"""Session control (issue 16): private keys apart from public ones, stopping and listing live
sessions, ``X-Session-Id`` on the 101, and the Session API proxied to a real FastAPI + uvicorn
bot. Real sockets on 127.0.0.1, both anyio backends; the uvicorn bot runs in a thread of its own
(its own asyncio loop), so the gateway's tests run under trio too."""

from __future__ import annotations

import json
import socket
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest

from wsgate import AgentConfig, Config, Gateway, GatewaySettings, OrgConfig, WebSocketDisconnect
from wsgate.errors import ConfigError
from wsgate.session_api import (
    MAX_FORWARD_PATH,
    SessionKeys,
    forward_head,
    judge_control,
    judge_forward,
    load_private_keys,
    page,
    private_keys_env,
)

from .helpers import (
    Bot,
    call,
    call_json,
    closed_with,
    echoed,
    in_thread,
    open_ws,
    session_id,
    until,
    uvicorn_in_thread,
)
from .telephony import CALL_IDS, PROVIDERS, opening_messages, provider_target

pytestmark = pytest.mark.anyio

ORGS = [
    OrgConfig("test", public_keys=["pk_test"], private_keys=["sk_test"]),
    OrgConfig("other", public_keys=["pk_other"], private_keys=["sk_other"]),
]


def control_config(upstream: str, **settings: Any) -> Config:
    """``bot.test`` relayed to ``upstream`` (at most ``max_sessions``), the builtin
    ``echo.test``, and ``solo.other`` in another organisation."""
    max_sessions = settings.pop("max_sessions", 50)
    return Config(
        gateway=GatewaySettings(port=0, **settings),
        orgs=ORGS,
        agents=[
            AgentConfig("bot", "test", upstream=upstream, max_sessions=max_sessions),
            AgentConfig("echo", "test", builtin="echo"),
            AgentConfig("solo", "other", builtin="echo"),
        ],
    )


@asynccontextmanager
async def gateway(upstream: str, **settings: Any) -> AsyncIterator[Gateway]:
    async with Gateway(control_config(upstream, **settings)).running() as gw:
        yield gw


# --- keys -------------------------------------------------------------------------------------


def test_private_keys_come_from_one_source_each(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text("# rotated monthly\nsk_one\n\n sk_two \n")
    orgs = [
        OrgConfig("listed", private_keys=["sk_a"]),
        OrgConfig("filed", private_keys_file=str(keys_file)),
        OrgConfig("my-env"),
        OrgConfig("none"),
    ]
    found = load_private_keys(orgs, {"WSGATE_PRIVATE_KEYS_MY_ENV": "sk_x, sk_y"})
    assert found == {"listed": ("sk_a",), "filed": ("sk_one", "sk_two"), "my-env": ("sk_x", "sk_y")}
    assert private_keys_env("my-env") == "WSGATE_PRIVATE_KEYS_MY_ENV"
    with pytest.raises(ConfigError, match="settings and WSGATE_PRIVATE_KEYS_LISTED"):
        load_private_keys(orgs[:1], {"WSGATE_PRIVATE_KEYS_LISTED": "sk_b"})
    with pytest.raises(ConfigError, match="given twice"):
        OrgConfig("both", private_keys=["sk_a"], private_keys_file=str(keys_file))


def test_a_key_is_never_both_public_and_private() -> None:
    with pytest.raises(ConfigError, match="both public and private"):
        OrgConfig("test", public_keys=["k"], private_keys=["k"])
    across = [OrgConfig("a", public_keys=["k"]), OrgConfig("b", private_keys=["k"])]
    with pytest.raises(ConfigError, match="also a public key") as caught:
        load_private_keys(across, {})
    assert "'k'" not in str(caught.value)
    assert "sk_test" not in repr(ORGS[0])


def test_private_keys_load_from_a_settings_file(tmp_path: Path) -> None:
    from wsgate.config import loads_config

    config = loads_config(
        '[[org]]\nname = "acme"\npublic_keys = ["pk_a"]\nprivate_keys = ["sk_a"]\n'
        '[[agent]]\nname = "e"\norg = "acme"\nbuiltin = "echo"\n'
        "[gateway]\nsession_api_timeout = 2.5\n"
    )
    assert config.orgs[0].private_keys == ("sk_a",)
    assert config.gateway.session_api_timeout == 2.5
    with pytest.raises(ConfigError, match=r"private_keys must be a list of strings, got int$"):
        loads_config('[[org]]\nname = "acme"\nprivate_keys = 7\n')


KEYS = SessionKeys(ORGS, {"test": ["sk_test"], "other": ["sk_other"]})
AGENTS = control_config("ws://127.0.0.1:9/ws").agents_by_host()
SID = "0f8fad5b-d9cb-469f-a165-70867728950e"


@pytest.mark.parametrize(
    ("method", "path", "key", "status"),
    [
        ("DELETE", f"/v1/agents/bot/sessions/{SID}", None, 401),
        ("DELETE", f"/v1/agents/bot/sessions/{SID}", "pk_test", 403),  # the wrong kind
        ("DELETE", f"/v1/agents/bot/sessions/{SID}", "sk_nobody", 401),
        ("DELETE", f"/v1/agents/bot/sessions/{SID}", "sk_other", 403),  # another org's
        ("DELETE", f"/v1/agents/nope/sessions/{SID}", "sk_test", 403),  # the same answer
        ("DELETE", "/v1/agents/bot/sessions/not-a-uuid", "sk_test", 400),
        ("GET", f"/v1/agents/bot/sessions/{SID}", "sk_test", 405),
        ("POST", "/v1/agents/bot/sessions", "sk_test", 405),
        ("GET", "/v1/agents/bot/other", "sk_test", 404),
    ],
)
def test_stop_and_list_refusals(method: str, path: str, key: str | None, status: int) -> None:
    headers = [] if key is None else [("authorization", f"Bearer {key}")]
    judged = judge_control(method, path, [], headers, AGENTS, KEYS)
    assert getattr(judged, "status", None) == status, judged


@pytest.mark.parametrize(
    ("query", "status"),
    [([("limit", "0")], 400), ([("limit", "1001")], 400), ([("limit", "-1")], 400),
     ([("after", "x")], 400), ([("limit", "1000"), ("after", SID.upper())], None)],
)  # fmt: skip
def test_list_arguments(query: list[tuple[str, str]], status: int | None) -> None:
    headers = [("authorization", "Bearer sk_test")]
    judged = judge_control("GET", "/v1/agents/bot/sessions", query, headers, AGENTS, KEYS)
    assert getattr(judged, "status", None) == status, judged


@pytest.mark.parametrize(
    ("path", "query", "key", "status"),
    [
        (f"/v1/public/bot/sessions/{SID}/status", "", None, 401),
        (f"/v1/public/bot/sessions/{SID}/status", "", "sk_test", 403),
        (f"/v1/public/bot/sessions/{SID}/status", "", "pk_nobody", 401),
        (f"/v1/public/bot/sessions/{SID}/status", "", "pk_other", 404),
        (f"/v1/public/nope/sessions/{SID}/status", "", "pk_test", 404),
        ("/v1/public/bot/sessions/nope/status", "", "pk_test", 400),
        (f"/v1/public/bot/sessions/{SID}/a/../admin", "", "pk_test", 400),
        (f"/v1/public/bot/sessions/{SID}/a/%2E%2e/admin", "", "pk_test", 400),
        (f"/v1/public/bot/sessions/{SID}/./x", "", "pk_test", 400),
        (f"/v1/public/bot/sessions/{SID}/x", "q=" + "a" * MAX_FORWARD_PATH, "pk_test", 400),
    ],
)
def test_session_api_refusals(path: str, query: str, key: str | None, status: int) -> None:
    headers = [] if key is None else [("authorization", f"Bearer {key}")]
    judged = judge_forward("GET", path, query, headers, AGENTS, KEYS)
    assert getattr(judged, "status", None) == status, judged


def test_session_api_target_keeps_the_path_and_query() -> None:
    headers = [("authorization", "Bearer pk_test")]
    path = f"/v1/public/bot/sessions/{SID}/a/b"
    judged = judge_forward("GET", path, "x=1", headers, AGENTS, KEYS)
    assert getattr(judged, "target", None) == "/a/b?x=1"
    assert judge_forward("TRACE", f"/v1/public/bot/sessions/{SID}/a", "", headers, AGENTS, KEYS)


def test_forwarded_head_drops_the_key_and_framing() -> None:
    head = forward_head(
        "POST",
        "/update",
        "bot:1",
        [("host", "gw"), ("authorization", "Bearer pk_test"), ("x-trace", "7"),
         ("x-daily-session-id", "forged"), ("content-length", "3"), ("connection", "keep-alive")],
        SID,
        3,
    )  # fmt: skip
    assert (
        head
        == (
            f"POST /update HTTP/1.1\r\nHost: bot:1\r\nx-trace: 7\r\nX-Daily-Session-Id: {SID}\r\n"
            "Content-Length: 3\r\nConnection: close\r\n\r\n"
        ).encode()
    )


def test_pages_are_ordered_by_id_and_chain() -> None:
    ids = sorted(str(uuid.uuid4()) for _ in range(5))
    entries = [{"sessionId": i} for i in reversed(ids)]
    first = page(entries, 2, None)
    assert [s["sessionId"] for s in first["sessions"]] == ids[:2]
    assert first["next"] == ids[1]
    last = page(entries, 3, first["next"])
    assert [s["sessionId"] for s in last["sessions"]] == ids[2:]
    assert last["next"] is None


# --- stop, list, X-Session-Id on a gateway ----------------------------------------------------


async def test_the_101_tells_the_client_the_id_the_bot_received(bot: Bot) -> None:
    async with gateway(bot.url) as gw:
        ws = await in_thread(open_ws, f"{gw.url}/ws/generic/bot.test")
        try:
            sid = session_id(ws)
            ws.send("x")
            assert await in_thread(ws.recv, 20) == "x"  # the bot has recorded its session
            assert bot.sessions[0].headers["X-Daily-Session-Id"] == sid
            uuid.UUID(sid)
        finally:
            await in_thread(ws.close)


async def test_stop_closes_both_sides_with_1000_and_frees_capacity(bot: Bot, caplog: Any) -> None:
    caplog.set_level("INFO", logger="wsgate")
    async with gateway(bot.url, max_sessions=1) as gw:
        ws = await in_thread(open_ws, f"{gw.url}/ws/generic/bot.test")
        sid = session_id(ws)
        assert gw.sessions("bot.test") == 1
        status, answer = await call_json(gw, "DELETE", f"/v1/agents/bot/sessions/{sid}", "sk_test")
        assert (status, answer) == (200, {"status": "stopped", "sessionId": sid})
        assert gw.sessions("bot.test") == 0  # at once, not after the close handshakes
        assert await in_thread(closed_with, ws.recv, 20) == (1000, "session stopped")
        await in_thread(bot.wait_ended)
        assert bot.sessions[0].close == (1000, "session stopped")
        # The place is free: another session opens on an agent of capacity 1.
        assert await in_thread(echoed, f"{gw.url}/ws/generic/bot.test") == "x"
        again = await call_json(gw, "DELETE", f"/v1/agents/bot/sessions/{sid}", "sk_test")
        assert again[0] == 404
        # No sleep: the doorbell has run once the next session's outcome was counted.
        with anyio.fail_after(10):
            while "ended by api" not in caplog.text:
                await anyio.wait_all_tasks_blocked()
        assert 'ended_by="api"' in gw.metrics.exposition(None).decode()


async def test_a_session_of_another_agent_is_not_found(bot: Bot) -> None:
    async with gateway(bot.url) as gw:
        ws = await in_thread(open_ws, f"{gw.url}/ws/generic/echo.test")
        try:
            sid = session_id(ws)
            status, _ = await call(gw, "DELETE", f"/v1/agents/bot/sessions/{sid}", "sk_test")
            assert status == 404
            status, _ = await call(gw, "DELETE", f"/v1/agents/bot/sessions/{sid}", "pk_test")
            assert status == 403
            status, _ = await call(gw, "DELETE", f"/v1/agents/echo/sessions/{sid}", "sk_other")
            assert status == 403
            ws.send("still here")
            assert await in_thread(ws.recv, 20) == "still here"
        finally:
            await in_thread(ws.close)


async def test_an_engine_session_named_under_another_agent_is_not_found_nor_taken(
    bot: Bot,
) -> None:
    # bot.test's sessions are the engine's own (kept by the engine until asked for): asked for
    # under another agent, one is 404 and stays as it was, stoppable under its own.
    async with gateway(bot.url) as gw:
        assert gw._sessions is not None and "bot.test" in gw._sessions.fast
        ws = await in_thread(open_ws, f"{gw.url}/ws/generic/bot.test")
        try:
            sid = session_id(ws)
            for path, expected in (
                (f"/v1/agents/echo/sessions/{sid}", 404),
                (f"/v1/agents/bot/sessions/{uuid.uuid4()}", 404),
                ("/v1/agents/bot/sessions/not-an-id", 400),
            ):
                assert (await call(gw, "DELETE", path, "sk_test"))[0] == expected, path
            assert gw._sessions.live == {}, "not adopted"
            ws.send("still here")
            assert await in_thread(ws.recv, 20) == "still here"
            status, _ = await call(gw, "DELETE", f"/v1/agents/bot/sessions/{sid}", "sk_test")
            assert status == 200
            assert await in_thread(closed_with, ws.recv, 20) == (1000, "session stopped")
        finally:
            await in_thread(ws.close)


async def test_a_private_key_never_mints_a_token(bot: Bot) -> None:
    async with gateway(bot.url) as gw:
        body = b'{"transport":"websocket"}'
        status, answer = await call(gw, "POST", "/v1/public/bot/start", "sk_test", body)
        assert status == 401, answer


async def test_list_shows_live_sessions_in_pages(bot: Bot) -> None:
    async with gateway(bot.url) as gw:
        clients = [await in_thread(open_ws, f"{gw.url}/ws/generic/bot.test") for _ in range(3)]
        try:
            ids = sorted(session_id(ws) for ws in clients)
            status, first = await call_json(gw, "GET", "/v1/agents/bot/sessions?limit=2", "sk_test")
            assert status == 200
            assert [s["sessionId"] for s in first["sessions"]] == ids[:2]
            entry = first["sessions"][0]
            assert entry["bot"] == "upstream" and entry["provider"] is None
            assert entry["startedAt"].endswith("Z") and entry["seconds"] >= 0
            target = f"/v1/agents/bot/sessions?limit=2&after={first['next']}"
            status, last = await call_json(gw, "GET", target, "sk_test")
            assert [s["sessionId"] for s in last["sessions"]] == ids[2:]
            assert last["next"] is None
            status, _ = await call(gw, "GET", "/v1/agents/bot/sessions", "pk_test")
            assert status == 403
            status, others = await call_json(gw, "GET", "/v1/agents/solo/sessions", "sk_other")
            assert (status, others) == (200, {"sessions": [], "next": None})
        finally:
            for ws in clients:
                await in_thread(ws.close)


def traffic(entry: dict[str, Any]) -> tuple[int, int, int, int]:
    """A list entry's messages and bytes: in (client -> bot), then out."""
    return entry["messagesIn"], entry["bytesIn"], entry["messagesOut"], entry["bytesOut"]


async def listed_traffic(gw: Gateway, agent: str) -> dict[str, tuple[int, int, int, int]]:
    _, listed = await call_json(gw, "GET", f"/v1/agents/{agent}/sessions", "sk_test")
    return {s["sessionId"]: traffic(s) for s in listed["sessions"]}


async def test_a_session_listed_and_one_never_asked_for_end_alike(
    bot: Bot, caplog: pytest.LogCaptureFixture
) -> None:
    # The engine keeps its sessions as their news until something asks for one (here the list):
    # either way its end gives back its place, is counted and logged the same.
    caplog.set_level("INFO", logger="wsgate")
    async with gateway(bot.url) as gw:
        never, listed = [await in_thread(open_ws, f"{gw.url}/ws/generic/bot.test") for _ in "ab"]
        never_id, listed_id = session_id(never), session_id(listed)
        await in_thread(never.close)  # ends before anything asked for it
        await in_thread(bot.wait_ended)
        _, answer = await call_json(gw, "GET", "/v1/agents/bot/sessions", "sk_test")
        assert [s["sessionId"] for s in answer["sessions"]] == [listed_id]
        await in_thread(listed.close)
        with anyio.fail_after(10):
            while gw.sessions("bot.test") or len(ends(caplog)) < 2:
                await anyio.wait_all_tasks_blocked()
        first, second = ends(caplog)
        assert (first["session_id"], second["session_id"]) == (never_id, listed_id)
        for fields in (first, second):
            assert (fields["agent"], fields["ended_by"], fields["code"]) == (
                "bot.test",
                "client",
                "1000",
            )
            assert fields["duration"] >= 0
        exposition = gw.metrics.exposition(None).decode()
        closed = 'wsgate_sessions_closed_total{agent="bot.test",code="1000",ended_by="client"} 2.0'
        assert closed in exposition


def ends(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    """The fields of the session lines logged so far."""
    return [r.fields for r in caplog.records if getattr(r, "event", None) == "session_end"]


async def test_list_shows_each_sessions_messages_and_bytes_each_way(bot: Bot) -> None:
    async with gateway(bot.url) as gw:
        busy = await in_thread(open_ws, f"{gw.url}/ws/generic/bot.test")
        quiet = await in_thread(open_ws, f"{gw.url}/ws/generic/bot.test")
        echo = await in_thread(open_ws, f"{gw.url}/ws/generic/echo.test")
        try:
            for message in ("hello", "wörld", b"\x00" * 1000):  # 5, 6 and 1000 bytes
                busy.send(message)
                assert await in_thread(busy.recv, 20) == message
            echo.send("x")
            assert await in_thread(echo.recv, 20) == "x"
            expected = {session_id(busy): (3, 1011, 3, 1011), session_id(quiet): (0, 0, 0, 0)}

            async def shown() -> bool:
                # Published by the session's thread after the read that relayed the message:
                # a moment after the echo reached the client, at worst.
                return await listed_traffic(gw, "bot") == expected

            await until(shown, within=10, what="the list shows each session's own traffic")
            assert await listed_traffic(gw, "echo") == {session_id(echo): (1, 1, 1, 1)}
        finally:
            for ws in (busy, quiet, echo):
                await in_thread(ws.close)


async def test_list_shows_an_inprocess_sessions_messages_and_bytes() -> None:
    async def shouter(args: Any) -> None:
        async for text in args.websocket.iter_text():
            await args.websocket.send_text(text.upper() * 2)

    config = Config(
        gateway=GatewaySettings(port=0),
        orgs=ORGS,
        agents=[AgentConfig("bot", "test", bot=shouter)],
    )
    async with Gateway(config).running() as gw:
        ws = await in_thread(open_ws, f"{gw.url}/ws/generic/bot.test")
        try:
            ws.send("abc")
            assert await in_thread(ws.recv, 20) == "ABCABC"
            expected = {session_id(ws): (1, 3, 1, 6)}

            async def shown() -> bool:
                return await listed_traffic(gw, "bot") == expected

            await until(shown, within=10, what="the list shows the in-process session's traffic")
        finally:
            await in_thread(ws.close)


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_a_telephony_session_is_named_on_its_101_listed_and_stopped(
    bot: Bot, provider: str
) -> None:
    """Twilio's 101 is answered before its opening names the agent: the id is chosen then."""
    async with gateway(bot.url) as gw:
        ws = await in_thread(open_ws, gw.url + provider_target(provider, "bot.test"))
        try:
            sid = session_id(ws)
            opening = opening_messages(provider, service_host="bot.test")
            for message in opening:
                ws.send(message)
            for message in opening:  # echoed: the bot has recorded its session
                assert await in_thread(ws.recv, 20) == message
            assert bot.sessions[0].headers["X-Daily-Session-Id"] == sid
            _, listed = await call_json(gw, "GET", "/v1/agents/bot/sessions", "sk_test")
            (entry,) = listed["sessions"]
            assert (entry["sessionId"], entry["provider"], entry["callId"]) == (
                sid,
                provider,
                CALL_IDS[provider],
            )
            status, _ = await call(gw, "DELETE", f"/v1/agents/bot/sessions/{sid}", "sk_test")
            assert status == 200
            assert await in_thread(closed_with, ws.recv, 20) == (1000, "session stopped")
        finally:
            await in_thread(ws.close)


async def test_a_twilio_stream_with_a_token_keeps_the_id_start_gave() -> None:
    """Its 101 names no id (the token's is known once its signature is checked, after the
    opening); the session is the one /start answered, addressable by that id."""
    bot = Bot()
    agent = AgentConfig("bot", "test", websocket_auth="token", upstream=bot.url)
    config = Config(gateway=GatewaySettings(port=0, secrets=["s" * 32]), orgs=ORGS, agents=[agent])
    try:
        async with Gateway(config).running() as gw:
            status, answer = await call_json(
                gw, "POST", "/v1/public/bot/start", "pk_test", b'{"transport":"websocket"}'
            )
            assert status == 200
            stream_url = gw.url + provider_target("twilio", "bot.test", answer["token"])
            ws = await in_thread(open_ws, stream_url)
            try:
                assert ws.response is not None and "X-Session-Id" not in ws.response.headers
                opening = opening_messages("twilio", service_host="bot.test")
                for message in opening:
                    ws.send(message)
                for message in opening:
                    assert await in_thread(ws.recv, 20) == message
                assert bot.sessions[0].headers["X-Daily-Session-Id"] == answer["sessionId"]
                target = f"/v1/agents/bot/sessions/{answer['sessionId']}"
                assert (await call(gw, "DELETE", target, "sk_test"))[0] == 200
            finally:
                await in_thread(ws.close)
    finally:
        bot.close()


@dataclass
class Heard:
    disconnect: int | None = None
    done: threading.Event = field(default_factory=threading.Event)


async def test_stop_reaches_an_inprocess_bot_as_a_disconnect() -> None:
    heard = Heard()

    async def listener(args: Any) -> None:
        try:
            while True:
                await args.websocket.receive_text()
        except WebSocketDisconnect as exc:
            heard.disconnect = exc.code
            heard.done.set()

    config = Config(
        gateway=GatewaySettings(port=0),
        orgs=ORGS,
        agents=[AgentConfig("bot", "test", bot=listener)],
    )
    async with Gateway(config).running() as gw:
        ws = await in_thread(open_ws, f"{gw.url}/ws/generic/bot.test")
        sid = session_id(ws)
        _, listed = await call_json(gw, "GET", "/v1/agents/bot/sessions", "sk_test")
        assert [s["bot"] for s in listed["sessions"]] == ["inprocess"]
        status, _ = await call(gw, "DELETE", f"/v1/agents/bot/sessions/{sid}", "sk_test")
        assert status == 200
        assert await in_thread(closed_with, ws.recv, 20) == (1000, "session stopped")
        assert await in_thread(heard.done.wait, 20)
        assert heard.disconnect == 1000
        assert gw.sessions("bot.test") == 0


# --- the Session API, with a FastAPI + uvicorn bot --------------------------------------------


@dataclass
class HttpBot:
    """A Pipecat-style bot: ``/ws`` (echo), ``GET /status``, ``POST /update-context``, served
    by uvicorn in a thread of its own. ``calls`` records each HTTP request it got."""

    url: str
    calls: list[dict[str, Any]]


@pytest.fixture
def http_bot() -> Iterator[HttpBot]:
    import fastapi

    app = fastapi.FastAPI()
    calls: list[dict[str, Any]] = []

    async def ws_endpoint(websocket: fastapi.WebSocket) -> None:
        await websocket.accept()
        try:
            while True:
                await websocket.send_text(await websocket.receive_text())
        except fastapi.WebSocketDisconnect:
            pass

    async def status(request: fastapi.Request) -> fastapi.Response:
        seen = {"path": request.url.path, "query": request.url.query, **_headers(request)}
        calls.append(seen)
        return fastapi.responses.JSONResponse({"state": "talking", **seen})

    async def update_context(request: fastapi.Request) -> fastapi.Response:
        document = await request.json()
        seen = {"path": request.url.path, "body": document, **_headers(request)}
        calls.append(seen)
        return fastapi.responses.JSONResponse({"updated": document}, status_code=201)

    # FastAPI reads the parameters' classes from their annotations, which are strings here
    # (`fastapi` is not a global of this module): give it the classes.
    ws_endpoint.__annotations__["websocket"] = fastapi.WebSocket
    for route in (status, update_context):
        route.__annotations__.update({"request": fastapi.Request, "return": fastapi.Response})
    app.add_api_websocket_route("/ws", ws_endpoint)
    app.add_api_route("/status", status, methods=["GET", "HEAD"])
    app.add_api_route("/api/status", status, methods=["GET"])  # for a session_api_upstream
    app.add_api_route("/update-context", update_context, methods=["POST"])
    with uvicorn_in_thread(app) as port:
        yield HttpBot(f"ws://127.0.0.1:{port}/ws", calls)


def _headers(request: Any) -> dict[str, Any]:
    return {
        "session": request.headers.get("x-daily-session-id"),
        "authorization": request.headers.get("authorization"),
        "trace": request.headers.get("x-trace"),
    }


async def test_session_api_reaches_the_bot_of_the_session(http_bot: HttpBot) -> None:
    async with gateway(http_bot.url) as gw:
        ws = await in_thread(open_ws, f"{gw.url}/ws/generic/bot.test")
        try:
            sid = session_id(ws)
            base = f"/v1/public/bot/sessions/{sid}"
            status, body = await call(gw, "GET", f"{base}/status?verbose=1", "pk_test", b"",
                                      "X-Trace: t-1")  # fmt: skip
            assert status == 200
            assert json.loads(body) == {
                "state": "talking",
                "path": "/status",
                "query": "verbose=1",
                "session": sid,
                "authorization": None,
                "trace": "t-1",
            }
            update = json.dumps({"messages": [{"role": "system", "content": "be brief"}]})
            json_type = "Content-Type: application/json"
            status, body = await call(
                gw, "POST", f"{base}/update-context", "pk_test", update.encode(), json_type
            )
            assert status == 201
            assert json.loads(body) == {"updated": json.loads(update)}
            assert http_bot.calls[-1]["session"] == sid
            status, body = await call(gw, "HEAD", f"{base}/status", "pk_test")
            assert (status, body) == (200, b"")
            status, _ = await call(gw, "GET", f"{base}/missing", "pk_test")
            assert status == 404  # the bot's own answer, passed on
            ws.send("the session goes on")
            assert await in_thread(ws.recv, 20) == "the session goes on"
        finally:
            await in_thread(ws.close)


async def test_session_api_upstream_serves_the_routes_of_a_bot_elsewhere(
    bot: Bot, http_bot: HttpBot
) -> None:
    """The WebSocket goes to ``bot``; the Session API to the FastAPI bot, under its ``/api``."""
    origin = http_bot.url.replace("ws://", "http://").removesuffix("/ws")
    agent = AgentConfig("bot", "test", upstream=bot.url, session_api_upstream=f"{origin}/api/")
    config = Config(gateway=GatewaySettings(port=0), orgs=ORGS, agents=[agent])
    async with Gateway(config).running() as gw:
        ws = await in_thread(open_ws, f"{gw.url}/ws/generic/bot.test")
        try:
            sid = session_id(ws)
            target = f"/v1/public/bot/sessions/{sid}/status?verbose=1"
            status, answer = await call_json(gw, "GET", target, "pk_test")
            assert status == 200
            assert (answer["path"], answer["query"], answer["session"]) == (
                "/api/status",
                "verbose=1",
                sid,
            )
            ws.send("relayed to the other bot")
            assert await in_thread(ws.recv, 20) == "relayed to the other bot"
            assert bot.sessions[0].headers["X-Daily-Session-Id"] == sid
        finally:
            await in_thread(ws.close)


async def test_session_api_refusals_never_reach_the_bot(http_bot: HttpBot) -> None:
    async with gateway(http_bot.url) as gw:
        ws = await in_thread(open_ws, f"{gw.url}/ws/generic/bot.test")
        try:
            sid = session_id(ws)
            base = f"/v1/public/bot/sessions/{sid}"
            refused = [
                (await call(gw, "GET", f"{base}/status", None))[0],
                (await call(gw, "GET", f"{base}/status", "sk_test"))[0],
                (await call(gw, "GET", f"{base}/../status", "pk_test"))[0],
                (await call(gw, "GET", f"{base}/{'a' * MAX_FORWARD_PATH}", "pk_test"))[0],
                (await call(gw, "GET", f"/v1/public/nope/sessions/{sid}/status", "pk_test"))[0],
                (await call(gw, "GET", f"/v1/public/bot/sessions/{uuid.uuid4()}/x", "pk_test"))[0],
                (await call(gw, "POST", f"{base}/update-context", "pk_test", b"",
                            "Content-Length: 70000"))[0],
                (await call(gw, "POST", f"{base}/update-context", "pk_test", b"",
                            "Transfer-Encoding: gzip, chunked"))[0],
            ]  # fmt: skip
            assert refused == [401, 403, 400, 400, 404, 404, 413, 501]
            status, _ = await call(gw, "GET", f"/v1/public/echo/sessions/{sid}/status", "pk_test")
            assert status == 404  # a live session, but of another agent
            assert http_bot.calls == []
        finally:
            await in_thread(ws.close)


async def test_session_api_says_404_for_a_builtin_bot(bot: Bot) -> None:
    async with gateway(bot.url) as gw:
        ws = await in_thread(open_ws, f"{gw.url}/ws/generic/echo.test")
        try:
            sid = session_id(ws)
            status, body = await call(gw, "GET", f"/v1/public/echo/sessions/{sid}/x", "pk_test")
            assert status == 404 and b"serves no routes" in body
        finally:
            await in_thread(ws.close)


class SilentOrigin:
    """A bot whose WebSocket works but whose HTTP origin never answers: the first connection
    (the gateway's dial) gets its 101 and echoes nothing; later ones wait in the backlog."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._run, daemon=True).start()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.listener.getsockname()[1]}/ws"

    def _run(self) -> None:
        from .helpers import accept_upgrade

        conn, _ = self.listener.accept()
        self.conns.append(conn)
        accept_upgrade(conn)

    def close(self) -> None:
        for conn in self.conns:
            conn.close()
        self.listener.close()


async def test_session_api_504_without_an_answer_and_502_when_unreachable() -> None:
    origin = SilentOrigin()
    try:
        async with gateway(origin.url, session_api_timeout=0.5) as gw:
            ws = await in_thread(open_ws, f"{gw.url}/ws/generic/bot.test")
            try:
                base = f"/v1/public/bot/sessions/{session_id(ws)}"
                status, body = await call(gw, "GET", f"{base}/status", "pk_test")
                assert status == 504, body
                origin.listener.close()  # nothing listens there any more
                status, body = await call(gw, "GET", f"{base}/status", "pk_test")
                assert status == 502, body
            finally:
                await in_thread(ws.close)
    finally:
        origin.close()


# --- the Python client and the CLI ------------------------------------------------------------


async def test_client_and_cli_list_and_stop(bot: Bot, capsys: pytest.CaptureFixture[str]) -> None:
    from wsgate.cli import main
    from wsgate.client import SessionControlError, list_sessions, stop_session

    async with gateway(bot.url) as gw:
        ws = await in_thread(open_ws, f"{gw.url}/ws/generic/bot.test")
        sid = session_id(ws)
        listed = await list_sessions(gw.url, "bot", "sk_test", limit=10)
        assert [s["sessionId"] for s in listed["sessions"]] == [sid]
        assert traffic(listed["sessions"][0]) == (0, 0, 0, 0)
        with pytest.raises(SessionControlError) as refused:
            await list_sessions(gw.url, "bot", "pk_test")
        assert refused.value.status == 403
        argv = ["sessions", "list", "--url", gw.url, "--agent", "bot", "--key", "sk_test"]
        assert await in_thread(main, argv) == 0
        (entry,) = json.loads(capsys.readouterr().out)["sessions"]
        assert (entry["sessionId"], traffic(entry)) == (sid, (0, 0, 0, 0))
        stop = ["sessions", "stop", "--url", gw.url, "--agent", "bot", "--key", "sk_test"]
        assert await in_thread(main, [*stop, "--id", sid]) == 0
        assert json.loads(capsys.readouterr().out) == {"status": "stopped", "sessionId": sid}
        assert await in_thread(closed_with, ws.recv, 20) == (1000, "session stopped")
        assert await in_thread(main, [*stop, "--id", sid]) == 1
        assert "404" in capsys.readouterr().err
        with pytest.raises(SessionControlError) as gone:
            await stop_session(gw.url, "bot", "sk_test", sid)
        assert gone.value.status == 404
