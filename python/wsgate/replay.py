"""Replay stores: where the nonces of accepted session tokens are recorded, so that each token
opens at most one session (SPEC §3).

Hierarchy::

    ReplayStore (protocol)     async claim(nonce, exp) -> bool, async release(nonce),
                               async aclose()
    ├── MemoryReplayStore      one process: a TTL set in memory
    └── RedisReplayStore       several processes or hosts: Redis or Valkey, SET NX EX

    ReplayStoreUnavailable     the store cannot answer: token sessions fail closed (503)

Invariants:
- ``claim`` is atomic: of any number of concurrent claims of one nonce, exactly one returns True.
- A claim is a reservation until the session it admits really starts: ``release`` gives it back
  (the bot could not be reached, the gateway gave up), so the client may retry with the same
  token. Only the caller whose claim returned True releases it, and nobody else can hold that
  nonce meanwhile, so ``release`` needs no owner check.
- An entry lives until its token expires and no longer, so memory is bounded by the tokens
  minted per token lifetime; a refused claim never needs the entry after that, because the
  token itself is refused as expired from then on.
- A store that cannot answer raises :class:`ReplayStoreUnavailable`; it never guesses "unused".
- Nonces and passwords never appear in a repr, a log line or an error message.

The Redis client is ours: a minimal RESP2 client over anyio streams, so it runs on asyncio and
trio alike (redis-py is asyncio-only). It speaks only what a replay store needs: AUTH, SELECT,
SET … NX EX, and DEL.
"""

from __future__ import annotations

import heapq
import math
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeAlias
from urllib.parse import unquote, urlsplit

import anyio
import anyio.abc

from .errors import ConfigError, ReplayStoreUnavailable

__all__ = [
    "DEFAULT_MAX_ENTRIES",
    "MemoryReplayStore",
    "RedisReplayStore",
    "ReplayStore",
    "ReplayStoreUnavailable",
    "RespError",
    "RespProtocolError",
    "encode_command",
    "open_replay_store",
    "parse_reply",
]

#: Nonces a :class:`MemoryReplayStore` holds at most (about 100 MB): 3,300 tokens a second
#: for 5 minutes. Past it, claims fail closed rather than forget a live nonce.
DEFAULT_MAX_ENTRIES = 1_000_000
#: Prefix of the replay store's keys in Redis.
KEY_PREFIX = "wsgate:nonce:"


class ReplayStore(Protocol):
    """Records the nonces of accepted tokens."""

    async def claim(self, nonce: str, exp: int) -> bool:
        """Record ``nonce`` until ``exp`` (Unix seconds): True if this is its first use,
        False if it was claimed before. Raises :class:`ReplayStoreUnavailable`."""
        ...

    async def release(self, nonce: str) -> None:
        """Give back a claim that returned True, so ``nonce`` may be claimed again (until its
        token expires). Raises :class:`ReplayStoreUnavailable`."""
        ...

    async def aclose(self) -> None:
        """Release connections; the store is not used afterwards."""
        ...


class MemoryReplayStore:
    """A TTL set in this process: entries leave when their token expires.

    Good for one gateway process; several processes need a shared store
    (:class:`RedisReplayStore`). ``clock`` returns Unix seconds (injectable for tests). Use it
    from one event loop thread: a claim never awaits, so it is atomic there.
    """

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.time,
        max_entries: int = DEFAULT_MAX_ENTRIES,
    ) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self._clock = clock
        self._max_entries = max_entries
        # nonce -> (exp, claimed). A released nonce stays, unclaimed, until it expires: it keeps
        # its one heap entry, so claim-release cycles add nothing.
        self._expiry: dict[str, tuple[int, bool]] = {}
        # (exp, nonce) in expiry order: expired entries are dropped from the front.
        self._heap: list[tuple[int, str]] = []

    def __len__(self) -> int:
        """Nonces held now (expired ones included until the next claim)."""
        return sum(1 for _, claimed in self._expiry.values() if claimed)

    def __repr__(self) -> str:
        return f"<MemoryReplayStore {len(self)} nonces>"

    async def claim(self, nonce: str, exp: int) -> bool:
        self._expire(math.floor(self._clock()))
        entry = self._expiry.get(nonce)
        if entry is not None:
            if entry[1]:
                return False
            self._expiry[nonce] = (entry[0], True)
            return True
        if len(self._expiry) >= self._max_entries:
            raise ReplayStoreUnavailable("replay store full")
        self._expiry[nonce] = (exp, True)
        heapq.heappush(self._heap, (exp, nonce))
        return True

    async def release(self, nonce: str) -> None:
        entry = self._expiry.get(nonce)
        if entry is not None:
            self._expiry[nonce] = (entry[0], False)

    async def aclose(self) -> None:
        self._expiry.clear()
        self._heap.clear()

    def _expire(self, now: int) -> None:
        # A token is refused from second `exp` on (rust/token.rs), so its nonce can go then.
        heap = self._heap
        while heap and heap[0][0] <= now:
            _, nonce = heapq.heappop(heap)
            del self._expiry[nonce]


