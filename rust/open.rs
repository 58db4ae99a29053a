//! Sessions the data plane opens by itself: the common case of SPEC §2 without a turn of
//! Python's event loop per step.
//!
//! The control plane pushes a route table ([`Route`]: the agents whose sessions need nothing but
//! the request's own checks, a place in `max_sessions` and a plain `ws://` bot at an IP address).
//! The engine accepts connections (on a relay thread: `accepting.rs`), reads each one's request
//! (at once, or on a relay thread as it arrives: `reading.rs`), and opens what
//! [`crate::upgrade::recognise`] takes and the table routes: a place is taken, the bot dialled,
//! its 101 checked, the client answered, and the relay starts on the same relay thread (an
//! [`Opening`] turns into the relayed session in place). Everything else — another endpoint, a
//! refusal — goes to the Python path with the bytes read.
//!
//! Python hears of each session once, through the doorbell with the outcomes ([`News`]): opened
//! (it registers, counts and later logs it as any session), or not opened (the client's socket
//! comes back with why, for the Python path to answer 502/504 as it answers its own dials).

use std::collections::HashMap;
use std::io::{self, ErrorKind};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::accepting::Connections;
use crate::body::DecodedBody;
use crate::counters::{AgentEnds, Later};
use crate::driver::Driven;
use crate::nonces::Nonces;
use crate::opener::Verdict;
use crate::opening::{OpeningReader, Provider};
use crate::reading::{Reading, Step};
use crate::relay::{self, Pair, Pending};
use crate::scratch;
use crate::session::{Limits, Outcome};
use crate::shard::{Run, Task};
use crate::stream::Stream;
use crate::tls::Tls;
use crate::twilio::{read_opening, Answering, Heard};
use crate::upgrade;

/// How one agent's sessions are opened in the data plane.
#[derive(Debug)]
pub struct Route {
    /// `{agent}.{org}`.
    pub service_host: String,
    /// Sessions it may have at once (its place count is shared with the Python path).
    pub max_sessions: usize,
    /// The bot's address (an IP literal in its URL: no resolver call).
    pub bot: SocketAddr,
    /// The bot URL's path and query.
    pub resource: String,
    /// The bot's `Host` header.
    pub host_header: String,
    /// Its sessions' limits.
    pub limits: Limits,
    /// Time for the bot's connect and 101.
    pub dial_timeout: Duration,
    /// Its index in the live counters, if counted.
    pub agent: Option<usize>,
    /// For a `token` agent: the keys its tokens are checked with and the set they are used up
    /// in (the memory replay store's). `None`: a `none` agent (a token it carries is ignored).
    pub tokens: Option<Tokens>,
    /// Its place count (set by the engine from [`Places`]).
    pub(crate) place: Arc<AtomicUsize>,
}

/// How a `token` agent's tokens are checked and used up (SPEC §3).
pub struct Tokens {
    /// The signing secrets.
    pub keys: Arc<crate::token::Keys>,
    /// Spent nonces, shared with the Python path.
    pub nonces: Arc<Nonces>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tokens")
    }
}

/// A token checked and used up for one session: given back if the session does not start.
pub struct Claimed {
    /// The set it was used up in.
    pub nonces: Arc<Nonces>,
    /// Its nonce.
    pub nonce: String,
    /// How long each call to the set took, in seconds (for the replay store's metrics).
    pub calls: Vec<f64>,
}

impl Claimed {
    /// Gives the token back (its session did not start): the client may use it again.
    fn release(&mut self) {
        let started = Instant::now();
        self.nonces.release(&self.nonce);
        self.calls.push(started.elapsed().as_secs_f64());
    }
}

/// Sessions open or being opened, per service host: `max_sessions` as one count for the Python
/// path and the data plane's.
#[derive(Default)]
pub struct Places {
    map: Mutex<HashMap<String, Arc<AtomicUsize>>>,
}

impl Places {
    /// The count of `service_host`.
    pub fn of(&self, service_host: &str) -> Arc<AtomicUsize> {
        let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        map.entry(service_host.to_owned()).or_default().clone()
    }

    /// Sessions of `service_host` now, or of all when `None`.
    pub fn count(&self, service_host: Option<&str>) -> usize {
        let map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        match service_host {
            Some(h) => map.get(h).map_or(0, |c| c.load(Ordering::Acquire)),
            None => map.values().map(|c| c.load(Ordering::Acquire)).sum(),
        }
    }
}

/// Takes a place if fewer than `max` are taken.
pub fn take(place: &AtomicUsize, max: usize) -> bool {
    place
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < max).then_some(n + 1)
        })
        .is_ok()
}

/// Gives a place back.
pub fn give(place: &AtomicUsize) {
    let _ = place.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
}

/// The place a session the engine opened holds, given back once: when its opening fails, at
/// its end ([`Owned`]), or sooner by the control plane (a stop through the Session API frees
/// it at once, before the close handshakes: `Engine::give_back_place`).
pub struct Hold {
    place: Arc<AtomicUsize>,
    held: AtomicBool,
}

impl Hold {
    pub(crate) fn new(place: Arc<AtomicUsize>) -> Self {
        Self {
            place,
            held: AtomicBool::new(true),
        }
    }

    /// Gives the place back unless that was done; whether this call did.
    pub fn give_back(&self) -> bool {
        let held = self.held.swap(false, Ordering::AcqRel);
        if held {
            give(&self.place);
        }
        held
    }
}

/// Why a bot's dial failed, for the Python path to word as its own dials' failures.
#[derive(Debug)]
pub enum Failure {
    /// No 101 within the dial timeout.
    TimedOut,
    /// The connect, the request or the read failed with this OS error number.
    Os(i32),
    /// The bot closed before its whole answer.
    Closed,
    /// Its answer's head was over [`upgrade::MAX_HEADER_BYTES`].
    TooLarge,
    /// Its answer's head, not an acceptable 101 for `key`.
    Answer {
        /// The head, `\r\n\r\n` included.
        head: Vec<u8>,
        /// The `Sec-WebSocket-Key` we sent.
        key: String,
    },
    /// Dropped before it settled (the engine stopping, a panic, a relay thread that could not
    /// take it): no client left to answer.
    ClientGone,
}

