"""A gateway's Prometheus metrics: what each one means is in ``docs/OPERATIONS.md``.

Three sources, all read when ``/metrics`` is scraped, exposed with ``prometheus-client`` (one
registry per gateway, so gateways in one process never mix):

- the relay engine's live counters per agent (``rust/counters.rs``, :meth:`_core.Engine.counters`):
  sessions opened and active by kind, messages and bytes each way. Counted in Rust as sessions
  go (a few relaxed atomic adds per read, nothing per message, no Python per message);
- events of the control plane, counted where they happen, once per request or session:
  refusals, session ends and their durations, ``/start`` answers, token rejections, the replay
  store's round trips, bot dials. The sessions the engine opens by itself (``fastpath``) have
  their dials, ends and durations counted in the engine (``rust/counters.rs``), added to the
  control plane's own at each scrape: nothing of theirs is counted in Python;
- the gateway's state: connections open, upgrades pending, draining; the build; the process.

Labels are bounded: ``agent`` is a configured service host (``{agent}.{org}``) or ``""`` (the
request named none that this gateway knows: a hostile path adds no series), status and reason
labels come from fixed sets, a close code outside the registered ones is ``3xxx``/``4xxx``. No
label holds a token, a body or a client address.
"""

from __future__ import annotations

import functools
import time
from bisect import bisect_left
from collections.abc import Callable, Container, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata

from prometheus_client import CollectorRegistry, Counter, Histogram, Info, ProcessCollector
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from . import _core
from .errors import HttpError, OpeningError, TokenRejected
from .replay import ReplayStore, ReplayStoreUnavailable
from .responses import http_response
from .session_api import STOP_REASON

__all__ = [
    "METRICS_PATH",
    "GatewayState",
    "Metrics",
    "TimedStore",
    "close_code_label",
    "dial_failure",
    "ended_by",
]

METRICS_PATH = "/metrics"

#: Session durations, seconds: voice calls last seconds to hours (SPEC §6 caps them at 4 h).
#: The engine's, which counts the durations of the sessions it opens by itself.
DURATION_BUCKETS = _core.DURATION_BUCKETS
#: A replay-store round trip: microseconds in memory, ~0.1 ms to Redis on the same host.
STORE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5)
#: A bot's TCP connect and 101: milliseconds nearby, up to ``dial_timeout`` (5 s by default).
DIAL_BUCKETS = _core.DIAL_BUCKETS

# The close reason of a stop (server.py's drain, sessions.py's supervise): a session ended with
# it was ended by the gateway's drain (the engine labels its own sessions' log lines by it).
_DRAIN_REASON = _core.DRAIN_REASON
# What upstream.dial's reasons say (after "bot unreachable: "), in the order judged, and the
# bounded reason each becomes; anything else is "other".
_DIAL_FAILURES = (
    ("timed out", "timeout"),
    ("refused", "refused"),
    ("resolve", "dns"),
    ("unreachable", "unreachable"),
    ("no route", "unreachable"),
    ("reset", "reset"),
    ("closed before", "closed"),
    ("answered", "bad_answer"),
    ("response", "bad_answer"),
    ("upgrade", "bad_answer"),
    ("sec-websocket", "bad_answer"),
    ("extension", "bad_answer"),
    ("subprotocol", "bad_answer"),
)


def ended_by(outcome: _core.Outcome, inprocess: bool, stopped: bool = False) -> str:
    """Who or what ended a session, as the ``ended_by`` label: ``client``, ``bot``,
    ``gateway_limit`` (time limit, message size), ``gateway_drain`` (a stop), ``api`` (stopped
    through ``DELETE /v1/agents/…/sessions/…``: ``stopped``, when that close is what ended it) or
    ``error`` (a broken protocol rule, the close timeout, the engine stopped).

    The engine says ``gateway`` whenever it sent the closes itself; for an in-process bot that
    includes the bot's own close (the gateway speaks WebSocket for it), which counts as ``bot``.
    """
    return _ended_by(outcome.ended_by, outcome.code, outcome.detail, inprocess, stopped)


