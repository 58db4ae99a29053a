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

The Redis client is valkey-glide (:mod:`wsgate.redis_store`), which runs on asyncio and trio
alike; the capacity store (:mod:`wsgate.capacity`) reaches Redis the same way.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any, Protocol

import anyio

from . import _core
from .errors import ConfigError, ReplayStoreUnavailable
from .redis_store import RedisStore

__all__ = [
    "DEFAULT_MAX_ENTRIES",
    "MemoryReplayStore",
    "RedisReplayStore",
    "ReplayStore",
    "ReplayStoreUnavailable",
    "open_replay_store",
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
    (:class:`RedisReplayStore`). ``clock`` returns Unix seconds (injectable for tests). The
    set is the core's (``_core.Nonces``), so the sessions the engine opens by itself
    (:mod:`wsgate.fastpath`) use tokens up in the same set; a claim is atomic.
    """

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.time,
        max_entries: int = DEFAULT_MAX_ENTRIES,
    ) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        #: The clock claims are judged by (Unix seconds).
        self.clock = clock
        #: The nonces (a released nonce stays, unclaimed, until it expires: claim-release
        #: cycles add nothing).
        self.nonces = _core.Nonces(max_entries)

    def __len__(self) -> int:
        """Nonces held now (expired ones included until the next claim)."""
        return len(self.nonces)

    def __repr__(self) -> str:
        return f"<MemoryReplayStore {len(self)} nonces>"

    @property
    def entries(self) -> int:
        """Entries held: claimed nonces, and released ones until their token expires."""
        return self.nonces.entries()

    async def claim(self, nonce: str, exp: int) -> bool:
        try:
            return self.nonces.claim(nonce, exp, math.floor(self.clock()))
        except OverflowError:
            raise ReplayStoreUnavailable("replay store full") from None

    async def release(self, nonce: str) -> None:
        self.nonces.release(nonce)

    async def aclose(self) -> None:
        self.nonces.clear()


# --- Redis -------------------------------------------------------------------------------------


class RedisReplayStore:
    """A replay store in Redis or Valkey, shared by every gateway that uses the same server.

    A claim is ``SET wsgate:nonce:<nonce> 1 NX EX <seconds until exp>``: OK is a first use,
    null a replay. The connection (:class:`~wsgate.redis_store.RedisStore`: valkey-glide, TLS,
    ACL user, Sentinel) is made at the first claim and comes back by itself when the server
    does; each claim must finish within ``timeout`` seconds, or it raises
    :class:`ReplayStoreUnavailable`.

    With Sentinel, a claim also waits until every replica that the Sentinels could promote
    holds it (``WAIT n``): a primary that dies right after a claim cannot take it along, and
    the replica promoted in its place refuses the token again. If they do not confirm within
    half of ``timeout``, the claim is given back and the store is unavailable (503: fail
    closed). A primary with nothing promotable beside it (its replica is the failed primary)
    accepts on its own. The count of promotable replicas is at most a second old.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 1.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = RedisStore(
            url, name="replay store", error=ReplayStoreUnavailable, timeout=timeout
        )
        self._clock = clock
        self._wait_ms = max(1, round(timeout * 500))

    def __repr__(self) -> str:
        return f"<RedisReplayStore {self._store.url}>"

    async def claim(self, nonce: str, exp: int) -> bool:
        ttl = max(1, exp - math.floor(self._clock()))
        claim = ("SET", KEY_PREFIX + nonce, "1", "NX", "EX", ttl)
        reply = await self._store.execute(*claim)
        if reply == "OK" and self._store.sentinel:
            await self._replicated(nonce)
        if reply == "OK":
            return True
        if reply is None:
            return False
        raise ReplayStoreUnavailable("replay store gave an unexpected answer to SET")

    async def release(self, nonce: str) -> None:
        await self._store.execute("DEL", KEY_PREFIX + nonce)

    async def execute(self, *args: str | bytes | int) -> Any:
        """Run one command and return its reply. Raises :class:`ReplayStoreUnavailable` on any
        failure, including an error reply; the message names the command, never its
        arguments."""
        return await self._store.execute(*args)

    async def aclose(self) -> None:
        await self._store.aclose()

    async def _replicated(self, nonce: str) -> None:
        """Wait until every replica that Sentinel could promote holds the claim just made;
        else give it back and fail (503)."""
        needed = await self._store.promotable_replicas()
        if not needed:
            return  # nothing could be promoted in the primary's place
        acked = await self._store.execute("WAIT", needed, self._wait_ms)
        if isinstance(acked, int) and acked >= needed:
            return
        self._store.forget_replicas()  # one may have gone: count again at the next claim
        with anyio.CancelScope(shield=True):
            try:
                await self.release(nonce)
            except ReplayStoreUnavailable:
                pass  # it expires with its token; the token is refused either way
        raise ReplayStoreUnavailable("replay store: replicas did not confirm the claim in time")


def open_replay_store(
    setting: str, *, clock: Callable[[], float] = time.time
) -> MemoryReplayStore | RedisReplayStore:
    """The store a ``replay_store`` setting names: ``"memory"`` or a store URL
    (:mod:`wsgate.redis_store`: ``redis://``, ``rediss://``, ``redis+sentinel://``). No
    connection is made yet. Raises ``ConfigError``; the message never holds the URL (it may
    carry a password)."""
    if setting == "memory":
        return MemoryReplayStore(clock=clock)
    try:
        return RedisReplayStore(setting, clock=clock)
    except ValueError as exc:
        raise ConfigError(f"replay_store: {exc}") from None
