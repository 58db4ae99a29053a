"""Capacity: an agent's ``max_sessions`` held on this gateway alone, or across every gateway
that shares a capacity store (``[gateway] capacity_store = "redis://…"``).

Hierarchy::

    Capacity (protocol)   async acquire(agent) -> Lease | None   (HttpError 503 when full)
                          release(lease)     (not async: a relayed session ends in a callback)
                          status             (None, or why limits are counted here: /readyz)
                          async run()        (the gateway's one background task), aclose()
    ├── LocalCapacity     nothing to add: :class:`~wsgate.sessions.Sessions` counts the
    │                     gateway's own sessions (503 at ``max_sessions``), as always
    └── RedisCapacity     a lease per session in Redis: one sorted set per agent, members
                          scored by their expiry on the server's clock

Invariants of :class:`RedisCapacity`:
- A lease is taken atomically (one Lua script: drop expired members, count, add) before the
  bot is dialled, and given back when the session ends; a lease nobody renews leaves within
  ``lease_ttl`` (a gateway killed with -9 holds nothing longer).
- Renewals are batched per gateway: every ``lease_ttl / 3`` one script call renews every lease
  this gateway holds (and gives back those of ended sessions, which also go at once).
- If the store cannot answer, the gateway counts ``max_sessions`` on its own (what
  :class:`~wsgate.sessions.Sessions` checks anyway), logs it once and says so in ``/readyz``;
  no live session is cut. Each renewal period it tries the store again; once it answers, every
  live session's lease is put back (also those admitted meanwhile: the shared count is then
  true again, even if it is over the limit for a while) and leases are shared again.
- Lease members are ``<gateway id>:<random id>``, unique per session; the gateway id is random
  per process, so nothing of a past process is ever renewed.

The session registry (with ``forward_secret`` set: :mod:`wsgate.forwarding`): each live
session of this gateway has a key ``wsgate:session:{sessionId}`` holding ``"{agent.org}
{internal_url}"``, so another gateway of the store can send its stop or Session API call here.
Entries are written and renewed in the same rounds as the leases (a new session's at the next
round, which it wakes: within a store round trip of its 101), deleted when the session ends,
and live ``lease_ttl`` unless renewed; in local mode none is written (a session then is reached
only on its own gateway), and they are all put back when the store is.

Beside it, one index per agent, ``wsgate:gateways:{agent.org}``: a sorted set of the
``internal_url`` of every gateway holding live sessions of that agent, scored by when the entry
expires (the server's clock), so a list asked of any gateway knows whom else to ask
(:meth:`RedisCapacity.gateways`). A gateway joins an agent's index in the round after its first
session of that agent registers, renews its place in every renewal round, and leaves it in the
round after its last one ended; a gateway killed leaves it within ``lease_ttl``.
"""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple, Protocol

import anyio
from anyio.abc import TaskStatus

from .config import forward_secret
from .errors import HttpError, StoreUnavailable
from .redis_store import RedisStore

if TYPE_CHECKING:
    from glide import Script

    from .config import AgentConfig, GatewaySettings

__all__ = [
    "KEY_PREFIX",
    "Capacity",
    "CapacityStoreUnavailable",
    "Lease",
    "LocalCapacity",
    "RedisCapacity",
    "open_capacity",
]

log = logging.getLogger("wsgate")

#: Prefix of the lease sets' keys in Redis (one per agent: ``wsgate:lease:{agent.org}``).
KEY_PREFIX = "wsgate:lease:"
#: Prefix of the session registry's keys (one per live session: ``wsgate:session:{id}``).
SESSION_PREFIX = "wsgate:session:"
#: Prefix of the per-agent index of gateways holding its sessions (``wsgate:gateways:{agent}``).
GATEWAYS_PREFIX = "wsgate:gateways:"
#: Leases renewed or given back per script call (a gateway holding more makes several).
BATCH = 1000

# KEYS[1]: the agent's lease set. ARGV: max_sessions, the new member, lease_ttl in ms.
# Returns 1 (taken) or 0 (the agent is at capacity). The server's clock: no skew between
# gateways.
_ACQUIRE = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local ttl = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then
  return 0
end
redis.call('ZADD', KEYS[1], now + ttl, ARGV[2])
if redis.call('PTTL', KEYS[1]) < ttl then
  redis.call('PEXPIRE', KEYS[1], ttl)
end
return 1
"""

# KEYS[i]: the lease set of pair i (repeats allowed). ARGV[1]: lease_ttl in ms; ARGV[2]: how
# many of the pairs (the first ones) are given back; ARGV[2 + i]: the member of pair i. The
# others are renewed, or put back if the set lost them (a store that restarted empty).
_SYNC = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local ttl = tonumber(ARGV[1])
local given_back = tonumber(ARGV[2])
local extended = {}
for i, key in ipairs(KEYS) do
  if i <= given_back then
    redis.call('ZREM', key, ARGV[i + 2])
  else
    redis.call('ZADD', key, now + ttl, ARGV[i + 2])
    if not extended[key] then
      extended[key] = true
      if redis.call('PTTL', key) < ttl then
        redis.call('PEXPIRE', key, ttl)
      end
    end
  end
end
return #KEYS
"""