def _ended_by(by: str, code: int, detail: str, inprocess: bool, stopped: bool) -> str:
    if by != "gateway":
        return by
    if stopped and detail == STOP_REASON:
        return "api"
    if detail == _core.TIME_LIMIT_REASON or code == 1009:
        return "gateway_limit"
    if detail == _DRAIN_REASON:
        return "gateway_drain"
    if inprocess and code not in (1002, 1006, 1007):
        return "bot"
    return "error"


def close_code_label(code: int) -> str:
    """A close code as a bounded label: the codes of RFC 6455 §7.4 and IANA's registry
    (1000-1015) as they are, the ranges left to applications as ``3xxx`` and ``4xxx``."""
    if 1000 <= code <= 1015:
        return str(code)
    if 3000 <= code <= 4999:
        return f"{code // 1000}xxx"
    return "other"


def dial_failure(error: HttpError) -> str:
    """Why a bot could not be reached (:func:`wsgate.upstream.dial`'s refusal), as a bounded
    label: ``timeout``, ``refused``, ``dns``, ``unreachable``, ``reset``, ``closed``,
    ``bad_answer`` (not a 101 we can relay) or ``other``."""
    if error.status == 504:
        return "timeout"
    reason = error.reason.lower().removeprefix("bot unreachable: ")
    return next((label for words, label in _DIAL_FAILURES if words in reason), "other")


@dataclass(frozen=True)
class GatewayState:
    """What the gauges of a serving gateway read."""

    #: TCP connections held (upgrading or in a session).
    connections: Callable[[], int]
    #: Connections still sending their request.
    pending: Callable[[], int]
    #: Whether a stop has begun.
    draining: Callable[[], bool]


