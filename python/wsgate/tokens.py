"""One-time session tokens (SPEC §3): minting for ``/start`` and the gateway's verdict on them.

The token format and its stateless checks (canonical encoding, signature in constant time,
service host, expiry) live in the Rust core (``rust/token.rs``); this module adds what needs
state or I/O: the secrets, the clock, the replay store, and the mapping to HTTP answers.

Invariants:
- Checks run in this order, and the first failure is the answer: missing token (403),
  the Rust checks (403), the body binding (403, once routing has decoded ``?body=``), the
  replay store (403 "token already used", 503 when it cannot answer). A token refused by the
  Rust checks or its body never costs a store round trip.
- A token is used up by :meth:`TokenAuthority.claim` just before its session's bot is reached,
  and given back by :meth:`TokenAuthority.release` when the session does not start (the bot
  cannot be reached, the gateway gives up): the client may retry with the same token while it
  lives. Of any number of concurrent claims, exactly one wins.
- A token minted for a body binds it (the ``bd`` claim, see ``rust/token.rs``); one minted
  without binds *no* body.
- Tokens, nonces and secrets never appear in a repr, an exception message or a log line.
- The session id of a token is derived from its nonce (:func:`session_id_for`): the token
  format is fixed at ``{sh, exp, nonce}``, and a derived id needs no shared state, so a token
  minted by one gateway instance opens a session with the same id on any other.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging
import math
import os
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from . import _core
from .body import encode_body
from .config import AgentConfig, Config
from .errors import ConfigError, HttpError, TokenRejected
from .replay import MemoryReplayStore, ReplayStore, ReplayStoreUnavailable, open_replay_store
from .request import Request

__all__ = [
    "SECRETS_ENV",
    "Claims",
    "MintedToken",
    "TokenAuthority",
    "VerifiedToken",
    "authority_for",
    "check_body",
    "load_secrets",
    "mint",
    "session_id_for",
    "token_from_request",
    "verify",
]

#: Environment variable holding the secrets, comma-separated, the signing one first.
SECRETS_ENV = "WSGATE_SECRETS"
_MAX_TTL = 86_400
#: Why the core refused a token (``_core.TokenError.kind``), as :class:`TokenRejected`'s bounded
#: ``kind`` (the metrics' label); the one place a core refusal gets its name.
_REJECTED_AS = {
    "malformed": "malformed",
    "bad_signature": "bad_signature",
    "wrong_service_host": "wrong_agent",
    "expired": "expired",
    "body_missing": "wrong_body",
    "body_not_bound": "wrong_body",
    "body_mismatch": "wrong_body",
}

log = logging.getLogger("wsgate")


@dataclass(frozen=True)
class MintedToken:
    """A freshly minted token and what ``/start`` answers with it."""

    token: str = field(repr=False)
    #: Expiry, Unix seconds.
    exp: int
    nonce: str = field(repr=False)
    #: The ``?body=`` value the client appends (standard base64 of the bound body), or None.
    body: str | None = field(default=None, repr=False)

    @property
    def session_id(self) -> str:
        """The id the bot will see for the session this token opens."""
        return session_id_for(self.nonce)


@dataclass(frozen=True)
class VerifiedToken:
    """A token that passed every check and is now used up (until it is released)."""

    service_host: str
    exp: int
    #: The session id that ``/start`` announced for this token (``X-Daily-Session-Id``).
    session_id: str
    nonce: str = field(repr=False)


def session_id_for(nonce: str) -> str:
    """The session id of the token with this nonce: a uuid4 made of SHA-256 of the nonce.

    One-way, so the session id (which reaches logs and the bot) does not reveal the nonce
    (the replay store's key); deterministic, so every gateway instance derives the same id.
    """
    digest = hashlib.sha256(b"wsgate session id\x00" + nonce.encode()).digest()
    return str(uuid.UUID(bytes=digest[:16], version=4))


def token_from_request(request: Request, path_token: str | None) -> str | None:
    """The token the client attached, from the first place present (SPEC §3), or None.

    1. ``Authorization`` header: the credentials of a ``Bearer`` scheme; any other scheme
       gives ``""``, which is judged (and refused) rather than skipped.
    2. The first ``token`` query parameter, percent-decoded.
    3. The trailing path segment (``/ws/generic/{host}/{token}``), as routing found it.
    """
    authorization = request.header("authorization")
    if authorization is not None:
        scheme, _, credentials = authorization.strip().partition(" ")
        return credentials.strip() if scheme.lower() == "bearer" else ""
    for name, value in request.query_params():
        if name == "token":
            return unquote(value)
    return path_token


def check_body(claims: _core.TokenClaims, body: bytes | None) -> None:
    """Hold a session's body (its JSON bytes; None without ``?body=``) to the token's binding:
    raises :class:`TokenRejected` (403) for a missing, unexpected or different body."""
    try:
        claims.check_body(body)
    except _core.TokenError as exc:
        raise _rejected(exc) from None


def _rejected(exc: _core.TokenError) -> TokenRejected:
    """The 403 for a token the core refused, named from the core's own ``kind``."""
    return TokenRejected(_REJECTED_AS.get(exc.kind, "malformed"), str(exc))


def load_secrets(
    secrets: Sequence[str | bytes] | None = None,
    *,
    secrets_file: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> tuple[bytes, ...]:
    """The token secrets from exactly one source, the signing secret first:

    - ``secrets``: a list (the settings file's ``secrets``), used as given;
    - ``secrets_file``: a file with one secret per line (blank lines and ``#`` comments
      skipped), e.g. a mounted Kubernetes or Docker secret;
    - the environment variable ``WSGATE_SECRETS``: comma-separated.

    Items from a file or the environment are stripped of surrounding whitespace. Raises
    :class:`ConfigError` when no source or more than one is set, or a secret is empty; the
    message never holds a secret.
    """
    env_value = (os.environ if environ is None else environ).get(SECRETS_ENV)
    given = [
        name
        for name, value in (
            ("secrets", secrets),
            ("secrets_file", secrets_file),
            (SECRETS_ENV, env_value),
        )
        if value is not None
    ]
    if not given:
        raise ConfigError(
            f"token auth needs secrets: set secrets or secrets_file, or {SECRETS_ENV}"
        )
    if len(given) > 1:
        raise ConfigError(f"secrets given more than once ({' and '.join(given)}); keep one")
    items: list[str | bytes]
    if secrets is not None:
        if isinstance(secrets, (str, bytes)):
            raise ConfigError("secrets must be a list of strings")
        items = list(secrets)
        source = "secrets"
    elif secrets_file is not None:
        try:
            text = Path(secrets_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"secrets_file {secrets_file}: cannot read: {exc}") from None
        items = [
            line.strip()
            for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")
        ]
        source = f"secrets_file {secrets_file}"
    else:
        assert env_value is not None
        items = [item.strip() for item in env_value.split(",")]
        source = SECRETS_ENV
    return _check_secrets(items, source)


def _check_secrets(items: Sequence[object], source: str) -> tuple[bytes, ...]:
    keys: list[bytes] = []
    for position, item in enumerate(items, 1):
        if isinstance(item, str):
            key = item.encode()
        elif isinstance(item, bytes):
            key = item
        else:
            raise ConfigError(f"{source}: secret #{position} must be a string")
        if not key:
            raise ConfigError(f"{source}: secret #{position} is empty")
        keys.append(key)
    if not keys:
        raise ConfigError(f"{source}: no secret given")
    return tuple(keys)


class TokenAuthority:
    """Mints tokens for ``/start`` and judges them at the WebSocket upgrade.

    ``secrets``: the first signs, all verify (rotation: add the new secret first, drop the old
    one a token lifetime later). ``ttl``: token lifetime in seconds. ``clock``: Unix seconds
    (injectable for tests). ``store``: the replay store, by default one in memory on the same
    clock.
    """

    def __init__(
        self,
        secrets: Sequence[str | bytes],
        ttl: int = _core.TOKEN_TTL_SECONDS,
        clock: Callable[[], float] = time.time,
        *,
        store: ReplayStore | None = None,
    ) -> None:
        if isinstance(secrets, (str, bytes)):
            raise ConfigError("secrets must be a list of strings")
        self._secrets = list(_check_secrets(list(secrets), "secrets"))
        self._keys = _core.TokenKeys(self._secrets)
        if isinstance(ttl, bool) or not isinstance(ttl, int) or not 1 <= ttl <= _MAX_TTL:
            raise ConfigError(f"token_ttl must be an integer of 1 to {_MAX_TTL} seconds")
        self.ttl = ttl
        self._clock = clock
        self.store: ReplayStore = MemoryReplayStore(clock=clock) if store is None else store

    def __repr__(self) -> str:
        return f"<TokenAuthority {len(self._secrets)} secret(s), ttl {self.ttl} s, {self.store!r}>"

    def _now(self) -> int:
        return math.floor(self._clock())

    @property
    def keys(self) -> _core.TokenKeys:
        """The secrets, keyed (what the engine checks tokens with: :mod:`wsgate.fastpath`)."""
        return self._keys

    @property
    def clock(self) -> Callable[[], float]:
        """The clock tokens are judged by (Unix seconds)."""
        return self._clock

    def with_store(self, store: ReplayStore) -> TokenAuthority:
        """This authority (the same secrets, lifetime and clock) on another replay store, e.g.
        the same store with its calls timed (:meth:`wsgate.metrics.Metrics.timed`)."""
        other = copy.copy(self)
        other.store = store
        return other

    def mint(self, service_host: str, body: bytes | None = None) -> MintedToken:
        """A new token for ``service_host``, valid for ``ttl`` seconds from now, that opens a
        session with exactly ``body`` (a body document's JSON bytes) or, for None, without one."""
        exp = self._now() + self.ttl
        nonce = _core.new_nonce()
        token = self._keys.mint(service_host, exp, nonce, body)
        return MintedToken(token=token, exp=exp, nonce=nonce)

    def check(self, token: str | None, service_host: str) -> _core.TokenClaims:
        """The stateless checks only (no replay store, no body): the claims of a token that is
        well formed, signed by one of the secrets, for ``service_host`` and not expired.

        Raises :class:`TokenRejected` (403); the reason never holds the token.
        """
        if token is None:
            raise TokenRejected("missing", "token missing")
        try:
            return self._keys.verify(token, service_host, self._now())
        except _core.TokenError as exc:
            raise _rejected(exc) from None

    async def claim(self, claims: _core.TokenClaims, service_host: str) -> VerifiedToken:
        """Use up a checked token (the replay store): raises ``HttpError`` 403 "token already
        used", or 503 when the store cannot answer (fail closed). Give it back with
        :meth:`release` if its session does not start."""
        try:
            first_use = await self.store.claim(claims.nonce, claims.exp)
        except ReplayStoreUnavailable:
            raise HttpError(503, "token store unavailable") from None
        if not first_use:
            raise TokenRejected("replayed", "token already used")
        return VerifiedToken(
            service_host=service_host,
            exp=claims.exp,
            session_id=session_id_for(claims.nonce),
            nonce=claims.nonce,
        )

    async def release(self, verified: VerifiedToken) -> None:
        """Give back a claimed token whose session did not start, so the client may retry
        with it. If the store cannot answer, the token stays used (logged): failing closed."""
        try:
            await self.store.release(verified.nonce)
        except ReplayStoreUnavailable as exc:
            log.warning("a token of %s stays used: %s", verified.service_host, exc)

    async def verify(
        self, token: str | None, service_host: str, body: bytes | None = None
    ) -> VerifiedToken:
        """Judge a token and use it up: the stateless checks, the body binding (``body``: the
        session body's JSON bytes, None without one), then the replay store.

        Raises ``HttpError`` 403 (missing, malformed, bad signature, other service host,
        expired, other body, already used) or 503 (replay store unavailable: fail closed).
        """
        claims = self.check(token, service_host)
        check_body(claims, body)
        return await self.claim(claims, service_host)

    def check_request(
        self, request: Request, path_token: str | None, agent: AgentConfig
    ) -> _core.TokenClaims | None:
        """The stateless part as a :data:`wsgate.routing.TokenCheck` hook: None for a ``none``
        agent; a ``token`` agent's request needs a token passing :meth:`check`, whose claims
        are returned for routing to hold the body to (:func:`check_body`) and for the server to
        :meth:`claim` once capacity allows."""
        if agent.websocket_auth != "token":
            return None
        return self.check(token_from_request(request, path_token), agent.service_host)

    async def aclose(self) -> None:
        """Close the replay store."""
        await self.store.aclose()


def authority_for(config: Config) -> TokenAuthority | None:
    """The token authority the settings describe, if an agent uses token auth."""
    if not any(agent.websocket_auth == "token" for agent in config.agents):
        return None
    settings = config.gateway
    secrets = load_secrets(settings.secrets, secrets_file=settings.secrets_file)
    store = open_replay_store(settings.replay_store)
    return TokenAuthority(secrets, settings.token_ttl, store=store)


@dataclass(frozen=True)
class Claims:
    """What :func:`verify` found in a good token."""

    service_host: str
    #: Expiry, Unix seconds.
    exp: int
    #: The session id the bot will see (``X-Daily-Session-Id``).
    session_id: str
    #: Whether the token binds a body (then only that body opens its session).
    binds_body: bool


def mint(
    secrets: str | bytes | Sequence[str | bytes],
    service_host: str,
    *,
    body: Any = None,
    ttl: int = _core.TOKEN_TTL_SECONDS,
    now: float | None = None,
) -> MintedToken:
    """Mint a session token as ``/start`` does, for a backend that hands out its own.

    ``secrets``: one secret, or the gateway's list (the first signs). ``body``: a JSON value
    the token binds; give the client ``minted.body`` to append as ``?body=`` (the gateway
    refuses the token with any other body). ``now``: Unix seconds (default: the clock).

        minted = wsgate.tokens.mint(secret, "my-agent.my-org", body={"caller": "+15550100"})
        url = f"wss://gateway/ws/generic/my-agent.my-org?body={quote(minted.body)}"
        headers = {"Authorization": f"Bearer {minted.token}"}
    """
    authority = _authority(secrets, ttl, now)
    if body is None:
        return authority.mint(service_host)
    document, encoded = encode_body(body)
    try:
        _core.check_body_json(document)  # the very check the upgrade applies to ?body=
    except _core.BodyError as exc:
        raise ValueError(exc.reason) from None
    return dataclasses.replace(authority.mint(service_host, document), body=encoded)


def verify(
    secrets: str | bytes | Sequence[str | bytes],
    token: str,
    service_host: str,
    *,
    body: Any = None,
    now: float | None = None,
) -> Claims:
    """Check a token as the gateway does before its one-time use: well formed, signed by one of
    ``secrets``, for ``service_host``, not expired, and bound to exactly ``body`` (a JSON value;
    None: no body). It does not use the token up: only the gateway's replay store does that.

    Raises :class:`~wsgate.HttpError` 403 with the gateway's one-line reason.
    """
    authority = _authority(secrets, _core.TOKEN_TTL_SECONDS, now)
    claims = authority.check(token, service_host)
    check_body(claims, None if body is None else encode_body(body)[0])
    return Claims(service_host, claims.exp, session_id_for(claims.nonce), claims.binds_body)


def _authority(
    secrets: str | bytes | Sequence[str | bytes], ttl: int, now: float | None
) -> TokenAuthority:
    listed = [secrets] if isinstance(secrets, (str, bytes)) else list(secrets)
    clock = time.time if now is None else (lambda: now)
    return TokenAuthority(listed, ttl, clock)
