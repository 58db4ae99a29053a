"""The ``/start`` service (SPEC §5), Sans-I/O: a request's parts in, a status and JSON out.

``POST /v1/public/{agent}/start`` with ``Authorization: Bearer pk_…`` and
``{"transport": "websocket", "body": {…}}``. Checks, in order; the first failure is the answer:

| check | failure |
| --- | --- |
| path is ``/v1/public/{agent}/start`` | 404 ``Not found`` |
| method POST | 405 |
| request body at most :data:`MAX_REQUEST_BYTES` | 413 |
| a public key that one organisation lists (constant-time compare against every key) | 401 |
| that key under ``start_rate_per_key`` (off by default) | 429 |
| ``{agent}.{org}`` is an agent, for an organisation of that key | 404 ``Service not found`` |
| request is a JSON object with ``"transport": "websocket"`` | 400 |
| its ``body`` passes the upgrade's own check (``_core.check_body_json``) | 413 or 400 |
| no ``body`` for an agent with ``websocket_auth = "none"`` | 400 |
| the agent can take another session (``capacity_check``) | 429 |

The URL names the agent only; the key names the organisation. A valid key of an organisation
without that agent gets 404, so a key reveals nothing about other organisations' agents.

A token minted here binds the request's ``body`` (or binds no body): the upgrade refuses it with
any other ``?body=`` (403), so a backend that calls ``/start`` with its caller's identity can trust
what its bot receives. The ``body`` answered here, appended as ``?body=``, always matches.

The bot's session id is derived from the token's nonce (:func:`wsgate.tokens.session_id_for`),
so the ``sessionId`` answered here is the ``X-Daily-Session-Id`` that the bot receives. A ``none``
agent's session takes no token, so nothing ties its later session to this answer: the
``sessionId`` is informational there.
"""

from __future__ import annotations

import hmac
import json
import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from . import _core
from .body import encode_body
from .config import AgentConfig, OrgConfig
from .errors import HttpError
from .names import NAME
from .request import bearer
from .responses import json_response
from .routing import body_error
from .tokens import TokenAuthority

__all__ = [
    "MAX_REQUEST_BYTES",
    "START_PATH",
    "StartAnswer",
    "answer_start",
    "encode_body",
    "is_start_path",
    "render_response",
    "request_body_length",
]

#: Largest ``/start`` request body read; over it, 413 and the connection is cut off.
MAX_REQUEST_BYTES = 64 * 1024
#: ``/v1/public/{agent}/start``.
START_PATH = re.compile(rf"/v1/public/({NAME.pattern})/start")
_START_PREFIX = "/v1/public/"

JSON = dict[str, Any]
CapacityCheck = Callable[[AgentConfig], bool]


def is_start_path(path: str) -> bool:
    """Whether the server should hand this request path to :func:`answer_start`.

    True for anything under ``/v1/public/``, so that a malformed agent name is answered 404
    in this service's JSON format.
    """
    return path.startswith(_START_PREFIX)


@dataclass(frozen=True)
class StartAnswer:
    """A ``/start`` answer: its status and JSON document, and the agent it was for once the
    request got that far (None when refused before: path, method, size, key or its rate)."""

    status: int
    document: JSON
    agent: AgentConfig | None = None


def answer_start(
    method: str,
    path: str,
    headers: Sequence[tuple[str, str]],
    body: bytes,
    agents: Mapping[str, AgentConfig],
    orgs: Sequence[OrgConfig],
    authority: TokenAuthority | None,
    capacity_check: CapacityCheck,
    *,
    public_url: str,
    key_rate_check: Callable[[str], bool] | None = None,
) -> StartAnswer:
    """Answer one ``/start`` request: its status, its JSON document, and the agent it was for
    (the gateway's metrics), or None when none was named by a valid key.

    ``headers``: ``(lower-cased name, value)`` pairs (``Request.headers``). ``agents``: by
    service host (``Config.agents_by_host()``). ``authority`` mints tokens; it may be None only
    when no agent uses token auth. ``capacity_check(agent)``: True if the agent can take
    another session. ``public_url``: the gateway's public ``ws(s)://`` base.
    ``key_rate_check(key)``: False when that (valid) key is over its request rate (429).
    """
    match = START_PATH.fullmatch(path)
    if match is None:
        return StartAnswer(*_error(404, "Not found"))
    if method != "POST":
        return StartAnswer(*_error(405, "Method not allowed: use POST"))
    if len(body) > MAX_REQUEST_BYTES:
        return StartAnswer(*_error(413, "Request too large"))
    key = bearer(headers)
    if key is None:
        return StartAnswer(*_error(401, "Missing public API key (Authorization: Bearer pk_...)"))
    key_orgs = _orgs_of_key(key, orgs)
    if not key_orgs:
        return StartAnswer(*_error(401, "Invalid public API key"))
    if key_rate_check is not None and not key_rate_check(key):
        return StartAnswer(*_error(429, "Too many requests for this key"))
    agent = next(
        (agents[host] for org in key_orgs if (host := f"{match.group(1)}.{org}") in agents),
        None,
    )
    if agent is None:
        return StartAnswer(*_error(404, "Service not found"))
    return StartAnswer(*_for_agent(agent, body, authority, capacity_check, public_url), agent)