class Metrics:
    """One gateway's metrics: a ``prometheus_client`` registry (:attr:`registry`, to which an
    embedder may add collectors of its own) and the events the control plane reports.

    ``agents``: the configured service hosts (a live view: in-process bots registered before
    the gateway serves show up); an ``agent`` label takes only these, else ``""``.
    """

    def __init__(self, agents: Container[str] = frozenset()) -> None:
        self._agents = agents
        #: Called first at each exposition (see :meth:`watch`).
        self._catch_up: Callable[[], None] | None = None
        self.registry = registry = CollectorRegistry()
        self._refused = Counter(
            "wsgate_upgrades_refused",
            "Requests answered with an HTTP error instead of a session (after Twilio's opening: "
            "a close frame), by agent and status",
            ["agent", "status"],
            registry=registry,
        )
        self._ends = _Ends(self.agent)
        registry.register(self._ends)
        self._start = Counter(
            "wsgate_start_requests",
            "/start requests answered, by agent and status",
            ["agent", "status"],
            registry=registry,
        )
        self._control = Counter(
            "wsgate_session_control_requests",
            "Session control and Session API requests answered, by agent, action (stop, list, "
            "session_api), status, and whether another gateway answered (forwarded: yes/no)",
            ["agent", "action", "status", "forwarded"],
            registry=registry,
        )
        self._tokens = Counter(
            "wsgate_token_rejections",
            "Session tokens refused (403), by reason",
            ["reason"],
            registry=registry,
        )
        self._store = Histogram(
            "wsgate_replay_store_seconds",
            "Round trips to the replay store (token claims and releases)",
            buckets=STORE_BUCKETS,
            registry=registry,
        )
        self._store_errors = Counter(
            "wsgate_replay_store_errors",
            "Replay-store calls that failed (token sessions are refused with 503 meanwhile)",
            registry=registry,
        )
        self._dial_failures = Counter(
            "wsgate_upstream_dial_failures",
            "Dials of an upstream bot that failed (the client got 502/504), by agent and reason",
            ["agent", "reason"],
            registry=registry,
        )
        Info("wsgate_build", "The wsgate build serving", registry=registry).info(
            {"version": _version()}
        )
        ProcessCollector(registry=registry)

    def agent(self, service_host: str | None) -> str:
        """``service_host`` as an ``agent`` label: a configured one, else ``""``."""
        return service_host if service_host and service_host in self._agents else ""

    def watch(
        self,
        counters: Callable[[], Sequence[_core.AgentCounts]],
        state: GatewayState,
        catch_up: Callable[[], None] | None = None,
    ) -> None:
        """Read the engine's live ``counters`` (with the dials and ends of the sessions it
        opened by itself) and the gateway's ``state`` at every scrape (once, when the gateway
        starts serving). ``catch_up``: called by :meth:`exposition` first, on the event loop:
        the ends the engine has yet to tell (the sessions it opened are told at leisure,
        :meth:`wsgate.engine.Relay.dispatch`) are taken in first, so the log has them too."""
        self.registry.register(_Live(counters, state))
        self._ends.engine = counters
        self._catch_up = catch_up

    def upgrade_refused(self, service_host: str | None, error: HttpError | OpeningError) -> None:
        """A request was refused; a Twilio opening refused after its upgrade counts as 400."""
        status = error.status if isinstance(error, HttpError) else 400
        self.refused(service_host, status)
        if isinstance(error, TokenRejected):
            self._tokens.labels(error.kind).inc()

    def refused(self, service_host: str | None, status: int) -> None:
        """A request was answered with ``status`` (a head too large, an internal error)."""
        self._refused.labels(self.agent(service_host), str(status)).inc()

    def start_answered(self, service_host: str | None, status: int) -> None:
        """``/start`` answered ``status`` (for the agent it resolved to, if it got that far)."""
        self._start.labels(self.agent(service_host), str(status)).inc()

    def session_control(
        self, service_host: str | None, action: str, status: int, forwarded: bool
    ) -> None:
        """A stop, a list or a Session API call answered ``status`` (its bot's own status for
        the Session API), here or by the gateway holding the session (``forwarded``)."""
        labels = (self.agent(service_host), action, str(status), "yes" if forwarded else "no")
        self._control.labels(*labels).inc()

    def session_ended(
        self,
        service_host: str,
        inprocess: bool,
        outcome: _core.Outcome,
        seconds: float,
        stopped: bool = False,
    ) -> None:
        """A session ended after ``seconds`` (``stopped``: through the API). Not for the
        sessions the engine opened by itself: it counts theirs."""
        agent = self.agent(service_host)
        by, code = ended_by(outcome, inprocess, stopped), close_code_label(outcome.code)
        self._ends.ended(agent, by, code, seconds)

    @contextmanager
    def dialling(self, service_host: str) -> Iterator[None]:
        """Around a dial of the agent's bot: its time if it succeeds, its reason if not."""
        started = time.perf_counter()
        try:
            yield
        except HttpError as exc:
            self.dial_failed(service_host, exc)
            raise
        self.dialled(service_host, time.perf_counter() - started)

    def dialled(self, service_host: str, seconds: float) -> None:
        """A dial of the agent's bot succeeded in ``seconds`` (the engine counts its own)."""
        self._ends.dialled(self.agent(service_host), seconds)

    def dial_failed(self, service_host: str, error: HttpError) -> None:
        """A dial of the agent's bot failed with ``error`` (502 or 504)."""
        self._dial_failures.labels(self.agent(service_host), dial_failure(error)).inc()

    def store_called(self, seconds: Iterable[float]) -> None:
        """Calls to the replay store made elsewhere (the engine's own sessions), each taking
        so many seconds."""
        for s in seconds:
            self._store.observe(s)

    def timed(self, store: ReplayStore) -> TimedStore:
        """``store``, with its round trips and failures counted here."""
        return TimedStore(store, self._store.observe, self._store_errors.inc)

    def exposition(self, accept: str | None = None) -> bytes:
        """The ``/metrics`` response: the text format, or OpenMetrics if ``accept`` asks.
        Call it on the gateway's event loop: it first takes in the ends the engine has yet to
        tell (:meth:`watch`)."""
        if self._catch_up is not None:
            self._catch_up()
        encoder, content_type = choose_encoder(accept or "")
        return http_response(200, encoder(self.registry), content_type)


