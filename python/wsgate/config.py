"""Settings: frozen dataclasses, built in Python or loaded from a TOML file.

Every check lives in the dataclasses' ``__post_init__``, so a ``Config`` built in code is held to
the same rules as one loaded from a file; :func:`load_config` only adds the file's name and the
table's position to the message of a :class:`~wsgate.errors.ConfigError`.

File layout::

    [gateway]            # GatewaySettings, every key optional
    [[org]]              # OrgConfig, one table per organisation
    [[agent]]            # AgentConfig, one table per agent
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from . import _core
from .errors import ConfigError
from .names import check_name
from .redis_store import REDIS_SCHEMES, parse_redis_url
from .urls import UpstreamURL, parse_http_url, parse_upstream_url

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "FORWARD_SECRET_ENV",
    "INTERNAL_URL_ENV",
    "AgentConfig",
    "Config",
    "GatewaySettings",
    "OrgConfig",
    "default_config",
    "forward_secret",
    "internal_url",
    "load_config",
    "loads_config",
]

#: In-process bots: bytes of client messages delivered and not yet taken by the bot past which
#: the gateway stops reading that client.
DEFAULT_INBOX_LIMIT = 1024 * 1024
#: Bytes queued for a client past which a bot's send waits for them to drain to half.
DEFAULT_SEND_BUFFER_LIMIT = 1024 * 1024
#: Seconds a bot may run on after its client left before it is cancelled.
DEFAULT_BOT_GRACE_PERIOD = 5.0
#: An in-process bot: an async callable taking a :class:`wsgate.BotArguments`.
BotFunction = Callable[[Any], Awaitable[Any]]
#: An ASGI application (scope, receive, send): an in-process bot's Session API.
SessionApp = Callable[[Any, Any, Any], Awaitable[None]]
# "package.module:function" (the attribute may be dotted), as uvicorn names an app.
# A forward secret travels in a header: visible ASCII only (a newline would end the field).
_FORWARD_SECRET = re.compile(r"[\x21-\x7e]{16,}")
_BOT_SPEC = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
BUILTINS = frozenset({"echo"})
WebsocketAuth = Literal["none", "token"]
LogFormat = Literal["text", "json"]
_T = TypeVar("_T")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)  # type: ignore[arg-type]


def _check_store_url(name: str, url: str) -> None:
    # The message never holds the URL: it may carry a password.
    if url.partition(":")[0] not in REDIS_SCHEMES:
        memory = "'memory' or " if name == "replay_store" else ""
        raise ConfigError(
            f"{name} must be {memory}a redis:// URL (or rediss://, redis+sentinel://)"
        )
    try:
        parse_redis_url(url)
    except ValueError as exc:
        raise ConfigError(f"{name}: {exc}") from None


@dataclass(frozen=True)
class GatewaySettings:
    """The ``[gateway]`` table: where to listen and the limits of every session."""

    host: str = "127.0.0.1"
    #: 0 picks a free port; :attr:`wsgate.Gateway.port` tells which.
    port: int = 8765
    #: Base of the ``wsUrl`` that ``/start`` returns, as clients reach this gateway (e.g.
    #: ``wss://gw.example.com`` behind a TLS load balancer). Unset: the listening address.
    public_url: str | None = None
    region: str = "local"
    #: Largest WebSocket message (all fragments), in bytes; over it the sender gets 1009.
    max_message_size: int = _core.DEFAULT_MAX_MESSAGE_SIZE
    #: Seconds a client has to send its whole upgrade request.
    handshake_timeout: float = 10.0
    #: Seconds to connect to the bot and get its 101 (502 refused or a bad answer, 504 timed
    #: out). For a pool (``upstream`` a list), one budget for every member tried.
    dial_timeout: float = 5.0
    #: Seconds the Session API waits for the bot's answer once connected (502 unreachable,
    #: 504 no answer in time); connecting takes ``dial_timeout``.
    session_api_timeout: float = 30.0
    #: Seconds a pool member whose dial failed is left out of new sessions (unless every
    #: member is out). 0: never left out.
    upstream_retry_after: float = 10.0
    #: Seconds that sessions may run on after a stop before they are closed with 1001.
    drain_timeout: float = 30.0
    #: Seconds a session may last (SPEC §6: 60-14400); then both sides get 1000. (Tests and
    #: embedders may go below the range with ``Gateway(..., session_time_limit=...)``.)
    max_session_duration: float = 7200.0
    #: Relay threads of the Rust engine; 0: ``$WSGATE_RELAY_THREADS`` if set, else half the
    #: CPUs (at least one; the figures are in benches/README.md, "Relay threads").
    relay_threads: int = 0
    #: Sessions of the plainest agents opened by the Rust engine, without a turn of Python's
    #: event loop per step: ``none`` auth (or ``token`` with the memory replay store), one
    #: ``ws://`` bot at an IP address, on a gateway without ``authorize``, a capacity store or
    #: per-client limits (:mod:`wsgate.fastpath`); with TLS on the listener, the engine does
    #: the handshakes too, and on the provider endpoints it reads the opening (Twilio's names
    #: the agent).
    #: Same checks, answers, logs and metrics. False: every request goes through Python.
    engine_opens: bool = True
    #: TCP connections held at once (upgrading, or sessions); past it the gateway stops
    #: accepting until one ends and new ones wait in the kernel's backlog. Each session holds
    #: two descriptors (client and bot): raise the process's open-files limit to match.
    max_connections: int = 10000
    #: Connections still sending their request (head, ``/start`` body, a Twilio opening) at
    #: once; a new one past it evicts the oldest, so slow or idle connections (slowloris)
    #: cannot crowd out real clients, which send their request in one round trip. None younger
    #: than a second is evicted for it (``admission.EVICT_AFTER``: in a burst of clients
    #: connecting at once their requests may be on their way, or unread yet), so more may wait
    #: for that second, as many as ``max_connections`` allows; once the gateway is full, each
    #: connection waiting for room evicts the oldest once it has had that second. A connection
    #: past its request (bot being dialled, token claimed) is never evicted.
    max_pending_upgrades: int = 1000
    #: Requests per second (upgrades and ``/start``) from one client address (an IPv6 /64), in
    #: bursts of as many; over it, 429. 0: off (the default: telephony providers connect from
    #: few addresses, so a per-address limit would throttle a provider, not an attacker).
    client_request_rate: float = 0
    #: Sessions at once from one client address (an IPv6 /64); over it, 429. 0: off.
    client_max_sessions: int = 0
    #: ``/start`` requests per second with one public key, in bursts of as many; over it, 429.
    #: 0: off.
    start_rate_per_key: float = 0
    #: In-process bots: bytes of client messages delivered and not yet taken by the bot past
    #: which the gateway stops reading that client (TCP backpressure).
    inbox_limit: int = DEFAULT_INBOX_LIMIT
    #: In-process bots: bytes queued for a client past which the bot's sends wait.
    send_buffer_limit: int = DEFAULT_SEND_BUFFER_LIMIT
    #: In-process bots: seconds a bot may run on after its client left before it is cancelled.
    bot_grace_period: float = DEFAULT_BOT_GRACE_PERIOD
    #: Seconds within which a peer that vanished without a FIN (power cut, NAT timeout) is
    #: detected, by TCP keepalive and ``TCP_USER_TIMEOUT``; the other side then gets 1011/1001.
    #: (No keepalive towards a bot on a loopback address, whose probes our own kernel answers;
    #: ``TCP_USER_TIMEOUT`` still ends a connection whose sent data waits that long.)
    dead_peer_timeout: float = 60.0
    #: Token signing secrets (the first signs, all verify). Only one source: this list,
    #: ``secrets_file``, or the ``WSGATE_SECRETS`` environment variable. Never in a repr.
    secrets: Sequence[str] | None = field(default=None, repr=False)
    #: A file with one secret per line (e.g. a mounted Kubernetes secret).
    secrets_file: str | None = None
    #: Seconds a token minted by ``/start`` stays valid (SPEC §3: 300).
    token_ttl: int = _core.TOKEN_TTL_SECONDS
    #: Where spent token nonces are kept: ``"memory"`` (this process) or a ``redis://`` URL
    #: (shared by several gateways). May hold a password: never in a repr or a log.
    replay_store: str = field(default="memory", repr=False)
    #: TLS on the listener (``wss://`` and ``https://``): a PEM certificate chain, leaf first,
    #: sent as given, and its PEM private key (RSA, ECDSA or Ed25519). Both or neither.
    tls_cert: str | None = None
    tls_key: str | None = None
    #: PEM roots that ``wss://`` bots' certificates must chain to (a private CA); unset: the
    #: system's roots. An agent may set its own.
    upstream_ca_file: str | None = None
    #: Where sessions are counted against ``max_sessions`` across gateways: a store URL
    #: (``redis://``, ``rediss://``, ``redis+sentinel://``) shared by every gateway, or None
    #: (the default): each gateway counts its own. May hold a password: never in a repr.
    capacity_store: str | None = field(default=None, repr=False)
    #: Seconds a session's lease in the capacity store lives unless renewed (every third of
    #: it): how long a gateway that died still counts.
    lease_ttl: float = 30.0
    #: Where the other gateways sharing ``capacity_store`` reach this one (``http://host:port``
    #: or ``https://``) to stop or call a session it holds. Unset: the listening address.
    internal_url: str | None = None
    #: The secret every gateway of a ``capacity_store`` shares to forward session control and
    #: Session API requests to the gateway holding the session (at least 16 characters; or
    #: ``$WSGATE_FORWARD_SECRET``). Unset: no forwarding. Never in a repr or a log.
    forward_secret: str | None = field(default=None, repr=False)
    #: Prometheus metrics at ``GET /metrics`` (docs/OPERATIONS.md). False: 404, and the relay
    #: engine counts nothing.
    metrics: bool = True
    #: A separate plain-HTTP listener for ``/metrics``, ``/livez`` and ``/readyz`` (0: any free
    #: port); ``/metrics`` then leaves the gateway's own port. It stays open while the gateway
    #: drains, so ``/readyz`` answers 503 there. Unset: no such listener.
    metrics_port: int | None = None
    #: Where that listener binds: loopback by default, so the metrics need not be public.
    metrics_host: str = "127.0.0.1"
    #: ``wsgate serve``'s log lines: ``"text"``, or ``"json"`` (one object per line; see
    #: :mod:`wsgate.logs`).
    log_format: LogFormat = "text"

    def __post_init__(self) -> None:
        for name in ("host", "region", "metrics_host"):
            if not isinstance(getattr(self, name), str):
                raise ConfigError(f"{name} must be a string")
        if self.public_url is not None and not isinstance(self.public_url, str):
            raise ConfigError("public_url must be a string")
        if not self.region:
            raise ConfigError("region must not be empty")
        if self.public_url is not None and not self.public_url.startswith(("ws://", "wss://")):
            raise ConfigError(f"public_url {self.public_url!r} must start with ws:// or wss://")
        for name, low in (
            ("port", 0),
            ("max_message_size", 1),
            ("relay_threads", 0),
            ("inbox_limit", 1),
            ("send_buffer_limit", 1),
            ("max_connections", 1),
            ("max_pending_upgrades", 1),
            ("client_max_sessions", 0),
        ):
            value = getattr(self, name)
            if not _is_int(value) or value < low:
                raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
        if self.port > 65535:
            raise ConfigError(f"port must be at most 65535, got {self.port}")
        for name in ("metrics", "engine_opens"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        port = self.metrics_port
        if port is not None and (not _is_int(port) or not 0 <= port <= 65535):
            raise ConfigError(f"metrics_port must be an integer of 0 to 65535, got {port!r}")
        if self.log_format not in ("text", "json"):
            raise ConfigError(f"log_format must be 'text' or 'json', got {self.log_format!r}")
        for name in ("client_request_rate", "start_rate_per_key"):
            value = getattr(self, name)
            if not _is_number(value) or value < 0:
                raise ConfigError(f"{name} must be a number >= 0 (0: off), got {value!r}")
        timeouts = ("handshake_timeout", "dial_timeout", "drain_timeout", "bot_grace_period")
        for name in (*timeouts, "session_api_timeout"):
            value = getattr(self, name)
            if not _is_number(value) or value <= 0:
                raise ConfigError(f"{name} must be a number of seconds > 0, got {value!r}")
        if not _is_number(self.upstream_retry_after) or self.upstream_retry_after < 0:
            raise ConfigError(
                "upstream_retry_after must be a number of seconds >= 0, "
                f"got {self.upstream_retry_after!r}"
            )
        if not _is_number(self.dead_peer_timeout) or self.dead_peer_timeout < 1:
            raise ConfigError(
                f"dead_peer_timeout must be at least 1 second, got {self.dead_peer_timeout!r}"
            )
        if not _is_int(self.token_ttl) or not 1 <= self.token_ttl <= 86400:
            raise ConfigError(f"token_ttl must be 1 to 86400 seconds, got {self.token_ttl!r}")
        if not isinstance(self.replay_store, str):
            raise ConfigError("replay_store must be 'memory' or a redis:// URL")
        if self.replay_store != "memory":
            _check_store_url("replay_store", self.replay_store)
        if self.capacity_store is not None:
            if not isinstance(self.capacity_store, str):
                raise ConfigError("capacity_store must be a redis:// URL")
            _check_store_url("capacity_store", self.capacity_store)
        if self.internal_url is not None:
            _parse_http("internal_url", self.internal_url)
        if self.forward_secret is not None:
            _check_forward_secret("forward_secret", self.forward_secret)
        if not _is_number(self.lease_ttl) or self.lease_ttl < 1:
            raise ConfigError(f"lease_ttl must be at least 1 second, got {self.lease_ttl!r}")
        if self.secrets is not None:
            if isinstance(self.secrets, str) or not isinstance(self.secrets, Sequence):
                raise ConfigError("secrets must be a list of strings")
            object.__setattr__(self, "secrets", tuple(self.secrets))
        if self.secrets_file is not None and not isinstance(self.secrets_file, str):
            raise ConfigError("secrets_file must be a string")
        for name in ("tls_cert", "tls_key", "upstream_ca_file"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise ConfigError(f"{name} must be a file path")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("tls_cert and tls_key go together: set both or neither")
        value = self.max_session_duration
        if not _is_number(value) or not 60 <= value <= 14400:
            raise ConfigError(f"max_session_duration must be 60 to 14400 seconds, got {value!r}")


@dataclass(frozen=True)
class OrgConfig:
    """An organisation: a name, the public API keys (``pk_…``) that may call its ``/start`` and
    its Session API, and the private keys (``sk_…``) that may list and stop its sessions.

    The two kinds are kept apart: a public key never lists or stops a session, a private key
    never mints a token, and no key may be both. Private keys come from one source:
    ``private_keys``, ``private_keys_file`` (one per line), or the environment variable
    ``WSGATE_PRIVATE_KEYS_<ORG>`` (the name upper-cased, ``-`` as ``_``; comma-separated), read
    when a gateway is built (:func:`wsgate.session_api.load_private_keys`)."""

    name: str
    #: Secrets: never shown in a repr or a log.
    public_keys: Sequence[str] = field(default=(), repr=False)
    #: Secrets: never shown in a repr or a log.
    private_keys: Sequence[str] | None = field(default=None, repr=False)
    #: A file with one private key per line (e.g. a mounted Kubernetes secret).
    private_keys_file: str | None = None

    def __post_init__(self) -> None:
        check_name("organisation", self.name)
        object.__setattr__(self, "public_keys", self._keys("public_keys", self.public_keys))
        if self.private_keys is not None:
            private = self._keys("private_keys", self.private_keys)
            if set(private) & set(self.public_keys):
                raise ConfigError(f"org {self.name!r}: a key is both public and private")
            object.__setattr__(self, "private_keys", private)
        if self.private_keys_file is not None and not isinstance(self.private_keys_file, str):
            raise ConfigError(f"org {self.name!r}: private_keys_file must be a string")
        if self.private_keys is not None and self.private_keys_file is not None:
            raise ConfigError(
                f"org {self.name!r}: private keys given twice (private_keys and "
                "private_keys_file); keep one"
            )

    def _keys(self, kind: str, keys: object) -> tuple[str, ...]:
        what = kind.replace("_keys", " key")
        if isinstance(keys, str) or not isinstance(keys, Sequence):
            raise ConfigError(f"org {self.name!r}: {kind} must be a list of strings")
        for key in keys:
            if not isinstance(key, str) or not key or key != key.strip():
                raise ConfigError(f"org {self.name!r}: every {what} must be a non-empty string")
        if len(set(keys)) != len(keys):
            raise ConfigError(f"org {self.name!r}: a {what} is listed twice")
        return tuple(keys)


@dataclass(frozen=True)
class AgentConfig:
    """An agent, reached as service host ``{name}.{org}``: a ``ws://`` upstream, a builtin, or an
    in-process bot."""

    name: str
    org: str
    websocket_auth: WebsocketAuth = "none"
    #: The bot's full ``ws://`` or ``wss://`` URL; the gateway dials it for each session. Or a
    #: pool: a list of such URLs, each session going to the member with the fewest live
    #: sessions (see :mod:`wsgate.pools`). A list is stored as a tuple.
    upstream: str | Sequence[str] | None = None
    #: A bot built into wsgate instead of an upstream: ``"echo"``.
    builtin: str | None = None
    #: An in-process bot: an async callable taking :class:`wsgate.BotArguments`, or its name
    #: ``"package.module:function"`` (imported when a :class:`~wsgate.Gateway` is built).
    bot: BotFunction | str | None = None
    #: Sessions this agent may have open at once (on this gateway); more get 503.
    max_sessions: int = 50
    #: An in-process bot's Session API: an ASGI app (:class:`wsgate.Routes`, FastAPI, …) or
    #: its name ``"package.module:app"``, called in-process (:mod:`wsgate.session_routes`).
    #: Unset: the bot serves no routes (404).
    session_api: SessionApp | str | None = None
    #: An upstream bot's Session API elsewhere than its WebSocket URL's origin: an
    #: ``http://`` (or ``https://``) base URL; a call to ``…/sessions/{id}/{path}`` goes to
    #: ``{session_api_upstream}/{path}``.
    session_api_upstream: str | None = None
    #: PEM roots for this agent's ``wss://`` bots, instead of the gateway's
    #: ``upstream_ca_file`` (or the system's roots).
    upstream_ca_file: str | None = None

    def __post_init__(self) -> None:
        check_name("agent", self.name)
        check_name("organisation", self.org)
        if self.websocket_auth not in ("none", "token"):
            raise ConfigError(
                f"agent {self.service_host!r}: websocket_auth must be 'none' or 'token', "
                f"got {self.websocket_auth!r}"
            )
        if sum(x is not None for x in (self.upstream, self.builtin, self.bot)) != 1:
            raise ConfigError(
                f"agent {self.service_host!r}: set exactly one of upstream, builtin or bot"
            )
        if isinstance(self.bot, str):
            if not _BOT_SPEC.fullmatch(self.bot):
                raise ConfigError(
                    f"agent {self.service_host!r}: bot {self.bot!r} must be written "
                    "'package.module:function'"
                )
        elif self.bot is not None and not callable(self.bot):
            raise ConfigError(
                f"agent {self.service_host!r}: bot must be an async callable or "
                "'package.module:function'"
            )
        if self.upstream is not None and not isinstance(self.upstream, str):
            if not isinstance(self.upstream, Sequence):
                raise ConfigError(
                    f"agent {self.service_host!r}: upstream must be a string or a list of strings"
                )
            object.__setattr__(self, "upstream", tuple(self.upstream))
        self.upstream_urls  # noqa: B018 (parses and checks every URL)
        if self.builtin is not None and self.builtin not in BUILTINS:
            raise ConfigError(
                f"agent {self.service_host!r}: unknown builtin {self.builtin!r} "
                f"(known: {', '.join(sorted(BUILTINS))})"
            )
        if self.upstream_ca_file is not None and not isinstance(self.upstream_ca_file, str):
            raise ConfigError(f"agent {self.service_host!r}: upstream_ca_file must be a file path")
        if not _is_int(self.max_sessions) or self.max_sessions < 1:
            raise ConfigError(
                f"agent {self.service_host!r}: max_sessions must be an integer >= 1, "
                f"got {self.max_sessions!r}"
            )
        self._check_session_api()

    def _check_session_api(self) -> None:
        where = f"agent {self.service_host!r}"
        app = self.session_api
        if app is not None:
            if self.bot is None:
                raise ConfigError(f"{where}: session_api is for in-process bots (bot = ...)")
            if isinstance(app, str):
                if not _BOT_SPEC.fullmatch(app):
                    raise ConfigError(
                        f"{where}: session_api {app!r} must be written 'package.module:app'"
                    )
            elif not callable(app):
                raise ConfigError(f"{where}: session_api must be an ASGI app or 'module:app'")
        if self.session_api_upstream is not None:
            if self.upstream is None:
                raise ConfigError(f"{where}: session_api_upstream is for upstream bots")
            self.session_api_url  # noqa: B018 (parses and checks it)

    @property
    def session_api_url(self) -> UpstreamURL | None:
        """``session_api_upstream`` parsed (as the ``ws://``/``wss://`` URL of the same origin
        and path: what :func:`wsgate.upstream.call_bot` takes), or None."""
        url = self.session_api_upstream
        if url is None:
            return None
        where = f"agent {self.service_host!r}: session_api_upstream"
        return _parse_http(where, url)

    @property
    def service_host(self) -> str:
        """``{agent}.{org}``: the name clients use to reach this agent."""
        return f"{self.name}.{self.org}"

    @property
    def upstream_url(self) -> UpstreamURL | None:
        """The parsed upstream URL (a pool's first member), or None for a builtin or in-process
        agent."""
        urls = self.upstream_urls
        return urls[0] if urls else None

    @functools.cached_property
    def upstream_urls(self) -> tuple[UpstreamURL, ...]:
        """Every upstream URL parsed, in order: one for a string, a pool's members for a list,
        none for a builtin or in-process agent. Parsed once (every session dials with them)."""
        upstream = self.upstream
        if upstream is None:
            return ()
        where = f"agent {self.service_host!r}: upstream"
        if isinstance(upstream, str):
            return (_parse_upstream(where, upstream),)
        if not upstream:
            raise ConfigError(f"{where} must not be an empty list")
        if not all(isinstance(url, str) for url in upstream):
            raise ConfigError(f"{where} must be a string or a list of strings")
        if len(set(upstream)) != len(upstream):
            raise ConfigError(f"{where} lists a URL twice")
        return tuple(_parse_upstream(where, url) for url in upstream)


def _parse_http(where: str, url: str) -> UpstreamURL:
    if not isinstance(url, str):
        raise ConfigError(f"{where} must be an http:// URL")
    try:
        return parse_http_url(url)
    except ValueError as exc:
        raise ConfigError(f"{where} {url!r} {exc}") from None


def _parse_upstream(where: str, url: str) -> UpstreamURL:
    try:
        return parse_upstream_url(url)
    except ValueError as exc:
        raise ConfigError(f"{where} {url!r} {exc}") from None


@dataclass(frozen=True)
class Config:
    """Everything a :class:`~wsgate.Gateway` serves. Lists are stored as tuples."""

    gateway: GatewaySettings = field(default_factory=GatewaySettings)
    orgs: Sequence[OrgConfig] = ()
    agents: Sequence[AgentConfig] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.gateway, GatewaySettings):
            raise ConfigError("gateway must be a GatewaySettings")
        object.__setattr__(self, "orgs", tuple(self.orgs))
        object.__setattr__(self, "agents", tuple(self.agents))
        org_names: set[str] = set()
        for org in self.orgs:
            if not isinstance(org, OrgConfig):
                raise ConfigError(f"orgs must hold OrgConfig objects, got {org!r}")
            if org.name in org_names:
                raise ConfigError(f"org {org.name!r} is defined twice")
            org_names.add(org.name)
        hosts: set[str] = set()
        for agent in self.agents:
            if not isinstance(agent, AgentConfig):
                raise ConfigError(f"agents must hold AgentConfig objects, got {agent!r}")
            if agent.org not in org_names:
                raise ConfigError(f"agent {agent.service_host!r}: unknown org {agent.org!r}")
            if agent.service_host in hosts:
                raise ConfigError(f"agent {agent.service_host!r} is defined twice")
            hosts.add(agent.service_host)

    def agents_by_host(self) -> dict[str, AgentConfig]:
        """The agents keyed by service host, as :func:`wsgate.routing.route` takes them."""
        return {agent.service_host: agent for agent in self.agents}

    def with_bot(
        self, service_host: str, bot: BotFunction | str, session_api: SessionApp | str | None
    ) -> Config:
        """A copy where ``service_host`` is served by the in-process ``bot`` (and its
        ``session_api``): an agent of that name keeps its other settings; otherwise the agent
        (and its organisation, if new) is added."""
        name, _, org = service_host.partition(".")
        agents, orgs = list(self.agents), list(self.orgs)
        existing = self.agents_by_host().get(service_host)
        if existing is not None:
            agent = dataclasses.replace(
                existing,
                upstream=None,
                builtin=None,
                bot=bot,
                session_api=session_api,
                session_api_upstream=None,
            )
            agents[agents.index(existing)] = agent
        else:
            agents.append(AgentConfig(name, org, bot=bot, session_api=session_api))
            if all(o.name != org for o in orgs):
                orgs.append(OrgConfig(org))
        return dataclasses.replace(self, orgs=orgs, agents=agents)

    def replace_gateway(self, **changes: Any) -> Config:
        """A copy with some ``[gateway]`` settings changed (e.g. ``port=0``), checked again."""
        return dataclasses.replace(self, gateway=dataclasses.replace(self.gateway, **changes))


#: The environment variable that gives ``forward_secret`` when the settings do not.
FORWARD_SECRET_ENV = "WSGATE_FORWARD_SECRET"


def forward_secret(
    settings: GatewaySettings, environ: Mapping[str, str] | None = None
) -> str | None:
    """The gateway's forward secret: ``forward_secret``, else ``$WSGATE_FORWARD_SECRET``, else
    None (no forwarding). Raises :class:`ConfigError` for one too short (never showing it)."""
    if settings.forward_secret is not None:
        return settings.forward_secret
    value = (os.environ if environ is None else environ).get(FORWARD_SECRET_ENV)
    if value is not None:
        _check_forward_secret(FORWARD_SECRET_ENV, value)
    return value


def _check_forward_secret(name: str, value: object) -> None:
    if not isinstance(value, str) or not _FORWARD_SECRET.fullmatch(value):
        raise ConfigError(
            f"{name} must be at least 16 characters, visible ASCII without spaces "
            "(e.g. openssl rand -hex 32)"
        )


#: The environment variable that gives ``internal_url`` when the settings do not.
INTERNAL_URL_ENV = "WSGATE_INTERNAL_URL"


def internal_url(
    settings: GatewaySettings, listening: str, environ: Mapping[str, str] | None = None
) -> str:
    """Where the other gateways of the store reach this one: ``internal_url``, else
    ``$WSGATE_INTERNAL_URL`` (one settings file for every instance, e.g. a pod's IP), else the
    ``listening`` address (``ws://…`` as ``http://…``: right on one host only)."""
    if settings.internal_url is not None:
        return settings.internal_url
    value = (os.environ if environ is None else environ).get(INTERNAL_URL_ENV)
    if value is not None:
        _parse_http(INTERNAL_URL_ENV, value)
        return value
    return listening.replace("ws", "http", 1)  # ws:// -> http://, wss:// -> https://


def default_config() -> Config:
    """The embedded default: agent ``echo.demo`` answered by the built-in echo bot."""
    return Config(orgs=[OrgConfig("demo")], agents=[AgentConfig("echo", "demo", builtin="echo")])


def load_config(path: str | Path) -> Config:
    """Read a TOML settings file; raises :class:`ConfigError` naming the file and the key."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from exc
    return loads_config(text, source=str(path))


def loads_config(text: str, *, source: str = "<config>") -> Config:
    """Parse settings from TOML text; ``source`` names it in error messages."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from exc
    try:
        return _from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def _from_dict(data: Mapping[str, Any]) -> Config:
    _check_keys("top level", data, {"gateway", "org", "agent"})
    gateway = data.get("gateway", {})
    if not isinstance(gateway, dict):
        raise ConfigError("[gateway] must be a table")
    return Config(
        gateway=_build("[gateway]", gateway, GatewaySettings),
        orgs=_build_all("org", data.get("org", []), OrgConfig),
        agents=_build_all("agent", data.get("agent", []), AgentConfig),
    )


def _build_all(kind: str, value: object, cls: type[_T]) -> list[_T]:
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise ConfigError(f"{kind} must be an array of tables ([[{kind}]])")
    return [_build(f"[[{kind}]] #{i + 1}", t, cls) for i, t in enumerate(value)]


def _build(where: str, table: dict[str, Any], cls: type[_T]) -> _T:
    """Check a table's keys and value types against the dataclass ``cls``, then build it."""
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    _check_keys(where, table, set(fields))
    missing = [name for name, f in fields.items() if _required(f) and name not in table]
    if missing:
        raise ConfigError(f"{where}: missing key {missing[0]!r}")
    for key, value in table.items():
        expected = _TYPES[cls.__name__, key]
        if not _has_type(value, expected):
            # Never echo a secret back in an error message.
            secret = key in (
                "public_keys",
                "private_keys",
                "secrets",
                "replay_store",
                "capacity_store",
                "forward_secret",
                "internal_url",
            )
            shown = "" if secret else f" {value!r}"
            raise ConfigError(
                f"{where}: {key} must be {expected}, got {type(value).__name__}{shown}"
            )
    try:
        return cls(**table)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _required(f: dataclasses.Field[Any]) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _check_keys(where: str, table: Mapping[str, Any], known: set[str]) -> None:
    unknown = sorted(set(table) - known)
    if unknown:
        raise ConfigError(
            f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(known))})"
        )