/// What Python hears of a session the data plane opened (or could not), and of the relay
/// thread's accepts.
#[derive(Debug)]
pub enum News {
    /// The gateway holds `max_connections` and a connection waits in the backlog: the oldest
    /// connection still sending its request should give way once it has been at it
    /// `EVICT_AFTER`, the engine's (`Engine::make_room`, `Engine::oldest_wait`) or one Python
    /// reads (`accepting.rs`, `OnRelay::make_room`).
    Crowded {
        /// Connections over so far (`Engine::ends`): once that moved, the room is made.
        ends: u64,
    },
    /// Accepting on a relay thread failed with `errno`: again in 100 ms if `paused` (out of
    /// descriptors or memory), else never (the listener is dropped).
    AcceptFailed {
        /// The error of `accept`.
        errno: i32,
        /// Accepting resumes by itself.
        paused: bool,
    },
    /// Answered 101 and relaying.
    Opened {
        /// The engine's session id.
        session_id: u64,
        /// The id the client's 101 and the bot's request named.
        session_uuid: String,
        /// Its agent.
        service_host: String,
        /// From the dial's start to the bot's 101, in seconds.
        dial_seconds: f64,
        /// How long each call to the replay store took (a token agent's claim), in seconds.
        store_seconds: Vec<f64>,
        /// When it was opened (answered 101; a URL-routed provider's, once its opening was
        /// read), in seconds of `CLOCK_MONOTONIC` (Python's `time.monotonic()`): its news may
        /// reach Python only with its end.
        opened_at: f64,
        /// A provider's call, from its opening (`None`: a generic session, or an opening not
        /// read).
        call: Option<Call>,
    },
    /// Its bot's dial failed; its place was given back.
    Unopened {
        /// The engine's session id (no outcome follows that Python needs).
        session_id: u64,
        /// Its agent.
        service_host: String,
        /// The client's socket and its TLS, to be answered (`None`: it went away).
        client: Option<Client>,
        /// Why.
        failure: Failure,
        /// How long each call to the replay store took (a token's claim and release), in
        /// seconds.
        store_seconds: Vec<f64>,
        /// Answered 101 already (`/ws/twilio`): Python closes it rather than answer a status.
        answered: bool,
    },
    /// A connection whose request a relay thread read (`reading.rs`) and did not open: Python's
    /// to serve, or, without a client, gone (the client left or was too slow).
    Handed {
        /// The client's socket and its TLS, the handshake done (`None`: gone, nothing to
        /// answer).
        client: Option<Client>,
        /// Its address.
        peer: Option<SocketAddr>,
        /// What it sent: its request's head whole (or more than the limit of one), and any
        /// bytes behind it.
        read: Vec<u8>,
        /// Seconds since its accept (its `handshake_timeout` runs from there).
        waited: f64,
        /// Gone because it was evicted: too many connections were waited for at once.
        evicted: bool,
        /// Gone because its TLS failed (plain text on the port, no common version or cipher, a
        /// bad record): why, for a debug line.
        tls_error: Option<String>,
        /// A `/ws/twilio` stream answered 101 (`twilio.rs`): the id the 101 named (`""`: none,
        /// the stream has a token). `read` is then its head and the frames read after it, and
        /// `waited` the seconds since the 101.
        answered: Option<String>,
    },
}

/// A provider's call, from its `start` message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    /// Whose.
    pub provider: Provider,
    /// Its call id (Twilio's `start.callSid`, and so on: `opening.rs`).
    pub call_id: Option<String>,
    /// Its stream id.
    pub stream_id: Option<String>,
}

/// A session answered 101 before it was opened (`/ws/twilio`).
pub struct Answered {
    /// The id the 101 named (`None`: none, a token names it).
    pub session_uuid: Option<String>,
    /// Its call.
    pub call: Call,
}

/// A client for Python to answer or serve: its own descriptor of the socket, and its TLS (boxed:
/// a rustls connection is over a kilobyte, and news of a plain one is queued by the thousand).
pub type Client = (TcpStream, Option<Box<Tls>>);

/// Where [`News`] goes (the engine's queue for Python).
pub type Tell = Arc<dyn Fn(News) + Send + Sync>;

/// A session opened by the data plane, as its relay thread runs it: dialling, then relayed.
pub struct Fast {
    id: u64,
    state: State,
    /// Once it is relayed: its place and its connection, given back by the engine at its end.
    owned: Option<Owned>,
}

/// What a session the engine opened holds while it is relayed: its agent's place and its
/// connection in `max_connections`. Both are given back here, on the relay thread, when the
/// session is over (dropped: its outcome is taken first), so nothing waits for Python to
/// hear of its end, which may come later (`engine.rs`, [`Task::can_wait`]).
struct Owned {
    hold: Arc<Hold>,
    connections: Arc<Connections>,
    /// Where its end is counted (`None`: its agent is not, or it was counted), and when it
    /// opened.
    ends: Option<AgentEnds>,
    opened_at: f64,
}

impl Owned {
    /// Its end counted, once.
    fn ended(&mut self, outcome: &Outcome) {
        if let Some(ends) = self.ends.take() {
            ends.ended(outcome, (monotonic_now() - self.opened_at).max(0.0));
        }
    }
}

impl Drop for Owned {
    fn drop(&mut self) {
        // Dropped without an outcome of its own (a panic, the engine stopped): counted as the
        // engine tells it to Python.
        if self.ends.is_some() {
            self.ended(&Outcome::new(0));
        }
        self.hold.give_back();
        self.connections.closed();
    }
}

// The relayed session is the state that lives (for hours): inline, in the one allocation the
// relay thread holds per session; the short-lived opening is the boxed one.
#[allow(clippy::large_enum_variant)]
enum State {
    /// Its request is being read (`reading.rs`).
    Reading(Box<Reading>),
    /// Answered 101 on `/ws/twilio`, its opening being read (`twilio.rs`).
    Answering(Box<Answering>),
    Opening(Box<Opening>),
    /// Answered, a provider's opening being read (`Peeking`).
    Peeking(Box<Peeking>),
    Relaying(Driven<Pair>),
    /// Not opened: its sockets are kept until the relay thread has taken them out of its epoll
    /// (the client's file lives on in the copy Python answers on, and an epoll registration
    /// lives as long as its file: left in, its events would reach the session that gets the
    /// slot next).
    Over(Outcome, [Option<Stream>; 2]),
}

/// What an opening holds for others: its place, its token, and its connection. Given back
/// exactly once: the place and the connection by the session's end if it opens ([`Owned`]);
/// the place and the token when it fails (its connection then by Python, which answers it), or
/// here if the opening is dropped without either (the engine stopping, a panic, a relay thread
/// that could not register its sockets).
struct Held {
    id: u64,
    route: Arc<Route>,
    /// Its place.
    hold: Arc<Hold>,
    /// The connections held: its own is given back at its end if it opens ([`Owned`]).
    connections: Arc<Connections>,
    claimed: Option<Claimed>,
    tell: Tell,
    armed: bool,
    /// Its 101 went already (`/ws/twilio`).
    answered: bool,
}

