"""Sessions: capacity, and the one handover of a checked request to a running session.

:meth:`Sessions.admit` takes a :class:`~wsgate.routing.Route` that passed every check of the
request and: takes a place in the agent's capacity (503; with a capacity store, also a lease
there: :mod:`wsgate.capacity`) and the client's (429), claims the token (403 replayed, 503 store
down), asks ``authorize`` (:mod:`wsgate.authorize`), dials the bot (a member of the agent's
pool: :mod:`wsgate.pools`; 502/504) or picks the builtin echo or the in-process bot, answers 101
(unless a Twilio opening was read after it), and hands the sockets to the Rust engine. Whatever
fails gives back the place and the token. A session's end (its :class:`_core.Outcome`) is logged
once, with the provider and call id where known, never a token, a body or a close reason, and
counted in the gateway's metrics (:mod:`wsgate.metrics`).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import anyio

from . import _core
from ._sockets import Conn, read_until, send_all
from .authorize import Authorize, SessionRequest, consult
from .capacity import Capacity, Lease, LocalCapacity
from .config import AgentConfig, GatewaySettings
from .engine import Handover, InProcess, Limits, Relay, RelaySession, Upstream
from .errors import HttpError, OpeningError
from .handshake import switching_protocols
from .inprocess import Bot, BotArguments, InProcessWebSocket, SessionChannel, serve_bot
from .logs import session_fields, write_info, write_session_lines
from .metrics import Metrics, ended_by
from .pools import Member, Pools
from .providers import Opening, OpeningReader
from .request import Request
from .routing import Route
from .session_api import STOP_CODE, STOP_REASON
from .tokens import TokenAuthority, VerifiedToken
from .upstream import dial
from .urls import UpstreamURL

__all__ = ["Opened", "Sessions", "log_outcome", "peek_opening"]

log = logging.getLogger("wsgate")

# How long the gateway waits for a Telnyx, Plivo or Exotel opening to learn the call's id; the
# bot's first messages wait as long at most. Providers send it at once.
_PEEK_TIME = 1.0


@dataclass(slots=True)
class Opened:
    """A session handed to the engine, with what its end-of-session log line needs."""

    relay: RelaySession
    service_host: str
    session_uuid: str
    started: float
    #: A telephony provider's opening (provider, call and stream ids), when one was read.
    opening: Opening | None = None
    #: For an in-process bot: the bot, its arguments and the session's channel.
    bot: tuple[Bot, BotArguments, SessionChannel] | None = None
    #: The client's address key (see :func:`~wsgate.admission.client_key`).
    client: str = ""
    #: The upstream bot that serves it (see :mod:`wsgate.pools`), counted live until its end.
    member: Member | None = None
    #: Its place in a shared capacity store, if one is used.
    lease: Lease | None = None
    #: The upstream bot's URL (the pool member's, or the one ``authorize`` chose): where the
    #: Session API reaches it. None for builtin and in-process bots.
    upstream: UpstreamURL | None = None
    #: Stopped through the API (``DELETE /v1/agents/…/sessions/…``): its end says ``api``.
    stopped: bool = False
    #: Its places (capacity, lease, pool member) given back and out of the live registry.
    freed: bool = False
    #: What a relayed session's end calls, with this and the outcome (the listener's).
    on_end: Callable[[Opened, _core.Outcome], None] | None = None
    #: For a session the engine opened by itself (:mod:`wsgate.fastpath`): when, in
    #: ``time.monotonic()`` seconds. The engine gives its place and its connection back itself
    #: at its end and counts it (:mod:`wsgate.metrics`); Python logs it.
    opened_at: float | None = None

    @property
    def engine_owned(self) -> bool:
        """Whether the engine opened it by itself, and so gives its place and connection back
        itself."""
        return self.opened_at is not None

    def __call__(self, outcome: _core.Outcome) -> None:
        """The session's ``on_done`` (:class:`~wsgate.engine.RelaySession`): it ended with
        ``outcome``. The Opened is the callback itself, so a gateway holding many sessions
        keeps no closure per session."""
        if self.on_end is not None:
            self.on_end(self, outcome)


class Sessions:
    """The sessions of one gateway: their capacity, their start, their end."""

    def __init__(
        self,
        settings: GatewaySettings,
        relay: Relay,
        bots: dict[str, Bot],
        authority: TokenAuthority | None,
        time_limit: float,
        capacity: Capacity | None = None,
        authorize: Authorize | None = None,
        bot_tls: Callable[[AgentConfig], _core.TlsClientContext] | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        #: The roots an agent's wss:// bots are checked against.
        self.bot_tls = bot_tls
        self.metrics = Metrics() if metrics is None else metrics
        #: The embedder's say on each session (``Gateway(authorize=...)``).
        self.authorize = authorize
        self.relay = relay
        #: In-process bots by service host (the gateway's own dict: registrations show here).
        self.bots = bots
        self.authority = authority
        self.time_limit = time_limit
        #: Counts beyond this gateway's own (a capacity store shared by several gateways).
        self.capacity: Capacity = LocalCapacity() if capacity is None else capacity
        # Places per agent are the engine's (sessions it opens by itself take theirs there);
        # per client, counted only when limited.
        self._places = relay.engine
        self._per_client: dict[str, int] = {}
        #: The agents whose sessions the engine opens by itself (:mod:`wsgate.fastpath`).
        self.fast: dict[str, AgentConfig] = {}
        self.pools = Pools(settings.upstream_retry_after)
        #: Live sessions by session id (``sessionId``, ``X-Session-Id``), from the handover to
        #: their end or stop; bounded by the agents' capacity. The engine's own sessions
        #: (:mod:`wsgate.fastpath`) join it when asked for (:meth:`find`, :meth:`listed`):
        #: until then the engine keeps them, and Python hears of them at their end
        #: (:meth:`told_ended`).
        self.live: dict[str, Opened] = {}
        #: What the end of an engine session adopted here calls (the listener's count).
        self.on_adopted_end: Callable[[Opened, _core.Outcome], None] | None = None

    def count(self, service_host: str | None = None) -> int:
        """Sessions open or being opened (past routing): of one service host, or in all."""
        return self._places.places(service_host)

    async def admit(
        self,
        sock: Conn,
        pending: bytes,
        target: Route,
        request: Request,
        client: str,
        opening: Opening | None,
        *,
        session_uuid: str | None = None,
    ) -> Opened:
        """Capacity, the token's claim, then the start; on any failure the capacity and the
        token are given back. ``session_uuid``: the id a 101 already sent named (Twilio's),
        for a session without a token; a token's session has the id ``/start`` gave."""
        self.reserve(target.agent, client)
        lease: Lease | None = None
        try:
            lease = await self.capacity.acquire(target.agent)  # shared capacity: 503
            session_uuid = session_uuid or str(uuid.uuid4())
            authority = self.authority
            verified: VerifiedToken | None = None
            if target.token is not None:
                assert authority is not None  # routing checked the token with it
                # Uses the token up; after the capacity check, so a 503 does not burn it.
                verified = await authority.claim(target.token, target.service_host)
                session_uuid = verified.session_id  # the sessionId /start returned
            try:
                chosen = None
                if self.authorize is not None:
                    asked = _session_request(target, request, session_uuid, client, opening)
                    chosen = await consult(self.authorize, asked)
                opened = await self._start(
                    sock, pending, target, session_uuid, request, opening, chosen
                )
            except BaseException:
                if authority is not None and verified is not None:
                    # The session did not start: the client may retry with the same token.
                    with anyio.CancelScope(shield=True):
                        await authority.release(verified)
                raise
        except HttpError:
            # Refused: the shared place is free again before the client hears why.
            self.release(target.service_host, client)
            await self.capacity.release_now(lease)
            raise
        except BaseException:
            self.release(target.service_host, client, lease)
            raise
        opened.client = client
        opened.lease = lease
        self.live[opened.session_uuid] = opened
        # Reachable from the store's other gateways (with a session registry).
        self.capacity.register(opened.session_uuid, opened.service_host)
        return opened

    def find(self, session_uuid: str, service_host: str) -> Opened | None:
        """The live session of that id, if it belongs to that agent."""
        self.relay.dispatch()  # sessions the engine opened, told of without a ring
        opened = self.live.get(session_uuid)
        if opened is None:
            told = self.relay.told_id(session_uuid)
            if told is None:
                return None
            opened = self._adopt(told, service_host)
        if opened is None or opened.service_host != service_host or opened.stopped:
            return None
        return opened

    def stop(self, opened: Opened) -> None:
        """End a live session through the API: both sides get 1000 "session stopped" (an
        in-process bot a ``WebSocketDisconnect(1000)``), and its places are given back now,
        not once the close handshakes are over."""
        opened.stopped = True
        if opened.bot is not None:
            opened.bot[2].close(STOP_CODE, STOP_REASON)  # the channel: the bot's own close is moot
        else:
            opened.relay.close(STOP_CODE, STOP_REASON)
        if opened.engine_owned:  # its place: given back now, not at its end
            self.relay.engine.give_back_place(opened.relay.id)
        self._free(opened)

    def listed(self, service_host: str) -> list[dict[str, Any]]:
        """The agent's live sessions as the list shows them, with their messages and bytes
        each way so far (one snapshot of the engine's per-session counters for all of them)."""
        self.relay.dispatch()  # sessions the engine opened, told of without a ring
        for news in self.relay.told_sessions(service_host):
            self._adopt(news.session_id, service_host)
        now, wall = anyio.current_time(), time.time()
        shown = [o for o in self.live.values() if o.service_host == service_host and not o.stopped]
        snapshot = self.relay.engine.session_counts([o.relay.id for o in shown])
        counts: dict[int, _core.SessionCounts | _core.Outcome] = {c.session_id: c for c in snapshot}
        entries: list[dict[str, Any]] = []
        for opened in shown:
            # Not in the engine any more: over, with its final counts (an in-process bot may
            # still be finishing), or its outcome not drained yet (then it is left out).
            traffic = counts.get(opened.relay.id) or opened.relay.outcome
            if traffic is None:
                continue
            call = opened.opening
            started = wall - (now - opened.started)
            entries.append(
                {
                    "sessionId": opened.session_uuid,
                    "startedAt": _iso(started),
                    "seconds": round(now - opened.started, 3),
                    "bot": "inprocess"
                    if opened.bot is not None
                    else "upstream"
                    if opened.upstream is not None
                    else "builtin",
                    "provider": None if call is None else call.provider,
                    "callId": None if call is None else call.call_id,
                    "messagesIn": traffic.messages_in,
                    "bytesIn": traffic.bytes_in,
                    "messagesOut": traffic.messages_out,
                    "bytesOut": traffic.bytes_out,
                }
            )
        return entries

    async def _start(
        self,
        sock: Conn,
        pending: bytes,
        target: Route,
        session_uuid: str,
        request: Request,
        opening: Opening | None,
        chosen: UpstreamURL | None,
    ) -> Opened:
        """Dial the bot (``chosen`` by ``authorize``, else the agent's; or pick the builtin or
        in-process bot), answer 101 unless the opening was read after it already, and hand the
        client (and bot) sockets to the engine."""
        settings = self.settings
        session_id = self.relay.new_session_id()
        answered = opening is not None
        inprocess = None if chosen is not None else self.bots.get(target.service_host)
        member = bot = None
        # After a 101 already sent (Twilio), there is no subprotocol left to agree on.
        offered = () if answered else target.subprotocols
        urls = (chosen,) if chosen is not None else target.agent.upstream_urls
        tls = None
        if self.bot_tls is not None and any(url.tls for url in urls):
            tls = self.bot_tls(target.agent)
        if chosen is not None:  # authorize picked this session's bot
            with self.metrics.dialling(target.service_host):
                bot = await dial(
                    chosen,
                    session_uuid=session_uuid,
                    body_value=target.upstream_body,
                    subprotocols=offered,
                    timeout=settings.dial_timeout,
                    tls=tls,
                )
        elif inprocess is None and target.agent.upstream is not None:
            # The member of the agent's pool (a string: of one) that answers first.
            with self.metrics.dialling(target.service_host):
                member, bot = await self.pools.dial(
                    target.agent,
                    session_uuid=session_uuid,
                    body_value=target.upstream_body,
                    subprotocols=offered,
                    timeout=settings.dial_timeout,
                    tls=tls,
                )
        try:
            if not answered:
                agreed = None if bot is None else bot.subprotocol
                await send_all(sock, switching_protocols(target.client_key, agreed, session_uuid))
                if target.provider != "generic":
                    opening, pending = await peek_opening(sock, pending, target.provider)
            started = anyio.current_time()
            where = (target.service_host, session_uuid, started, opening)
            handover = Handover(
                session_id,
                target.service_host,
                sock,
                peer=None if bot is None else Upstream(bot.sock, bot.pending),
                limits=Limits(settings.max_message_size, self.time_limit),
                client_pending=pending,
            )
            if inprocess is not None:
                return self._attach_inprocess(handover, target, request, inprocess, where)
            session = self.relay.start(handover)
        except BaseException:
            self.pools.release(member)
            raise
        finally:
            if bot is not None:
                bot.sock.close()  # no-op once detached
        upstream = chosen if chosen is not None else None if member is None else member.url
        return Opened(session, *where, member=member, upstream=upstream)

    def _attach_inprocess(
        self,
        handover: Handover,
        target: Route,
        request: Request,
        bot: Bot,
        where: tuple[str, str, float, Opening | None],
    ) -> Opened:
        """Attach the client to the engine; the bot is called by _supervise."""
        settings = self.settings
        body = None if target.body_json is None else json.loads(target.body_json)
        channel = SessionChannel(
            self.relay.engine,
            handover.session_id,
            inbox_limit=settings.inbox_limit,
            send_buffer_limit=settings.send_buffer_limit,
        )
        websocket = InProcessWebSocket(
            channel, headers=request.headers, query=request.query, path=request.path
        )
        handover.peer = InProcess(channel, settings.inbox_limit, settings.send_buffer_limit)
        session = self.relay.start(handover)
        arguments = BotArguments(where[1], websocket, body)
        return Opened(session, *where, bot=(bot, arguments, channel))

    async def supervise(self, opened: Opened) -> None:
        """Run an in-process bot until its session ends (time limit included); log its end."""
        session = opened.relay
        assert opened.bot is not None
        bot, arguments, channel = opened.bot
        try:
            outcome = await serve_bot(
                bot,
                arguments,
                channel,
                grace_period=self.settings.bot_grace_period,
            )
        except BaseException:
            session.close(1001, _core.DRAIN_REASON)
            raise
        finally:
            self._free(opened)
        self._finished(opened, outcome)

    def reserve(self, agent: AgentConfig, client: str) -> None:
        """Take a place in the agent's capacity (503) and the client's (429)."""
        if not self._places.take_place(agent.service_host, agent.max_sessions):
            raise HttpError(503, "agent at capacity")
        limit = self.settings.client_max_sessions
        if limit:
            mine = self._per_client.get(client, 0)
            if mine >= limit:
                self._places.give_place(agent.service_host)
                raise HttpError(429, "too many sessions from this address")
            self._per_client[client] = mine + 1

    def release(self, service_host: str, client: str, lease: Lease | None = None) -> None:
        """Give back the places :meth:`reserve` took, and the capacity store's lease."""
        self.capacity.release(lease)
        self._places.give_place(service_host)
        if self.settings.client_max_sessions:
            count = self._per_client[client] - 1
            if count:
                self._per_client[client] = count
            else:
                del self._per_client[client]

    def store_called(self, calls: _core.StoreCalls) -> None:
        """The replay store's calls for a session the engine opened by itself (a token agent's
        claim): counted as they are made. The session itself is the engine's to keep until it
        is asked for (:meth:`find`, :meth:`listed`) or ends (:meth:`told_ended`); its place and
        its connection were taken by the engine, which gives them back itself at its end (a
        Session API stop gives the place back at once: :meth:`stop`), and the engine counts
        its dial and its end (:mod:`wsgate.metrics`)."""
        self.metrics.store_called(calls.seconds)

    def _adopt(self, session_id: int, service_host: str) -> Opened | None:
        """The Opened of a live session the engine opened by itself, if it is ``service_host``'s
        (another agent's is left as it is), registered from now on like one handed over here
        (its end through :attr:`on_adopted_end`)."""
        adopted = self.relay.adopt(session_id, service_host)
        if adopted is None:
            return None
        news, session = adopted
        (upstream,) = self.fast[service_host].upstream_urls
        # Told of without a ring, maybe only with its end: started when the engine says.
        started = anyio.current_time() - max(0.0, time.monotonic() - news.opened_at)
        opened = Opened(
            session,
            service_host,
            news.session_uuid,
            started,
            _call_of(news),
            upstream=upstream,
            opened_at=news.opened_at,
        )
        opened.on_end = self.on_adopted_end
        session.on_done = opened
        self.live[opened.session_uuid] = opened
        return opened

    def told_ended(self, ends: _core.ToldEnds) -> None:
        """Sessions the engine opened ended without being adopted: each end logged as an
        adopted one's would be (the engine gave their places back and counted their ends). To
        :func:`~wsgate.logs.configure`'s handler, the engine makes the lines."""
        if not log.isEnabledFor(logging.INFO) or write_session_lines(log, ends):
            return
        for outcome in ends.outcomes():
            news = outcome.opened
            assert news is not None  # (the engine gives every one its news)
            seconds = max(0.0, outcome.ended_at - news.opened_at)
            log_outcome(_Unadopted(news), outcome, seconds)

    def ended(self, opened: Opened, outcome: _core.Outcome) -> None:
        """A relayed session ended (its outcome came through the doorbell): free its place
        (the engine freed that of a session it opened), count and log it."""
        self._free(opened)
        self._finished(opened, outcome)

    def _free(self, opened: Opened) -> None:
        """Give back the session's places and take it out of the registry, once."""
        if opened.freed:
            return
        opened.freed = True
        if self.live.get(opened.session_uuid) is opened:
            del self.live[opened.session_uuid]
            self.capacity.unregister(opened.session_uuid)
        if not opened.engine_owned:  # the engine gives back what it took itself
            self.release(opened.service_host, opened.client, opened.lease)
        self.pools.release(opened.member)

    def _finished(self, opened: Opened, outcome: _core.Outcome) -> None:
        if opened.opened_at is None:
            seconds = anyio.current_time() - opened.started
            inprocess, stopped = opened.bot is not None, opened.stopped
            self.metrics.session_ended(opened.service_host, inprocess, outcome, seconds, stopped)
        else:  # its end may be told a little late: timed (and counted) by the engine
            seconds = max(0.0, outcome.ended_at - opened.opened_at)
        log_outcome(opened, outcome, seconds)


def _session_request(
    target: Route, request: Request, session_uuid: str, client: str, opening: Opening | None
) -> SessionRequest:
    agent = target.agent
    return SessionRequest(
        service_host=target.service_host,
        agent=agent.name,
        org=agent.org,
        provider=target.provider,
        session_id=session_uuid,
        path=request.path,
        headers=request.headers,
        body=None if target.body_json is None else json.loads(target.body_json),
        token=target.token is not None,
        client=client,
        call_id=None if opening is None else opening.call_id,
    )


async def peek_opening(sock: Conn, pending: bytes, provider: str) -> tuple[Opening | None, bytes]:
    """Telnyx, Plivo, Exotel: read the opening messages that follow the upgrade, only to learn
    the call's ids for the log. Whatever arrives (or not, within :data:`_PEEK_TIME`) is relayed
    unchanged: these endpoints route from the URL and judge no payload, like the generic one."""
    reader = OpeningReader(provider)
    opening: Opening | None = None
    try:
        with anyio.move_on_after(_PEEK_TIME):
            opening = await read_until(sock, reader.feed, pending)
    except (OpeningError, EOFError):
        pass  # not an opening we know (or the client left): the relay takes it from here
    return opening, reader.raw


class _Logged(Protocol):
    """What a session's log line shows of it."""

    service_host: str
    session_uuid: str
    opening: Opening | None
    member: Member | None
    bot: tuple[Bot, BotArguments, SessionChannel] | None
    stopped: bool


class _Unadopted:
    """An engine session that ended unadopted, as its log line shows it: a plain relay (no
    pool member, no in-process bot, never stopped) of a generic endpoint or a provider's
    call."""

    __slots__ = ("opening", "service_host", "session_uuid")
    member: Member | None = None
    bot: tuple[Bot, BotArguments, SessionChannel] | None = None
    stopped: bool = False

    def __init__(self, news: _core.Opened) -> None:
        self.service_host = news.service_host
        self.session_uuid = news.session_uuid
        self.opening = _call_of(news)


def _call_of(news: _core.Opened) -> Opening | None:
    """The provider's call of a session the engine opened on a provider endpoint, as
    :class:`~wsgate.providers.OpeningReader` reads it (None: generic, or not read)."""
    if news.call is None:
        return None
    provider, call_id, stream_id = news.call
    host = news.service_host if provider == "twilio" else None  # the others' is in the URL
    return Opening(provider, host, call_id, stream_id)


def log_outcome(opened: _Logged, outcome: _core.Outcome, seconds: float) -> None:
    """The session's one log line (INFO), ``seconds`` after its start."""
    # Codes only: close reasons, bodies and tokens come from users and stay out of the log.
    if not log.isEnabledFor(logging.INFO):
        return  # nothing to build: a gateway of many sessions may log only warnings

    def code(close: tuple[int, str] | None) -> str:
        return "-" if close is None else str(close[0])

    call = opened.opening
    via = "" if call is None else f" via {call.provider} call {call.call_id or '-'}"
    member = opened.member
    if member is not None and member.listed:
        via += f" to {member.label}"
    by = ended_by(outcome, opened.bot is not None, opened.stopped)
    args = (
        outcome.session_id,
        opened.service_host,
        opened.session_uuid,
        via,
        "api" if by == "api" else outcome.ended_by,
        outcome.detail,
        seconds,
        code(outcome.client_close),
        code(outcome.bot_close),
        outcome.messages_in,
        outcome.bytes_in,
        outcome.messages_out,
        outcome.bytes_out,
    )

    def fields() -> dict[str, Any]:
        return session_fields(
            outcome,
            agent=opened.service_host,
            session_id=opened.session_uuid,
            seconds=seconds,
            inprocess=opened.bot is not None,
            stopped=opened.stopped,
            provider=None if call is None else call.provider,
            call_id=None if call is None else call.call_id,
        )

    if not write_info(log, "session_end", _SESSION_LINE % args, fields):
        log.info(_SESSION_LINE, *args, extra={"event": "session_end", "fields": fields()})


#: A session's end, as :func:`log_outcome` writes it.
_SESSION_LINE = (
    "session %d %s %s%s ended by %s (%s) after %.1f s; client close %s, bot close %s; "
    "in %d msgs %d B, out %d msgs %d B"
)


def _iso(seconds: float) -> str:
    """Unix seconds as ISO 8601 UTC, to the millisecond."""
    whole = int(seconds)
    return (
        time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
        + f".{int((seconds - whole) * 1000):03d}Z"
    )