# --- RESP2, Sans-I/O ------------------------------------------------------------------------

Reply: TypeAlias = "str | int | bytes | RespError | list[Reply] | None"


@dataclass(frozen=True)
class RespError:
    """An error reply (``-ERR …``) from the server, as a value."""

    message: str


class RespProtocolError(Exception):
    """Bytes from the server that are not RESP2: the connection cannot be trusted any more."""


def encode_command(*args: str | bytes | int) -> bytes:
    """A command as a RESP array of bulk strings."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


_MAX_BULK = 512 * 1024 * 1024
_MAX_LINE = 64 * 1024


def parse_reply(buf: bytes | bytearray, pos: int = 0) -> tuple[Reply, int] | None:
    """Parse one RESP2 reply from ``buf`` at ``pos``: ``(reply, next position)``, or None when
    ``buf`` does not hold a whole reply yet. Raises :class:`RespProtocolError`.

    Simple strings come back as ``str``, bulk strings as ``bytes``, nulls as None.
    """
    end = buf.find(b"\r\n", pos)
    if end < 0:
        if len(buf) - pos > _MAX_LINE:
            raise RespProtocolError("reply line too long")
        return None
    kind, line = buf[pos : pos + 1], bytes(buf[pos + 1 : end])
    after = end + 2
    if kind == b"+":
        return line.decode("utf-8", "replace"), after
    if kind == b"-":
        return RespError(line.decode("utf-8", "replace")), after
    if kind == b"_":  # RESP3 null, in case a proxy speaks it
        return None, after
    length = _integer(line)
    if kind == b":":
        return length, after
    if kind == b"$":
        if length == -1:
            return None, after
        if not 0 <= length <= _MAX_BULK:
            raise RespProtocolError("bad bulk string length")
        if len(buf) < after + length + 2:
            return None
        if buf[after + length : after + length + 2] != b"\r\n":
            raise RespProtocolError("bulk string not terminated by CRLF")
        return bytes(buf[after : after + length]), after + length + 2
    if kind == b"*":
        if length == -1:
            return None, after
        if length < 0:
            raise RespProtocolError("bad array length")
        items: list[Reply] = []
        for _ in range(length):
            parsed = parse_reply(buf, after)
            if parsed is None:
                return None
            item, after = parsed
            items.append(item)
        return items, after
    raise RespProtocolError(f"unknown reply type {kind!r}")


def _integer(line: bytes) -> int:
    try:
        return int(line)
    except ValueError:
        raise RespProtocolError("bad integer in reply") from None


# --- Redis over anyio -------------------------------------------------------------------------


@dataclass(frozen=True)
class _RedisAddress:
    host: str
    port: int
    tls: bool
    db: int
    username: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)

    def __str__(self) -> str:
        scheme = "rediss" if self.tls else "redis"
        auth = "***@" if self.password is not None else ""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{auth}{host}:{self.port}/{self.db}"


def _parse_url(url: str) -> _RedisAddress:
    """``redis[s]://[[user]:password@]host[:port][/db]`` (also ``valkey[s]://``)."""
    try:
        parts = urlsplit(url)
        port = parts.port or 6379
    except ValueError:
        raise ValueError("replay store URL is malformed") from None
    schemes = {"redis": False, "valkey": False, "rediss": True, "valkeys": True}
    if parts.scheme not in schemes:
        raise ValueError("replay store URL must start with redis://, rediss:// or valkey://")
    if not parts.hostname:
        raise ValueError("replay store URL has no host")
    db_text = parts.path.lstrip("/") or "0"
    if not db_text.isdigit():
        raise ValueError("replay store URL: the path must be a database number")
    password = unquote(parts.password) if parts.password is not None else None
    username = unquote(parts.username) if parts.username else None
    if password is None and username is not None:
        # redis://secret@host: a lone userinfo is the password (as redis-cli -u reads it).
        username, password = None, username
    return _RedisAddress(
        host=parts.hostname,
        port=port,
        tls=schemes[parts.scheme],
        db=int(db_text),
        username=username,
        password=password,
    )


class _Connection:
    """One Redis connection: send a command, read its reply."""

    def __init__(self, stream: anyio.abc.ByteStream) -> None:
        self.stream = stream
        self._buf = bytearray()

    async def call(self, *args: str | bytes | int) -> Reply:
        await self.stream.send(encode_command(*args))
        while True:
            parsed = parse_reply(self._buf)
            if parsed is not None:
                reply, used = parsed
                del self._buf[:used]
                return reply
            self._buf += await self.stream.receive()

    async def aclose(self) -> None:
        await anyio.aclose_forcefully(self.stream)


