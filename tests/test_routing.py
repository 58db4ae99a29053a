"""SPEC §2's pure checks (wsgate.routing): every row of the table, in order, with its status."""

import base64
import json

import pytest

from wsgate import _core
from wsgate.config import AgentConfig
from wsgate.errors import HttpError
from wsgate.request import Request, parse_request
from wsgate.routing import no_token_auth_yet, route
from wsgate.tokens import token_from_request as find_token

from .helpers import b64

KEY = "dGhlIHNhbXBsZSBub25jZQ=="
ECHO = AgentConfig("echo", "demo", builtin="echo")
BOT = AgentConfig("my-agent", "my-org", upstream="ws://127.0.0.1:9001/ws")
SECURED = AgentConfig("secure", "my-org", websocket_auth="token", upstream="ws://127.0.0.1:9/ws")
AGENTS = {a.service_host: a for a in (ECHO, BOT, SECURED)}
UPGRADE = {
    "Host": "gw",
    "Upgrade": "websocket",
    "Connection": "Upgrade",
    "Sec-WebSocket-Version": "13",
    "Sec-WebSocket-Key": KEY,
}


def req(target: str, *extra: tuple[str, str], method: str = "GET", drop: str = "") -> Request:
    fields = [(k, v) for k, v in UPGRADE.items() if k != drop] + list(extra)
    lines = [f"{method} {target} HTTP/1.1"] + [f"{k}: {v}" for k, v in fields]
    return parse_request(("\r\n".join(lines) + "\r\n\r\n").encode())


def refused(request: Request) -> tuple[int, str]:
    with pytest.raises(HttpError) as caught:
        route(request, AGENTS)
    return caught.value.status, caught.value.reason


def test_the_service_host_in_the_path_routes_to_its_agent() -> None:
    result = route(req("/ws/generic/my-agent.my-org"), AGENTS)
    assert result.service_host == "my-agent.my-org"
    assert result.agent is BOT
    assert (result.body_json, result.upstream_body, result.path_token) == (None, None, None)
    assert result.client_key == KEY
    assert result.subprotocols == ()


def test_the_service_host_as_a_query_parameter_routes_to_its_agent() -> None:
    result = route(req("/ws/generic?serviceHost=echo.demo&x=1"), AGENTS)
    assert result.agent is ECHO


def test_a_trailing_path_segment_is_kept_as_the_path_token() -> None:
    result = route(req("/ws/generic/echo.demo/abc.def"), AGENTS)
    assert result.path_token == "abc.def"
    assert "abc.def" not in repr(result)


def test_offered_subprotocols_are_kept_in_order_across_header_lines() -> None:
    request = req(
        "/ws/generic/echo.demo",
        ("Sec-WebSocket-Protocol", "chat, v2"),
        ("Sec-WebSocket-Protocol", "v3"),
    )
    assert route(request, AGENTS).subprotocols == ("chat", "v2", "v3")


def test_upgrade_and_connection_tokens_match_without_case_and_among_others() -> None:
    request = req(
        "/ws/generic/echo.demo",
        ("Upgrade", "h2c, WebSocket"),
        ("Connection", "keep-alive, UPGRADE"),
        drop="Connection",
    )
    assert route(request, AGENTS).agent is ECHO


def test_a_body_is_decoded_to_the_clients_json_and_reencoded_for_the_bot() -> None:
    document = {"user": "ada", "n": [1, 2]}
    encoded = base64.urlsafe_b64encode(json.dumps(document).encode()).decode().rstrip("=")
    result = route(req(f"/ws/generic/my-agent.my-org?body={encoded}"), AGENTS)
    assert result.body_json is not None and json.loads(result.body_json) == document
    expected, upstream = _core.decode_body(encoded)
    assert (result.body_json, result.upstream_body) == (expected, upstream)
    assert "ada" not in repr(result)


