"""One connection to a shared store in Redis or Valkey, through the valkey-glide client: what the
replay store (spent token nonces) and the capacity store (session leases) have in common.

URL forms (``valkey``/``valkeys`` may stand for ``redis``/``rediss``)::

    redis://[[user]:password@]host[:port][/db]
    rediss://[[user]:password@]host[:port][/db][?ssl_ca_certs=/path/ca.pem]
    redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/service[/db]
    rediss+sentinel://...same...[?ssl_ca_certs=...]

The user and password (ACL, or ``requirepass`` with the password alone) are the data nodes';
Sentinels are asked without credentials. ``rediss`` checks the server's certificate against the
system's CAs, or against ``ssl_ca_certs`` when given. A lone userinfo (``redis://secret@h``) is
the password, as ``redis-cli -u`` reads it.

The client: valkey-glide (a Rust core, maintained by the Valkey project) runs under asyncio and
trio, multiplexes every command of a store on one connection, reconnects by itself with a short
backoff, and runs Lua scripts by their SHA. It has no Sentinel support, so for a
``redis+sentinel`` URL this module asks the Sentinels for the primary, connects to it, and asks
again whenever the connection fails or the node answers as a replica (``READONLY``): a failover
costs the commands in flight and those until the Sentinels name the new primary.

Invariants:
- Every failure of a command (unreachable, timed out, refused) raises the store's
  :class:`~wsgate.errors.StoreUnavailable` subclass; nothing guesses an answer.
- Messages, reprs and logs name the store, its address and the command, never a password, a
  key or an argument.
- valkey-glide is imported only when a store is first used (its import costs ~0.5 s).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, urlsplit

import anyio

from .errors import StoreUnavailable

if TYPE_CHECKING:
    from glide import GlideClient, Script

__all__ = ["REDIS_SCHEMES", "RedisStore", "RedisURL", "parse_redis_url"]

log = logging.getLogger("wsgate")

#: URL schemes of a Redis or Valkey store: (TLS, Sentinel) for each.
REDIS_SCHEMES: dict[str, tuple[bool, bool]] = {
    "redis": (False, False),
    "valkey": (False, False),
    "rediss": (True, False),
    "valkeys": (True, False),
    "redis+sentinel": (False, True),
    "valkey+sentinel": (False, True),
    "rediss+sentinel": (True, True),
    "valkeys+sentinel": (True, True),
}
DEFAULT_PORT = 6379
DEFAULT_SENTINEL_PORT = 26379
# Reconnection: the wait between attempts grows 10, 20, 40, 80, 160 ms, then stays there, so a
# server that is back is used again within a fifth of a second.
_BACKOFF_RETRIES = 4
_BACKOFF_FACTOR_MS = 10
# After a failed connection (or search for the primary), commands fail at once for this long.
_RETRY_PAUSE = 0.2
# With Sentinel: seconds a count of promotable replicas is used before asking again.
_REPLICAS_MAX_AGE = 1.0


@dataclass(frozen=True)
class RedisURL:
    """A parsed store URL. ``str()`` shows it without its password."""

    #: ``(host, port)`` of the server, or of each Sentinel.
    hosts: tuple[tuple[str, int], ...]
    tls: bool = False
    db: int = 0
    #: The Sentinels' name for the primary; None: not a Sentinel URL.
    service: str | None = None
    ca_file: str | None = None
    username: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)

    def __str__(self) -> str:
        scheme = ("rediss" if self.tls else "redis") + ("+sentinel" if self.service else "")
        auth = "***@" if self.password is not None else ""
        hosts = ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in self.hosts)
        path = f"/{self.service}/{self.db}" if self.service else f"/{self.db}"
        return f"{scheme}://{auth}{hosts}{path}"

    @property
    def where(self) -> str:
        """The address for messages: ``host:port``, or the Sentinel service's name."""
        if self.service is not None:
            return f"sentinel service {self.service}"
        host, port = self.hosts[0]
        return f"{host}:{port}"


