r"""Session control, Sans-I/O: who may stop, list or call a live session, judged from the
request alone. The I/O (the registry of live sessions, the close, the proxy to the bot) is in
:mod:`wsgate.session_calls` and :mod:`wsgate.sessions`.

Two kinds of key, kept apart (:class:`SessionKeys`): an organisation's *private* keys
(``sk_…``) list and stop its sessions and never mint a token; its *public* keys (``pk_…``) call
``/start`` and the Session API and never list or stop a session. Every comparison is in constant
time against every key, like ``/start``'s.

- ``DELETE /v1/agents/{agent}/sessions/{sessionId}``: stop (:class:`Stop`), private key;
- ``GET /v1/agents/{agent}/sessions[?limit=&after=]``: list (:class:`ListSessions`), private key;
- ``{GET,POST,PUT,PATCH,DELETE,OPTIONS,HEAD} /v1/public/{agent}/sessions/{sessionId}/{path}``:
  the Session API (:class:`Forward`), public key.

Checks of stop and list, in order; the first failure is the answer (JSON
``{"error": …, "code": "…"}`` like ``/start``'s):

| check | failure |
| --- | --- |
| path is one of the above | 404 ``Not found`` |
| method (DELETE for a session, GET for the list) | 405 |
| a bearer key | 401 |
| not a public key | 403 |
| a private key that one organisation lists | 401 |
| ``{agent}.{org}`` is an agent of an organisation of that key | 403 (\*) |
| ``sessionId`` is a UUID; ``limit`` 1-1000, ``after`` a UUID | 400 |

(\*) The same whether the agent exists in another organisation or not: a key reveals nothing of
other organisations.

The Session API's: path (404), method (405), path tail without ``.``/``..`` segments and at most
:data:`MAX_FORWARD_PATH` bytes with its query (400), a bearer key (401), not a private key (403),
a public key (401), the agent of that key's organisation (404 ``Service not found``, like
``/start``), ``sessionId`` a UUID (400). Whether the session is live (404) is the caller's to say.
"""

from __future__ import annotations

import hmac
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from .config import AgentConfig, Config, OrgConfig
from .errors import ConfigError
from .names import NAME
from .request import bearer

__all__ = [
    "CONTROL_PREFIX",
    "DEFAULT_PAGE",
    "FORWARD_METHODS",
    "MAX_FORWARD_PATH",
    "MAX_PAGE",
    "PRIVATE_KEYS_ENV_PREFIX",
    "STOP_CODE",
    "STOP_REASON",
    "Forward",
    "ListSessions",
    "Refusal",
    "SessionKeys",
    "Stop",
    "answer_framing",
    "forward_fields",
    "forward_head",
    "hop_page",
    "is_forward_path",
    "judge_control",
    "judge_forward",
    "load_private_keys",
    "merge_pages",
    "page",
    "private_keys_env",
    "refusal",
]

JSON = dict[str, Any]

#: Everything under it is session control (stop, list).
CONTROL_PREFIX = "/v1/agents/"
#: The close code and reason both sides of a stopped session get.
STOP_CODE = 1000
STOP_REASON = "session stopped"
#: Sessions on a page of the list unless ``?limit=`` says otherwise, and at most.
DEFAULT_PAGE = 100
MAX_PAGE = 1000
#: The Session API's methods.
FORWARD_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"})
#: Longest ``/{path}?{query}`` forwarded to a bot, in bytes of the raw target; over it, 400.
MAX_FORWARD_PATH = 2048
#: ``WSGATE_PRIVATE_KEYS_<ORG>``: an organisation's private keys, comma-separated.
PRIVATE_KEYS_ENV_PREFIX = "WSGATE_PRIVATE_KEYS_"

_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_SESSIONS = re.compile(rf"/v1/agents/({NAME.pattern})/sessions/?")
_SESSION = re.compile(rf"/v1/agents/({NAME.pattern})/sessions/([^/]*)")
_FORWARD = re.compile(rf"/v1/public/({NAME.pattern})/sessions/([^/]*)(/[^?]*)?")
_FORWARD_PREFIX = re.compile(rf"/v1/public/{NAME.pattern}/sessions(/|$)")
# Never forwarded: the request's own framing and routing, hop-by-hop fields (RFC 9110 §7.6.1),
# the key, an X-Daily-Session-Id of the client's (the gateway sets its own), and the secret of
# a request forwarded by another gateway (wsgate.forwarding.FORWARD_HEADER).
_NOT_FORWARDED = frozenset(
    {
        "host",
        "content-length",
        "authorization",
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "expect",
        "x-daily-session-id",
        "x-wsgate-forward",
    }
)