def _for_agent(
    agent: AgentConfig,
    body: bytes,
    authority: TokenAuthority | None,
    capacity_check: CapacityCheck,
    public_url: str,
) -> tuple[int, JSON]:
    """The checks and the answer of a request for a known agent, by a valid key."""
    try:
        request = json.loads(body, parse_constant=_refuse_constant)
    except (ValueError, RecursionError):
        return _error(400, "Request body must be JSON")
    if not isinstance(request, dict):
        return _error(400, "Request body must be a JSON object")
    if request.get("transport") != "websocket":
        return _error(400, 'transport must be "websocket" (other transports are not served)')
    session_body = request.get("body")
    document: bytes | None = None
    encoded: str | None = None
    if session_body is not None:
        try:
            document, encoded = encode_body(session_body)
        except (ValueError, RecursionError):
            return _error(400, "body must be JSON")
        try:
            # The very check the upgrade applies to ?body=, so a token is never minted for a
            # body that its session would then refuse.
            _core.check_body_json(document)
        except _core.BodyError as exc:
            refused = body_error(exc)
            return _error(refused.status, refused.reason)
        if agent.websocket_auth == "none":
            return _error(
                400, "body is not taken for an agent without token auth: send it as ?body="
            )
    if not capacity_check(agent):
        return _error(429, "Agent at capacity")
    ws_url = f"{public_url.rstrip('/')}/ws/generic/{agent.service_host}"
    if agent.websocket_auth == "none":
        return 200, {"wsUrl": ws_url, "sessionId": str(uuid.uuid4())}
    if authority is None:
        raise RuntimeError(f"agent {agent.service_host} uses token auth but no authority is set")
    # The token binds the body: its holder cannot open the session with another one.
    minted = authority.mint(agent.service_host, document)
    answer: JSON = {"token": minted.token, "wsUrl": ws_url, "sessionId": minted.session_id}
    if encoded is not None:
        answer["body"] = encoded
    return 200, answer


def request_body_length(headers: Sequence[tuple[str, str]]) -> int:
    """The length of a ``/start`` request's body from its framing headers, or ``HttpError``:
    411 for ``Transfer-Encoding`` (send Content-Length), 400 for a Content-Length that is not
    ``1*DIGIT`` (RFC 9110 §8.6: no sign, no ``_``, no spaces inside) or differs between
    repeats, 413 over :data:`MAX_REQUEST_BYTES`. No Content-Length: an empty body."""
    if any(name == "transfer-encoding" for name, _ in headers):
        raise HttpError(411, "send Content-Length")
    values = {value.strip() for name, value in headers if name == "content-length"}
    if not values:
        return 0
    if len(values) > 1:
        raise HttpError(400, "bad Content-Length")
    (text,) = values
    if not (text.isascii() and text.isdigit()):
        raise HttpError(400, "bad Content-Length")
    # Judged by its digits before int(): a 10,000-digit length costs nothing to refuse.
    if len(text.lstrip("0")) > len(str(MAX_REQUEST_BYTES)) or int(text) > MAX_REQUEST_BYTES:
        raise HttpError(413, "Request too large")
    return int(text)


#: ``/start``'s HTTP response for :func:`answer_start`'s answer.
render_response = json_response


def _error(status: int, reason: str) -> tuple[int, JSON]:
    return status, {"error": reason, "code": str(status)}


def _orgs_of_key(key: str, orgs: Sequence[OrgConfig]) -> list[str]:
    """The organisations listing ``key``. Every key is compared, in constant time each, so the
    time taken depends on neither where nor whether the key matched."""
    given = key.encode("utf-8", "surrogateescape")
    matched: list[str] = []
    for org in orgs:
        found = False
        for candidate in org.public_keys:
            found |= hmac.compare_digest(given, candidate.encode())
        if found:
            matched.append(org.name)
    return matched


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")
