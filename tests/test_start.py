"""The /start service (wsgate.start), Sans-I/O: every status of SPEC §5 and its JSON."""

from __future__ import annotations

import base64
import json
import uuid
from typing import Any

import pytest

from wsgate import _core
from wsgate.body import encode_body
from wsgate.config import AgentConfig, OrgConfig
from wsgate.start import (
    MAX_REQUEST_BYTES,
    answer_start,
    is_start_path,
    render_response,
)
from wsgate.tokens import TokenAuthority

from .helpers import T0, Clock

ORGS = [
    OrgConfig("my-org", public_keys=["pk_mine", "pk_mine_2"]),
    OrgConfig("other-org", public_keys=["pk_other"]),
]
AGENTS = {
    a.service_host: a
    for a in [
        AgentConfig("talk", "my-org", websocket_auth="token", builtin="echo", max_sessions=2),
        AgentConfig("open", "my-org", builtin="echo"),
        AgentConfig("theirs", "other-org", websocket_auth="token", builtin="echo"),
    ]
}
AUTHORITY = TokenAuthority(["start-secret"], clock=Clock())
PUBLIC_URL = "wss://gw.example.com"


def call(
    agent: str = "talk",
    request: Any = None,
    *,
    key: str | None = "pk_mine",
    method: str = "POST",
    raw: bytes | None = None,
    capacity: bool = True,
    headers: tuple[tuple[str, str], ...] | None = None,
    public_url: str = PUBLIC_URL,
) -> tuple[int, dict[str, Any]]:
    if request is None:
        request = {"transport": "websocket"}
    if headers is None:
        headers = (("content-type", "application/json"),)
        if key is not None:
            headers += (("authorization", f"Bearer {key}"),)
    body = raw if raw is not None else json.dumps(request).encode()
    answer = answer_start(
        method,
        f"/v1/public/{agent}/start",
        headers,
        body,
        AGENTS,
        ORGS,
        AUTHORITY,
        lambda agent: capacity,
        public_url=public_url,
    )
    return answer.status, answer.document


def assert_error(answer: tuple[int, dict[str, Any]], status: int, reason: str = "") -> None:
    code, document = answer
    assert code == status
    assert set(document) == {"error", "code"}
    assert document["code"] == str(status)
    assert reason in document["error"]


def test_a_token_agent_gets_a_token_for_its_service_host_a_ws_url_and_a_session_id() -> None:
    status, document = call()
    assert status == 200
    assert set(document) == {"token", "wsUrl", "sessionId"}
    assert document["wsUrl"] == "wss://gw.example.com/ws/generic/talk.my-org"
    assert uuid.UUID(document["sessionId"]).version == 4
    keys = _core.TokenKeys([b"start-secret"])
    claims = keys.verify(document["token"], "talk.my-org", T0)  # refused unless for talk.my-org
    assert claims.exp == T0 + 300


@pytest.mark.anyio
async def test_the_session_id_answered_is_the_one_the_token_opens() -> None:
    _, document = call()
    verified = await AUTHORITY.verify(document["token"], "talk.my-org")
    assert verified.session_id == document["sessionId"]


def test_a_token_agents_body_comes_back_as_standard_base64_of_its_json() -> None:
    body = {"lang": "fr", "text": "été", "n": [1, 2.5, None, True]}
    status, document = call(request={"transport": "websocket", "body": body})
    assert status == 200
    assert json.loads(base64.b64decode(document["body"], validate=True)) == body
    json_text, _ = _core.decode_body(document["body"])
    assert json.loads(json_text) == body


def test_a_none_agent_gets_a_ws_url_and_session_id_but_no_token() -> None:
    status, document = call("open")
    assert status == 200
    assert set(document) == {"wsUrl", "sessionId"}
    assert document["wsUrl"] == "wss://gw.example.com/ws/generic/open.my-org"


def test_the_ws_url_keeps_the_public_urls_path_prefix() -> None:
    _, document = call("open", public_url="wss://example.com/gateway/")
    assert document["wsUrl"] == "wss://example.com/gateway/ws/generic/open.my-org"


def test_a_body_for_a_none_agent_is_400() -> None:
    assert_error(call("open", {"transport": "websocket", "body": {"a": 1}}), 400, "?body=")


def test_a_null_body_counts_as_no_body() -> None:
    assert call("open", {"transport": "websocket", "body": None})[0] == 200


@pytest.mark.parametrize(
    "raw",
    [b"", b"not json", b"[1,2]", b'"websocket"', b'{"transport": NaN}', b"\xff", b"[" * 50_000],
)
def test_a_request_that_is_not_a_json_object_is_400(raw: bytes) -> None:
    assert_error(call(raw=raw), 400)


