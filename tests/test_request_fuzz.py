"""Property-based fuzzing of the upgrade request, against the real gateway over real sockets.

One :class:`~wsgate.Gateway` listens on 127.0.0.1 (port 0) for the whole module, in a thread of
its own (an anyio blocking portal), so hypothesis' examples are plain sync code. Each input is
sent on a raw TCP socket that then half-closes (so an incomplete head meets EOF and is dropped at
once), and the answer is read until the gateway closes. Whatever the bytes, the answer is:

- an error with status 400, 403, 404, 413 or 431, a one-line plain-text reason and a matching
  ``Content-Length``; 431 exactly when the head is over 8 KiB (SPEC §2);
- or 101 with the right ``Sec-WebSocket-Accept``, only for a valid upgrade to the builtin echo
  agent. An oracle written from RFC 9112, RFC 6455 §4.2.1 and SPEC §2/§4 (not from the gateway's
  code) says which requests must be opened, which must be refused and where the RFCs leave the
  choice to the server; a request it calls valid must get its 101;
- or nothing at all, only when the head is incomplete.

The two token agents (``my-agent.my-org``, ``secure.my-org``) have as upstream a real listening
socket that counts the connections it accepts. Their tokens are signed with a secret the fuzzer
never has (it signs with ``SECRET`` or a foreign one), so fuzzed input must never dial them: after
every input the count equals the dials that known requests made on purpose (tokens signed with
the gateway's secret; the upstream closes at once, so they get 502). The gateway's log must hold
no error, and no warning but those 502s.

Inputs: arbitrary bytes; nearly valid upgrades (every part of a valid request kept, dropped,
repeated, mangled or oversized), which reach the deep checks; a deterministic loop of mutations of
valid requests (bits flipped, bytes inserted and deleted, headers duplicated, CRLFs dropped, huge
values, truncation); a request of 10,000 headers; a head never finished; one known request per
outcome. Then a normal client must still get its echo session. ``WSGATE_FUZZ_EXAMPLES`` raises
the number of hypothesis examples (docs/RELIABILITY.md); the mutation loop runs ten times that.
"""

from __future__ import annotations

import base64
import enum
import json
import logging
import math
import os
import random
import re
import socket
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from urllib.parse import quote, unquote, unquote_to_bytes

import anyio
import pytest
from anyio.abc import SocketAttribute, SocketStream
from anyio.from_thread import start_blocking_portal
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from wsgate import AgentConfig, Config, Gateway, GatewaySettings, OrgConfig, _core
from wsgate.tokens import TokenAuthority

from .helpers import accept_key, connect

#: The fuzzer signs its tokens with this; the gateway does not accept it.
SECRET = b"fuzz-secret"
#: The gateway's secret: only the known requests that must dial the bot use it.
GATEWAY_SECRET = b"gateway-secret, never given to the fuzzer"
NOW = 1_800_000_000
ECHO, BOT, SECURED = "echo.demo", "my-agent.my-org", "secure.my-org"
ALLOWED = frozenset({400, 403, 404, 413, 431})
MAX_HEAD = _core.MAX_HEADER_BYTES
HANDSHAKE_TIMEOUT = 1.0
#: How long a client waits for the gateway's answer and close: longer means a hang.
CLIENT_TIMEOUT = 10.0
EXAMPLES = int(os.environ.get("WSGATE_FUZZ_EXAMPLES", "150"))
MUTATIONS = 10 * EXAMPLES

FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# -- the gateway under test ------------------------------------------------------------------


class CountingUpstream:
    """The token agents' bot: a real listening socket that counts the connections it accepts
    and closes each at once (a dial that reaches it ends in 502)."""

    def __init__(self) -> None:
        self.dials = 0

    async def handle(self, stream: SocketStream) -> None:
        self.dials += 1
        await stream.aclose()