@pytest.mark.parametrize(
    "path",
    [
        "/",
        "/ws",
        "/ws/generic/",
        "/ws/genericx",
        "/ws/generic//a",
        "/ws/generic/a.b/t/x",
        "/ws/twilioo",
        "/ws/twilio/token/extra",
        "/ws/Twilio",
        "/ws/generic/echo.demo/",
        "/WS/generic/echo.demo",
    ],
)
def test_a_path_outside_the_generic_endpoint_is_404(path: str) -> None:
    assert refused(req(path)) == (404, "not found")


def test_the_path_is_checked_before_the_upgrade() -> None:
    assert refused(req("/nope", method="POST", drop="Upgrade")) == (404, "not found")


@pytest.mark.parametrize(
    ("request_", "reason"),
    [
        (req("/ws/generic/echo.demo", method="POST"), "method must be GET"),
        (req("/ws/generic/echo.demo", drop="Upgrade"), "Upgrade: websocket missing"),
        (req("/ws/generic/echo.demo", ("Upgrade", "h2c"), drop="Upgrade"), "Upgrade: websocket"),
        (req("/ws/generic/echo.demo", drop="Connection"), "Connection: upgrade missing"),
        (req("/ws/generic/echo.demo", ("Connection", "close"), drop="Connection"), "Connection"),
        (req("/ws/generic/echo.demo", drop="Sec-WebSocket-Version"), "Version must be 13"),
        (
            req(
                "/ws/generic/echo.demo",
                ("Sec-WebSocket-Version", "8"),
                drop="Sec-WebSocket-Version",
            ),
            "Version must be 13",
        ),
        (req("/ws/generic/echo.demo", drop="Sec-WebSocket-Key"), "Key must be base64 of 16"),
        (
            req(
                "/ws/generic/echo.demo", ("Sec-WebSocket-Key", "c2hvcnQ="), drop="Sec-WebSocket-Key"
            ),
            "Key must be base64 of 16",
        ),
        (
            req("/ws/generic/echo.demo", ("Sec-WebSocket-Key", "!!!"), drop="Sec-WebSocket-Key"),
            "Key must be base64 of 16",
        ),
        (req("/ws/generic/echo.demo", ("Sec-WebSocket-Key", KEY)), "Key must be base64 of 16"),
        (req("/ws/generic/echo.demo", drop="Host"), "Host header"),
        (req("/ws/generic/echo.demo", ("Content-Length", "5")), "must not have a body"),
        (req("/ws/generic/echo.demo", ("Transfer-Encoding", "chunked")), "must not have a body"),
        (req("/ws/generic/echo.demo", ("Host", "again")), "Host header"),
        (req("/ws/generic/echo.demo", ("Sec-WebSocket-Protocol", "a b")), "Sec-WebSocket-Protocol"),
        (parse_request(b"GET /ws/generic/echo.demo HTTP/1.0\r\nHost: gw\r\n\r\n"), "HTTP/1.1"),
    ],
)
def test_a_request_that_is_not_a_valid_websocket_upgrade_is_400(
    request_: Request, reason: str
) -> None:
    status, text = refused(request_)
    assert status == 400
    assert reason in text


def test_the_upgrade_is_checked_before_the_service_host() -> None:
    assert refused(req("/ws/generic", method="PUT")) == (
        400,
        "method must be GET for a WebSocket upgrade",
    )


@pytest.mark.parametrize(
    ("target", "reason"),
    [
        ("/ws/generic", "missing service host"),
        ("/ws/generic?servicehost=echo.demo", "missing service host"),
        ("/ws/generic?serviceHost=echo.demo&serviceHost=echo.demo", "more than once"),
        ("/ws/generic/echo.demo?serviceHost=echo.demo", "both in the path and as serviceHost"),
        ("/ws/generic/echo", "malformed service host"),
        ("/ws/generic/Echo.demo", "malformed service host"),
        ("/ws/generic/a.b.c", "malformed service host"),
        ("/ws/generic/a_b.c", "malformed service host"),
        ("/ws/generic/" + "a" * 64 + ".org", "malformed service host"),
        ("/ws/generic?serviceHost=", "malformed service host"),
        ("/ws/generic?serviceHost=%ff.x", "malformed service host"),
        ("/ws/generic?serviceHost=echo.demo%0a", "malformed service host"),
    ],
)
def test_a_service_host_missing_repeated_or_malformed_is_400(target: str, reason: str) -> None:
    status, text = refused(req(target))
    assert status == 400
    assert reason in text