class _Histogram:
    """Observations in buckets, as the engine keeps them (:class:`_core.AgentCounts`):
    ``counts[i]`` those of at most ``bounds[i]`` and above the bound before, the last those
    above every bound."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def add(self, counts: Sequence[int], total: float) -> None:
        for i, n in enumerate(counts):
            self.counts[i] += n
        self.sum += total

    def copy(self) -> _Histogram:
        h = _Histogram(self.bounds)
        h.add(self.counts, self.sum)
        return h

    def buckets(self) -> list[tuple[str, float]]:
        """Cumulative, as the exposition shows them."""
        les = [*map(floatToGoString, self.bounds), "+Inf"]
        running, out = 0, list[tuple[str, float]]()
        for le, n in zip(les, self.counts, strict=True):
            running += n
            out.append((le, running))
        return out


class _Ends(Collector):
    """Session ends, their durations and bot dials: the control plane's own, counted in plain
    numbers as they happen (on the event loop: ``prometheus_client``'s take a lock per
    observation, and these come once per session), and at each scrape the engine's for the
    sessions it opened by itself, once :meth:`Metrics.watch` gave its counters."""

    def __init__(self, agent: Callable[[str], str]) -> None:
        self._agent = agent
        self.engine: Callable[[], Sequence[_core.AgentCounts]] | None = None
        self._closed: dict[tuple[str, str, str], int] = {}
        self._durations: dict[str, _Histogram] = {}
        self._dials: dict[str, _Histogram] = {}

    def ended(self, agent: str, by: str, code: str, seconds: float) -> None:
        key = (agent, by, code)
        self._closed[key] = self._closed.get(key, 0) + 1
        _histogram_of(self._durations, agent, DURATION_BUCKETS).observe(seconds)

    def dialled(self, agent: str, seconds: float) -> None:
        _histogram_of(self._dials, agent, DIAL_BUCKETS).observe(seconds)

    def describe(self) -> Iterable[Metric]:
        return self._families({}, {}, {})

    def collect(self) -> Iterable[Metric]:
        closed = dict(self._closed)
        durations = {a: h.copy() for a, h in list(self._durations.items())}
        dials = {a: h.copy() for a, h in list(self._dials.items())}
        for c in self.engine() if self.engine is not None else ():
            agent = self._agent(c.agent)
            for by, code, detail, n in c.closed:
                # The engine's sessions are relayed, stopped only through the API.
                label = _ended_by(by, code, detail, inprocess=False, stopped=True)
                key = (agent, label, close_code_label(code))
                closed[key] = closed.get(key, 0) + n
            if c.duration_counts:
                lasted = _histogram_of(durations, agent, DURATION_BUCKETS)
                lasted.add(c.duration_counts, c.duration_sum)
            if c.dial_counts:
                _histogram_of(dials, agent, DIAL_BUCKETS).add(c.dial_counts, c.dial_sum)
        return self._families(closed, durations, dials)

    @staticmethod
    def _families(
        closed: dict[tuple[str, str, str], int],
        durations: dict[str, _Histogram],
        dials: dict[str, _Histogram],
    ) -> list[Metric]:
        ends = CounterMetricFamily(
            "wsgate_sessions_closed",
            "Sessions ended, by agent, who ended them and the close code they ended with",
            labels=["agent", "ended_by", "code"],
        )
        for labels, n in closed.items():
            ends.add_metric(labels, n)
        return [
            ends,
            _by_agent(
                "wsgate_session_duration_seconds",
                "How long ended sessions lasted, from the hand-over to the engine to their end",
                durations,
            ),
            _by_agent(
                "wsgate_upstream_dial_seconds",
                "Time to reach an upstream bot and get its 101, of the dials that succeeded",
                dials,
            ),
        ]


def _histogram_of(
    histograms: dict[str, _Histogram], agent: str, bounds: Sequence[float]
) -> _Histogram:
    """The agent's histogram in ``histograms``, made (over ``bounds``) if it has none."""
    histogram = histograms.get(agent)
    if histogram is None:
        histogram = histograms[agent] = _Histogram(bounds)
    return histogram