class Records(logging.Handler):
    """The gateway's log records of level WARNING and above (emitted in the gateway's thread)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@dataclass
class Served:
    """The running gateway, as the tests see it."""

    port: int
    url: str
    upstream: CountingUpstream
    log: Records
    #: Dials made on purpose so far (known requests with the gateway's own tokens).
    expected_dials: int = 0

    def probe(self, data: bytes, *, dials: int = 0) -> str:
        """Send ``data``, half-close, read the answer to EOF and check it; returns the outcome
        ("101", "HTTP 400", ..., "dropped"). ``dials``: the upstream dials ``data`` must cause
        (the answer then must be a 502)."""
        self.expected_dials += dials
        raw, reset = exchange(self.port, data)
        try:
            outcome = check_answer(data, raw, reset, dialled=dials > 0)
        except AssertionError as exc:
            raise AssertionError(
                f"{exc}\nrequest: {shorten(data)}\nanswer: {shorten(raw)}"
            ) from exc
        self.check_quiet()
        return outcome

    def check_quiet(self) -> None:
        """Nothing dialled but on purpose; nothing logged but the 502s of those dials."""
        assert self.upstream.dials == self.expected_dials, "a token agent's bot was dialled"
        unexpected = [
            r.getMessage()
            for r in self.log.records
            if r.levelno != logging.WARNING or not r.getMessage().startswith("refused with 502")
        ]
        assert not unexpected, unexpected
        assert len(self.log.records) == self.expected_dials


def fuzz_config(upstream: str) -> Config:
    """The agents the oracle knows: ``echo.demo`` (builtin), two token agents dialling
    ``upstream``."""
    return Config(
        gateway=GatewaySettings(port=0, handshake_timeout=HANDSHAKE_TIMEOUT, drain_timeout=2.0),
        orgs=[OrgConfig("demo"), OrgConfig("my-org")],
        agents=[
            # Enough sessions that an echo session ending a moment after its client read its
            # close cannot make the next request a 503.
            AgentConfig("echo", "demo", builtin="echo", max_sessions=1000),
            AgentConfig("my-agent", "my-org", websocket_auth="token", upstream=upstream),
            AgentConfig("secure", "my-org", websocket_auth="token", upstream=upstream),
        ],
    )


@asynccontextmanager
async def serve_gateway(log: Records) -> AsyncIterator[Served]:
    upstream = CountingUpstream()
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    async with listener, anyio.create_task_group() as tasks:
        tasks.start_soon(listener.serve, upstream.handle)
        upstream_url = f"ws://127.0.0.1:{listener.extra(SocketAttribute.local_port)}/ws"
        authority = TokenAuthority([GATEWAY_SECRET], clock=lambda: NOW)
        try:
            async with Gateway(fuzz_config(upstream_url), authority=authority).running() as gw:
                yield Served(gw.port, gw.url, upstream, log)
        finally:
            await authority.aclose()
        tasks.cancel_scope.cancel()


@pytest.fixture(scope="module")
def gateway(backend: str) -> Iterator[Served]:
    """One gateway for the module (per backend), run by an event loop in a thread of its own."""
    logger = logging.getLogger("wsgate")
    records = Records()
    logger.addHandler(records)
    try:
        with (
            start_blocking_portal(backend) as portal,
            portal.wrap_async_context_manager(serve_gateway(records)) as served,
        ):
            yield served
    finally:
        logger.removeHandler(records)


def exchange(port: int, data: bytes) -> tuple[bytes, bool]:
    """Send ``data`` on a new connection, half-close, read until the gateway closes:
    ``(answer, reset)``, ``reset`` when the connection ended with a reset instead of a FIN."""
    chunks: list[bytes] = []
    with socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except (BrokenPipeError, ConnectionResetError):
            return b"".join(chunks), True
        except TimeoutError:
            raise AssertionError(
                f"the gateway neither answered nor closed within {CLIENT_TIMEOUT} s: "
                f"{shorten(data)} -> {shorten(b''.join(chunks))}"
            ) from None
    return b"".join(chunks), False


def shorten(data: bytes, keep: int = 300) -> str:
    if len(data) <= keep:
        return repr(data)
    return f"{data[:keep]!r}... ({len(data)} bytes)"


# -- the answer -------------------------------------------------------------------------------

STATUS_LINE = re.compile(rb"HTTP/1\.1 ([1-5][0-9][0-9]) [\x20-\x7e]*")
HEALTH_PATHS = (b"/livez", b"/readyz")
START_PREFIX = b"/v1/public/"


def head_too_large(data: bytes) -> bool:
    """Request line plus headers (the head without its final CRLF CRLF) over 8 KiB."""
    end = data.find(b"\r\n\r\n")
    return end > MAX_HEAD if end >= 0 else len(data) >= MAX_HEAD + 4


def parse_response(raw: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
    head, sep, rest = raw.partition(b"\r\n\r\n")
    assert sep, "no complete response head"
    status_line, *lines = head.split(b"\r\n")
    match = STATUS_LINE.fullmatch(status_line)
    assert match, f"malformed status line {status_line!r}"
    headers: dict[bytes, bytes] = {}
    for line in lines:
        name, colon, value = line.partition(b":")
        assert colon and re.fullmatch(rb"[A-Za-z0-9-]+", name), f"malformed field {line!r}"
        assert name.lower() not in headers, f"repeated field {name!r}"
        headers[name.lower()] = value.strip(b" ")
    return int(match[1]), headers, rest


def check_plain(headers: dict[bytes, bytes], body: bytes) -> str:
    """A one-line plain-text reason with a matching Content-Length; returns the reason."""
    assert headers.get(b"content-type", b"").startswith(b"text/plain"), headers
    assert headers.get(b"content-length") == str(len(body)).encode(), (headers, body)
    assert headers.get(b"connection", b"").lower() == b"close", headers
    assert body.endswith(b"\n") and body.count(b"\n") == 1 and b"\r" not in body, body
    reason = body[:-1].decode("utf-8")
    assert reason.strip(), "empty reason"
    return reason


def diversion(data: bytes) -> bytes | None:
    """The health check or ``/start`` path of the request line, which the gateway answers on
    the same port with their own statuses: fuzzing may hit them, though it hardly ever does."""
    parts = data.split(b"\r\n", 1)[0].split(b" ")
    if len(parts) != 3:
        return None
    path = parts[1].partition(b"?")[0]
    if path in HEALTH_PATHS or path.startswith(START_PREFIX):
        return path
    return None


def check_answer(data: bytes, raw: bytes, reset: bool, *, dialled: bool = False) -> str:
    """Check the gateway's answer ``raw`` to ``data`` (see the module's doc); returns the
    outcome for the tallies."""
    too_large = head_too_large(data)
    incomplete = b"\r\n\r\n" not in data and not too_large
    if not raw:
        assert incomplete or (too_large and reset), "dropped a complete request without an answer"
        return "dropped"
    assert not incomplete, "answered an incomplete request"
    status, headers, body = parse_response(raw)
    judgement = judge(data)
    if status == 101:
        assert judgement.verdict is not Verdict.REFUSE, f"101 for {judgement.why}"
        assert judgement.key is not None
        assert headers.get(b"upgrade", b"").lower() == b"websocket", headers
        assert headers.get(b"connection", b"").lower() == b"upgrade", headers
        assert headers.get(b"sec-websocket-accept") == accept_key(judgement.key), headers
        # The echo agent speaks no subprotocol, and no extension is ever negotiated.
        assert b"sec-websocket-protocol" not in headers, headers
        assert b"sec-websocket-extensions" not in headers, headers
        return "101"
    assert judgement.verdict is not Verdict.OPEN, f"refused a valid echo upgrade with {status}"
    assert not reset or too_large, "the error answer ended with a reset"
    assert (status == 431) == too_large, (
        f"{status} for a {'too large' if too_large else 'fine'} head"
    )
    path = diversion(data)
    if dialled:
        assert status == 502, status
    elif path in HEALTH_PATHS and status == 200:
        assert check_plain(headers, body) == "ok"
        return "health"
    elif (
        path is not None
        and path.startswith(START_PREFIX)
        and b"json" in headers.get(b"content-type", b"")
    ):
        # /start answers in JSON (SPEC §5).
        assert status in {400, 401, 404, 405, 411, 413, 429}, status
        assert headers.get(b"content-length") == str(len(body)).encode(), (headers, body)
        json.loads(body)
        return f"/start {status}"
    else:
        assert status in ALLOWED, f"status {status} is not one of {sorted(ALLOWED)}"
    check_plain(headers, body)
    return f"HTTP {status}"


# -- the oracle: what the RFCs and the SPEC ask of an upgrade to the echo agent ----------------


class Verdict(enum.Enum):
    OPEN = "must be opened"
    REFUSE = "must be refused"
    EITHER = "may be opened or refused"


@dataclass(frozen=True)
class Judgement:
    verdict: Verdict
    #: The violation (REFUSE) or the latitude (EITHER).
    why: str = ""
    #: The request's Sec-WebSocket-Key, once its fields could be read.
    key: bytes | None = None


class Refuse(Exception):
    pass


TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 §5.6.2
FIELD_VALUE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")  # RFC 9110 §5.5: VCHAR, obs-text, SP, HTAB
ORIGIN_FORM = re.compile(rb"/[\x21-\x7e]*")
# RFC 3986 path-abempty ["?" query], strictly: pchar, "/" and "?", well-formed escapes.
STRICT_TARGET = re.compile(rb"/(?:[A-Za-z0-9\-._~!$&'()*+,;=:@/?]|%[0-9A-Fa-f]{2})*")
# RFC 9112 §3.2 / RFC 3986 §3.2.2: uri-host [":" port].
URI_HOST = re.compile(
    rb"(?:\[[0-9A-Fa-f:.]+\]|(?:[A-Za-z0-9\-._~!$&'()*+,;=]|%[0-9A-Fa-f]{2})*)(?::[0-9]*)?"
)
GENERIC = "/ws/generic"


def judge(data: bytes) -> Judgement:
    """Whether ``data`` must be answered by opening an echo session, must be refused, or is a
    case where RFC 9112 lets a server either tolerate something or refuse it (bare LF or CR,
    obs-fold, NUL and other controls in a value, extra whitespace in the request line)."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return Judgement(Verdict.REFUSE, "an incomplete head")
    if end > MAX_HEAD:
        return Judgement(Verdict.REFUSE, "a head over 8 KiB")
    strict = judge_head(data[:end])
    if strict.verdict is not Verdict.REFUSE:
        return strict
    tolerated = tolerant_reading(data[:end])
    if tolerated == data[:end]:
        return strict
    lenient = judge_head(tolerated.split(b"\r\n\r\n")[0])
    if lenient.verdict is Verdict.REFUSE:
        return strict
    why = f"{strict.why}, which RFC 9112 lets a server tolerate"
    return Judgement(Verdict.EITHER, why, lenient.key)