def test_a_percent_encoded_service_host_is_decoded_first() -> None:
    assert route(req("/ws/generic?serviceHost=echo%2Edemo"), AGENTS).agent is ECHO
    assert route(req("/ws/generic/echo%2edemo"), AGENTS).agent is ECHO


def test_the_longest_names_are_well_formed() -> None:
    name = "a" * 63
    agents = {f"{name}.{name}": ECHO}
    assert route(req(f"/ws/generic/{name}.{name}"), agents).agent is ECHO


def test_an_unknown_agent_is_404_naming_the_service_host() -> None:
    assert refused(req("/ws/generic/other.demo")) == (404, "unknown service host other.demo")


def test_the_agent_is_checked_before_the_body() -> None:
    assert refused(req("/ws/generic/other.demo?body=%%%")) == (
        404,
        "unknown service host other.demo",
    )


def test_a_token_agent_is_403_until_token_auth_exists_even_with_a_token() -> None:
    for target in ("/ws/generic/secure.my-org", "/ws/generic/secure.my-org/tok?token=t"):
        assert refused(req(target)) == (403, "token auth not available yet")


def test_the_token_is_checked_before_the_body() -> None:
    assert refused(req("/ws/generic/secure.my-org?body=%%%")) == (
        403,
        "token auth not available yet",
    )


def test_a_custom_token_check_receives_the_path_token_and_the_agent() -> None:
    seen: list[object] = []

    def check(request: Request, path_token: str | None, agent: AgentConfig) -> None:
        seen.append((path_token, agent))

    route(req("/ws/generic/secure.my-org/tok"), AGENTS, check)
    assert seen == [("tok", SECURED)]


def test_the_default_token_check_lets_none_agents_through_and_refuses_token_agents() -> None:
    assert no_token_auth_yet(req("/ws/generic/echo.demo"), None, ECHO) is None  # no claims
    with pytest.raises(HttpError) as caught:
        no_token_auth_yet(req("/ws/generic/secure.my-org/tok"), "tok", SECURED)
    assert (caught.value.status, caught.value.reason) == (403, "token auth not available yet")


@pytest.mark.parametrize(
    ("query", "status", "reason"),
    [
        ("body=%%%", 400, "body is not base64"),
        ("body=bm90IGpzb24", 400, "body is not a UTF-8 JSON document"),  # "not json"
        (
            "body=" + b64("x" * 5000),
            413,
            "body is 5002 bytes after decoding, over the 4096-byte limit",
        ),
        (f"body={b64({'a': 1})}&body={b64({'a': 1})}", 400, "body given more than once"),
    ],
)
def test_a_body_that_cannot_be_used_is_400_or_413_when_too_large(
    query: str, status: int, reason: str
) -> None:
    assert refused(req(f"/ws/generic/my-agent.my-org?{query}")) == (status, reason)


def test_a_repeated_body_says_so() -> None:
    assert refused(req("/ws/generic/echo.demo?body=e30&body=e30")) == (
        400,
        "body given more than once",
    )


def test_the_token_is_found_in_header_then_query_then_path() -> None:
    both = req("/ws/generic/a.b?token=q", ("Authorization", "Bearer h"))
    assert find_token(both, "p") == "h"
    assert find_token(req("/ws/generic/a.b?token=q%2E"), "p") == "q."
    assert find_token(req("/ws/generic/a.b"), "p") == "p"
    assert find_token(req("/ws/generic/a.b"), None) is None


def test_an_authorization_header_that_is_not_bearer_counts_as_an_empty_token() -> None:
    assert find_token(req("/ws/generic/a.b", ("Authorization", "Basic eDp5")), "p") == ""