# KEYS[i]: a session's registry key. ARGV[1]: lease_ttl in ms; ARGV[2]: how many of the keys
# (the first ones) are deleted; ARGV[2 + i]: the entry of key i (ignored for those deleted).
_REGISTER = """
local ttl = tonumber(ARGV[1])
local deleted = tonumber(ARGV[2])
for i, key in ipairs(KEYS) do
  if i <= deleted then
    redis.call('DEL', key)
  else
    redis.call('SET', key, ARGV[i + 2], 'PX', ttl)
  end
end
return #KEYS
"""

# KEYS[i]: an agent's index of gateways. ARGV[1]: lease_ttl in ms; ARGV[2]: how many of the keys
# (the first ones) this gateway leaves; ARGV[3]: its internal URL. Expired members go as others
# are written: a gateway killed is not read after its expiry, and not kept after the next write.
_INDEX = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local ttl = tonumber(ARGV[1])
local left = tonumber(ARGV[2])
for i, key in ipairs(KEYS) do
  if i <= left then
    redis.call('ZREM', key, ARGV[3])
  else
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
    redis.call('ZADD', key, now + ttl, ARGV[3])
    if redis.call('PTTL', key) < ttl then
      redis.call('PEXPIRE', key, ttl)
    end
  end
end
return #KEYS
"""

# KEYS[1]: an agent's index of gateways. The members not expired, on the server's clock.
_GATEWAYS = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
return redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now, '+inf')
"""


class _Scripts(NamedTuple):
    acquire: Script
    sync: Script
    register: Script
    index: Script
    gateways: Script


class CapacityStoreUnavailable(StoreUnavailable):
    """The capacity store cannot answer: limits are counted on this gateway meanwhile."""


@dataclass(frozen=True, slots=True)
class Lease:
    """One session's place in its agent's shared capacity."""

    service_host: str
    member: str


class Capacity(Protocol):
    """Where an agent's sessions are counted beyond this gateway's own count."""

    async def acquire(self, agent: AgentConfig) -> Lease | None:
        """Take a place for one session of ``agent`` (after the gateway's own count allowed
        it); raises ``HttpError`` 503 "agent at capacity"."""
        ...

    def release(self, lease: Lease | None) -> None:
        """Give the place back (the session ended or did not start)."""
        ...

    async def release_now(self, lease: Lease | None) -> None:
        """Give the place back before a refusal is answered (a token already used, a bot
        unreachable): a client that retries at once must find it free, not still held until
        the next background round."""
        ...

    @property
    def status(self) -> str | None:
        """None while all is well; else one line on why limits are counted here."""
        ...

    def register(self, session_id: str, service_host: str) -> None:
        """A session of this gateway went live: make it reachable from the store's others."""
        ...

    def unregister(self, session_id: str) -> None:
        """The session ended (or was stopped)."""
        ...

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """The background work (renewals) until cancelled."""
        ...

    async def aclose(self) -> None:
        """Release connections; not used afterwards."""
        ...


class LocalCapacity:
    """This gateway's own count is the whole limit (the default)."""

    async def acquire(self, agent: AgentConfig) -> Lease | None:
        return None

    def release(self, lease: Lease | None) -> None:
        pass

    async def release_now(self, lease: Lease | None) -> None:
        pass

    @property
    def status(self) -> str | None:
        return None

    def register(self, session_id: str, service_host: str) -> None:
        pass

    def unregister(self, session_id: str) -> None:
        pass

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()

    async def aclose(self) -> None:
        pass


