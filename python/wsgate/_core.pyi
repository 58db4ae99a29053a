"""wsgate's native core (Rust): limits, ``?body=`` decoding, session tokens and the relay engine.

Private: users import :mod:`wsgate`. This stub is the whole typed surface between the Python
control plane and the Rust data plane; ``python -m mypy.stubtest wsgate._core`` keeps it honest.
"""

from typing import Any, Literal, final

__all__ = [
    "DEFAULT_MAX_MESSAGE_SIZE",
    "DIAL_BUCKETS",
    "DRAIN_REASON",
    "DURATION_BUCKETS",
    "MAX_BODY_BYTES",
    "MAX_BODY_DEPTH",
    "MAX_HEADER_BYTES",
    "MAX_TOKEN_BYTES",
    "TIME_LIMIT_REASON",
    "TOKEN_TTL_SECONDS",
    "AcceptFailed",
    "AgentCounts",
    "BodyError",
    "Crowded",
    "Engine",
    "FastRoute",
    "Handed",
    "Message",
    "Nonces",
    "Opened",
    "Outcome",
    "SessionCounts",
    "StoreCalls",
    "TlsClientContext",
    "TlsConnection",
    "TlsError",
    "TlsServerContext",
    "TokenClaims",
    "TokenError",
    "TokenKeys",
    "ToldEnds",
    "Unopened",
    "check_body_json",
    "decode_body",
    "new_nonce",
    "release_memory",
]

#: Largest ``?body=`` JSON document, in bytes after base64 decoding (SPEC §4).
MAX_BODY_BYTES: int
#: Deepest nesting of arrays and objects in a ``?body=`` document (deeper: 400).
MAX_BODY_DEPTH: int
#: Largest request line plus headers of an upgrade request, in bytes (SPEC §2: over it, 431).
MAX_HEADER_BYTES: int
#: Default cap on one WebSocket message (all fragments), in bytes.
DEFAULT_MAX_MESSAGE_SIZE: int
#: The close reason (with code 1000) a session gets at its time limit, and its outcome's detail.
TIME_LIMIT_REASON: str
#: The close reason (with code 1001) of the gateway's drain: an end by it is ``gateway_drain``.
DRAIN_REASON: str
#: Upper bounds, in seconds, of the metrics' histogram of bot dials (:class:`AgentCounts`).
DIAL_BUCKETS: tuple[float, ...]
#: Upper bounds, in seconds, of the metrics' histogram of session durations.
DURATION_BUCKETS: tuple[float, ...]
#: Lifetime of a session token, in seconds (SPEC §3).
TOKEN_TTL_SECONDS: int
#: Longest token accepted; longer ones are refused before any work.
MAX_TOKEN_BYTES: int

class BodyError(ValueError):
    """A ``?body=`` value that cannot be used. ``kind`` names the check that refused it (too
    large, not base64, not a UTF-8 JSON document, nested too deep); which HTTP status that is,
    the control plane decides (``wsgate.routing.body_error``). ``reason`` is one line that never
    echoes the input."""

    kind: Literal["too_large", "not_base64", "not_json", "too_deep"]
    reason: str

def decode_body(raw: str) -> tuple[str, str]:
    """Check and decode a ``?body=`` value exactly as it appeared in the request target.

    The value is percent-decoded, a space is read as ``+``, and standard or URL-safe base64 with
    or without padding is accepted. The decoded bytes must be at most :data:`MAX_BODY_BYTES` of
    JSON. Returns ``(json_text, upstream_value)``: the document the client encoded, and the same
    bytes re-encoded as padded standard base64, percent-encoded for a query string (what the
    upstream bot's ``/ws?body=`` expects). Raises :class:`BodyError` otherwise.
    """

def check_body_json(document: bytes) -> None:
    """Check a body document's bytes exactly as :func:`decode_body` checks a decoded ``?body=``:
    at most :data:`MAX_BODY_BYTES`, UTF-8 JSON, nested at most :data:`MAX_BODY_DEPTH` levels.
    Raises :class:`BodyError`. ``/start`` uses it, so both refuse the same documents."""