def tolerant_reading(head: bytes) -> bytes:
    """``head`` as RFC 9112 lets a server read it: bare LF ends a line (§2.2), a bare CR is a
    space (§2.2), obs-fold is a space (§5.2), NUL and other controls in a value are spaces
    (RFC 9110 §5.5), any whitespace separates the request line's parts (§3)."""
    head = re.sub(rb"(?<!\r)\n", b"\r\n", head)
    head = re.sub(rb"\r(?!\n)", b" ", head)
    head = re.sub(rb"\r\n[ \t]+", b" ", head)
    line, sep, fields = head.partition(b"\r\n")
    fields = re.sub(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]", b" ", fields)
    return b" ".join(line.split()) + sep + fields


def judge_head(head: bytes) -> Judgement:
    doubts: list[str] = []
    key: bytes | None = None
    try:
        key = judge_fields(head, doubts)
    except Refuse as exc:
        return Judgement(Verdict.REFUSE, str(exc), key)
    if doubts:
        return Judgement(Verdict.EITHER, "; ".join(doubts), key)
    return Judgement(Verdict.OPEN, "", key)


def judge_fields(head: bytes, doubts: list[str]) -> bytes:
    """Raise :class:`Refuse` for what the RFCs and the SPEC forbid, note in ``doubts`` what they
    leave to the server; returns the Sec-WebSocket-Key."""
    request_line, *lines = head.split(b"\r\n")
    parts = request_line.split(b" ")
    if len(parts) != 3:
        raise Refuse("a request line not method SP target SP version")
    method, target, version = parts
    if method != b"GET":  # RFC 6455 §4.1 (methods are case-sensitive, RFC 9110 §9.1)
        raise Refuse("a method other than GET")
    if version != b"HTTP/1.1":
        if not re.fullmatch(rb"HTTP/1\.[2-9]", version):
            raise Refuse("a version other than HTTP/1.1")  # RFC 6455 §4.1
        doubts.append("a later HTTP/1 minor version")
    if not ORIGIN_FORM.fullmatch(target):
        raise Refuse("a target not in origin-form")
    if not STRICT_TARGET.fullmatch(target):
        doubts.append("a target with characters RFC 3986 does not allow there")
    fields: list[tuple[bytes, bytes]] = []
    for line in lines:
        name, colon, value = line.partition(b":")
        if not colon or not TOKEN.fullmatch(name):
            raise Refuse("a malformed field line")
        if not FIELD_VALUE.fullmatch(value):
            raise Refuse("a control character in a field value")
        fields.append((name.lower(), value.strip(b" \t")))
    if len(fields) > 100:
        doubts.append("over 100 fields (the gateway's own limit)")

    def values(name: bytes) -> list[bytes]:
        return [v for n, v in fields if n == name]

    def elements(name: bytes) -> list[bytes]:
        items = (item.strip(b" \t") for v in values(name) for item in v.split(b","))
        return [item for item in items if item]

    # RFC 9112 §3.2: exactly one Host; an invalid value "must" get a 400 too, which the gateway
    # does not check (it routes by path): left to the server here.
    hosts = values(b"host")
    if len(hosts) != 1:
        raise Refuse("not exactly one Host")
    if not URI_HOST.fullmatch(hosts[0]):
        doubts.append("a Host value that is not host[:port]")
    # SPEC §2 (ours): bytes after the head are frames, so no body.
    if values(b"transfer-encoding"):
        raise Refuse("a Transfer-Encoding")
    lengths = values(b"content-length")
    if lengths not in ([], [b"0"]):
        if not all(v.isdigit() and int(v) == 0 for v in lengths):
            raise Refuse("a Content-Length other than 0")
        doubts.append("a Content-Length of 0 written otherwise")
    # RFC 6455 §4.2.1
    if b"websocket" not in [v.lower() for v in elements(b"upgrade")]:
        raise Refuse("no Upgrade: websocket")
    if b"upgrade" not in [v.lower() for v in elements(b"connection")]:
        raise Refuse("no Connection: upgrade")
    if values(b"sec-websocket-version") != [b"13"]:
        raise Refuse("not exactly one Sec-WebSocket-Version: 13")
    keys = values(b"sec-websocket-key")
    if len(keys) != 1 or not re.fullmatch(rb"[A-Za-z0-9+/]{22}==", keys[0]):
        raise Refuse("not exactly one Sec-WebSocket-Key of 16 bytes")
    key = keys[0]
    if base64.b64encode(base64.b64decode(key)) != key:
        doubts.append("a Sec-WebSocket-Key with non-zero trailing bits")
    if not all(TOKEN.fullmatch(p) for p in elements(b"sec-websocket-protocol")):
        raise Refuse("a subprotocol that is not a token")
    judge_target(target.decode("ascii"), doubts)
    return key