def _by_agent(name: str, doc: str, histograms: dict[str, _Histogram]) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, doc, labels=["agent"])
    for agent, h in histograms.items():
        family.add_metric([agent], h.buckets(), h.sum)
    return family


class _Live(Collector):
    """The engine's counters and the gateway's gauges, read at each scrape."""

    def __init__(
        self, counters: Callable[[], Sequence[_core.AgentCounts]], state: GatewayState
    ) -> None:
        self._counters = counters
        self._state = state

    def describe(self) -> Iterable[Metric]:
        return self._families(())

    def collect(self) -> Iterable[Metric]:
        return self._families(self._counters(), self._state)

    @staticmethod
    def _families(
        counts: Sequence[_core.AgentCounts], state: GatewayState | None = None
    ) -> list[Metric]:
        active = GaugeMetricFamily(
            "wsgate_sessions_active",
            "Sessions being relayed now, by agent and what serves them",
            labels=["agent", "kind"],
        )
        opened = CounterMetricFamily(
            "wsgate_sessions_opened",
            "Sessions handed to the relay engine, by agent",
            labels=["agent"],
        )
        messages = CounterMetricFamily(
            "wsgate_messages",
            "Data messages relayed, by agent and direction (counted in the engine as they flow)",
            labels=["agent", "direction"],
        )
        payload = CounterMetricFamily(
            "wsgate_bytes",
            "Payload bytes of the data messages relayed, by agent and direction",
            labels=["agent", "direction"],
        )
        for c in counts:
            active.add_metric([c.agent, "upstream"], c.active_upstream)
            active.add_metric([c.agent, "inprocess"], c.active_inprocess)
            active.add_metric([c.agent, "builtin"], c.active_builtin)
            opened.add_metric([c.agent], c.opened)
            messages.add_metric([c.agent, "client_to_bot"], c.messages_in)
            messages.add_metric([c.agent, "bot_to_client"], c.messages_out)
            payload.add_metric([c.agent, "client_to_bot"], c.bytes_in)
            payload.add_metric([c.agent, "bot_to_client"], c.bytes_out)
        connections, pending, draining = (
            (0, 0, False)
            if state is None
            else (state.connections(), state.pending(), state.draining())
        )
        return [
            active,
            opened,
            messages,
            payload,
            GaugeMetricFamily(
                "wsgate_connections_open",
                "TCP connections held: upgrading or in a session",
                value=connections,
            ),
            GaugeMetricFamily(
                "wsgate_upgrades_pending",
                "Connections still sending their request",
                value=pending,
            ),
            GaugeMetricFamily(
                "wsgate_draining",
                "1 once a stop has begun (the gateway drains), else 0",
                value=int(draining),
            ),
        ]


class TimedStore:
    """A replay store whose calls are timed and whose failures are counted (see
    :meth:`Metrics.timed`); anything else is the wrapped store's."""

    def __init__(
        self,
        store: ReplayStore,
        observe: Callable[[float], None],
        failed: Callable[[], None],
    ) -> None:
        self.store = store
        self._observe = observe
        self._failed = failed

    def __repr__(self) -> str:
        return repr(self.store)

    def __getattr__(self, name: str) -> object:
        return getattr(self.store, name)

    async def claim(self, nonce: str, exp: int) -> bool:
        with self._timing():
            return await self.store.claim(nonce, exp)

    async def release(self, nonce: str) -> None:
        with self._timing():
            await self.store.release(nonce)

    async def aclose(self) -> None:
        await self.store.aclose()

    @contextmanager
    def _timing(self) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        except ReplayStoreUnavailable:
            self._failed()
            raise
        finally:
            self._observe(time.perf_counter() - started)


@functools.cache
def _version() -> str:
    try:
        return metadata.version("wsgate")
    except metadata.PackageNotFoundError:
        return "unknown"