def parse_redis_url(url: str) -> RedisURL:
    """Parse a store URL (forms in the module's docstring). Raises ``ValueError`` with a
    message that never holds the URL (it may carry a password)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        raise ValueError("store URL is malformed") from None
    if parts.scheme not in REDIS_SCHEMES:
        raise ValueError(
            "store URL must start with redis://, rediss://, redis+sentinel:// "
            "or rediss+sentinel:// (or valkey…)"
        )
    tls, sentinel = REDIS_SCHEMES[parts.scheme]
    userinfo, _, hostlist = parts.netloc.rpartition("@")
    hosts = tuple(
        _host_port(item, DEFAULT_SENTINEL_PORT if sentinel else DEFAULT_PORT)
        for item in hostlist.split(",")
    )
    if not sentinel and len(hosts) != 1:
        raise ValueError("store URL names several hosts: only redis+sentinel:// takes a list")
    segments = [s for s in parts.path.split("/") if s]
    service = None
    if sentinel:
        if not segments:
            raise ValueError("redis+sentinel:// URL needs the service name as its path")
        service = unquote(segments.pop(0))
    if len(segments) > 1 or (segments and not segments[0].isdigit()):
        raise ValueError("store URL: the path must be a database number")
    username: str | None = None
    password: str | None = None
    if userinfo:
        user_text, colon, password_text = userinfo.partition(":")
        username = unquote(user_text) or None
        if colon:
            password = unquote(password_text)
        else:
            # redis://secret@host: a lone userinfo is the password (as redis-cli -u reads it).
            username, password = None, username
    query = parse_qs(parts.query, keep_blank_values=True)
    unknown = set(query) - {"ssl_ca_certs"}
    if unknown:
        raise ValueError(f"store URL: unknown option {sorted(unknown)[0]!r}")
    ca_file = query.get("ssl_ca_certs", [None])[-1]
    if ca_file is not None and not tls:
        raise ValueError("store URL: ssl_ca_certs needs rediss://")
    return RedisURL(
        hosts=hosts,
        tls=tls,
        db=int(segments[0]) if segments else 0,
        service=service,
        ca_file=ca_file or None,
        username=username,
        password=password,
    )


def _host_port(text: str, default_port: int) -> tuple[str, int]:
    try:
        parts = urlsplit("//" + text)
        port = parts.port
    except ValueError:
        raise ValueError("store URL has a bad host or port") from None
    if not parts.hostname:
        raise ValueError("store URL has no host")
    return parts.hostname, default_port if port is None else port


class RedisStore:
    """Commands to one Redis or Valkey store, by URL; connected at the first command.

    ``name`` (e.g. ``"replay store"``) opens every error message; ``error`` is the
    :class:`StoreUnavailable` subclass raised. Each command (connecting included) must finish
    within ``timeout`` seconds. Use it from one event loop (asyncio or trio).
    """

    def __init__(
        self,
        url: str | RedisURL,
        *,
        name: str = "store",
        error: type[StoreUnavailable] = StoreUnavailable,
        timeout: float = 1.0,
    ) -> None:
        self.url = parse_redis_url(url) if isinstance(url, str) else url
        if not timeout > 0:
            raise ValueError("timeout must be > 0")
        self.name = name
        self.error = error
        self.timeout = timeout
        self._client: GlideClient | None = None
        self._lock: anyio.Lock | None = None
        self._retry_at = -math.inf
        self._closed = False
        self._replicas = 1
        self._replicas_at = -math.inf

    def __repr__(self) -> str:
        return f"<RedisStore {self.name} {self.url}>"

    @property
    def sentinel(self) -> bool:
        return self.url.service is not None

    async def execute(self, *args: str | bytes | int | float) -> Any:
        """Run one command; its reply (``"OK"``, bytes, int, None, lists…)."""
        command = str(args[0]).upper()
        client = await self._connected(command)
        try:
            return await client.custom_command([_arg(a) for a in args])
        except BaseException as exc:
            raise await self._failed(exc, command, client) from None

    async def script(
        self,
        script: Script,
        keys: Sequence[str],
        args: Sequence[str | bytes | int | float],
        *,
        name: str = "EVALSHA",
    ) -> Any:
        """Run a Lua script (by its SHA, loaded again by the client when the server lost it)."""
        client = await self._connected(name)
        try:
            return await client.invoke_script(script, keys=list(keys), args=[_arg(a) for a in args])
        except BaseException as exc:
            raise await self._failed(exc, name, client) from None

    async def aclose(self) -> None:
        """Close the connection; the store is not used afterwards."""
        self._closed = True
        client, self._client = self._client, None
        if client is not None:
            with anyio.CancelScope(shield=True):
                await _close(client)

    # --- connecting ---------------------------------------------------------------------------

    async def _connected(self, command: str) -> GlideClient:
        if self._client is not None:
            return self._client
        if self._closed:
            raise self.error(f"{self.name} is closed")
        if self._lock is None:
            self._lock = anyio.Lock()
        async with self._lock:
            if self._client is not None:
                return self._client
            if anyio.current_time() < self._retry_at:
                # Failed a moment ago: do not queue every command behind another timeout.
                raise self.error(
                    f"{self.name} {self.url.where} unreachable (no connection during {command})"
                )
            try:
                address = await self._primary(command)
                # Not lazy: a client exists only once it has reached the server. From then on
                # glide reconnects by itself.
                client = await self._create(address)
            except BaseException:
                self._retry_at = anyio.current_time() + _RETRY_PAUSE
                raise
            if self._closed:  # closed while connecting
                with anyio.CancelScope(shield=True):
                    await _close(client)
                raise self.error(f"{self.name} is closed")
            self._client = client
            return client

    async def _primary(self, command: str) -> tuple[str, int]:
        """The server to connect to: the URL's, or the primary that a Sentinel names."""
        url = self.url
        if url.service is None:
            return url.hosts[0]
        reply = await self._ask_sentinels("GET-MASTER-ADDR-BY-NAME", command)
        if isinstance(reply, list) and len(reply) == 2:
            return _text(reply[0]), int(reply[1])
        raise self.error(f"{self.name} {url.where} has no primary (during {command})")

    async def promotable_replicas(self) -> int:
        """With Sentinel: how many replicas the Sentinels could promote now (those not down
        nor disconnected), asked at most once a second. A write that every one of them holds
        (``WAIT n``) survives a failover. If no Sentinel answers, the last count stands (1
        before any answer)."""
        now = anyio.current_time()
        if now - self._replicas_at < _REPLICAS_MAX_AGE:
            return self._replicas
        self._replicas_at = now
        try:
            reply = await self._ask_sentinels("REPLICAS", "WAIT")
        except StoreUnavailable:
            return self._replicas
        self._replicas = sum(1 for replica in reply or () if _promotable(replica))
        return self._replicas

    def forget_replicas(self) -> None:
        """Ask the Sentinels again at the next :meth:`promotable_replicas`."""
        self._replicas_at = -math.inf

    async def _ask_sentinels(self, subcommand: str, command: str) -> Any:
        """``SENTINEL <subcommand> <service>`` at the first Sentinel that answers."""
        url = self.url
        assert url.service is not None
        for host, port in url.hosts:
            sentinel: GlideClient | None = None
            try:
                sentinel = await self._create((host, port), sentinel=True)
                return await sentinel.custom_command(["SENTINEL", subcommand, url.service])
            except Exception:
                continue  # the next Sentinel
            finally:
                if sentinel is not None:
                    await _close(sentinel)
        raise self.error(f"{self.name} {url.where} unreachable (no Sentinel during {command})")

    async def _create(self, address: tuple[str, int], *, sentinel: bool = False) -> GlideClient:
        from glide import (
            AdvancedGlideClientConfiguration,
            BackoffStrategy,
            GlideClient,
            GlideClientConfiguration,
            NodeAddress,
            NodeDiscoveryMode,
            ServerCredentials,
            TlsAdvancedConfiguration,
        )

        _quiet_glide()
        url = self.url
        timeout_ms = max(1, round(self.timeout * 1000))
        tls = None
        if url.ca_file is not None:
            try:
                tls = TlsAdvancedConfiguration(root_pem_cacerts=Path(url.ca_file).read_bytes())
            except OSError as exc:
                raise self.error(
                    f"{self.name}: cannot read ssl_ca_certs ({exc.strerror})"
                ) from None
        credentials = None
        if url.password is not None and not sentinel:
            credentials = ServerCredentials(password=url.password, username=url.username)
        config = GlideClientConfiguration(
            [NodeAddress(*address)],
            use_tls=url.tls,
            credentials=credentials,
            request_timeout=timeout_ms,
            reconnect_strategy=BackoffStrategy(
                num_of_retries=_BACKOFF_RETRIES, factor=_BACKOFF_FACTOR_MS, exponent_base=2
            ),
            database_id=None if sentinel else url.db,
            advanced_config=AdvancedGlideClientConfiguration(
                connection_timeout=timeout_ms, tls_config=tls
            ),
            # A data node must be a primary (glide checks with INFO: an ACL user needs +info;
            # with Sentinel, a node that turned replica sends us back to ask again). A
            # Sentinel is used as it is. (STATIC on a data node would also hide a refused
            # password behind timeouts.)
            node_discovery_mode=(
                NodeDiscoveryMode.STATIC if sentinel else NodeDiscoveryMode.STANDARD
            ),
        )
        try:
            return await GlideClient.create(config)
        except Exception as exc:
            raise self._error_for(exc, "CONNECT") from None

    # --- errors -------------------------------------------------------------------------------

    async def _failed(self, exc: BaseException, command: str, client: GlideClient) -> BaseException:
        """The exception to raise for ``exc`` (a glide error becomes ``self.error``). With
        Sentinel, a broken or read-only connection is dropped, so the next command asks the
        Sentinels again."""
        if not isinstance(exc, Exception):
            return exc  # cancellation and the like pass through unchanged
        error = self._error_for(exc, command)
        if self.sentinel and _is_connection_trouble(exc) and self._client is client:
            self._client = None
            with anyio.CancelScope(shield=True):
                await _close(client)
        return error

    def _error_for(self, exc: Exception, command: str) -> BaseException:
        from glide import ClosingError, ConnectionError, GlideError, TimeoutError

        if isinstance(exc, self.error):
            return exc
        if not isinstance(exc, GlideError):
            return exc
        text = str(exc)
        where = f"{self.name} {self.url.where}"
        for code in ("WRONGPASS", "NOAUTH"):
            if code in text:
                return self.error(f"{where} refused AUTH: {code}")
        if "NOPERM" in text or "no permissions" in text:
            return self.error(f"{where} refused {command}: NOPERM (the user's ACL)")
        if isinstance(exc, TimeoutError) or "timed out" in text:
            kind = "TimeoutError"
        elif "refused" in text.lower():
            kind = "ConnectionRefused"
        elif isinstance(exc, (ConnectionError, ClosingError)) or "connect" in text.lower():
            kind = "ConnectionError"
        else:
            # An error reply: its first word is its code (ERR, READONLY, NOSCRIPT…); the rest
            # may quote arguments.
            first = text.strip().split(" ", 1)[0].rstrip(":")[:32] or "error"
            return self.error(f"{where} refused {command}: {first}")
        return self.error(f"{where} unreachable ({kind} during {command})")