impl Held {
    /// It did not open: the place and the token back, and Python told (with the client's socket
    /// to answer, unless it is gone).
    fn fail(&mut self, client: Option<Client>, failure: Failure) {
        self.armed = false;
        self.hold.give_back();
        let store_seconds = match self.claimed.take() {
            Some(mut c) => {
                c.release(); // the client may retry with its token
                c.calls
            }
            None => Vec::new(),
        };
        (self.tell)(News::Unopened {
            session_id: self.id,
            service_host: self.route.service_host.clone(),
            client,
            failure,
            store_seconds,
            answered: self.answered,
        });
    }

    /// It opened: the place is the session's now (given back at its end: [`Owned`]).
    fn opened(&mut self) -> Vec<f64> {
        self.armed = false;
        self.claimed.take().map(|c| c.calls).unwrap_or_default()
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if self.armed {
            self.fail(None, Failure::ClientGone);
        }
    }
}

/// `CLOCK_MONOTONIC` now, in seconds: the clock of Python's `time.monotonic()`.
pub(crate) fn monotonic_now() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// How long a Telnyx, Plivo or Exotel opening is waited for, to learn the call's ids
/// (`sessions._PEEK_TIME`): the bot's first messages wait as long at most.
const PEEK_TIME: Duration = Duration::from_secs(1);

/// A provider's session answered 101, its opening being read before it is relayed.
pub struct Peeking {
    o: Opening,
    bot_pending: Vec<u8>,
    reader: OpeningReader,
    /// What came behind the request's head, fed to the reader at the first step.
    behind: Vec<u8>,
    /// From the dial's start to the bot's 101 (the peek is not the dial's).
    dial_seconds: f64,
    /// The 101, while a TLS connection's queued records keep it from going.
    unsent: Vec<u8>,
    /// `PEEK_TIME` after the 101 went (`None` until it has).
    deadline: Option<Instant>,
}

impl Peeking {
    /// Reads the opening on: `Some` once it is read, or will not be (its ids, if read).
    fn step(&mut self, now: Instant) -> Option<Option<Call>> {
        let provider = self.reader.provider();
        let call = |o: crate::opening::Opening| Call {
            provider,
            call_id: o.call_id,
            stream_id: o.stream_id,
        };
        let client = &self.o.client;
        // TLS: records (the 101's too) the socket did not take at once. The opening comes only
        // once the client has its 101, and its time counts from there.
        match client.flush_held(&mut self.unsent) {
            Ok(true) => {}
            Ok(false) => return None,
            Err(_) => return Some(None), // the relay meets the error
        }
        if self.deadline.is_none() {
            self.deadline = now.checked_add(PEEK_TIME);
        }
        if self.deadline.is_some_and(|d| now >= d) {
            return Some(None);
        }
        // Not read (the client's end, an error, an opening not taken): the relay meets them.
        read_opening(client, &mut self.reader, &mut self.behind).map(|read| read.map(call))
    }
}

/// A session whose bot is being dialled.
pub struct Opening {
    held: Held,
    client: Stream,
    bot: Stream,
    client_key: String,
    client_pending: Vec<u8>,
    /// A `/ws/twilio` stream's call: its 101 went already.
    call: Option<Call>,
    /// A URL-routed provider's session: its opening is read after the 101.
    peek: Option<Provider>,
    request: Vec<u8>,
    sent: usize,
    tried: bool,
    key: String,
    session_uuid: String,
    response: Vec<u8>,
    started: Instant,
    /// When the dial fails for time (`None`: a `dial_timeout` too long to count).
    deadline: Option<Instant>,
    /// The connect failed at once.
    failed: Option<io::Error>,
    stop: Option<(u16, String)>,
    meter: Option<Later>,
    /// Where its dial and its end are counted (`None`: its agent is not).
    ends: Option<AgentEnds>,
    /// When Python was told it opened (`CLOCK_MONOTONIC` seconds, as [`News::Opened`]).
    opened_at: f64,
}

/// What [`Fast::new`] needs beside the sockets.
pub struct Open {
    /// The agent's route.
    pub route: Arc<Route>,
    /// The client's `Sec-WebSocket-Key`.
    pub client_key: String,
    /// Its `?body=`, decoded and checked.
    pub body: Option<DecodedBody>,
    /// What the client sent past its head, for the bot first.
    pub client_pending: Vec<u8>,
    /// A `/ws/twilio` stream: answered 101 already, and its call.
    pub answered: Option<Answered>,
    /// A Telnyx, Plivo or Exotel session: its opening is read after the 101.
    pub peek: Option<Provider>,
    /// Makes the session's meter once it is relayed (counted from then on, as a session the
    /// Python path hands over).
    pub meter: Later,
    /// Where its news goes.
    pub tell: Tell,
    /// Its token, checked and used up (a `token` agent's session), whose nonce names it.
    pub claimed: Option<Claimed>,
    /// Its place, taken.
    pub hold: Arc<Hold>,
    /// The connections held (its own among them).
    pub connections: Arc<Connections>,
}

impl Fast {
    /// Session `id`, whose request its relay thread reads (`reading.rs`), then opens it or
    /// hands it to Python.
    pub fn reading(id: u64, reading: Reading) -> Box<Self> {
        Box::new(Self {
            id,
            state: State::Reading(Box::new(reading)),
            owned: None,
        })
    }

    /// Session `id`: a `/ws/twilio` stream answered 101, whose opening its relay thread reads
    /// (`twilio.rs`), then opens it or hands it to Python.
    pub fn answering(id: u64, answering: Answering) -> Box<Self> {
        Box::new(Self {
            id,
            state: State::Answering(Box::new(answering)),
            owned: None,
        })
    }