# What a settings file may give for each annotation of the dataclasses: the file's schema is
# derived from them, so a new setting needs no second declaration here (an annotation missing
# from this table fails at import, not at the first file that uses it).
_FILE_TYPES = {
    "str": "a string",
    "int": "an integer",
    "float": "a number",
    "bool": "a boolean",
    "Sequence[str]": "a list of strings",
    "str | Sequence[str]": "a string or a list of strings",
    "WebsocketAuth": "a string",
    "LogFormat": "a string",
    "BotFunction | str": "a string",  # a file names a bot; only code passes the callable
    "SessionApp | str": "a string",  # likewise an app
}


def _schema(*classes: type) -> dict[tuple[str, str], str]:
    return {
        (cls.__name__, f.name): _FILE_TYPES[str(f.type).removesuffix(" | None")]
        for cls in classes
        for f in dataclasses.fields(cls)
    }


_TYPES = _schema(GatewaySettings, OrgConfig, AgentConfig)


def _has_type(value: object, expected: str) -> bool:
    if expected == "a string":
        return isinstance(value, str)
    if expected == "a string or a list of strings":
        return isinstance(value, str) or _has_type(value, "a list of strings")
    if expected == "an integer":
        return _is_int(value)
    if expected == "a number":
        return _is_int(value) or isinstance(value, float)
    if expected == "a boolean":
        return isinstance(value, bool)
    return isinstance(value, list) and all(isinstance(v, str) for v in value)
