"""The /start service as an ASGI app (wsgate.asgi.start_app) mounted in Starlette and called with
httpx, and wsgate.tokens' mint/verify for a backend that hands out its own tokens: the tokens
they mint open sessions on a real gateway sharing the settings."""

from __future__ import annotations

import base64
import json
from urllib.parse import parse_qs, quote, urlsplit

import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

import wsgate
import wsgate.asgi
import wsgate.tokens
from wsgate import AgentConfig, Config, Gateway, GatewaySettings, OrgConfig

from .helpers import Bot, connect, in_thread

pytestmark = pytest.mark.anyio

SECRET = "gateway-secret-0123456789"
PUBLIC = "wss://voice.example.com"


def config(upstream: str) -> Config:
    return Config(
        gateway=GatewaySettings(port=0, secrets=[SECRET], public_url=PUBLIC),
        orgs=[OrgConfig("acme", public_keys=["pk_acme"])],
        agents=[
            AgentConfig("talk", "acme", websocket_auth="token", upstream=upstream),
            AgentConfig("open", "acme", upstream=upstream),
        ],
    )


def backend(cfg: Config) -> Starlette:
    """A Starlette project with routes of its own and wsgate's /start under /api."""

    async def home(request: object) -> PlainTextResponse:
        return PlainTextResponse("our own page")

    return Starlette(
        routes=[Route("/", home), Mount("/api", app=wsgate.asgi.start_app(cfg))],
    )


def client(app: Starlette) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


def open_session(url: str, token: str) -> str:
    with connect(url, additional_headers={"Authorization": f"Bearer {token}"}) as ws:
        ws.send("hi")
        answer = ws.recv()
        assert isinstance(answer, str)
        return answer


async def test_start_app_mounted_in_starlette_mints_tokens_the_gateway_accepts(bot: Bot) -> None:
    cfg = config(bot.url)
    async with client(backend(cfg)) as http:
        assert (await http.get("/")).text == "our own page"
        answer = await http.post(
            "/api/v1/public/talk/start",
            headers={"Authorization": "Bearer pk_acme"},
            json={"transport": "websocket", "body": {"caller": "+15550100"}},
        )
    assert answer.status_code == 200
    assert answer.headers["cache-control"] == "no-store"
    started = answer.json()
    assert started["wsUrl"] == f"{PUBLIC}/ws/generic/talk.acme"
    async with Gateway(cfg).running() as gw:
        url = f"{gw.url}/ws/generic/talk.acme?body={quote(started['body'])}"
        assert await in_thread(open_session, url, started["token"]) == "hi"
        bot.wait_ended()
    seen = bot.sessions[0]
    assert seen.headers["X-Daily-Session-Id"] == started["sessionId"]
    body = parse_qs(urlsplit(seen.path).query)["body"][0]
    assert json.loads(base64.b64decode(body)) == {"caller": "+15550100"}


@pytest.mark.parametrize(
    ("method", "path", "headers", "content", "status"),
    [
        ("POST", "/api/v1/public/talk/start", {}, b"{}", 401),
        ("POST", "/api/v1/public/talk/start", {"Authorization": "Bearer pk_x"}, b"{}", 401),
        ("POST", "/api/v1/public/nobody/start", {"Authorization": "Bearer pk_acme"}, b"{}", 404),
        ("GET", "/api/v1/public/talk/start", {"Authorization": "Bearer pk_acme"}, b"", 405),
        ("POST", "/api/v1/public/talk/start", {"Authorization": "Bearer pk_acme"}, b"{", 400),
        (
            "POST",
            "/api/v1/public/talk/start",
            {"Authorization": "Bearer pk_acme"},
            b'{"transport": "websocket", "body": "' + b"x" * 5000 + b'"}',
            413,
        ),
        (
            "POST",
            "/api/v1/public/talk/start",
            {"Authorization": "Bearer pk_acme"},
            b" " * 70_000,
            413,
        ),
    ],
)
async def test_start_app_refuses_as_the_gateway_does(
    bot: Bot, method: str, path: str, headers: dict[str, str], content: bytes, status: int
) -> None:
    cfg = config(bot.url)
    request = (method, path.removeprefix("/api"), headers, content)
    async with client(backend(cfg)) as http:
        answer = await http.request(method, path, headers=headers, content=content)
    assert answer.status_code == status
    assert answer.json()["code"] == str(status)
    # The gateway's own listener gives the same answer to the same request.
    async with (
        Gateway(cfg).running() as gw,
        httpx.AsyncClient(base_url=f"http://{gw.url[5:]}") as own,
    ):
        direct = await own.request(request[0], request[1], headers=request[2], content=request[3])
    assert (direct.status_code, direct.json()) == (answer.status_code, answer.json())


def test_start_app_needs_the_gateways_public_url() -> None:
    cfg = config("ws://127.0.0.1:9/ws")
    bare = Config(gateway=GatewaySettings(secrets=[SECRET]), orgs=cfg.orgs, agents=cfg.agents)
    with pytest.raises(wsgate.ConfigError, match="public_url"):
        wsgate.asgi.start_app(bare)


async def test_a_backend_mints_its_own_tokens_and_checks_them(bot: Bot) -> None:
    minted = wsgate.tokens.mint(SECRET, "talk.acme", body={"user": 7})
    assert minted.body is not None
    claims = wsgate.tokens.verify([SECRET], minted.token, "talk.acme", body={"user": 7})
    assert (claims.service_host, claims.binds_body) == ("talk.acme", True)
    assert claims.session_id == minted.session_id
    refusals = [
        ((SECRET, minted.token, "talk.acme"), {"body": {"user": 8}}),  # another body
        ((SECRET, minted.token, "open.acme"), {"body": {"user": 7}}),  # another agent
        (("another-secret-0123456789", minted.token, "talk.acme"), {"body": {"user": 7}}),
        ((SECRET, minted.token, "talk.acme"), {"body": {"user": 7}, "now": minted.exp + 1}),
    ]
    for args, kwargs in refusals:
        with pytest.raises(wsgate.HttpError) as refused:
            wsgate.tokens.verify(*args, **kwargs)  # type: ignore[arg-type]
        assert refused.value.status == 403
    async with Gateway(config(bot.url)).running() as gw:
        url = f"{gw.url}/ws/generic/talk.acme?body={quote(minted.body)}"
        assert await in_thread(open_session, url, minted.token) == "hi"
        bot.wait_ended()
    assert bot.sessions[0].headers["X-Daily-Session-Id"] == minted.session_id
