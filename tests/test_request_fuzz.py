"""Property-based fuzzing of the upgrade request path: whatever bytes a client sends, the head is
read (``read_head``, on a real socket pair), parsed (``parse_request``) and routed (``route``,
with the real token check) into either a :class:`Route` or an ``HttpError`` whose status is one
of 400, 403, 404, 413 and 431, with a one-line reason. Nothing else may escape.

Two strategies: arbitrary bytes, and requests that are nearly right (every part of a valid
upgrade, each possibly dropped, repeated, mangled or oversized), which reach the deep checks.
``WSGATE_FUZZ_EXAMPLES`` raises the number of examples for a long run (docs/RELIABILITY.md).
"""

from __future__ import annotations

import base64
import json
import os
import re
import socket
from urllib.parse import quote, unquote

import anyio
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from wsgate import _core
from wsgate._sockets import HeadTooLarge, read_head
from wsgate.config import AgentConfig
from wsgate.errors import HttpError
from wsgate.request import is_token, parse_request
from wsgate.routing import Route, route
from wsgate.tokens import TokenAuthority

SECRET = b"fuzz-secret"
NOW = 1_800_000_000
AUTHORITY = TokenAuthority([SECRET], clock=lambda: NOW)
ECHO = AgentConfig("echo", "demo", builtin="echo")
BOT = AgentConfig("my-agent", "my-org", upstream="ws://127.0.0.1:9/ws")
SECURED = AgentConfig("secure", "my-org", websocket_auth="token", upstream="ws://127.0.0.1:9/ws")
AGENTS = {a.service_host: a for a in (ECHO, BOT, SECURED)}
ALLOWED = {400, 403, 404, 413, 431}
SERVICE_HOST = re.compile(r"[a-z0-9-]{1,63}\.[a-z0-9-]{1,63}")

FUZZ = settings(
    max_examples=int(os.environ.get("WSGATE_FUZZ_EXAMPLES", "150")),
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def answer(data: bytes) -> Route | HttpError:
    """What the gateway makes of ``data`` sent by a client that then half-closes: the route, or
    the error it answers with (``read_head``'s 431 included)."""
    a, b = socket.socketpair()
    with a, b:
        b.setblocking(False)
        a.sendall(data)
        a.shutdown(socket.SHUT_WR)
        try:
            head, _ = anyio.run(read_head, b, _core.MAX_HEADER_BYTES)
        except HeadTooLarge:
            return HttpError(431, "request header fields too large")
    try:
        request = parse_request(head)
        return route(request, AGENTS, AUTHORITY.check_request)
    except HttpError as exc:
        return exc


def tally(outcome: Route | HttpError) -> Route | HttpError:
    """Counted by ``pytest --hypothesis-show-statistics``: shows the strategies reach every
    outcome, not only the first check."""
    event(f"HTTP {outcome.status}" if isinstance(outcome, HttpError) else "routed")
    return outcome


def check(outcome: Route | HttpError) -> None:
    if isinstance(outcome, HttpError):
        assert outcome.status in ALLOWED, outcome
        assert isinstance(outcome.reason, str) and outcome.reason
        assert "\r" not in outcome.reason and "\n" not in outcome.reason
        return
    assert SERVICE_HOST.fullmatch(outcome.service_host)
    assert outcome.agent is AGENTS[outcome.service_host]
    assert len(base64.b64decode(outcome.client_key, validate=True)) == 16
    assert all(is_token(p) for p in outcome.subprotocols)
    if outcome.body_json is None:
        assert outcome.upstream_body is None
    else:
        # The document the bot gets is JSON to Python too, within the cap, and the bot's
        # ?body= value carries exactly it.
        json.loads(outcome.body_json)
        assert len(outcome.body_json.encode()) <= _core.MAX_BODY_BYTES
        assert outcome.upstream_body is not None
        upstream = base64.b64decode(unquote(outcome.upstream_body), validate=True)
        assert upstream == outcome.body_json.encode()


# -- near-valid requests ---------------------------------------------------------------------

KEY = "dGhlIHNhbXBsZSBub25jZQ=="
VISIBLE = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=30)
ANY_TEXT = st.text(max_size=30)
# Mostly the known hosts, then well-shaped unknown ones, then anything.
HOSTS = st.one_of(
    st.sampled_from(sorted(AGENTS)),
    st.from_regex(SERVICE_HOST, fullmatch=True),
    ANY_TEXT,
)