def private_keys_env(org: str) -> str:
    """The environment variable holding ``org``'s private keys: ``my-org`` ->
    ``WSGATE_PRIVATE_KEYS_MY_ORG`` (names are lowercase letters, digits and ``-``, so this is
    one to one)."""
    return PRIVATE_KEYS_ENV_PREFIX + org.upper().replace("-", "_")


def load_private_keys(
    orgs: Sequence[OrgConfig], environ: Mapping[str, str] | None = None
) -> dict[str, tuple[str, ...]]:
    """Each organisation's private keys, by name, from at most one source each:
    ``private_keys``, ``private_keys_file`` (one per line; blank lines and ``#`` comments
    skipped) or :func:`private_keys_env`. An organisation with none is left out (its sessions
    cannot be listed or stopped). Raises :class:`ConfigError` for two sources, an empty key, or
    a private key that is also a public key (of any organisation); never with a key in it."""
    env = os.environ if environ is None else environ
    public = {key for org in orgs for key in org.public_keys}
    found: dict[str, tuple[str, ...]] = {}
    for org in orgs:
        name = private_keys_env(org.name)
        env_value = env.get(name)
        given = org.private_keys is not None or org.private_keys_file is not None
        if given and env_value is not None:
            raise ConfigError(f"org {org.name!r}: private keys given in the settings and {name}")
        if org.private_keys is not None:
            keys = tuple(org.private_keys)
        elif org.private_keys_file is not None:
            try:
                text = Path(org.private_keys_file).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigError(
                    f"org {org.name!r}: private_keys_file {org.private_keys_file}: "
                    f"cannot read: {exc}"
                ) from None
            keys = _lines(text)
        elif env_value is not None:
            keys = tuple(item.strip() for item in env_value.split(","))
        else:
            continue
        if not keys or not all(keys):
            raise ConfigError(f"org {org.name!r}: a private key is empty")
        if public.intersection(keys):
            raise ConfigError(f"org {org.name!r}: a private key is also a public key")
        found[org.name] = keys
    return found


def _lines(text: str) -> tuple[str, ...]:
    stripped = (line.strip() for line in text.splitlines())
    return tuple(line for line in stripped if line and not line.startswith("#"))


class SessionKeys:
    """Both kinds of key of every organisation, compared in constant time.

    ``private``: by organisation, as :func:`load_private_keys` returns them."""

    __slots__ = ("_private", "_public")

    def __init__(self, orgs: Sequence[OrgConfig], private: Mapping[str, Sequence[str]]) -> None:
        self._public = {org.name: tuple(org.public_keys) for org in orgs}
        self._private = {org: tuple(keys) for org, keys in private.items()}

    @classmethod
    def from_config(cls, config: Config, environ: Mapping[str, str] | None = None) -> SessionKeys:
        """The keys of ``config``'s organisations, private ones from their source."""
        return cls(config.orgs, load_private_keys(config.orgs, environ))

    def __repr__(self) -> str:
        return f"<SessionKeys of {len(self._public)} organisations>"

    def public_orgs(self, key: str) -> list[str]:
        """The organisations listing ``key`` as a public key."""
        return _matching(key, self._public)

    def private_orgs(self, key: str) -> list[str]:
        """The organisations listing ``key`` as a private key."""
        return _matching(key, self._private)


def _matching(key: str, table: Mapping[str, Sequence[str]]) -> list[str]:
    """Every key is compared, in constant time each, so the time taken depends on neither
    where nor whether the key matched."""
    given = key.encode("utf-8", "surrogateescape")
    matched: list[str] = []
    for org, keys in table.items():
        found = False
        for candidate in keys:
            found |= hmac.compare_digest(given, candidate.encode())
        if found:
            matched.append(org)
    return matched


@dataclass(frozen=True)
class Refusal:
    """A request answered without reaching a session: its status and JSON document, the
    ``Allow`` header of a 405, and the agent once the request got that far."""

    status: int
    document: JSON
    allow: str | None = None
    agent: AgentConfig | None = None


@dataclass(frozen=True)
class Stop:
    """Stop this session of this agent, if it is live."""

    agent: AgentConfig
    session_id: str


@dataclass(frozen=True)
class ListSessions:
    """A page of this agent's live sessions: ids after ``after``, at most ``limit``."""

    agent: AgentConfig
    limit: int
    after: str | None


