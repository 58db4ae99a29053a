"""The checks of SPEC §2 that need nothing but the request: path, upgrade, service host, agent,
token and body, in that order. Pure functions; the first failing check raises its ``HttpError``.

Endpoints: ``/ws/generic[/{host}[/{token}]]``, and the provider endpoints of SPEC §6b,
``/ws/{telnyx,plivo,exotel}[/{token}]?serviceHost=`` (routed exactly like the generic one) and
``/ws/twilio[/{token}]``, whose service host only arrives in the stream's ``start`` message:
:func:`precheck` judges its request before the upgrade, and :func:`route` is called with
``opening_host`` once the opening is read.

Capacity (503) and the bot's own upgrade (502) need live state and I/O, so the server applies
them after :func:`route` succeeds. Nothing here starts a bot.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from urllib.parse import unquote

from . import _core
from .config import AgentConfig
from .errors import HttpError
from .names import is_service_host
from .providers import provider_of_path
from .request import Request, is_token, split_list
from .tokens import check_body

__all__ = [
    "GENERIC_PATH",
    "Route",
    "TokenCheck",
    "Upgrade",
    "body_error",
    "check_upgrade",
    "named_agent",
    "no_token_auth_yet",
    "precheck",
    "route",
]

GENERIC_PATH = "/ws/generic"


@dataclass(frozen=True)
class Route:
    """A request that passed every pure check: where it goes and what it carries."""

    service_host: str
    agent: AgentConfig
    #: The client's body JSON document, or None without ``?body=``. Never logged.
    body_json: str | None = field(repr=False)
    #: The same body as the bot's ``?body=`` value (standard base64, percent-encoded).
    upstream_body: str | None = field(repr=False)
    #: Sec-WebSocket-Protocol values the client offered, in order.
    subprotocols: tuple[str, ...]
    #: The client's Sec-WebSocket-Key, needed for its 101 answer.
    client_key: str
    #: A trailing ``/ws/generic/{host}/{token}`` path segment, if the client sent one.
    path_token: str | None = field(default=None, repr=False)
    #: For a ``token`` agent: the claims of its token, checked (body binding included) but not
    #: yet used up; the server claims it once capacity allows. None for a ``none`` agent.
    token: _core.TokenClaims | None = field(default=None, repr=False)
    #: ``"generic"``, or the telephony provider whose endpoint was used.
    provider: str = "generic"


#: Called after the agent is known: raises ``HttpError(403, ...)`` to refuse the request, and
#: returns the token's claims for a ``token`` agent (None for a ``none`` agent).
#: Arguments: the request, the path's token segment (if any), the agent.
TokenCheck = Callable[[Request, str | None, AgentConfig], "_core.TokenClaims | None"]


def no_token_auth_yet(
    request: Request, path_token: str | None, agent: AgentConfig
) -> _core.TokenClaims | None:
    """The token check of a gateway without a token authority: ``none`` agents pass,
    ``token`` agents never (a gateway builds an authority whenever an agent uses tokens, so this
    only guards routing used on its own). The real check is
    :meth:`wsgate.tokens.TokenAuthority.check_request`.
    """
    if agent.websocket_auth != "none":
        raise HttpError(403, "token auth not available yet")
    return None


@dataclass(frozen=True)
class Upgrade:
    """What the request line and headers of an upgrade say, before any service is looked up."""

    #: ``"generic"`` or a provider of :data:`wsgate.providers.PROVIDERS`.
    provider: str
    client_key: str
    subprotocols: tuple[str, ...]
    path_host: str | None
    path_token: str | None = field(repr=False)


def precheck(request: Request) -> Upgrade:
    """The checks that need no service host: path (404) and upgrade (400); for ``/ws/twilio``
    also its query, whose ``serviceHost`` Twilio cannot send (400) and ``body`` (400/413), so
    that everything judged from the request is answered before the upgrade."""
    provider, path_host, path_token = _match_path(request.path)
    client_key, subprotocols = check_upgrade(request)
    if provider == "twilio":
        params = request.query_params()
        if any(name == "serviceHost" for name, _ in params):
            raise HttpError(400, "serviceHost is not taken on /ws/twilio: send it in the start "
                            "message's customParameters._pipecatCloudServiceHost")  # fmt: skip
        _body(params)
    return Upgrade(provider, client_key, subprotocols, path_host, path_token)


def route(
    request: Request,
    agents: Mapping[str, AgentConfig],
    check_token: TokenCheck = no_token_auth_yet,
    *,
    opening_host: str | None = None,
) -> Route:
    """Apply SPEC §2's pure checks in order; ``agents`` maps service hosts to agents.
    ``opening_host``: for ``/ws/twilio``, the service host its ``start`` message named (None
    when it named none: 400).

    Raises ``HttpError``: 404 (path, unknown agent), 400 (upgrade, service host, body),
    403 (token, via ``check_token``; then a body the token does not bind), 413 (body over the
    size cap).
    """
    upgrade = precheck(request)
    path_token = upgrade.path_token
    params = request.query_params()
    if upgrade.provider == "twilio":
        service_host = _checked_host(opening_host, "twilio")
    else:
        service_host = _service_host(upgrade.path_host, params, upgrade.provider)
    agent = agents.get(service_host)
    if agent is None:
        raise HttpError(404, f"unknown service host {service_host}")
    claims = check_token(request, path_token, agent)
    body_json, upstream_body = _body(params)
    if claims is not None:
        check_body(claims, None if body_json is None else body_json.encode())
    return Route(
        service_host=service_host,
        agent=agent,
        body_json=body_json,
        upstream_body=upstream_body,
        subprotocols=upgrade.subprotocols,
        client_key=upgrade.client_key,
        path_token=path_token,
        token=claims,
        provider=upgrade.provider,
    )


def named_agent(
    request: Request, agents: Mapping[str, AgentConfig], opening_host: str | None = None
) -> str | None:
    """The service host of ``agents`` that a request names (for ``/ws/twilio``: that its
    opening named), or None: a metrics label, never a name the client made up. Judges nothing
    else (a refused request may name a known agent)."""
    try:
        provider, path_host, _ = _match_path(request.path)
        if provider == "twilio":
            host = _checked_host(opening_host, provider)
        else:
            host = _service_host(path_host, request.query_params(), provider)
    except HttpError:
        return None
    return host if host in agents else None


def _match_path(path: str) -> tuple[str, str | None, str | None]:
    """``/ws/generic[/{host}[/{token}]]`` -> ("generic", host, token); ``/ws/{provider}
    [/{token}]`` -> (provider, None, token); anything else is 404."""
    provider = provider_of_path(path)
    if provider is not None:
        return provider[0], None, provider[1]
    if path == GENERIC_PATH:
        return "generic", None, None
    if not path.startswith(GENERIC_PATH + "/"):
        raise HttpError(404, "not found")
    segments = path[len(GENERIC_PATH) + 1 :].split("/")
    if len(segments) > 2 or not all(segments):
        raise HttpError(404, "not found")
    try:
        decoded = [unquote(segment, errors="strict") for segment in segments]
    except UnicodeDecodeError:
        raise HttpError(404, "not found") from None
    return "generic", decoded[0], decoded[1] if len(decoded) == 2 else None


def check_upgrade(request: Request) -> tuple[str, tuple[str, ...]]:
    """RFC 6455 §4.2.1: returns the client's key and offered subprotocols, or raises 400."""
    if request.method != "GET":
        raise HttpError(400, "method must be GET for a WebSocket upgrade")
    if request.version != "HTTP/1.1":
        raise HttpError(400, "a WebSocket upgrade needs HTTP/1.1")
    if len(request.headers_all("host")) != 1:
        raise HttpError(400, "exactly one Host header is required")
    # Bytes after the head are WebSocket frames: an HTTP body there would be misread as frames.
    has_body = request.headers_all("content-length") not in ([], ["0"])
    if has_body or request.headers_all("transfer-encoding"):
        raise HttpError(400, "an upgrade request must not have a body")
    upgrade = [v.lower() for v in split_list(request.headers_all("upgrade"))]
    if "websocket" not in upgrade:
        raise HttpError(400, "not a WebSocket upgrade (Upgrade: websocket missing)")
    connection = [v.lower() for v in split_list(request.headers_all("connection"))]
    if "upgrade" not in connection:
        raise HttpError(400, "not a WebSocket upgrade (Connection: upgrade missing)")
    if request.headers_all("sec-websocket-version") != ["13"]:
        raise HttpError(400, "Sec-WebSocket-Version must be 13")
    keys = request.headers_all("sec-websocket-key")
    if len(keys) != 1 or not _valid_key(keys[0]):
        raise HttpError(400, "Sec-WebSocket-Key must be base64 of 16 bytes")
    subprotocols = split_list(request.headers_all("sec-websocket-protocol"))
    if not all(is_token(p) for p in subprotocols):
        raise HttpError(400, "malformed Sec-WebSocket-Protocol")
    return keys[0], tuple(subprotocols)