class RedisCapacity:
    """``max_sessions`` across every gateway sharing one Redis or Valkey (see the module's
    invariants). ``url``: a store URL (:mod:`wsgate.redis_store`); ``lease_ttl``: seconds a
    lease lives unless renewed; ``timeout``: seconds each store command may take;
    ``internal_url``: this gateway's address for the others (asked when a session registers),
    or None: no session registry."""

    def __init__(
        self,
        url: str,
        *,
        lease_ttl: float = 30.0,
        timeout: float = 1.0,
        internal_url: Callable[[], str] | None = None,
    ) -> None:
        if not lease_ttl > 0:
            raise ValueError("lease_ttl must be > 0")
        self._store = RedisStore(
            url, name="capacity store", error=CapacityStoreUnavailable, timeout=timeout
        )
        self.lease_ttl = lease_ttl
        self._ttl_ms = max(1, math.ceil(lease_ttl * 1000))
        #: Random per process: this gateway's part of every lease member.
        self.gateway_id = uuid.uuid4().hex[:16]
        # member -> service host: every lease of a live session of this gateway.
        self._live: dict[str, str] = {}
        # (service host, member) to remove from the store at the next sync.
        self._given_back: list[tuple[str, str]] = []
        self._shared = True
        self._wake: anyio.Event | None = None
        self._scripts: _Scripts | None = None
        #: This gateway's address for the others; None: no session registry.
        self.internal_url = internal_url
        # session id -> its registry entry: every live session of this gateway.
        self._entries: dict[str, str] = {}
        # Entries to write (new sessions) and keys to delete (ended ones) at the next sync.
        self._new_entries: list[str] = []
        self._ended_entries: list[str] = []
        # Agent (service host) -> its live sessions here; the agents whose index holds us.
        self._agents: dict[str, int] = {}
        self._indexed: set[str] = set()

    def __repr__(self) -> str:
        mode = "shared" if self._shared else "local"
        return f"<RedisCapacity {self._store.url} {mode}, {len(self._live)} leases>"

    @property
    def shared(self) -> bool:
        """Whether limits are held in the store now (False: counted on this gateway)."""
        return self._shared

    @property
    def leases(self) -> int:
        """Leases this gateway holds (its live sessions past the capacity check)."""
        return len(self._live)

    @property
    def status(self) -> str | None:
        if self._shared:
            return None
        return "capacity store unreachable: max_sessions counted on this gateway"

    @property
    def registry(self) -> bool:
        """Whether this gateway writes its live sessions to the store (for forwarding)."""
        return self.internal_url is not None

    def register(self, session_id: str, service_host: str) -> None:
        if self.internal_url is None:
            return
        self._entries[session_id] = f"{service_host} {self.internal_url()}"
        self._agents[service_host] = self._agents.get(service_host, 0) + 1
        if self._shared:
            self._new_entries.append(session_id)
            self._poke()

    def unregister(self, session_id: str) -> None:
        entry = self._entries.pop(session_id, None)
        if entry is None:
            return
        host = entry.partition(" ")[0]
        if self._agents[host] > 1:
            self._agents[host] -= 1
        else:
            del self._agents[host]
        if self._shared:
            self._ended_entries.append(session_id)
            self._poke()

    async def locate(self, session_id: str) -> tuple[str, str] | None:
        """Where a live session is held, from the registry: ``(service host, internal URL)``,
        or None. Raises :class:`CapacityStoreUnavailable` when the store cannot answer."""
        entry = await self._store.execute("GET", SESSION_PREFIX + session_id)
        if entry is None:
            return None
        text = entry.decode() if isinstance(entry, bytes) else str(entry)
        host, _, where = text.partition(" ")
        return host, where

    async def gateways(self, service_host: str) -> list[str]:
        """The internal URLs of the gateways holding live sessions of the agent (this one's
        too, if it does), from the agent's index. Raises :class:`CapacityStoreUnavailable`."""
        found = await self._store.script(
            self._script_objects().gateways, [GATEWAYS_PREFIX + service_host], [], name="gateways"
        )
        return [m.decode() if isinstance(m, bytes) else str(m) for m in found or ()]

    async def acquire(self, agent: AgentConfig) -> Lease | None:
        lease = Lease(agent.service_host, f"{self.gateway_id}:{uuid.uuid4().hex}")
        if self._shared:
            try:
                granted = await self._store.script(
                    self._script_objects().acquire,
                    [KEY_PREFIX + agent.service_host],
                    [agent.max_sessions, lease.member, self._ttl_ms],
                    name="acquire",
                )
            except StoreUnavailable as exc:
                self._fall_back(exc)  # and admit: the gateway's own count allowed it
            except BaseException:
                # Cancelled (the client left) while the script may have run: give it back.
                self._give_back(lease)
                raise
            else:
                if granted != 1:
                    raise HttpError(503, "agent at capacity")
        self._live[lease.member] = lease.service_host
        return lease

    def release(self, lease: Lease | None) -> None:
        if lease is None or self._live.pop(lease.member, None) is None:
            return
        self._give_back(lease)

    async def release_now(self, lease: Lease | None) -> None:
        if lease is None or self._live.pop(lease.member, None) is None or not self._shared:
            return
        sync = self._script_objects().sync
        try:
            # The renewal script with one lease, counted as released.
            await self._store.script(
                sync,
                [KEY_PREFIX + lease.service_host],
                [self._ttl_ms, 1, lease.member],
                name="renew",
            )
        except StoreUnavailable as exc:
            self._fall_back(exc)  # unrenewed, it leaves within lease_ttl
        except BaseException:
            self._give_back(lease)  # cancelled: the background round gives it back
            raise

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Renew every ``lease_ttl / 3``; give back ended leases as they end."""
        period = self.lease_ttl / 3
        next_renewal = anyio.current_time() + period
        task_status.started()
        while True:
            self._wake = anyio.Event()
            if not (self._shared and self._changed):
                with anyio.move_on_after(next_renewal - anyio.current_time()):
                    await self._wake.wait()
            renew = anyio.current_time() >= next_renewal
            if renew:
                next_renewal = anyio.current_time() + period
            if renew or (self._shared and self._changed):
                await self.sync(renew=renew)

    @property
    def _changed(self) -> bool:
        return bool(self._given_back or self._new_entries or self._ended_entries)

    async def sync(self, *, renew: bool = True) -> None:
        """One round: give back ended leases and, with ``renew``, renew (or put back) every
        live one. In local mode, a success means the store is back."""
        given_back, self._given_back = self._given_back, []
        new, self._new_entries = self._new_entries, []
        ended, self._ended_entries = self._ended_entries, []
        if not self._shared and not renew:
            return
        pairs = given_back + ([(h, m) for m, h in self._live.items()] if renew else [])
        released = len(given_back)
        scripts = self._script_objects()
        try:
            entries = [s for s in (self._entries if renew else new) if s in self._entries]
            ended = [s for s in ended if s not in self._entries]
            for start in range(0, len(ended) + len(entries), BATCH):
                keys = (ended + entries)[start : start + BATCH]
                count = max(0, min(len(ended) - start, len(keys)))
                values = ["" if i < count else self._entries[k] for i, k in enumerate(keys)]
                await self._store.script(
                    scripts.register,
                    [SESSION_PREFIX + key for key in keys],
                    [self._ttl_ms, count, *values],
                    name="register",
                )
            await self._index(scripts.index, renew=renew)
            for start in range(0, max(len(pairs), 1), BATCH):
                chunk = pairs[start : start + BATCH]
                if not chunk:
                    if renew:
                        await self._store.execute("PING")  # nothing held: just probe the store
                    break
                count = max(0, min(released - start, len(chunk)))
                await self._store.script(
                    scripts.sync,
                    [KEY_PREFIX + host for host, _ in chunk],
                    [self._ttl_ms, count, *(member for _, member in chunk)],
                    name="renew",
                )
        except StoreUnavailable as exc:
            # Given-back leases are dropped: unrenewed, they leave within lease_ttl.
            self._fall_back(exc)
            return
        if not self._shared:
            self._shared = True
            log.warning(
                "capacity store %s is back: max_sessions shared again (%d lease(s) put back)",
                self._store.url.where,
                len(self._live),
            )

    async def aclose(self) -> None:
        await self._store.aclose()

    def _give_back(self, lease: Lease) -> None:
        if not self._shared:
            return  # not renewed any more: it leaves the store within lease_ttl
        self._given_back.append((lease.service_host, lease.member))
        self._poke()

    def _poke(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def _fall_back(self, exc: StoreUnavailable) -> None:
        # Not renewed any more: they leave within lease_ttl.
        self._given_back.clear()
        self._new_entries.clear()
        self._ended_entries.clear()
        if self._shared:
            self._shared = False
            log.warning("%s: max_sessions counted on this gateway until it is back", exc)

    async def _index(self, script: Script, *, renew: bool) -> None:
        """Join the index of each agent with live sessions here (all of them on ``renew``, else
        those new here) and leave those of agents with none any more."""
        if self.internal_url is None:
            return
        live = set(self._agents)
        joined = live if renew else live - self._indexed
        left = self._indexed - live
        if not (joined or left):
            return
        keys = [GATEWAYS_PREFIX + host for host in (*left, *joined)]
        own = self.internal_url()
        await self._store.script(script, keys, [self._ttl_ms, len(left), own], name="index")
        self._indexed = (self._indexed | joined) - left

    def _script_objects(self) -> _Scripts:
        if self._scripts is None:
            from glide import Script

            # glide's Script is not annotated.
            texts = (_ACQUIRE, _SYNC, _REGISTER, _INDEX, _GATEWAYS)
            self._scripts = _Scripts(*(Script(t) for t in texts))  # type: ignore[no-untyped-call]
        return self._scripts


def open_capacity(
    settings: GatewaySettings, internal_url: Callable[[], str] | None = None
) -> LocalCapacity | RedisCapacity:
    """The capacity a gateway's settings name: shared when ``capacity_store`` is set, with a
    session registry when a forward secret is too (``internal_url``: this gateway's address,
    asked when the first session registers)."""
    if settings.capacity_store is None:
        return LocalCapacity()
    registry = internal_url if forward_secret(settings) is not None else None
    return RedisCapacity(
        settings.capacity_store, lease_ttl=settings.lease_ttl, internal_url=registry
    )