def _is_connection_trouble(exc: Exception) -> bool:
    from glide import ClosingError, ConnectionError, TimeoutError

    text = str(exc)
    return isinstance(exc, (ConnectionError, ClosingError, TimeoutError)) or any(
        word in text for word in ("READONLY", "connect", "timed out", "MASTERDOWN")
    )


def _promotable(replica: object) -> bool:
    # SENTINEL REPLICAS: a map per replica (RESP3), or a flat field/value list (RESP2).
    if isinstance(replica, list):
        replica = dict(zip(replica[::2], replica[1::2], strict=False))
    if not isinstance(replica, dict):
        return False
    flags = _text(replica.get(b"flags", replica.get("flags", b""))).split(",")
    return not {"s_down", "o_down", "disconnected"} & set(flags)


def _arg(value: str | bytes | int | float) -> str | bytes:
    return value if isinstance(value, (str, bytes)) else str(value)


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def _close(client: GlideClient) -> None:
    try:
        await client.close()
    except Exception:
        pass  # already closed, or the connection is gone: nothing left to release


_glide_logger_set = False


def _quiet_glide() -> None:
    """Silence glide's own console log (a warning per timed-out command during an outage)
    unless the program configured it first: the stores report trouble once, in our log."""
    global _glide_logger_set
    if not _glide_logger_set:
        from glide import Logger, LogLevel

        Logger.init(LogLevel.OFF)
        _glide_logger_set = True