    /// Session `id`: `client` (past the read of its request) and `bot` (connecting: `failed` if
    /// the connect failed at once), both prepared for a relay thread.
    pub fn new(id: u64, client: Stream, bot: Stream, failed: Option<io::Error>, o: Open) -> Self {
        let key = upgrade::new_key();
        let (named, call) = match o.answered {
            Some(a) => (a.session_uuid, Some(a.call)),
            None => (None, None),
        };
        let session_uuid = match (named, &o.claimed) {
            // The id its 101 named.
            (Some(uuid), _) => uuid,
            // The id /start answered with, derived from the token's nonce.
            (None, Some(c)) => upgrade::session_id_for(&c.nonce),
            (None, None) => upgrade::new_uuid(),
        };
        let r = &o.route;
        let request = upgrade::bot_request(
            &r.resource,
            &r.host_header,
            &key,
            &session_uuid,
            o.body.as_ref(),
        );
        let started = Instant::now();
        let opening = Opening {
            deadline: started.checked_add(r.dial_timeout),
            held: Held {
                id,
                route: o.route.clone(),
                hold: o.hold,
                connections: o.connections,
                claimed: o.claimed,
                tell: o.tell,
                armed: true,
                answered: call.is_some(),
            },
            client,
            bot,
            client_key: o.client_key,
            client_pending: o.client_pending,
            call,
            peek: o.peek,
            request,
            sent: 0,
            tried: false,
            key,
            session_uuid,
            response: Vec::new(),
            started,
            failed,
            stop: None,
            ends: o.meter.ends(),
            meter: Some(o.meter),
            opened_at: 0.0,
        };
        Self {
            id,
            state: State::Opening(Box::new(opening)),
            owned: None,
        }
    }
}

/// What one step of an opening came to.
enum Dial {
    Blocked,
    /// The bot's 101 passed; the bytes behind it.
    Answered(Vec<u8>),
    Failed(Failure),
}

fn os(e: &io::Error) -> Failure {
    match e.raw_os_error() {
        Some(n) => Failure::Os(n),
        None if e.kind() == ErrorKind::UnexpectedEof => Failure::Closed,
        // An error without an OS number (not expected from a plain socket).
        None => Failure::Os(libc::EIO),
    }
}

impl Opening {
    fn dial(&mut self, now: Instant) -> Dial {
        if let Some(e) = self.failed.take() {
            return Dial::Failed(os(&e));
        }
        if self.deadline.is_some_and(|d| now >= d) {
            return Dial::Failed(Failure::TimedOut);
        }
        // The request goes as soon as the connect is up: the first try needs no event (a
        // connect still under way answers WouldBlock).
        while self.sent < self.request.len() {
            if self.tried && !self.bot.may_write() {
                return Dial::Blocked;
            }
            self.tried = true;
            match self.bot.write(&self.request[self.sent..]) {
                Ok(n) => self.sent += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Dial::Blocked,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Dial::Failed(os(&e)),
            }
        }
        scratch::with(4096, |buf| {
            loop {
                if !self.bot.may_read() {
                    return Dial::Blocked;
                }
                match self.bot.read(buf) {
                    Ok(0) => return Dial::Failed(Failure::Closed),
                    Ok(n) => {
                        if n < buf.len() && !self.bot.is_tls() {
                            // Emptied (as a pump's short read): no EAGAIN read once relaying.
                            self.bot.read_drained();
                        }
                        self.response.extend_from_slice(&buf[..n]);
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => return Dial::Blocked,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(e) => return Dial::Failed(os(&e)),
                }
                match upgrade::split_head(&self.response) {
                    Err(upgrade::TooLarge) => return Dial::Failed(Failure::TooLarge),
                    Ok(Some(end)) => {
                        let rest = self.response.split_off(end);
                        if upgrade::bot_accepted(&self.response, &self.key) {
                            return Dial::Answered(rest);
                        }
                        let head = std::mem::take(&mut self.response);
                        let key = std::mem::take(&mut self.key);
                        return Dial::Failed(Failure::Answer { head, key });
                    }
                    Ok(None) => {}
                }
            }
        })
    }
}

impl Fast {
    /// The request was read: open its session here, or hand the connection to Python.
    fn read(&mut self, step: Step, now: Instant) -> Run {
        let over = State::Over(Outcome::new(self.id), [None, None]);
        let State::Reading(reading) = std::mem::replace(&mut self.state, over) else {
            unreachable!("read twice");
        };
        let waited = reading.waited();
        let Reading {
            client,
            read,
            peer,
            prepared,
            worker,
            waiting,
            ..
        } = *reading;
        let opener = waiting.opener().clone();
        let routes = opener.routes();
        // A /ws/twilio stream: answered, and still waited for while its opening is read.
        let twilio = match step {
            Step::Whole if !routes.is_empty() => upgrade::recognise_twilio(&read),
            _ => None,
        };
        if let Some(up) = twilio {
            if !waiting.is_live() {
                // Picked for eviction, its stop on its way: dropped unanswered, as evicted.
                waiting.hand(None, peer, Vec::new(), (waited, true), None);
                self.state = State::Over(Outcome::new(self.id), [Some(client), None]);
                return Run::Done;
            }
            let timeout = opener.wait_timeout();
            let Some(a) = Answering::new(
                client,
                (&read, &up),
                (peer, prepared),
                (worker, timeout),
                waiting,
            ) else {
                return Run::Done; // gone before its 101: dropped (Python told)
            };
            self.state = State::Answering(Box::new(a));
            return self.run(now);
        }
        // Dropped without an answer: whether evicted, and why its TLS failed. A whole request
        // is claimed first: from then on no eviction can pick it (one that picked it wins).
        let dropped = match step {
            Step::Whole if waiting.claim() => None,
            Step::Whole | Step::Evicted => Some((true, None)),
            Step::TlsFailed(why) => Some((false, Some(why))),
            Step::Gone | Step::Blocked => Some((false, None)),
        };
        if let Some((evicted, tls_error)) = dropped {
            waiting.hand(None, peer, Vec::new(), (waited, evicted), tls_error);
            self.state = State::Over(Outcome::new(self.id), [Some(client), None]);
            return Run::Done;
        }
        match opener.open(&routes, client, &read, prepared, (self.id, worker)) {
            Verdict::Started(fast) => {
                waiting.opened();
                self.state = fast.state;
                self.run(now)
            }
            Verdict::Back(mut client) => {
                let copy = for_python(&mut client);
                let read = if copy.is_some() { read } else { Vec::new() };
                waiting.hand(copy, peer, read, (waited, false), None);
                self.state = State::Over(Outcome::new(self.id), [Some(client), None]);
                Run::Done
            }
        }
    }