@dataclass(frozen=True)
class Forward:
    """Forward the request to the bot of this session: ``target`` is ``/{path}[?query]``."""

    agent: AgentConfig
    session_id: str
    target: str


def refusal(status: int, reason: str, allow: str | None = None) -> Refusal:
    """The JSON refusal of ``/start``'s format."""
    return Refusal(status, {"error": reason, "code": str(status)}, allow)


def is_forward_path(path: str) -> bool:
    """Whether ``path`` is the Session API's (``/v1/public/{agent}/sessions…``), which the
    gateway must take before ``/start``'s prefix does."""
    return _FORWARD_PREFIX.match(path) is not None


def judge_control(
    method: str,
    path: str,
    query: Iterable[tuple[str, str]],
    headers: Sequence[tuple[str, str]],
    agents: Mapping[str, AgentConfig],
    keys: SessionKeys,
) -> Stop | ListSessions | Refusal:
    """Judge a request under :data:`CONTROL_PREFIX` (the checks in this module's table)."""
    listing = _SESSIONS.fullmatch(path)
    one = None if listing is not None else _SESSION.fullmatch(path)
    match = listing or one
    if match is None:
        return refusal(404, "Not found")
    wanted = "GET" if listing is not None else "DELETE"
    if method != wanted:
        return refusal(405, f"Method not allowed: use {wanted}", allow=wanted)
    orgs = _key_orgs(headers, keys, private=True)
    if isinstance(orgs, Refusal):
        return orgs
    agent = _agent(match.group(1), orgs, agents)
    if agent is None:
        return refusal(403, "This key is not valid for this agent")
    if one is not None:
        session_id = one.group(2)
        if not _UUID.fullmatch(session_id):
            return refusal(400, "sessionId must be a UUID")
        return Stop(agent, session_id.lower())
    limit, after = DEFAULT_PAGE, None
    for name, value in query:
        if name == "limit":
            if not (value.isascii() and value.isdigit() and len(value) <= 4):
                return refusal(400, f"limit must be 1 to {MAX_PAGE}")
            limit = int(value)
            if not 1 <= limit <= MAX_PAGE:
                return refusal(400, f"limit must be 1 to {MAX_PAGE}")
        elif name == "after":
            if not _UUID.fullmatch(value):
                return refusal(400, "after must be a sessionId")
            after = value.lower()
    return ListSessions(agent, limit, after)


def judge_forward(
    method: str,
    path: str,
    query: str,
    headers: Sequence[tuple[str, str]],
    agents: Mapping[str, AgentConfig],
    keys: SessionKeys,
) -> Forward | Refusal:
    """Judge a Session API request (the checks in this module's docstring). ``path`` and
    ``query`` are the raw, still percent-encoded parts of the request's target."""
    match = _FORWARD.fullmatch(path)
    if match is None:
        return refusal(404, "Not found")
    if method not in FORWARD_METHODS:
        return refusal(405, "Method not allowed", allow=", ".join(sorted(FORWARD_METHODS)))
    tail = match.group(3) or "/"
    target = tail if not query else f"{tail}?{query}"
    if len(target.encode()) > MAX_FORWARD_PATH:
        return refusal(400, f"path too long (at most {MAX_FORWARD_PATH} bytes)")
    if any(unquote(segment) in (".", "..") for segment in tail.split("/")):
        return refusal(400, "path must not hold '.' or '..' segments")
    orgs = _key_orgs(headers, keys, private=False)
    if isinstance(orgs, Refusal):
        return orgs
    agent = _agent(match.group(1), orgs, agents)
    if agent is None:
        return refusal(404, "Service not found")
    session_id = match.group(2)
    if not _UUID.fullmatch(session_id):
        return refusal(400, "sessionId must be a UUID")
    return Forward(agent, session_id.lower(), target)