class TokenError(ValueError):
    """A refused session token. The message is a reason, never the token."""

    #: The check that refused it: ``"malformed"``, ``"bad_signature"``,
    #: ``"wrong_service_host"``, ``"expired"``, ``"body_missing"``, ``"body_not_bound"`` or
    #: ``"body_mismatch"``.
    kind: str

@final
class TokenKeys:
    """A deployment's signing secrets, keyed once (what the gateway uses per request): the
    first signs, all verify. Its repr shows only how many there are."""

    def __new__(cls, secrets: list[bytes]) -> TokenKeys:
        """Raises ``ValueError`` for an empty list or an empty secret."""

    def mint(self, service_host: str, exp: int, nonce: str, body: bytes | None = None) -> str:
        """Mint ``base64url(payload).base64url(HMAC-SHA256)`` with the first secret, bound to
        ``service_host`` until ``exp`` (Unix seconds), and to ``body`` (a session body's JSON
        bytes; None: no body, and no ``bd`` claim)."""

    def verify(self, token: str, service_host: str, now: int) -> TokenClaims:
        """Verify a token (signature in constant time against every secret, then service host
        and expiry): its claims (the service host is the one asked for). Raises
        :class:`TokenError`. Replay is the caller's check: record the nonce. The body binding is
        checked apart, by :meth:`TokenClaims.check_body`, once the request's ``?body=`` is
        decoded."""

@final
class TokenClaims:
    """What a verified token says. Its repr leaves out the nonce."""

    #: Expiry, Unix seconds.
    @property
    def exp(self) -> int: ...
    #: The replay store's key for this token.
    @property
    def nonce(self) -> str: ...
    #: Whether the token names a body (``bd``); a token that names none opens no body.
    @property
    def binds_body(self) -> bool: ...
    def check_body(self, body: bytes | None) -> None:
        """Check the upgrade's body (its JSON bytes; None without ``?body=``) against the one
        this token binds. Raises :class:`TokenError` when it is missing, not allowed, or
        different."""

@final
class Nonces:
    """Spent token nonces (the memory replay store's set), at most ``max_entries``; a nonce
    leaves when its token expires. Shared with the engine's own sessions (:class:`FastRoute`)."""

    def __new__(cls, max_entries: int) -> Nonces: ...
    def claim(self, nonce: str, exp: int, now: int) -> bool:
        """Use up ``nonce`` (its token expires at ``exp``) at Unix second ``now``: True the
        first time (or after :meth:`release`), False once used. ``OverflowError`` when full."""

    def release(self, nonce: str) -> None:
        """Give back a claimed nonce (its session did not start)."""

    def entries(self) -> int:
        """Entries held: claimed nonces, and released ones until they expire."""

    def clear(self) -> None:
        """Forget every nonce."""

    def __len__(self) -> int:
        """Nonces claimed now."""

def new_nonce() -> str:
    """16 random bytes from the OS, base64url: a token's nonce."""

def release_memory() -> bool:
    """Give the heap's free memory back to the operating system (glibc's ``malloc_trim(0)``:
    the free pages inside every arena, not only at their tops); True when some was. A no-op
    returning False with another C library. Runs without the GIL; costs a walk of the free
    chunks, so call it after many sessions ended, not per session."""

@final
class Outcome:
    """How one relayed session ended, reported once by :meth:`Engine.drain`."""

    session_id: int
    #: ``(code, reason)`` of the close frame the client sent, if it sent one.
    client_close: tuple[int, str] | None
    #: ``(code, reason)`` of the close frame the bot sent, if it sent one.
    bot_close: tuple[int, str] | None
    #: ``"client"``, ``"bot"`` or ``"gateway"``: who ended the session.
    ended_by: str
    #: One line for the log, e.g. ``"client closed"``, ``"bot lost"``, ``"client message too big"``.
    detail: str
    #: The close code the session ended with: that of the close frame that ended it (1005 for
    #: one without a code), the gateway's own (a :meth:`Engine.close`'s, 1000 at the time limit,
    #: 1002/1007/1009 for a broken rule), or 1006 when a connection ended without a close.
    code: int
    #: Data messages client -> bot (for an in-process bot: delivered to it).
    messages_in: int
    #: Data messages bot -> client (for an in-process bot: those it sent).
    messages_out: int
    #: Their payload bytes.
    bytes_in: int
    bytes_out: int
    #: When the engine told it (``time.monotonic()`` seconds). The end of a session the engine
    #: opened by itself may be told to Python later than that (with the next ring, at most
    #: ``LEISURE_DELAY``, 20 ms, after the last): its length is measured to this.
    ended_at: float
    #: For a session the engine opened by itself and nothing adopted (:meth:`Engine.adopt`),
    #: from :meth:`ToldEnds.outcomes`: its news, which the engine kept while it lived. None for
    #: any other session.
    opened: Opened | None