def encoded(text: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """Text as it may sit in a target: percent-encoded to various degrees, or mangled."""
    return st.one_of(
        text.map(lambda s: quote(s, safe="")),
        text.map(lambda s: quote(s, safe="/?=&%+")),
        VISIBLE,
        st.sampled_from(["%", "%z", "%zz", "%ff", "%C3%28", "%00", "%2F", "%0D%0A"]),
    )


def json_documents() -> st.SearchStrategy[bytes]:
    values = st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | ANY_TEXT,
        lambda inner: st.lists(inner, max_size=5) | st.dictionaries(ANY_TEXT, inner, max_size=5),
        max_leaves=20,
    )
    return st.one_of(
        values.map(lambda v: json.dumps(v).encode()),
        st.binary(max_size=40),  # not JSON, or not UTF-8
        st.sampled_from([4096, 4097, 4500, 5500]).map(lambda n: b'"' + b"a" * (n - 2) + b'"'),
    )


@st.composite
def bodies(draw: st.DrawFn) -> str:
    doc = draw(json_documents())
    b64 = draw(st.sampled_from([base64.b64encode, base64.urlsafe_b64encode]))(doc).decode()
    how = draw(st.integers(0, 5))
    if how == 1:
        b64 = b64.rstrip("=")
    elif how == 2:
        b64 = b64.replace("+", " ")
    elif how == 3:
        b64 = quote(b64, safe="")
    elif how == 4:
        b64 = draw(encoded(ANY_TEXT))
    return quote(b64, safe="%+=/") if " " in b64 else b64


def rarely(draw: st.DrawFn, one_in: int) -> bool:
    """True about once in ``one_in`` draws: most parts of a near-valid request stay right."""
    # Hypothesis shrinks towards the low end, so the simplest example is the valid request.
    return draw(st.integers(1, one_in)) == one_in


@st.composite
def tokens(draw: st.DrawFn) -> str:
    """A valid token for the secured agent, or one with one thing wrong, or junk."""
    host, exp, nonce, secret = SECURED.service_host, NOW + 300, "n0nce", SECRET
    if rarely(draw, 2):
        host = draw(st.sampled_from([BOT.service_host, "x.y"])) if rarely(draw, 4) else host
        exp = draw(st.sampled_from([NOW, NOW - 1])) if rarely(draw, 4) else exp
        nonce = "" if rarely(draw, 4) else nonce
        secret = b"another secret" if rarely(draw, 4) else secret
    good = _core.mint_token(secret, host, exp, nonce)
    if rarely(draw, 4):
        return draw(st.one_of(VISIBLE, st.just(good[:-1]), st.just(good + "="), encoded(ANY_TEXT)))
    return good


@st.composite
def targets(draw: st.DrawFn) -> str:
    params: list[str] = []
    kind = draw(st.integers(0, 9))
    if kind <= 4:
        path = "/ws/generic/" + quote(draw(HOSTS), safe="")
        if draw(st.booleans()):
            path += "/" + draw(tokens())
    elif kind <= 7:
        path = "/ws/generic"
        params.append("serviceHost=" + quote(draw(HOSTS), safe=""))
    elif kind == 8:
        path = "/" + draw(encoded(ANY_TEXT))
    else:
        path = draw(st.sampled_from(["", "*", "http://gw/ws/generic", "/ws/generic//", "/a/b/c"]))
    if draw(st.booleans()):
        params.append("body=" + draw(bodies()))
    params += draw(
        st.lists(
            st.one_of(
                HOSTS.map(lambda h: f"serviceHost={quote(h, safe='')}"),
                bodies().map(lambda b: f"body={b}"),
                tokens().map(lambda t: f"token={t}"),
                st.tuples(encoded(ANY_TEXT), encoded(ANY_TEXT)).map("=".join),
                st.sampled_from(["", "&", "flag", "serviceHost", "body=", "token"]),
            ),
            max_size=3,
        )
    )
    params = draw(st.permutations(params))
    return path + ("?" + "&".join(params) if params or rarely(draw, 8) else "")