def decoded(text: str) -> str | None:
    try:
        return unquote(text, errors="strict")
    except UnicodeDecodeError:
        return None


def judge_target(target: str, doubts: list[str]) -> None:
    """SPEC §2: the service host exactly once, the echo agent's; SPEC §4: the body."""
    path, _, query = target.partition("?")
    params: list[tuple[str, str]] = []
    for piece in query.split("&"):
        if piece:
            name, _, value = piece.partition("=")
            if decoded(name) is None:
                doubts.append("a query parameter name that is not UTF-8")
            params.append((decoded(name) or name, value))
    in_query = [value for name, value in params if name == "serviceHost"]
    if path == GENERIC:
        if len(in_query) != 1:
            raise Refuse("not exactly one service host")
        host = decoded(in_query[0])
    elif path.startswith(GENERIC + "/"):
        segments = path[len(GENERIC) + 1 :].split("/")
        if len(segments) > 2 or not all(segments):
            raise Refuse("a path other than /ws/generic/{host}[/{token}]")
        if in_query:
            raise Refuse("a service host both in the path and as serviceHost")
        host = decoded(segments[0])
        if len(segments) == 2 and decoded(segments[1]) is None:
            doubts.append("a token segment that is not UTF-8")
    else:
        raise Refuse("a path other than the generic endpoint")
    if host != ECHO:
        raise Refuse("another service host than the echo agent's")
    bodies = [value for name, value in params if name == "body"]
    if len(bodies) > 1:
        raise Refuse("more than one body")
    if bodies:
        judge_body(bodies[0], doubts)