@final
class ToldEnds:
    """The ends of the sessions the engine opened by itself that nothing adopted, from one
    :meth:`Engine.drain`: their log lines, made by the engine (``rust/session_line.rs``), or
    their outcomes."""

    def __len__(self) -> int: ...
    def outcomes(self) -> list[Outcome]:
        """Each end as an :class:`Outcome` whose ``opened`` is its session's news."""

    def text(self, head: str, terminator: str, limit: int) -> list[tuple[str, int]]:
        """Each end's ``session_end`` line as ``sessions.log_outcome`` writes its message, after
        ``head`` (its time and level) and before ``terminator``; in chunks of whole lines of
        at most ``limit`` bytes (a longer line alone), each with how many lines it holds."""

    def json(self, ts: str, terminator: str, limit: int) -> list[tuple[str, int]]:
        """Each end's ``session_end`` line as :class:`wsgate.logs.JsonFormatter` writes it, its
        ``ts`` field ``ts``; chunked as :meth:`text`."""

@final
class AgentCounts:
    """One agent's live counters, as :meth:`Engine.counters` read them: totals since the
    agent was registered, of ended and live sessions alike."""

    #: The name given to :meth:`Engine.register_agent`.
    agent: str
    #: Sessions started.
    opened: int
    #: Live sessions served by a dialled bot (:meth:`Engine.relay`).
    active_upstream: int
    #: Live sessions served by an in-process bot (:meth:`Engine.attach`).
    active_inprocess: int
    #: Live sessions served by the built-in echo bot (:meth:`Engine.echo`).
    active_builtin: int
    #: Data messages and payload bytes, client -> bot (``in``) and bot -> client (``out``).
    messages_in: int
    messages_out: int
    bytes_in: int
    bytes_out: int
    #: The sessions the engine opened by itself (:class:`FastRoute`) are counted here as they
    #: go, not in Python: their dials (``dial_counts[i]``: those of at most
    #: ``DIAL_BUCKETS[i]`` seconds and above the bound before, the last above every bound;
    #: empty before the first; and their sum)...
    dial_counts: list[int]
    dial_sum: float
    #: ...how long those that ended lasted (over :data:`DURATION_BUCKETS`, the same way)...
    duration_counts: list[int]
    duration_sum: float
    #: ...and how they ended: ``(ended_by, code, detail, count)``. ``code`` is the close code
    #: as its label keeps it: 1000-1015 as they are, 3000 for any 3xxx, 4000 for any 4xxx, 0 for
    #: any other; ``detail`` is the gateway's reason for an end of ``"gateway"``, else ``""``.
    closed: list[tuple[str, int, str, int]]

@final
class SessionCounts:
    """One live session's traffic so far, as :meth:`Engine.session_counts` read it: what its
    thread last published (after its latest read), so a message just relayed may show a
    moment later."""

    #: The ``session_id`` the session was started with.
    session_id: int
    #: Data messages and payload bytes, client -> bot (``in``) and bot -> client (``out``);
    #: for an in-process bot, as :class:`Outcome` counts them.
    messages_in: int
    messages_out: int
    bytes_in: int
    bytes_out: int

@final
class Message:
    """News of an in-process session, reported by :meth:`Engine.drain`."""

    session_id: int
    #: A whole message from the client (``str`` for text, ``bytes`` for binary), or ``None``:
    #: the session's send buffer, once over its limit, has drained to half of it.
    data: str | bytes | None