@pytest.mark.parametrize(
    "request_json", [{}, {"transport": "webrtc"}, {"transport": "daily"}, {"transport": None}]
)
def test_a_transport_other_than_websocket_is_400(request_json: dict[str, Any]) -> None:
    assert_error(call(request=request_json), 400, "transport")


def test_a_body_of_4096_bytes_of_json_is_accepted_and_one_more_is_413() -> None:
    filler = "x" * (_core.MAX_BODY_BYTES - len('{"a":""}'))
    assert call(request={"transport": "websocket", "body": {"a": filler}})[0] == 200
    big = {"transport": "websocket", "body": {"a": filler + "y"}}
    assert_error(call(request=big), 413, "4096")


def test_a_body_is_measured_as_compact_utf8_json() -> None:
    # 2 bytes per "é": 2048 of them are over the limit, however the request spelled them.
    body = {"a": "é" * 2045}
    assert len(encode_body(body)[0]) == 4098
    assert_error(call(request={"transport": "websocket", "body": body}), 413)


def test_a_request_over_64_kib_is_413() -> None:
    assert_error(call(raw=b" " * (MAX_REQUEST_BYTES + 1)), 413)


@pytest.mark.parametrize(
    "headers",
    [
        (),
        (("authorization", "pk_mine"),),
        (("authorization", "Basic pk_mine"),),
        (("authorization", "Bearer "),),
        (("authorization", "Bearer pk_mine"), ("authorization", "Bearer pk_mine")),
    ],
)
def test_a_missing_key_is_401(headers: tuple[tuple[str, str], ...]) -> None:
    assert_error(call(headers=headers), 401, "Missing")


@pytest.mark.parametrize(
    "key", ["pk_wrong", "pk_min", "pk_mine2", "PK_MINE", "pk_mine_22", "pk_other_"]
)
def test_a_key_no_organisation_lists_is_401(key: str) -> None:
    assert_error(call(key=key), 401, "Invalid")


def test_every_key_of_the_organisation_is_accepted() -> None:
    assert call(key="pk_mine_2")[0] == 200
    assert call(key="bearer  pk_mine", headers=(("authorization", "bearer  pk_mine"),))[0] == 200


def test_an_unknown_agent_is_404_service_not_found() -> None:
    assert_error(call("nobody"), 404, "Service not found")


def test_another_organisations_agent_is_404_so_keys_reveal_nothing_about_it() -> None:
    assert_error(call("theirs"), 404, "Service not found")
    assert call("theirs", key="pk_other")[0] == 200


def test_an_agent_at_capacity_is_429() -> None:
    assert_error(call(capacity=False), 429)


def test_a_method_other_than_post_is_405() -> None:
    assert_error(call(method="GET"), 405)


@pytest.mark.parametrize("path", ["/v1/public/Bad/start", "/v1/public/a/b/start", "/v1/public/"])
def test_a_path_that_is_not_a_start_path_is_404_in_json(path: str) -> None:
    answer = answer_start(
        "POST", path, (), b"", AGENTS, ORGS, AUTHORITY, lambda a: True, public_url=PUBLIC_URL
    )
    status, document = answer.status, answer.document
    assert (status, document) == (404, {"error": "Not found", "code": "404"})
    assert is_start_path(path)


def test_the_checks_run_in_order_key_then_agent_then_json_then_body_then_capacity() -> None:
    too_big = {"transport": "websocket", "body": "x" * 5000}
    assert call("nobody", raw=b"junk", key="pk_wrong")[0] == 401
    assert call("nobody", raw=b"junk")[0] == 404
    assert call(raw=b"junk", capacity=False)[0] == 400
    assert call(request=too_big, capacity=False)[0] == 413
    assert call("open", request={**too_big, "body": {}}, capacity=False)[0] == 400
    assert call(capacity=False)[0] == 429


def test_the_response_is_json_and_never_cached() -> None:
    status, document = call()
    response = render_response(status, document)
    head, _, payload = response.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0] == "HTTP/1.1 200 OK"
    assert "Cache-Control: no-store" in lines
    assert "Content-Type: application/json" in lines
    assert f"Content-Length: {len(payload)}" in lines
    assert json.loads(payload) == document
    assert b"Allow: POST" in render_response(*call(method="GET"))


def test_an_error_never_echoes_the_key() -> None:
    for key in ("pk_wrong_secretive", "pk_mine"):
        _, document = call("nobody", key=key)
        assert key not in json.dumps(document)