    /// What the `/ws/twilio` opening came to: open its session here, or hand it to Python.
    fn heard(&mut self, heard: Heard, now: Instant) -> Run {
        let over = State::Over(Outcome::new(self.id), [None, None]);
        let State::Answering(a) = std::mem::replace(&mut self.state, over) else {
            unreachable!("heard twice");
        };
        let mut a = *a;
        let opening = match heard {
            Heard::Blocked => unreachable!("a blocked opening is not heard"),
            // Dropped: its `Waiting` tells Python; the socket stays until taken out.
            Heard::Gone => {
                self.state = State::Over(Outcome::new(self.id), [Some(a.client), None]);
                return Run::Done;
            }
            Heard::OutOfTime => {
                let evicted = a.evicted();
                return self.hand_answered(a, (true, evicted));
            }
            Heard::NotMine => return self.hand_answered(a, (false, false)),
            Heard::Opening(opening) => opening,
        };
        // From here no eviction picks it (one that picked it first wins: evicted).
        if !a.waiting.claim() {
            return self.hand_answered(a, (true, true));
        }
        let Some(service_host) = opening.service_host else {
            return self.hand_answered(a, (false, false)); // Python's 1008
        };
        let answered = Answered {
            session_uuid: a.session_uuid.clone(),
            call: Call {
                provider: Provider::Twilio,
                call_id: opening.call_id,
                stream_id: opening.stream_id,
            },
        };
        let opener = a.waiting.opener().clone();
        let pending = a.reader.raw().to_vec();
        let at = (self.id, a.worker);
        let to = (service_host.as_str(), a.token.as_deref());
        match opener.open_answered(a.client, (pending, answered), to, a.prepared, at) {
            Verdict::Started(fast) => {
                a.waiting.opened();
                self.state = fast.state;
                self.run(now)
            }
            Verdict::Back(client) => {
                a.client = client;
                self.hand_answered(a, (false, false))
            }
        }
    }

    /// An answered `/ws/twilio` stream goes to Python with all it read (`out_of_time`: too
    /// slow or `evicted`, with no time left to read more).
    fn hand_answered(&mut self, mut a: Answering, (out_of_time, evicted): (bool, bool)) -> Run {
        let waited = if out_of_time { a.timeout() } else { a.waited() };
        let copy = for_python(&mut a.client);
        let read = if copy.is_some() {
            a.take_read()
        } else {
            Vec::new()
        };
        let uuid = std::mem::take(&mut a.session_uuid);
        a.waiting
            .hand_answered(copy, a.peer, read, (waited, evicted), uuid);
        self.state = State::Over(Outcome::new(self.id), [Some(a.client), None]);
        Run::Done
    }

    /// The opening is over: relay, or report why not and end.
    fn settle(&mut self, dial: Dial, now: Instant) -> Run {
        let over = State::Over(Outcome::new(self.id), [None, None]);
        let State::Opening(opening) = std::mem::replace(&mut self.state, over) else {
            unreachable!("settled twice");
        };
        let o = *opening;
        let failure = match dial {
            Dial::Blocked => unreachable!("a blocked dial is not settled"),
            Dial::Failed(f) => f,
            Dial::Answered(bot_pending) => return self.relay(o, bot_pending, now),
        };
        self.fail(o, failure)
    }

    fn relay(&mut self, mut o: Opening, bot_pending: Vec<u8>, now: Instant) -> Run {
        let answered = o.call.is_some();
        if let Some(provider) = o.peek.take() {
            // Telnyx, Plivo, Exotel: answered, then their opening read for the call's ids
            // before anything is relayed (`sessions.peek_opening`), for `PEEK_TIME` at most.
            let answer = upgrade::switching_protocols(&o.client_key, &o.session_uuid);
            let unsent = o.client.write_or_hold(answer).unwrap_or_else(|_| {
                o.client.shutdown_both(); // gone or broken: the relay ends it at once
                Vec::new()
            });
            let peeking = Peeking {
                reader: OpeningReader::new(provider),
                behind: std::mem::take(&mut o.client_pending),
                dial_seconds: o.started.elapsed().as_secs_f64(),
                unsent,
                deadline: None,
                o,
                bot_pending,
            };
            self.state = State::Peeking(Box::new(peeking));
            return self.run(now);
        }
        let answer =
            (!answered).then(|| upgrade::switching_protocols(&o.client_key, &o.session_uuid));
        // Kept before the client can read its 101: a Session API call made with the id the 101
        // names finds the session.
        let dial_seconds = o.started.elapsed().as_secs_f64();
        self.tell_opened(&mut o, dial_seconds);
        if let Some(answer) = answer {
            write_101(&o.client, &answer);
        }
        self.relaying(o, bot_pending, now)
    }

    /// Python told: the session is open, its place its own from now on, its length counted
    /// from now (as the Python path starts its clock once the session is handed over).
    fn tell_opened(&self, o: &mut Opening, dial_seconds: f64) {
        let store_seconds = o.held.opened();
        if let Some(ends) = &o.ends {
            ends.dialled(dial_seconds);
        }
        o.opened_at = monotonic_now();
        (o.held.tell)(News::Opened {
            session_id: self.id,
            session_uuid: std::mem::take(&mut o.session_uuid),
            service_host: o.held.route.service_host.clone(),
            dial_seconds,
            store_seconds,
            opened_at: o.opened_at,
            call: o.call.take(),
        });
    }

    /// A provider's opening read (or not, in time): Python told, with the call's ids if it was,
    /// and every byte read relayed first.
    fn peeked(&mut self, heard: Option<Call>, now: Instant) -> Run {
        let over = State::Over(Outcome::new(self.id), [None, None]);
        let State::Peeking(p) = std::mem::replace(&mut self.state, over) else {
            unreachable!("peeked twice");
        };
        let Peeking {
            mut o,
            bot_pending,
            reader,
            dial_seconds,
            ..
        } = *p;
        o.call = heard;
        o.client_pending = reader.into_raw();
        self.tell_opened(&mut o, dial_seconds);
        self.relaying(o, bot_pending, now)
    }

    /// Relayed from now on, in place.
    fn relaying(&mut self, mut o: Opening, bot_pending: Vec<u8>, now: Instant) -> Run {
        let meter = o.meter.take().expect("a meter per session").meter();
        let pending = Pending {
            client: o.client_pending,
            bot: bot_pending,
        };
        let limits = o.held.route.limits;
        self.owned = Some(Owned {
            hold: o.held.hold.clone(),
            connections: o.held.connections.clone(),
            ends: o.ends.take(),
            opened_at: o.opened_at,
        });
        let mut driven = relay::session(self.id, o.client, o.bot, pending, limits, meter);
        if let Some((code, reason)) = o.stop {
            driven.stop(code, reason);
        }
        let run = driven.run(now);
        self.state = State::Relaying(driven);
        run
    }