@final
class FastRoute:
    """One agent whose generic-endpoint sessions the engine opens by itself (see
    :meth:`Engine.set_routes`): its place count, its bot (a plain ``ws://`` bot at an IP
    address: its URL's path and query as ``resource``, its ``Host`` header), and its sessions'
    limits. Given to one engine only."""

    def __new__(
        cls,
        service_host: str,
        max_sessions: int,
        bot_ip: str,
        bot_port: int,
        resource: str,
        host_header: str,
        max_message_size: int,
        time_limit: float | None,
        dial_timeout: float,
        *,
        agent: int | None = None,
        keys: TokenKeys | None = None,
        nonces: Nonces | None = None,
    ) -> FastRoute:
        """``keys`` and ``nonces`` (both or neither): a ``token`` agent's, its tokens checked
        with the one and used up in the other before its bot is dialled."""

@final
class Opened:
    """A session the engine opened by itself: answered 101 (``X-Session-Id: session_uuid``,
    the bot's ``X-Daily-Session-Id``) and relaying. Kept by the engine while it lives (never
    in :meth:`Engine.drain`): taken by :meth:`Engine.adopt`, copied by :meth:`Engine.told`,
    else given with its :class:`Outcome`."""

    session_id: int
    session_uuid: str
    service_host: str
    #: From the start of the bot's dial to its 101.
    dial_seconds: float
    #: When it was opened (answered 101; a URL-routed provider's once its opening was read),
    #: on ``time.monotonic()``'s clock (its news may come late).
    opened_at: float
    #: A provider's ``(provider, call id, stream id)`` from its ``start`` (None: a generic
    #: session, or a provider's whose opening was not read).
    call: tuple[str, str | None, str | None] | None

@final
class StoreCalls:
    """How long the replay store's calls for a session the engine opened by itself took (a
    token agent's claim): told as they are made (the session itself only at its end)."""

    #: Seconds, a call each.
    seconds: list[float]

@final
class Unopened:
    """A session the engine could not open: its bot's dial failed, its place was given back.
    ``fd`` is the client's socket, the caller's to answer and close (-1: the client went away).
    ``failure``: ``timed_out``, ``os`` (``errno``), ``closed`` (before the whole answer),
    ``too_large`` (the answer's head), ``answer`` (``head``: not a 101 that passes with
    ``key``), ``client_gone``."""

    session_id: int
    service_host: str
    fd: int
    #: The client's TLS, to answer through (None: a plain connection).
    tls: TlsConnection | None
    failure: str
    errno: int
    head: bytes
    key: str
    #: How long each call to the replay store took (a token's claim and release), in seconds.
    store_seconds: list[float]
    #: Answered 101 already (``/ws/twilio``): closed with a close frame, not a status.
    answered: bool

@final
class Handed:
    """A connection the engine accepted and did not open: the caller's to serve on ``fd``
    (non-blocking) from the bytes ``read``, ``waited`` seconds after its accept. Either handed
    at its accept (:meth:`Engine.listen`: ``waited`` 0, ``read`` what one read got, maybe
    nothing), or after a relay thread read its request (see :meth:`Engine.set_wait`: ``read``
    a whole head, or more than the limit of one). ``fd`` -1: the client went away or took
    over the wait's timeout (nothing to answer)."""

    fd: int
    #: The client's TLS, its handshake done (None: a plain connection).
    tls: TlsConnection | None
    address: Any
    read: bytes
    waited: float
    #: Gone (fd -1) because too many connections were waited for at once, it the oldest.
    evicted: bool
    #: Gone (fd -1) because its TLS failed (plain text on the port, no common version or
    #: cipher, a bad record): why.
    tls_error: str | None
    #: A ``/ws/twilio`` stream the engine answered 101: the id the 101 named (``""``: none, a
    #: token names its session). ``read`` is then its head and the frames after it, ``waited``
    #: the seconds since the 101 (all of ``handshake_timeout`` when evicted or too slow: none
    #: left to read the opening).
    answered: str | None