class RedisReplayStore:
    """A replay store in Redis or Valkey, shared by every gateway that uses the same server.

    A claim is ``SET wsgate:nonce:<nonce> 1 NX EX <seconds until exp>``: OK is a first use,
    null a replay. Connections are pooled (at most ``pool_size``); one that failed in any way
    is dropped, and the next claim connects afresh, so the store recovers by itself when the
    server is back. Connecting (with AUTH and SELECT from the URL) and each command must finish
    within ``timeout`` seconds, or the claim raises :class:`ReplayStoreUnavailable`.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 1.0,
        pool_size: int = 8,
        clock: Callable[[], float] = time.time,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._address = _parse_url(url)
        if timeout <= 0 or pool_size < 1:
            raise ValueError("timeout must be > 0 and pool_size >= 1")
        self._timeout = timeout
        self._pool_size = pool_size
        self._clock = clock
        self._ssl_context = ssl_context
        self._idle: list[_Connection] = []
        self._limiter: anyio.CapacityLimiter | None = None

    def __repr__(self) -> str:
        return f"<RedisReplayStore {self._address}>"

    async def claim(self, nonce: str, exp: int) -> bool:
        ttl = max(1, exp - math.floor(self._clock()))
        reply = await self.execute("SET", KEY_PREFIX + nonce, "1", "NX", "EX", ttl)
        if reply == "OK":
            return True
        if reply is None:
            return False
        raise ReplayStoreUnavailable("replay store gave an unexpected answer to SET")

    async def release(self, nonce: str) -> None:
        await self.execute("DEL", KEY_PREFIX + nonce)

    async def execute(self, *args: str | bytes | int) -> Reply:
        """Run one command on a pooled connection and return its reply.

        Raises :class:`ReplayStoreUnavailable` on any failure, including an error reply; the
        message names the command, never its arguments.
        """
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(self._pool_size)
        command = str(args[0]).upper()
        async with self._limiter:
            conn: _Connection | None = None
            try:
                with anyio.fail_after(self._timeout):
                    conn = self._idle.pop() if self._idle else await self._connect()
                    reply = await conn.call(*args)
            except BaseException as exc:
                if conn is not None:
                    await conn.aclose()
                if isinstance(exc, (OSError, anyio.EndOfStream, TimeoutError)):
                    raise ReplayStoreUnavailable(
                        f"replay store {self._address.host}:{self._address.port} unreachable "
                        f"({type(exc).__name__} during {command})"
                    ) from None
                if isinstance(exc, (RespProtocolError, anyio.BrokenResourceError)):
                    raise ReplayStoreUnavailable(
                        f"replay store connection broken during {command}"
                    ) from None
                raise
            if isinstance(reply, RespError):
                # The connection itself is still fine.
                self._idle.append(conn)
                raise ReplayStoreUnavailable(
                    f"replay store refused {command}: {_first_word(reply.message)}"
                )
            self._idle.append(conn)
            return reply

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            await conn.aclose()

    async def _connect(self) -> _Connection:
        address = self._address
        stream: anyio.abc.ByteStream
        if address.tls:
            stream = await anyio.connect_tcp(
                address.host,
                address.port,
                tls=True,
                ssl_context=self._ssl_context,
                tls_standard_compatible=False,
            )
        else:
            stream = await anyio.connect_tcp(address.host, address.port)
        conn = _Connection(stream)
        try:
            if address.password is not None:
                credentials: Sequence[str] = (
                    (address.username, address.password)
                    if address.username is not None
                    else (address.password,)
                )
                reply = await conn.call("AUTH", *credentials)
                if isinstance(reply, RespError):
                    raise ReplayStoreUnavailable(
                        f"replay store refused AUTH: {_first_word(reply.message)}"
                    )
            if address.db:
                reply = await conn.call("SELECT", address.db)
                if isinstance(reply, RespError):
                    raise ReplayStoreUnavailable(
                        f"replay store refused SELECT: {_first_word(reply.message)}"
                    )
        except BaseException:
            await conn.aclose()
            raise
        return conn


def open_replay_store(
    setting: str, *, clock: Callable[[], float] = time.time
) -> MemoryReplayStore | RedisReplayStore:
    """The store a ``replay_store`` setting names: ``"memory"`` or a ``redis://`` URL (also
    ``rediss://``, ``valkey://``). No connection is made yet. Raises ``ConfigError``; the
    message never holds the URL (it may carry a password)."""
    if setting == "memory":
        return MemoryReplayStore(clock=clock)
    try:
        return RedisReplayStore(setting, clock=clock)
    except ValueError as exc:
        raise ConfigError(f"replay_store: {exc}") from None


def _first_word(message: str) -> str:
    # Error replies start with a code (ERR, WRONGPASS, NOAUTH, …); the rest may quote arguments.
    return message.split(" ", 1)[0][:32] or "error"