def forward_fields(headers: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """The client's header fields that go on to the bot: all but the key, the request's
    framing, hop-by-hop fields and a client's own ``X-Daily-Session-Id``."""
    return [(name, value) for name, value in headers if name not in _NOT_FORWARDED]


def forward_head(
    method: str,
    target: str,
    host: str,
    headers: Sequence[tuple[str, str]],
    session_id: str,
    body_length: int,
) -> bytes:
    """The request head that goes to the bot: the client's fields but those never forwarded,
    then ``X-Daily-Session-Id``, the body's length and ``Connection: close`` (one request per
    connection)."""
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}"]
    lines += [f"{name}: {value}" for name, value in forward_fields(headers)]
    lines.append(f"X-Daily-Session-Id: {session_id}")
    if body_length or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {body_length}")
    lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def answer_framing(head: bytes, head_only: bool) -> tuple[int, int | None]:
    """The status of a bot's answer ``head`` and the length of the body behind it: 0 for a
    ``HEAD`` request, 1xx, 204 and 304; its ``Content-Length``; None when it runs to the
    connection's end (chunked, or no length: the bot closes, as asked). Raises ``ValueError``
    for an answer that is not HTTP/1.x or a bad length."""
    lines = head.decode("latin-1").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    code = rest[:3]
    if not version.startswith("HTTP/1.") or not (code.isascii() and code.isdigit()):
        raise ValueError("not an HTTP/1.x answer")
    status = int(code)
    if head_only or status < 200 or status in (204, 304):
        return status, 0
    fields = [line.partition(":") for line in lines[1:] if line]
    if any(name.strip().lower() == "transfer-encoding" for name, _, _ in fields):
        return status, None
    lengths = {
        value.strip() for name, _, value in fields if name.strip().lower() == "content-length"
    }
    if not lengths:
        return status, None
    if len(lengths) > 1:
        raise ValueError("conflicting Content-Length")
    (text,) = lengths
    if not (text.isascii() and text.isdigit()) or len(text) > 15:
        raise ValueError("bad Content-Length")
    return status, int(text)


def page(sessions: Iterable[JSON], limit: int, after: str | None) -> JSON:
    """One page of the list: ``{"sessions": [...], "next": <sessionId> | null}``, ordered by
    ``sessionId``; ``next`` is the ``after`` of the following page (null on the last). Ordering
    by id keeps pages stable while sessions come and go: a session that ended is simply not
    there, and ``after`` need not be live."""
    ordered = sorted(
        (s for s in sessions if after is None or s["sessionId"] > after),
        key=lambda s: str(s["sessionId"]),
    )
    shown = ordered[:limit]
    more = len(ordered) > limit
    return {"sessions": shown, "next": shown[-1]["sessionId"] if more else None}


def merge_pages(pages: Sequence[JSON], limit: int, after: str | None) -> JSON:
    """One page of the list from the same page (``limit``, ``after``) of each gateway: the
    first ``limit`` by ``sessionId`` of them all. Each gateway's page holds its first ``limit``
    after ``after``, so the merged page is the one a single gateway holding every session would
    give, and its ``next`` pages on the same way across gateways. ``next`` is null only when no
    gateway has more."""
    document = page([s for one in pages for s in one["sessions"]], limit, after)
    shown = document["sessions"]
    if document["next"] is None and shown and any(one["next"] is not None for one in pages):
        document["next"] = shown[-1]["sessionId"]
    return document


def hop_page(payload: bytes) -> JSON:
    """The page another gateway answered to a list forwarded to it (:func:`page`'s shape),
    checked; ``ValueError`` for anything else."""
    document = json.loads(payload)
    sessions = document.get("sessions") if isinstance(document, dict) else None
    following = document.get("next") if isinstance(document, dict) else None
    if not isinstance(sessions, list) or not (following is None or isinstance(following, str)):
        raise ValueError("not a page of sessions")
    for entry in sessions:
        if not (isinstance(entry, dict) and isinstance(entry.get("sessionId"), str)):
            raise ValueError("a session without a sessionId")
    return {"sessions": sessions, "next": following}


def _key_orgs(
    headers: Sequence[tuple[str, str]], keys: SessionKeys, *, private: bool
) -> list[str] | Refusal:
    """The organisations of the request's Bearer key, which must be of the kind wanted: a
    private key for session control, a public one for the Session API (401 missing or
    unknown, 403 the other kind)."""
    key = bearer(headers)
    if key is None:
        prefix = "sk" if private else "pk"
        kind = "private" if private else "public"
        return refusal(401, f"Missing {kind} API key (Authorization: Bearer {prefix}_...)")
    if private and keys.public_orgs(key):
        return refusal(403, "A public key cannot control sessions: use a private key")
    if not private and keys.private_orgs(key):
        return refusal(403, "A private key cannot call the Session API: use a public key")
    orgs = keys.private_orgs(key) if private else keys.public_orgs(key)
    return orgs or refusal(401, f"Invalid {'private' if private else 'public'} API key")


def _agent(name: str, orgs: Sequence[str], agents: Mapping[str, AgentConfig]) -> AgentConfig | None:
    return next((agents[h] for org in orgs if (h := f"{name}.{org}") in agents), None)
