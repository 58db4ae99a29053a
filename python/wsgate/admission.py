"""Admission: which connections may be dropped to make room, and how fast one client may come.

Rate limits (:class:`RateLimiter`, keyed by :func:`client_key` or by public key) are off by
default; they are for gateways on the open internet (see docs/SECURITY.md).

Which connections may be dropped to make room: those still sending their request.

A connection is *reading* while the client has not finished its request: the HTTP head, a
``/start`` body, a Twilio stream's opening messages. Nothing has been decided for it yet, so it
may be evicted when more than ``max_pending_upgrades`` are reading at once. A connection past its
request (checked, its token claimed, its bot being dialled) is never evicted: it is bounded by
``dial_timeout`` and ``max_connections`` instead. Evicting one of those would let a client that
opens idle connections fast cancel other clients' sessions and burn their tokens.

Eviction order: the oldest first, never the connection just accepted, and none reading for less
than :data:`EVICT_AFTER` (one second). A real client sends its request at once, so it leaves
the reading state within a round trip (a TLS handshake's few); under a flood of idle or slow
connections, those that outlive a second are evicted as newcomers arrive. Preferring to evict
the idle ones would look kinder, but a just-accepted real client *is* idle for its first
microseconds, so a flood of slow partial requests would then evict the real clients first. And
a younger one may be a real client whose request is on its way, or in its socket unread while
the gateway accepts a burst: 2,000 clients connecting at once lost half their connections to
evictions (benches/README.md, "Session opens, round 10"), 5,000 lost 3,000 when the young were
evicted past twice the limit (round 11). So in a burst more than ``max_pending_upgrades``
may be reading for that second, as many as ``max_connections`` allows (each costs its socket and
a few KiB). Once the gateway holds ``max_connections`` and another connection waits in the
listener's backlog, the oldest reading connection gives way once it has been at it a second
too (the engine's or one of :class:`PendingReads`, whichever has been at it longer; one per
newcomer: :meth:`wsgate.listener.Listener._try_room`, told by the engine's ``accepting.rs`` or
seen when Python accepts). So idle connections hold a full gateway a second at most; an honest
client's TLS handshake, or its request on its way, gets that second, as above; and none is
evicted while the backlog is empty (a burst that fits ``max_connections`` exactly loses no
one). The engine's own reads keep the same rules (``rust/opener.rs``).
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import anyio

__all__ = ["EVICT_AFTER", "PendingReads", "RateLimiter", "client_key"]

log = logging.getLogger("wsgate")

# Evictions are logged at most once per this many seconds, with their count.
_LOG_INTERVAL = 1.0

#: Seconds a connection reads its request before it may be evicted (see the module docs; the
#: engine's ``EVICT_AFTER``).
EVICT_AFTER = 1.0


class PendingReads:
    """The connections reading their request, at most ``limit`` at once."""

    def __init__(self, limit: int, clock: Callable[[], float] = anyio.current_time) -> None:
        self.limit = limit
        #: Ages a reading connection (the event loop's clock; tests give their own).
        self._clock = clock
        #: Connections evicted so far.
        self.evicted = 0
        # Insertion-ordered: the oldest first, each with when it began (the event loop's clock).
        self._reading: dict[anyio.CancelScope, float] = {}
        self._unlogged = 0
        self._last_log = -_LOG_INTERVAL

    def __len__(self) -> int:
        return len(self._reading)

    @contextmanager
    def reading(self, deadline: float) -> Iterator[None]:
        """Run the body as a reading phase ending at ``deadline`` (the event loop's clock).
        Over the deadline or evicted, the body is cancelled and the block ends early: the
        caller sees that from its own result (e.g. still None)."""
        with anyio.CancelScope(deadline=deadline) as scope:
            self._reading[scope] = self._clock()
            try:
                self._evict_over_limit(scope)
                yield
            finally:
                self._reading.pop(scope, None)

    def cancel_all(self) -> None:
        """End every reading phase (the gateway is closing)."""
        for scope in self._reading:
            scope.cancel()
        self._reading.clear()

    def make_room(self) -> bool:
        """The gateway holds ``max_connections`` and a connection waits for room: the oldest
        reading connection gives way (the caller checked its age, :meth:`oldest_age`). Whether
        there was one."""
        if not self._reading:
            return False
        self._evict(next(iter(self._reading)))
        return True

    def oldest_age(self) -> float | None:
        """Seconds the oldest reading connection has been at it (None: none is)."""
        for since in self._reading.values():
            return self._clock() - since
        return None

    def _evict_over_limit(self, newcomer: anyio.CancelScope) -> None:
        # The newcomer itself is never the victim: it has had no time to send anything yet;
        # nor is any other reading for less than EVICT_AFTER.
        before = self._clock() - EVICT_AFTER
        while len(self) > self.limit:
            victim, since = next(iter(self._reading.items()))
            if victim is newcomer or since > before:
                break
            self._evict(victim)

    def _evict(self, victim: anyio.CancelScope) -> None:
        del self._reading[victim]
        victim.cancel()
        self.note_eviction()

    def note_eviction(self) -> None:
        """Count (and log, at most once a second) a connection evicted: one of these, or one
        the engine read for the same limit (``reading.rs``: the connections it accepts)."""
        self.evicted += 1
        self._unlogged += 1
        now = anyio.current_time()
        if now - self._last_log >= _LOG_INTERVAL:
            log.warning(
                "evicted %d connection(s) still sending their request: more than "
                "max_pending_upgrades (%d) at once, or max_connections held and more waiting",
                self._unlogged,
                self.limit,
            )
            self._unlogged = 0
            self._last_log = now


def client_key(address: object) -> str:
    """The key under which a client address is limited: the IPv4 address, or the /64 of an
    IPv6 one (one subscriber's whole prefix, which an attacker can rotate through at will)."""
    if isinstance(address, tuple) and len(address) == 2 and isinstance(address[0], str):
        return address[0]  # AF_INET: the kernel's dotted quad is already canonical
    host = address[0] if isinstance(address, tuple) and address else address
    if not isinstance(host, str):
        return ""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class RateLimiter:
    """Token buckets by key: ``rate`` events per second, in bursts of up to ``burst`` (default:
    ``rate``, at least 1).

    Memory: a key is forgotten once its bucket has refilled, so only keys active in the last
    ``burst / rate`` seconds are held, and at most ``max_keys`` of them. Past that, new keys go
    untracked (allowed): failing open, because failing closed would let an attacker with many
    addresses lock every new client out.
    """

    def __init__(self, rate: float, burst: float | None = None, *, max_keys: int = 100_000) -> None:
        if rate <= 0:
            raise ValueError("rate must be > 0")
        self.rate = rate
        self.burst = max(1.0, rate if burst is None else burst)
        self.max_keys = max_keys
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)
        self._calls = 0

    def __len__(self) -> int:
        return len(self._buckets)

    def allow(self, key: str, now: float) -> bool:
        """Take one token of ``key``'s bucket at ``now`` (seconds); False when it is empty."""
        self._calls += 1
        if self._calls % 1024 == 0:  # amortised: one sweep per 1024 calls
            self._forget_full(now)
        tokens, at = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        if tokens < 1:
            self._buckets[key] = (tokens, now)
            return False
        if key in self._buckets or len(self._buckets) < self.max_keys:
            self._buckets[key] = (tokens - 1, now)
        return True

    def _forget_full(self, now: float) -> None:
        full = [
            key
            for key, (tokens, at) in self._buckets.items()
            if tokens + (now - at) * self.rate >= self.burst
        ]
        for key in full:
            del self._buckets[key]