@final
class AcceptFailed:
    """Accepting on the relay thread failed (see :meth:`Engine.listen`) with ``errno``: again in
    100 ms if ``paused`` (out of descriptors or memory), else never (the listener is dropped)."""

    errno: int
    paused: bool

@final
class Crowded:
    """The engine holds its ``limit`` of connections (see :meth:`Engine.listen`) and one waits
    in the backlog: the oldest connection still sending its request should give way, the
    engine's (:meth:`Engine.make_room`, :meth:`Engine.oldest_wait`) or one the caller reads,
    once it has been at it a second. Its :meth:`Engine.closed` lets the newcomer in; no other
    comes until a connection is closed. Moot once :meth:`Engine.ends` is past ``ends`` (a
    connection ended: the newcomer takes its place)."""

    ends: int

@final
class Engine:
    """The relay: moves frames between sockets on Rust threads, with the GIL released.

    Sessions are handed over as connected, non-blocking-capable TCP file descriptors whose
    WebSocket handshakes Python already completed; the engine owns (and closes) them from then on.
    Finished sessions are queued; the :meth:`doorbell` descriptor turns readable when the queue is
    not empty, and :meth:`drain` empties it (one wake-up for many outcomes).
    """

    def __new__(cls, threads: int = 0, dead_peer_timeout: float = 60.0) -> Engine:
        """Start the engine with ``threads`` relay threads (0: ``$WSGATE_RELAY_THREADS`` if set,
        else half the CPUs, at least one; a bad ``$WSGATE_RELAY_THREADS`` raises ``OSError``). A
        peer that vanishes without a FIN is detected within ``dead_peer_timeout`` seconds (at
        least 1) by TCP keepalive and ``TCP_USER_TIMEOUT``: nothing is spent per message."""

    def doorbell(self) -> int:
        """A file descriptor that is readable while outcomes wait to be drained."""

    def register_agent(self, name: str) -> int:
        """The index of agent ``name`` in the live counters (registered now if new; the same
        name gives the same index). A session started with ``agent=`` that index is counted
        under it: opened, active, and its messages and bytes as they flow, published by the
        session's thread once per read (a few relaxed atomic adds, nothing per message)."""

    def counters(self) -> list[AgentCounts]:
        """Every registered agent's counters, in the order of registration."""

    def session_counts(self, session_ids: list[int] | None = None) -> list[SessionCounts]:
        """The traffic so far of the live sessions among ``session_ids`` (ids not live are
        left out), or of every live session, of any kind and agent: one snapshot taken
        without the GIL. Each session's thread publishes its totals once per read (relaxed
        atomic stores beside the agent's counters), so this costs nothing per message."""

    def relay(
        self,
        session_id: int,
        client_fd: int,
        bot_fd: int,
        client_pending: bytes,
        bot_pending: bytes,
        max_message_size: int,
        time_limit: float | None = None,
        client_tls: TlsConnection | None = None,
        bot_tls: TlsConnection | None = None,
        *,
        agent: int | None = None,
    ) -> None:
        """Relay a session between a client (we are its server) and a bot (we are its client).
        After ``time_limit`` seconds both sides get 1000 "session time limit". ``*_tls``: the
        TLS connection on that socket, taken over in the state its handshake left it.
        ``agent``: an index from :meth:`register_agent` to count the session under (an index
        never registered raises ``OSError``).

        ``*_pending`` are bytes already read from each socket past its HTTP handshake: they are
        the start of that side's frame stream. Takes ownership of both descriptors, also when
        it raises (they are closed then).
        """

    def echo(
        self,
        session_id: int,
        client_fd: int,
        client_pending: bytes,
        max_message_size: int,
        time_limit: float | None = None,
        client_tls: TlsConnection | None = None,
        *,
        agent: int | None = None,
    ) -> None:
        """Serve a client with the built-in echo bot: every message comes back unchanged."""

    def attach(
        self,
        session_id: int,
        client_fd: int,
        client_pending: bytes,
        max_message_size: int,
        inbox_limit: int,
        send_buffer_limit: int,
        time_limit: float | None = None,
        client_tls: TlsConnection | None = None,
        *,
        agent: int | None = None,
    ) -> None:
        """Serve a client for an in-process bot: the engine speaks WebSocket (reassembly, UTF-8
        checks, pongs, closes) and reports whole messages through :meth:`drain`. Past
        ``inbox_limit`` bytes delivered and not :meth:`consumed`, it stops reading the client.
        At ``time_limit`` seconds the client gets 1000 :data:`TIME_LIMIT_REASON` and the
        outcome's ``detail`` is that reason."""

    def send(self, session_id: int, data: str | bytes) -> int | None:
        """Queue a text (``str``) or binary (``bytes``) message for an in-process session's
        client. Returns the bytes now queued (over ``send_buffer_limit``: wait for a drained
        :class:`Message`), or ``None`` when the session is closing or gone (nothing sent)."""

    def consumed(self, session_id: int, nbytes: int) -> None:
        """Python's bot took ``nbytes`` of an in-process session's messages."""

    def next_session_id(self) -> int:
        """A fresh session id: the engine's own sessions and the caller's draw from one count."""

    def take_place(self, service_host: str, max_sessions: int) -> bool:
        """Take a place among the agent's ``max_sessions``; False when every one is taken. The
        sessions the engine opens by itself take theirs from the same count."""

    def give_place(self, service_host: str) -> None:
        """Give back a place :meth:`take_place` took."""

    def adopt(self, session_id: int, service_host: str | None = None) -> Opened | None:
        """Take the news of live session ``session_id``, one the engine opened by itself:
        Python knows it from now on, and its :class:`Outcome` comes without it. None if it is
        not such a session, is over, was taken already, or is not ``service_host``'s (when
        given: that one is left as it is)."""

    def told_id(self, session_uuid: str) -> int | None:
        """The id of the live session the engine opened by itself, not adopted, whose
        ``X-Session-Id`` is ``session_uuid``."""

    def told(self, service_host: str | None = None) -> list[Opened]:
        """Copies of the news of every live session the engine opened by itself and nothing
        adopted (of ``service_host``'s, when given)."""

    def told_count(self) -> int:
        """How many live sessions the engine opened by itself and nothing adopted."""

    def told_peak(self) -> int:
        """The most live sessions the engine opened by itself and nothing adopted at once,
        since the last call (the first: since the engine started)."""

    def give_back_place(self, session_id: int) -> bool:
        """Give back now the place of live session ``session_id``, one the engine opened by
        itself (it gives it back at the session's end otherwise); False if there is none to
        give (not such a session, over, or given back already)."""

    def places(self, service_host: str | None = None) -> int:
        """Places taken: of one service host, or of all."""

    def set_routes(self, routes: list[FastRoute]) -> None:
        """From now on, open by itself every session that :meth:`accept` reads whole and that
        one of ``routes`` serves (replacing the previous table; an empty list: none). An
        ``agent`` index never registered raises ``OSError``."""

    def listen(self, listener: int, limit: int) -> None:
        """Relay thread 0 accepts on the listening socket ``listener`` from now on (a copy of
        it, until :meth:`unlisten`), at most ``limit`` connections held at once (past it, new
        ones wait in the backlog until one is :meth:`closed`; each that comes meanwhile is told
        as a :class:`Crowded`, for the oldest connection still sending its request to give
        way). Each connection is read once at
        its accept; a request the route table serves is opened by the engine (an
        :class:`Opened` or :class:`Unopened` comes through :meth:`drain`), and so is one whose
        request is not all there yet while :meth:`set_wait` leaves room (a :class:`Handed`
        comes unless it opens); any other is the caller's, a :class:`Handed` with the bytes
        read (``waited`` 0). A connection closed before its first byte is dropped. An accept
        error comes as an :class:`AcceptFailed`."""

    def unlisten(self) -> None:
        """Stop accepting; returns once the relay thread closed its copy of the listener."""

    def held(self) -> int:
        """Connections accepted since :meth:`listen` and not yet :meth:`closed`."""

    def closed(self) -> int:
        """One of the connections accepted is over (each is, once: its session ended, its
        refusal answered, or it was dropped): how many are held now. Not for a session the
        engine opened by itself (:class:`Opened`): that gives its connection back at its
        end."""

    def prepare_listener(self, listener: int) -> None:
        """Set the relayed sockets' options (Nagle off, the dead-peer keepalive and
        ``TCP_USER_TIMEOUT``) on the socket ``listener`` before it listens: the sockets
        :meth:`accept` takes from it inherit them. Sockets from a listener not prepared so get
        them one by one."""

    def set_tls(self, context: TlsServerContext | None) -> None:
        """The listener's TLS for connections :meth:`accept` takes from now on (None: plain):
        with TLS nothing is read at the accept, and each connection's handshake and request
        are read on a relay thread as :meth:`set_wait` says (with no wait set, each comes back
        from :meth:`accept` unread, for the caller's own TLS). A :class:`Handed` or
        :class:`Unopened` then carries the connection's TLS."""

    def set_wait(self, timeout: float, most: int) -> None:
        """Wait on a relay thread for requests not there when :meth:`accept` read: at most
        ``most`` connections at once (past it the oldest is evicted; 0, the default: none is
        waited for), each for ``timeout`` seconds from its accept (positive, else
        ``ValueError``)."""

    def waiting(self) -> int:
        """Connections whose request a relay thread waits for now."""

    def ends(self) -> int:
        """Connections accepted on the relay thread that are over, so far."""

    def oldest_wait(self) -> float | None:
        """Seconds the connection whose request a relay thread has waited for longest has
        waited (None: none is)."""

    def make_room(self) -> bool:
        """Evict the connection whose request a relay thread has waited for longest (after a
        :class:`Crowded`); False if none is waited for."""

    def stop_waiting(self) -> None:
        """Evict every connection whose request a relay thread waits for."""

    def close(self, session_id: int, code: int, reason: str) -> bool:
        """Close both sides of a live session with ``code`` and ``reason``; False if unknown."""

    def drain(
        self,
    ) -> list[
        Outcome | ToldEnds | Message | StoreCalls | Unopened | Handed | AcceptFailed | Crowded
    ]:
        """Take everything queued since the last call, in order (a session's messages before
        its outcome), and clear the doorbell. The ends of sessions this engine opened by itself
        that nothing adopted come last, together, as one :class:`ToldEnds`."""

    def shutdown(self) -> None:
        """Drop every session at once (their sockets are closed) and stop the threads."""