    /// It did not open: the place and the token back, Python told why (with its own copy of
    /// the client's socket to answer on, unless the client went away); the sockets stay until
    /// the relay thread takes the session out.
    fn fail(&mut self, o: Opening, failure: Failure) -> Run {
        let Opening {
            mut held,
            mut client,
            bot,
            ..
        } = o;
        let answer_on = match failure {
            Failure::ClientGone => None,
            _ => for_python(&mut client),
        };
        held.fail(answer_on, failure);
        self.state = State::Over(Outcome::new(self.id), [Some(client), Some(bot)]);
        Run::Done
    }
}

/// Writes the client's 101. A fresh connection's send buffer takes it whole. If it does not, the
/// client is gone or broken: its socket is shut, and the relay ends the session at once (its end
/// is logged like any other's).
fn write_101(client: &Stream, answer: &[u8]) {
    if !matches!(client.write(answer), Ok(n) if n == answer.len()) {
        client.shutdown_both();
    }
}

/// The client for Python to answer or serve: a copy of its socket of its own (this one stays
/// until the relay thread deregisters it) and its TLS, taken off.
fn for_python(client: &mut Stream) -> Option<Client> {
    let copy = client.try_clone_socket().ok()?;
    Some((copy, client.take_tls().map(Box::new)))
}

impl Task for Fast {
    fn stream(&self, side: usize) -> Option<&Stream> {
        match &self.state {
            State::Reading(r) => (side == 0).then_some(&r.client),
            State::Answering(a) => (side == 0).then_some(&a.client),
            State::Opening(o) => match side {
                0 => Some(&o.client),
                1 => Some(&o.bot),
                _ => None,
            },
            State::Peeking(p) => match side {
                0 => Some(&p.o.client),
                1 => Some(&p.o.bot),
                _ => None,
            },
            State::Relaying(d) => d.stream(side),
            State::Over(_, kept) => kept.get(side).and_then(Option::as_ref),
        }
    }

    fn run(&mut self, now: Instant) -> Run {
        match &mut self.state {
            State::Reading(r) => match r.step(now) {
                Step::Blocked => Run::Blocked,
                step => self.read(step, now),
            },
            State::Answering(a) => match a.step(now) {
                Heard::Blocked => Run::Blocked,
                heard => self.heard(heard, now),
            },
            State::Opening(o) => match o.dial(now) {
                Dial::Blocked => Run::Blocked,
                settled => self.settle(settled, now),
            },
            State::Peeking(p) => match p.step(now) {
                None => Run::Blocked,
                Some(heard) => self.peeked(heard, now),
            },
            State::Relaying(d) => d.run(now),
            State::Over(..) => Run::Done,
        }
    }

    fn stop(&mut self, code: u16, reason: String) {
        match &mut self.state {
            // Not yet a session Python knows: only an eviction or the gateway's close stops it
            // (never once it is opening: `Waiting::claim`).
            State::Reading(r) => r.stop(code),
            State::Answering(a) => a.stop(code),
            State::Opening(o) => o.stop = Some((code, reason)),
            State::Peeking(p) => p.o.stop = Some((code, reason)),
            State::Relaying(d) => d.stop(code, reason),
            State::Over(..) => {}
        }
    }

    fn deadline(&self) -> Option<Instant> {
        match &self.state {
            State::Reading(r) => r.deadline(),
            State::Answering(a) => a.deadline(),
            State::Opening(o) => o.deadline,
            State::Peeking(p) => p.deadline,
            State::Relaying(d) => d.deadline(),
            State::Over(..) => None,
        }
    }

    fn can_wait(&self) -> bool {
        self.owned.is_some()
    }

    fn finish(self: Box<Self>) -> Outcome {
        let Self {
            state, mut owned, ..
        } = *self;
        match state {
            State::Relaying(d) => {
                let outcome = Box::new(d).finish();
                // Counted before its place and connection are given back (`owned` dropped).
                if let Some(owned) = &mut owned {
                    owned.ended(&outcome);
                }
                outcome
            }
            State::Over(o, _) => o,
            // Dropped while dialling (the engine stopped): its `Held` gives everything back;
            // while reading, its `Waiting` tells Python.
            State::Opening(_) | State::Reading(_) | State::Answering(_) | State::Peeking(_) => {
                Outcome::new(self.id)
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    //! Through the engine's own entry points, on loopback TCP: a request the table serves is
    //! opened and relayed, anything else is handed back with its bytes, and a failed dial comes
    //! back as news with the client's socket.

    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsRawFd;
    use std::time::{Duration, Instant};

    use super::{Failure, News, Route};
    use crate::engine::{Accepted, Engine, Item};
    use crate::frame::{encode_frame, Opcode};
    use crate::session::Limits;
    use crate::upgrade::accept_key;

    pub(crate) const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

    pub(crate) fn route(
        host: &str,
        bot: std::net::SocketAddr,
        max: usize,
        timeout_ms: u64,
    ) -> Route {
        Route {
            service_host: host.to_owned(),
            max_sessions: max,
            bot,
            resource: "/ws".to_owned(),
            host_header: bot.to_string(),
            limits: Limits {
                max_message_size: 1 << 20,
                time_limit: None,
            },
            dial_timeout: Duration::from_millis(timeout_ms),
            agent: None,
            tokens: None,
            place: Default::default(),
        }
    }

    pub(crate) fn upgrade(target: &str) -> String {
        format!(
            "GET {target} HTTP/1.1\r\nHost: gw\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
    }

    /// A listening gateway socket, and a client that sent `request` to it.
    fn connected(request: &str) -> (TcpListener, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let mut c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        c.write_all(request.as_bytes()).unwrap();
        (l, c)
    }

    /// Accepts the one waiting connection (on loopback its request is in its socket once the
    /// client's write returned: the kernel delivers it within that call).
    pub(crate) fn accept_one(engine: &Engine, l: &TcpListener) -> Accepted {
        let end = Instant::now() + Duration::from_secs(5);
        loop {
            let (mut got, err) = engine.accept(l.as_raw_fd(), 8);
            assert!(err.is_none());
            if let Some(a) = got.pop() {
                assert!(got.is_empty());
                return a;
            }
            assert!(Instant::now() < end, "nothing to accept");
            std::thread::yield_now();
        }
    }

    /// The head a peer sent, read up to its blank line.
    pub(crate) fn read_head(s: &mut TcpStream) -> String {
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            assert_eq!(s.read(&mut b).unwrap(), 1, "closed before its head");
            head.push(b[0]);
        }
        String::from_utf8(head).unwrap()
    }

    /// Reads the bot's upgrade request and answers it 101: the request's head.
    pub(crate) fn answer_101(bot: &mut TcpStream) -> String {
        let request = read_head(bot);
        let key = header(&request, "Sec-WebSocket-Key").unwrap();
        let answer = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: {}\r\n\r\n",
            accept_key(key)
        );
        let _ = bot.write_all(answer.as_bytes());
        request
    }

    /// A frame the bot sends reaches the client unchanged.
    pub(crate) fn relays_the_bots_frame(bot: &mut TcpStream, client: &mut TcpStream) {
        let frame = encode_frame(true, Opcode::TEXT, b"hello", None);
        bot.write_all(&frame).unwrap();
        let mut got = vec![0; frame.len()];
        client.read_exact(&mut got).unwrap();
        assert_eq!(got, frame);
    }

    pub(crate) fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
        head.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(": ")))
    }