def _valid_key(key: str) -> bool:
    try:
        return len(base64.b64decode(key, validate=True)) == 16
    except (binascii.Error, ValueError):
        return False


def _service_host(path_host: str | None, params: list[tuple[str, str]], provider: str) -> str:
    query_hosts = [value for name, value in params if name == "serviceHost"]
    if len(query_hosts) > 1:
        raise HttpError(400, "serviceHost given more than once")
    if path_host is not None and query_hosts:
        raise HttpError(400, "service host given both in the path and as serviceHost")
    if path_host is not None:
        host = path_host
    elif query_hosts:
        try:
            host = unquote(query_hosts[0], errors="strict")
        except UnicodeDecodeError:
            raise HttpError(400, "malformed service host") from None
    elif provider == "generic":
        raise HttpError(400, "missing service host (/ws/generic/{agent}.{org} or ?serviceHost=)")
    else:
        raise HttpError(400, f"missing service host (/ws/{provider}?serviceHost={{agent}}.{{org}})")
    return _checked_host(host, provider)


def _checked_host(host: str | None, provider: str) -> str:
    if host is None:
        # Only Twilio gets here without a host: its start message named none.
        raise HttpError(400, "missing service host (customParameters._pipecatCloudServiceHost)")
    if not is_service_host(host):
        raise HttpError(400, "malformed service host (expected {agent}.{org})")
    return host


def _body(params: list[tuple[str, str]]) -> tuple[str | None, str | None]:
    bodies = [value for name, value in params if name == "body"]
    if not bodies:
        return None, None
    if len(bodies) > 1:
        raise HttpError(400, "body given more than once")
    try:
        return _core.decode_body(bodies[0])
    except _core.BodyError as exc:
        raise body_error(exc) from None


def body_error(exc: _core.BodyError) -> HttpError:
    """The answer to a body the core refused (SPEC §4): 413 when it is too large, else 400. The
    one place a ``_core.BodyError`` becomes a status; ``/start`` answers with it too."""
    return HttpError(413 if exc.kind == "too_large" else 400, exc.reason)
