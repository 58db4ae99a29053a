"""Both WebSocket handshakes as bytes (wsgate.handshake)."""

import base64

import pytest

from wsgate.handshake import (
    BotHandshakeError,
    accept_key,
    check_upstream_response,
    new_key,
    plain_response,
    switching_protocols,
    upstream_request,
)
from wsgate.urls import parse_upstream_url

KEY = "dGhlIHNhbXBsZSBub25jZQ=="
ACCEPT = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="  # RFC 6455 §1.3's worked example


def test_the_accept_key_matches_rfc_6455s_example() -> None:
    assert accept_key(KEY) == ACCEPT


def test_a_new_key_is_base64_of_16_fresh_random_bytes() -> None:
    keys = {new_key() for _ in range(50)}
    assert len(keys) == 50
    assert all(len(base64.b64decode(k, validate=True)) == 16 for k in keys)


def test_the_101_carries_the_accept_key_and_no_extension() -> None:
    response = switching_protocols(KEY, None)
    assert response == (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + ACCEPT.encode() + b"\r\n\r\n"
    )


def test_the_101_names_the_subprotocol_the_bot_chose() -> None:
    assert b"\r\nSec-WebSocket-Protocol: chat\r\n\r\n" in switching_protocols(KEY, "chat")


def test_an_error_response_is_plain_text_with_the_reason_on_one_line() -> None:
    assert plain_response(404, "unknown service host a.b") == (
        b"HTTP/1.1 404 Not Found\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Length: 25\r\nConnection: close\r\n\r\nunknown service host a.b\n"
    )


def test_an_error_reason_cannot_inject_lines_and_its_length_counts_bytes() -> None:
    response = plain_response(400, "bad\r\nSet-Cookie: x é")
    head, body = response.split(b"\r\n\r\n")
    assert body == "bad Set-Cookie: x é\n".encode()
    assert f"Content-Length: {len(body)}".encode() in head
    assert b"\r\nSet-Cookie" not in head


def test_an_unusual_status_still_gets_a_phrase() -> None:
    assert plain_response(431, "x").startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")
    assert plain_response(599, "x").startswith(b"HTTP/1.1 599 Error\r\n")


@pytest.mark.parametrize(
    ("url", "host", "port", "resource", "host_header"),
    [
        ("ws://127.0.0.1:9001/ws", "127.0.0.1", 9001, "/ws", "127.0.0.1:9001"),
        ("ws://bot.internal", "bot.internal", 80, "/", "bot.internal"),
        ("ws://bot:80/a/b?room=1", "bot", 80, "/a/b?room=1", "bot"),
        ("ws://[::1]:9001/ws", "::1", 9001, "/ws", "[::1]:9001"),
        ("wss://bot.internal/ws", "bot.internal", 443, "/ws", "bot.internal"),
        ("wss://bot.internal:8443/ws", "bot.internal", 8443, "/ws", "bot.internal:8443"),
        ("wss://bot.internal:80/ws", "bot.internal", 80, "/ws", "bot.internal:80"),
    ],
)
def test_an_upstream_url_splits_into_host_port_and_resource(
    url: str, host: str, port: int, resource: str, host_header: str
) -> None:
    target = parse_upstream_url(url)
    assert (target.host, target.port, target.resource) == (host, port, resource)
    assert target.host_header == host_header
    assert target.tls == url.startswith("wss://")


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://bot/ws", "must be a ws:// URL"),
        ("bot:9001", "must be a ws:// URL"),
        ("ws://user:pw@bot/ws", "user information"),
        ("ws://bot/ws#x", "fragment"),
        ("ws:///ws", "has no host"),
        ("ws://bot:99999/ws", "invalid port"),
        ("ws://bot/a b", "percent-encoded"),
    ],
)
def test_an_upstream_url_that_cannot_be_dialled_is_refused(url: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_upstream_url(url)


def test_the_upstream_request_carries_body_session_id_and_offered_subprotocols() -> None:
    request = upstream_request(
        parse_upstream_url("ws://127.0.0.1:9001/ws"),
        key=KEY,
        session_uuid="0f0e",
        body_value="eyJhIjoxfQ%3D%3D",
        subprotocols=["chat", "v2"],
    )
    assert request == (
        b"GET /ws?body=eyJhIjoxfQ%3D%3D HTTP/1.1\r\nHost: 127.0.0.1:9001\r\n"
        b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: " + KEY.encode() + b"\r\n"
        b"Sec-WebSocket-Version: 13\r\nX-Daily-Session-Id: 0f0e\r\n"
        b"Sec-WebSocket-Protocol: chat, v2\r\n\r\n"
    )
    assert b"Extensions" not in request


def test_the_body_is_appended_to_an_existing_query_and_absent_without_one() -> None:
    target = parse_upstream_url("ws://bot/ws?room=1")
    with_body = upstream_request(
        target, key=KEY, session_uuid="s", body_value="e30%3D", subprotocols=[]
    )
    assert with_body.startswith(b"GET /ws?room=1&body=e30%3D HTTP/1.1\r\n")
    without = upstream_request(target, key=KEY, session_uuid="s", body_value=None, subprotocols=[])
    assert without.startswith(b"GET /ws?room=1 HTTP/1.1\r\n")
    assert b"Sec-WebSocket-Protocol" not in without


def _bot_response(
    *extra: str, status: str = "101 Switching Protocols", accept: str = ACCEPT
) -> bytes:
    lines = [f"HTTP/1.1 {status}", "Upgrade: websocket", "Connection: Upgrade"]
    lines += [f"Sec-WebSocket-Accept: {accept}", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def test_a_bots_101_without_subprotocol_is_accepted() -> None:
    assert check_upstream_response(_bot_response(), KEY, []) is None
    assert check_upstream_response(_bot_response(), KEY, ["chat"]) is None


def test_the_bots_choice_among_the_offered_subprotocols_is_returned() -> None:
    head = _bot_response("Sec-WebSocket-Protocol: v2")
    assert check_upstream_response(head, KEY, ["chat", "v2"]) == "v2"


@pytest.mark.parametrize(
    ("head", "offered", "reason"),
    [
        (_bot_response(status="403 Forbidden"), [], "bot answered 403 instead of 101"),
        (_bot_response(status="200 OK"), [], "bot answered 200 instead of 101"),
        (b"SSH-2.0-OpenSSH\r\n\r\n", [], "malformed response"),
        (b"HTTP/1.1 1x1 Nope\r\n\r\n", [], "malformed response"),
        (_bot_response(accept="AAAA"), [], "wrong Sec-WebSocket-Accept"),
        (_bot_response("Sec-WebSocket-Accept: " + ACCEPT), [], "wrong Sec-WebSocket-Accept"),
        (b"HTTP/1.1 101 OK\r\nConnection: Upgrade\r\n\r\n", [], "not a WebSocket upgrade"),
        (_bot_response("Sec-WebSocket-Extensions: permessage-deflate"), [], "extension"),
        (_bot_response("Sec-WebSocket-Protocol: chat"), [], "not offered"),
        (_bot_response("Sec-WebSocket-Protocol: x"), ["chat"], "not offered"),
        (_bot_response("Sec-WebSocket-Protocol: chat, v2"), ["chat", "v2"], "not offered"),
        (_bot_response("Bad Header"), [], "malformed response headers"),
    ],
)
def test_a_bot_answer_that_cannot_be_relayed_is_refused_with_a_short_reason(
    head: bytes, offered: list[str], reason: str
) -> None:
    with pytest.raises(BotHandshakeError, match=reason):
        check_upstream_response(head, KEY, offered)