def judge_body(raw: str, doubts: list[str]) -> None:
    """SPEC §4: percent-decoded, a space read as "+", standard or URL-safe base64 with or without
    padding (padding, when present, right), of at most 4096 bytes of UTF-8 JSON (RFC 8259)."""
    if re.search(r"%(?![0-9A-Fa-f]{2})", raw):
        raise Refuse("a body with a malformed percent-escape")
    text = unquote_to_bytes(raw).replace(b" ", b"+").translate(bytes.maketrans(b"-_", b"+/"))
    data = text.rstrip(b"=")
    padding = len(text) - len(data)
    if padding and (padding > 2 or len(text) % 4):
        raise Refuse("a body with wrong padding")
    if not re.fullmatch(rb"[A-Za-z0-9+/]*", data) or len(data) % 4 == 1:
        raise Refuse("a body that is not base64")
    if len(data) // 4 * 3 + len(data) % 4 * 3 // 4 > _core.MAX_BODY_BYTES:
        raise Refuse("a body over 4096 bytes")
    document = base64.b64decode(data + b"=" * (-len(data) % 4))
    if base64.b64encode(document).rstrip(b"=") != data:
        doubts.append("a body with non-zero trailing bits")  # RFC 4648 §3.5: may be refused

    def no_constant(name: str) -> None:
        raise ValueError(f"{name} is not JSON")

    def number(text: str) -> float:
        if not math.isfinite(float(text)):
            doubts.append("a body number beyond a double's range")
        return 0.0

    try:
        value = json.loads(
            document.decode("utf-8"),
            parse_constant=no_constant,
            parse_float=number,
            parse_int=number,
        )
    except RecursionError:
        doubts.append("a body nested deeper than Python parses")
        return
    except ValueError:  # UnicodeDecodeError included
        raise Refuse("a body that is not UTF-8 JSON") from None
    if re.search(rb"\\u[dD][89a-fA-F]", document):
        doubts.append("a body with a surrogate escape")  # RFC 8259 §8.2
    if depth(value) > _core.MAX_BODY_DEPTH:
        doubts.append("a body nested deeper than the gateway's own limit")