    /// `CLOCK_MONOTONIC` now, as the engine's news counts it.
    pub(crate) fn monotonic() -> f64 {
        super::monotonic_now()
    }

    /// The next news: queued, or an opened session's (kept by the engine; adopted here).
    pub(crate) fn news(engine: &Engine) -> News {
        let end = Instant::now() + Duration::from_secs(5);
        while Instant::now() < end {
            for item in engine.drain() {
                if let Item::Open(n) = item {
                    return n;
                }
            }
            let told = engine.told(None, |n| match n {
                News::Opened { session_id, .. } => *session_id,
                _ => unreachable!("only opened sessions are kept"),
            });
            if let Some(n) = told.into_iter().min().and_then(|id| engine.adopt(id, None)) {
                return n;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        panic!("no news");
    }

    /// A bot's listener, and an engine that opens `a.b`'s sessions (5 at most) to it.
    fn engine_to_bot() -> (TcpListener, Engine) {
        let bot_l = TcpListener::bind("127.0.0.1:0").unwrap();
        let engine = Engine::new(1, Duration::from_secs(60)).unwrap();
        engine
            .set_routes(vec![route("a.b", bot_l.local_addr().unwrap(), 5, 5000)])
            .unwrap();
        (bot_l, engine)
    }

    /// A session the engine opens to `bot_l`'s bot: the client's 101 head, the client, and the
    /// bot (answered; its reads time out after 5 s).
    fn open_one(engine: &Engine, bot_l: &TcpListener) -> (String, TcpStream, TcpStream) {
        let (l, mut client) = connected(&upgrade("/ws/generic/a.b"));
        assert!(matches!(accept_one(engine, &l), Accepted::Opening));
        let (mut bot, _) = bot_l.accept().unwrap();
        bot.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        answer_101(&mut bot);
        let head = read_head(&mut client);
        assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
        (head, client, bot)
    }

    /// The news session `id`'s outcome came with, waiting at most 5 s for the outcome.
    fn outcome_news(engine: &Engine, id: u64) -> Option<News> {
        let end = Instant::now() + Duration::from_secs(5);
        while Instant::now() < end {
            for item in engine.drain() {
                if let Item::Outcome(o, _, news) = item {
                    if o.session_id == id {
                        return news;
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        panic!("session {id} did not end");
    }

    #[test]
    fn a_request_the_table_serves_is_opened_and_relayed() {
        let (bot_l, engine) = engine_to_bot();
        let (l, mut client) = connected(&upgrade("/ws/generic/a.b"));
        assert!(matches!(accept_one(&engine, &l), Accepted::Opening));
        assert_eq!(engine.places(Some("a.b")), 1, "its place is taken");
        let (mut bot, _) = bot_l.accept().unwrap();
        bot.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let request = answer_101(&mut bot);
        assert!(request.starts_with("GET /ws HTTP/1.1\r\n"));
        let uuid = header(&request, "X-Daily-Session-Id").unwrap().to_owned();
        let head = read_head(&mut client);
        assert!(head.starts_with("HTTP/1.1 101 "));
        assert_eq!(header(&head, "X-Session-Id"), Some(uuid.as_str()));
        assert_eq!(
            header(&head, "Sec-WebSocket-Accept"),
            Some(accept_key(KEY).as_str())
        );
        match news(&engine) {
            News::Opened {
                session_uuid,
                service_host,
                ..
            } => assert_eq!((session_uuid, service_host.as_str()), (uuid, "a.b")),
            other => panic!("{other:?}"),
        }
        relays_the_bots_frame(&mut bot, &mut client);
    }

    #[test]
    fn a_session_gives_its_place_back_once_at_its_end_or_sooner_when_asked() {
        let (bot_l, engine) = engine_to_bot();
        let open = || {
            let (_, client, bot) = open_one(&engine, &bot_l);
            let News::Opened { session_id, .. } = news(&engine) else {
                panic!("not opened")
            };
            (session_id, client, bot)
        };
        let ended = |id| drop(outcome_news(&engine, id));
        // At its end, by the engine itself (nothing asked of the control plane).
        let (id, client, bot) = open();
        assert_eq!(engine.places(Some("a.b")), 1);
        drop((client, bot));
        ended(id);
        assert_eq!(engine.places(Some("a.b")), 0);
        // Sooner when asked (a stop through the Session API), and then not again: the place
        // taken meanwhile by another session stays taken.
        let (id, client, bot) = open();
        assert!(engine.give_back_place(id));
        assert!(!engine.give_back_place(id), "once");
        assert_eq!(engine.places(Some("a.b")), 0);
        assert!(engine.take_place("a.b", 5));
        drop((client, bot));
        ended(id);
        assert_eq!(engine.places(Some("a.b")), 1);
        assert!(!engine.give_back_place(id), "over");
        assert!(!engine.give_back_place(12345), "no such session");
    }

    #[test]
    fn the_engine_keeps_an_opened_sessions_news_until_it_is_adopted_or_ends() {
        let (bot_l, engine) = engine_to_bot();
        let open = || {
            let (head, client, bot) = open_one(&engine, &bot_l);
            let uuid = header(&head, "X-Session-Id").expect("named").to_owned();
            assert!(engine.drain().is_empty(), "kept, not queued");
            (uuid, client, bot)
        };
        let id_of = |news: &News| match news {
            News::Opened { session_id, .. } => *session_id,
            _ => panic!("not opened: {news:?}"),
        };
        // Kept, not queued: found by the id its 101 named as soon as the client has the 101.
        let (uuid, client, bot) = open();
        let id = engine.told_id(&uuid).expect("kept before the 101 went");
        assert_eq!(engine.told(None, id_of), vec![id]);
        assert!(
            engine.adopt(id, Some("other.b")).is_none(),
            "another agent's: left"
        );
        // Not adopted: its news goes with its outcome, and it is no longer kept.
        drop((client, bot));
        assert_eq!(outcome_news(&engine, id).as_ref().map(id_of), Some(id));
        assert_eq!((engine.told_count(), engine.told_id(&uuid)), (0, None));
        assert!(engine.adopt(id, None).is_none(), "over");
        // Adopted: taken once, and its outcome comes without it.
        let (uuid, client, bot) = open();
        let id = engine.told_id(&uuid).expect("kept");
        assert_eq!(engine.adopt(id, Some("a.b")).as_ref().map(id_of), Some(id));
        assert!(engine.adopt(id, None).is_none(), "once");
        assert_eq!((engine.told_count(), engine.told_id(&uuid)), (0, None));
        drop((client, bot));
        assert!(outcome_news(&engine, id).is_none());
    }

    #[test]
    fn an_opened_sessions_dial_and_end_are_counted_even_when_the_engine_stops_under_it() {
        use crate::counters::EndKind;
        use crate::session::EndedBy;
        let bot_l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut engine = Engine::new(1, Duration::from_secs(60)).unwrap();
        let mut r = route("a.b", bot_l.local_addr().unwrap(), 5, 5000);
        r.agent = Some(engine.register_agent("a.b"));
        engine.set_routes(vec![r]).unwrap();
        let (_, client, bot) = open_one(&engine, &bot_l);
        let id = engine.told(None, |n| match n {
            News::Opened { session_id, .. } => *session_id,
            _ => unreachable!(),
        })[0];
        drop((client, bot)); // both gone: the client's end, 1006
        assert!(outcome_news(&engine, id).is_some());
        let _live = open_one(&engine, &bot_l);
        engine.shutdown(); // dropped while relaying: counted as the engine tells it
        let s = &engine.counters()[0];
        assert_eq!(s.dials.counts.iter().sum::<u64>(), 2);
        assert_eq!(s.durations.counts.iter().sum::<u64>(), 2);
        let kind = |ended_by, code| EndKind {
            ended_by,
            code,
            detail: String::new(),
        };
        assert_eq!(
            s.closed,
            vec![
                (kind(EndedBy::Client, 1006), 1),
                (kind(EndedBy::Gateway, 1006), 1)
            ]
        );
    }

    #[test]
    fn anything_else_is_handed_back_with_its_bytes() {
        let bot_l = TcpListener::bind("127.0.0.1:0").unwrap();
        let engine = Engine::new(1, Duration::from_secs(60)).unwrap();
        engine
            .set_routes(vec![route("a.b", bot_l.local_addr().unwrap(), 1, 5000)])
            .unwrap();
        for request in [
            upgrade("/ws/generic/other.b"),
            upgrade("/ws/twilio"),
            "GET /livez HTTP/1.1\r\n\r\n".to_owned(),
        ] {
            let (l, _client) = connected(&request);
            match accept_one(&engine, &l) {
                Accepted::Handed { read, .. } => assert_eq!(read, request.as_bytes()),
                Accepted::Opening => panic!("{request:?} was taken"),
            }
        }
        // Full: the place count is the control plane's too.
        assert!(engine.take_place("a.b", 1));
        let (l, _client) = connected(&upgrade("/ws/generic/a.b"));
        assert!(matches!(accept_one(&engine, &l), Accepted::Handed { .. }));
        assert_eq!(engine.places(Some("a.b")), 1);
    }

    #[test]
    fn an_opening_dropped_by_a_shutdown_gives_its_place_back_and_says_so() {
        // A bot that accepts and never answers: the session is still opening at the shutdown.
        let silent = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut engine = Engine::new(1, Duration::from_secs(60)).unwrap();
        let r = route("a.b", silent.local_addr().unwrap(), 1, 60_000);
        engine.set_routes(vec![r]).unwrap();
        let (l, _client) = connected(&upgrade("/ws/generic/a.b"));
        assert!(matches!(accept_one(&engine, &l), Accepted::Opening));
        let _dialled = silent.accept().unwrap();
        engine.shutdown();
        assert_eq!(engine.places(Some("a.b")), 0);
        match news(&engine) {
            News::Unopened {
                client: None,
                failure: Failure::ClientGone,
                ..
            } => {}
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_failed_dial_gives_the_place_and_the_client_back() {
        // Refused: a port nothing listens on.
        let closed = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        // A bot that accepts and never answers.
        let silent = TcpListener::bind("127.0.0.1:0").unwrap();
        // A bot that answers something else than a 101.
        let wrong = TcpListener::bind("127.0.0.1:0").unwrap();
        let wrong_addr = wrong.local_addr().unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = wrong.accept().unwrap();
            read_head(&mut s);
            s.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
                .unwrap();
            std::thread::sleep(Duration::from_secs(2));
        });
        let engine = Engine::new(1, Duration::from_secs(60)).unwrap();
        engine
            .set_routes(vec![
                route("refused.b", closed, 5, 5000),
                route("silent.b", silent.local_addr().unwrap(), 5, 150),
                route("wrong.b", wrong_addr, 5, 5000),
            ])
            .unwrap();
        for host in ["refused.b", "silent.b", "wrong.b"] {
            let (l, _client) = connected(&upgrade(&format!("/ws/generic/{host}")));
            assert!(matches!(accept_one(&engine, &l), Accepted::Opening));
            let News::Unopened {
                service_host,
                client,
                failure,
                ..
            } = news(&engine)
            else {
                panic!("{host} opened")
            };
            assert_eq!(service_host, host);
            assert!(
                client.is_some(),
                "the client's socket comes back to be answered"
            );
            match (host, failure) {
                ("refused.b", Failure::Os(e)) => assert_eq!(e, 111), // ECONNREFUSED
                ("silent.b", Failure::TimedOut) => {}
                ("wrong.b", Failure::Answer { head, .. }) => {
                    assert!(head.starts_with(b"HTTP/1.1 404"))
                }
                (h, f) => panic!("{h}: {f:?}"),
            }
            assert_eq!(engine.places(Some(host)), 0, "its place is given back");
        }
    }
}