class TlsError(ConnectionError):
    """The peer's TLS failed (a bad record, an alert, no common version or cipher, a certificate
    that does not verify): the connection is over."""

@final
class TlsServerContext:
    """The listener's certificate chain and key (PEM). ``ValueError`` with the reason for an
    unreadable chain or key, a key that does not match, a certificate outside its validity."""

    def __new__(cls, chain_pem: bytes, key_pem: bytes) -> TlsServerContext: ...
    def accept(self) -> TlsConnection:
        """The server end of a new connection."""

@final
class TlsClientContext:
    """The roots bots' certificates are checked against: the system's, or ``ca_pem``'s."""

    def __new__(cls, ca_pem: bytes | None = None) -> TlsClientContext: ...
    def connect(self, host: str) -> TlsConnection:
        """The client end of a new connection to ``host``, whose certificate must name it."""

@final
class TlsConnection:
    """One TLS connection, driven from Python (Sans-I/O) until the engine takes it."""

    def feed(self, data: bytes) -> int:
        """Take bytes read from the socket; returns how many were taken (it stops once
        decrypted bytes wait: :meth:`read` them, then feed the rest again). ``TlsError`` when
        they end the connection (its alert, if any, is then in :meth:`outgoing`)."""

    def read(self, n: int) -> bytes | None:
        """Up to ``n`` decrypted bytes: ``b""`` once the peer closed, None when more bytes
        must be fed first."""

    def write(self, data: bytes) -> None:
        """Encrypt ``data`` for the peer (see :meth:`outgoing`)."""

    def outgoing(self) -> bytes:
        """Every record waiting to be sent, taken."""

    def close_notify(self) -> None:
        """Queue a close_notify alert."""

    @property
    def handshaking(self) -> bool:
        """Whether the handshake is still going on."""