def depth(value: object) -> int:
    if isinstance(value, list):
        return 1 + max(map(depth, value), default=0)
    if isinstance(value, dict):
        return 1 + max(map(depth, value.values()), default=0)
    return 0


# -- near-valid requests ---------------------------------------------------------------------

KEY = "dGhlIHNhbXBsZSBub25jZQ=="
VISIBLE = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=30)
ANY_TEXT = st.text(max_size=30)
# Mostly the known hosts, then well-shaped unknown ones, then anything.
HOSTS = st.one_of(
    st.sampled_from([ECHO, BOT, SECURED]),
    st.from_regex(r"[a-z0-9-]{1,63}\.[a-z0-9-]{1,63}", fullmatch=True),
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
    """A token for the secured agent signed with the fuzzer's secret (which the gateway does not
    accept), or one with one more thing wrong, or junk."""
    host, exp, nonce, secret = SECURED, NOW + 300, "n0nce", SECRET
    if rarely(draw, 2):
        host = draw(st.sampled_from([BOT, "x.y"])) if rarely(draw, 4) else host
        exp = draw(st.sampled_from([NOW, NOW - 1])) if rarely(draw, 4) else exp
        nonce = "" if rarely(draw, 4) else nonce
        secret = b"another secret" if rarely(draw, 4) else secret
    good = _core.TokenKeys([secret]).mint(host, exp, nonce)
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


def gateway_token(host: str, nonce: str) -> str:
    """A token the gateway accepts (its own secret): the one way to get a token agent dialled."""
    return _core.TokenKeys([GATEWAY_SECRET]).mint(host, NOW + 300, nonce)


# -- known requests ----------------------------------------------------------------------------

FUZZ_TOKEN = _core.TokenKeys([SECRET]).mint(SECURED, NOW + 300, "n0nce")
BODY = base64.b64encode(b'{"a": [1]}').decode()
OVERSIZED = base64.b64encode(b'"' + b"a" * 4096 + b'"').decode()
KNOWN = [
    pytest.param(upgrade_head(f"/ws/generic/{ECHO}?body={BODY}"), "101", 0, id="echo-body"),
    pytest.param(
        upgrade_head(f"/ws/generic?serviceHost={ECHO}", ("Sec-WebSocket-Protocol", "chat")),
        "101",
        0,
        id="echo-by-query",
    ),
    pytest.param(
        upgrade_head(f"/ws/generic/{SECURED}/{gateway_token(SECURED, 'known-1')}"),
        "HTTP 502",
        1,
        id="path-token-dials",
    ),
    pytest.param(
        upgrade_head(
            f"/ws/generic?serviceHost={BOT}",
            ("Authorization", f"Bearer {gateway_token(BOT, 'known-2')}"),
        ),
        "HTTP 502",
        1,
        id="bearer-token-dials",
    ),
    pytest.param(
        upgrade_head(f"/ws/generic/{SECURED}/{FUZZ_TOKEN}"), "HTTP 403", 0, id="fuzz-token"
    ),
    pytest.param(
        upgrade_head(f"/ws/generic/{ECHO}", drop="Sec-WebSocket-Key"), "HTTP 400", 0, id="no-key"
    ),
    pytest.param(upgrade_head(f"/ws/generic/{SECURED}"), "HTTP 403", 0, id="no-token"),
    pytest.param(
        upgrade_head(f"/ws/generic/{SECURED}/{gateway_token(SECURED, 'known-3')[:-1]}"),
        "HTTP 403",
        0,
        id="broken-token",
    ),
    pytest.param(upgrade_head("/ws/generic/nobody.my-org"), "HTTP 404", 0, id="unknown-agent"),
    pytest.param(
        upgrade_head(f"/ws/generic/{ECHO}?body={OVERSIZED}"), "HTTP 413", 0, id="big-body"
    ),
    pytest.param(
        upgrade_head(f"/ws/generic/{ECHO}", ("X-Pad", "p" * 8192)), "HTTP 431", 0, id="big-head"
    ),
    pytest.param(
        upgrade_head(f"/ws/generic/{ECHO}", *[(f"X-{i}", "v") for i in range(96)]),
        "HTTP 400",
        0,
        id="101-fields",
    ),
    pytest.param(upgrade_head(f"/ws/generic/{ECHO}")[:-2], "dropped", 0, id="incomplete-then-eof"),
]


@pytest.mark.parametrize(("head", "expected", "dials"), KNOWN)
def test_each_outcome_is_reached_by_a_known_request(
    gateway: Served, head: bytes, expected: str, dials: int
) -> None:
    assert gateway.probe(head, dials=dials) == expected


@pytest.mark.slow
@FUZZ
@given(data=st.binary(max_size=512))
@example(data=b"")
@example(data=b"GET / HTTP/1.1")
@example(data=b"\r\n")
@example(data=f"GET /ws/generic/{ECHO} HTTP/1.1\r\nHost: gw".encode())
def test_arbitrary_bytes_get_an_allowed_answer(gateway: Served, data: bytes) -> None:
    event(gateway.probe(data + b"\r\n\r\n"))


@pytest.mark.slow
@FUZZ
@given(head=near_valid_heads())
def test_nearly_valid_upgrades_get_an_allowed_answer(gateway: Served, head: bytes) -> None:
    event(gateway.probe(head))
    event(f"oracle: {judge(head).verdict.value}")


# -- mutations of valid requests ---------------------------------------------------------------

MUTATION_BASES = [
    upgrade_head(f"/ws/generic/{ECHO}?body={BODY}", ("Sec-WebSocket-Protocol", "chat")),
    upgrade_head(f"/ws/generic?serviceHost={ECHO}&token=x"),
    upgrade_head(f"/ws/generic/{SECURED}", ("Authorization", f"Bearer {FUZZ_TOKEN}")),
    upgrade_head(f"/ws/generic/{BOT}/{_core.TokenKeys([SECRET]).mint(BOT, NOW + 300, 'n')}"),
]
INTERESTING = b"\r\n\x00\xff \t:%/?&=,"
HUGE = (100, 4000, 8000, 8150, 8200, 9000, 70_000)


def mutate(rng: random.Random, data: bytes) -> bytes:
    """One to three edits of ``data``: flip a bit, insert or delete a byte, duplicate a field
    line, drop a CRLF (or half of one), add a huge field or value, cut the request short."""
    buf = bytearray(data)
    for _ in range(rng.choice((1, 1, 2, 3))):
        op = rng.randrange(8)
        at = rng.randrange(len(buf) + 1)
        crlfs = [m.start() for m in re.finditer(b"\r\n", buf)]
        if op == 0 and buf:
            buf[min(at, len(buf) - 1)] ^= 1 << rng.randrange(8)
        elif op == 1:
            buf[at:at] = bytes([rng.choice([*INTERESTING, rng.randrange(256)])])
        elif op == 2 and buf:
            del buf[min(at, len(buf) - 1)]
        elif op == 3:
            lines = bytes(buf).split(b"\r\n")
            fields = [i for i in range(1, len(lines)) if lines[i]]
            if fields:
                lines.insert(rng.randrange(1, len(lines)), lines[rng.choice(fields)])
                buf = bytearray(b"\r\n".join(lines))
        elif op == 4 and crlfs:
            start = rng.choice(crlfs)
            del buf[start + rng.choice((0, 0, 1)) : start + rng.choice((1, 2, 2))]
        elif op == 5 and crlfs:
            start = rng.choice(crlfs)
            size = rng.choice(HUGE)
            if rng.random() < 0.5:
                buf[start:start] = b"v" * size  # the value of the field that ends there
            else:
                buf[start + 2 : start + 2] = b"X-Huge: " + b"h" * size + b"\r\n"
        elif op == 6:
            del buf[at:]
        elif op == 7:
            buf[at:at] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 8)))
    return bytes(buf)