UPGRADE = [
    ("Host", "gw"),
    ("Upgrade", "websocket"),
    ("Connection", "Upgrade"),
    ("Sec-WebSocket-Version", "13"),
    ("Sec-WebSocket-Key", KEY),
]
EXTRA_HEADERS = st.one_of(
    tokens().map(lambda t: ("Authorization", "Bearer " + t)),
    VISIBLE.map(lambda v: ("Authorization", v)),
    st.lists(st.sampled_from(["chat", "v2.bot", "", " ", "a b", "x/y"]), max_size=3).map(
        lambda ps: ("Sec-WebSocket-Protocol", ", ".join(ps))
    ),
    st.sampled_from(["0", "1", "-1", ""]).map(lambda v: ("Content-Length", v)),
    st.just(("Transfer-Encoding", "chunked")),
    st.sampled_from(UPGRADE).map(lambda kv: (kv[0].upper(), kv[1])),  # repeated, other case
    st.sampled_from(["Upgrade", "Connection"]).map(lambda n: (n, "keep-alive, Upgrade, websocket")),
    st.tuples(VISIBLE, ANY_TEXT),
    st.integers(8100, 8300).map(lambda n: ("X-Pad", "p" * n)),  # around MAX_HEADER_BYTES
)


def mangle(value: str) -> st.SearchStrategy[str]:
    return st.one_of(
        st.just(value.lower()),
        st.just(value[:-1]),
        st.just(" " + value + "\t"),
        ANY_TEXT,
    )


@st.composite
def near_valid_heads(draw: st.DrawFn) -> bytes:
    method = "GET"
    if rarely(draw, 16):
        method = draw(st.one_of(st.sampled_from(["POST", "get", "G\tET", ""]), VISIBLE))
    version = "HTTP/1.1"
    if rarely(draw, 16):
        version = draw(st.sampled_from(["HTTP/1.0", "HTTP/2", "http/1.1", "", "HTTP/1.1 x"]))
    fields = []
    for name, value in UPGRADE:
        if rarely(draw, 16):
            continue  # dropped
        fields.append((name, draw(mangle(value)) if rarely(draw, 16) else value))
    fields += draw(st.lists(EXTRA_HEADERS, max_size=2))
    fields = draw(st.permutations(fields))
    lines = [f"{method} {draw(targets())} {version}"] + [f"{n}: {v}" for n, v in fields]
    head = "\r\n".join(lines).encode()
    # A few raw byte edits: bare LF, folding, NUL, obs-text, an early empty line.
    while rarely(draw, 3):
        at = draw(st.integers(0, len(head)))
        insert = draw(st.sampled_from([b"\n", b"\r\n ", b"\x00", b"\xff", b" ", b":", b"\r\n\r\n"]))
        head = head[:at] + insert + head[at:]
    return head + b"\r\n\r\n"


def upgrade_head(target: str, *extra: tuple[str, str], drop: str = "") -> bytes:
    fields = [(n, v) for n, v in UPGRADE if n != drop] + list(extra)
    lines = [f"GET {target} HTTP/1.1"] + [f"{n}: {v}" for n, v in fields]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


TOKEN = _core.mint_token(SECRET, SECURED.service_host, NOW + 300, "n0nce")
BODY = base64.b64encode(b'{"a": [1]}').decode()
OVERSIZED = base64.b64encode(b'"' + b"a" * 4096 + b'"').decode()
KNOWN = [
    (upgrade_head(f"/ws/generic/echo.demo?body={BODY}"), "routed"),
    (upgrade_head(f"/ws/generic/secure.my-org/{TOKEN}"), "routed"),
    (
        upgrade_head("/ws/generic?serviceHost=secure.my-org", ("Authorization", f"Bearer {TOKEN}")),
        "routed",
    ),
    (upgrade_head("/ws/generic/echo.demo", drop="Sec-WebSocket-Key"), 400),
    (upgrade_head("/ws/generic/secure.my-org"), 403),
    (upgrade_head(f"/ws/generic/secure.my-org/{TOKEN[:-1]}"), 403),
    (upgrade_head("/ws/generic/nobody.my-org"), 404),
    (upgrade_head(f"/ws/generic/echo.demo?body={OVERSIZED}"), 413),
    (upgrade_head("/ws/generic/echo.demo", ("X-Pad", "p" * 8192)), 431),
]


@pytest.mark.parametrize(("head", "expected"), KNOWN)
def test_each_outcome_is_reached_by_a_known_request(head: bytes, expected: int | str) -> None:
    outcome = answer(head)
    check(outcome)
    assert (outcome.status if isinstance(outcome, HttpError) else "routed") == expected


@FUZZ
@given(st.binary(max_size=512))
@example(b"")
@example(b"GET / HTTP/1.1")
@example(b"\r\n")
def test_arbitrary_bytes_route_or_get_an_allowed_status(data: bytes) -> None:
    check(tally(answer(data + b"\r\n\r\n")))


@FUZZ
@given(near_valid_heads())
def test_nearly_valid_upgrades_route_or_get_an_allowed_status(head: bytes) -> None:
    check(tally(answer(head)))