@pytest.mark.slow
def test_mutated_upgrades_get_an_allowed_answer(gateway: Served) -> None:
    rng = random.Random(6455)
    outcomes: Counter[str] = Counter()
    for n in range(MUTATIONS):
        data = mutate(rng, MUTATION_BASES[n % len(MUTATION_BASES)])
        outcomes[gateway.probe(data)] += 1
    # The loop reaches the gateway's every answer, not only its first check.
    for outcome in ("101", "HTTP 400", "HTTP 403", "HTTP 404", "HTTP 431", "dropped"):
        assert outcomes[outcome], outcomes


# -- floods and stalls -------------------------------------------------------------------------


def echo_round_trip(url: str) -> None:
    """A normal client gets its echo session: a text and a binary message come back."""
    with connect(f"{url}/ws/generic/{ECHO}") as ws:
        ws.send("hello, echo")
        assert ws.recv(timeout=CLIENT_TIMEOUT) == "hello, echo"
        ws.send(b"\x00\x01\xfe\xff")
        assert ws.recv(timeout=CLIENT_TIMEOUT) == b"\x00\x01\xfe\xff"


def test_ten_thousand_fields_get_431_and_the_gateway_serves_on(gateway: Served) -> None:
    head = upgrade_head(f"/ws/generic/{ECHO}", *[(f"X-Field-{i}", "v") for i in range(10_000)])
    assert gateway.probe(head) in ("HTTP 431", "dropped")
    echo_round_trip(gateway.url)


def test_a_head_not_finished_in_time_is_dropped(gateway: Served) -> None:
    """No EOF this time: the gateway drops the connection after ``handshake_timeout``."""
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=CLIENT_TIMEOUT) as sock:
        sock.sendall(upgrade_head(f"/ws/generic/{ECHO}")[:-2])
        assert sock.recv(65536) == b""
    gateway.check_quiet()


def test_the_gateway_serves_a_normal_client_after_the_fuzzing(gateway: Served) -> None:
    echo_round_trip(gateway.url)
    gateway.check_quiet()
