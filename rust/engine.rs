//! The engine: sessions handed over by the control plane as connected sockets, served on relay
//! threads (`shard.rs`) until they end (`relay.rs`, `echo.rs`, `inproc/`), and their outcomes
//! queued for Python.
//!
//! Python learns of finished sessions through one doorbell (a socketpair) per engine: a byte is
//! written when the outcome queue turns non-empty, so one event-loop wake-up drains many
//! outcomes. An outcome rings at most once per [`RING_DELAY`]: one ending within that time of
//! the last ring waits for the relay thread's owed ring (`shard.rs`), and Python takes every
//! outcome of that millisecond in one wake-up. The end of a session the engine opened by itself
//! waits longer ([`LEISURE_DELAY`]): it gave back its place and connection itself and counted its
//! end (`counters.rs`), and Python only logs it. Anything else (a message for an in-process bot,
//! a connection for Python to serve) rings at once. Nothing here touches Python or holds its
//! GIL. Live counts per agent, for metrics, are the [`Counters`]' (a session of a registered
//! agent carries a `Meter` on them); each live session's own messages and bytes are its
//! [`Live`], kept beside its command channel and read all at once by [`Engine::tallies`].

use std::collections::HashMap;
use std::io::{self, ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use crate::accepting::{Acceptor, Connections, OnRelay};
use crate::counters::{Counters, Live, Meter, Served, Snapshot, Tally};
use crate::inproc::{self, Handle, Message};
use crate::open::{self, monotonic_now, Hold, News, Places, Route};
use crate::opener::{Opener, Wait};
use crate::reading::{CLOSING, EVICTED};
use crate::relay::Pending;
use crate::session::{Limits, Outcome};
use crate::shard::{self, Reports, Shard, Task};
use crate::sockets::{adopt, options};
use crate::tls::Tls;
use crate::upgrade;
use crate::{echo, relay};

/// Bytes read from a connection as it is accepted: a request head at most, and what the client
/// sent behind it.
pub(crate) const FIRST_READ: usize = upgrade::MAX_HEADER_BYTES + 4096;

/// News for Python, in the order it happened: a session's messages come before its outcome.
#[derive(Debug)]
pub enum Item {
    /// A session ended, when it was told (`CLOCK_MONOTONIC` seconds, as Python's
    /// `time.monotonic()`: an outcome that waited is timed by this, not by its delivery), and
    /// for a session the engine opened that Python never adopted, its news (a
    /// [`News::Opened`], kept by the engine until then: [`Engine::adopt`]).
    Outcome(Outcome, f64, Option<News>),
    /// A message of an in-process session.
    Message(Message),
    /// A session the engine could not open, a connection for Python, a failed accept.
    Open(News),
    /// How long the replay store's calls for a session the engine opened took, in seconds.
    StoreCalls(Vec<f64>),
}

/// A connection [`Engine::accept`] took: opened by the engine, or for the control plane.
#[cfg(test)]
pub enum Accepted {
    /// The engine opens it (its news comes through the doorbell).
    Opening,
    /// The control plane's: the socket (non-blocking), its peer and the bytes read from it.
    Handed {
        /// The connection.
        sock: std::net::TcpStream,
        /// The client's address.
        peer: Option<std::net::SocketAddr>,
        /// What it sent so far (maybe nothing yet).
        read: Vec<u8>,
    },
}

/// How long after a ring the next outcome waits for its own (see the module docs). Opening
/// sessions 8 at a time, Python's thread then spent 15-18 µs a session where it spent 25-27
/// (benches/README.md): an event-loop turn per outcome or two cost more than the outcomes.
/// What waits for an outcome is never a client: a place, a count, a log line.
pub const RING_DELAY: Duration = Duration::from_millis(1);

/// How long after a ring the outcome of a session the engine opened waits for its own. Its
/// place and connection are given back already and its end counted (`open.rs`); Python only
/// logs it, so it is told with the next ring, or this long after the last one. One at a time,
/// a ring a millisecond cost more than the sessions: Python's wake-ups took the CPU the next
/// open needed (benches/README.md, "Session opens, round 8"). When the gateway has stopped
/// accepting and holds no connection any more, its end is told at once: a drain may be
/// waiting for that.
pub const LEISURE_DELAY: Duration = Duration::from_millis(20);

/// Items queued (a session the engine opened brings one, its end: its news is kept, not
/// queued) past which such an end waits only [`RING_DELAY`]: Python's turn for them is a burst
/// of CPU taken from the sessions being opened, kept short (with 64, an open's p99 one at a
/// time went from 340 to 510 µs; at 20 ms without a bound, 8 at a time, it doubled:
/// benches/README.md, "Session opens, round 8").
pub const LEISURE_BATCH: usize = 16;

#[derive(Default)]
struct Queue {
    items: Vec<Item>,
    /// The sessions the engine opened that Python has not adopted, by id: their news
    /// ([`News::Opened`]), which goes with their outcome. Python asks for one when the Session
    /// API names it (by its UUID: `by_uuid`) or lists its agent's, and hears of the rest only
    /// as they end: nothing of a live session the engine opened is in Python.
    told: HashMap<u64, News>,
    by_uuid: HashMap<String, u64>,
    /// The most of them at once since [`Engine::told_peak`] was last read.
    told_peak: usize,
    rung: bool,
    /// When the doorbell last rang.
    rang_at: Option<Instant>,
}

impl Queue {
    /// The news of session `id`, if the engine opened it and Python has not adopted it.
    fn take_told(&mut self, id: u64) -> Option<News> {
        let news = self.told.remove(&id)?;
        if let News::Opened { session_uuid, .. } = &news {
            self.by_uuid.remove(session_uuid);
        }
        Some(news)
    }

    /// Rings unless rung (a full socketpair already holds a byte, which is all it needs).
    fn ring(&mut self, bell: &UnixStream) {
        if !self.rung {
            self.rung = true;
            self.rang_at = Some(Instant::now());
            let _ = (&*bell).write(&[1]);
        }
    }
}

/// A live session as the engine reaches it: its relay thread, and its traffic so far.
struct Entry {
    worker: usize,
    live: Arc<Live>,
    /// The place of a session the engine opened (`open.rs`).
    hold: Option<Arc<Hold>>,
}

pub(crate) struct Shared {
    queue: Mutex<Queue>,
    bell: UnixStream,
    /// Live sessions: the relay thread of each, and its traffic so far.
    sessions: Mutex<HashMap<u64, Entry>>,
    inproc: Mutex<HashMap<u64, Arc<Handle>>>,
    /// The connections held (set once the relay threads are up: relay thread 0 resumes
    /// accepting through it).
    connections: OnceLock<Arc<Connections>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding these locks leaves plain data behind; keep going.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    /// A session the engine opened: its news kept until Python adopts it or it ends (see
    /// [`Queue`]); the replay store's calls it made, if any, queued without ringing.
    pub(crate) fn opened(&self, mut news: News) {
        let News::Opened {
            session_id,
            session_uuid,
            store_seconds,
            ..
        } = &mut news
        else {
            unreachable!("only opened sessions are kept");
        };
        let mut q = lock(&self.queue);
        if !store_seconds.is_empty() {
            let calls = std::mem::take(store_seconds);
            q.items.push(Item::StoreCalls(calls));
        }
        q.by_uuid.insert(session_uuid.clone(), *session_id);
        q.told.insert(*session_id, news);
        q.told_peak = q.told_peak.max(q.told.len());
    }

    /// Queues `item` and rings (outcomes come through [`Reports`], which may ring later).
    pub(crate) fn push(&self, item: Item) {
        let mut q = lock(&self.queue);
        q.items.push(item);
        q.ring(&self.bell);
    }

    /// Registers live session `id` on relay thread `worker`: its traffic, read by
    /// [`Engine::tallies`], and where its stops go.
    pub(crate) fn register(
        &self,
        id: u64,
        worker: usize,
        hold: Option<Arc<Hold>>,
    ) -> io::Result<Arc<Live>> {
        let mut sessions = lock(&self.sessions);
        if sessions.contains_key(&id) {
            return Err(io::Error::new(
                ErrorKind::InvalidInput,
                "session id already in use",
            ));
        }
        let live = Arc::new(Live::default());
        sessions.insert(
            id,
            Entry {
                worker,
                live: live.clone(),
                hold,
            },
        );
        Ok(live)
    }

    /// The connections held.
    pub(crate) fn connections(&self) -> Arc<Connections> {
        self.connections
            .get()
            .expect("set as the engine starts")
            .clone()
    }
}

impl Reports for Shared {
    fn report(&self, o: Outcome, can_wait: bool) -> Option<Instant> {
        lock(&self.sessions).remove(&o.session_id);
        lock(&self.inproc).remove(&o.session_id);
        let at = monotonic_now();
        // Nothing held and no new connection coming: a drain may be waiting for this one.
        let drained = self
            .connections
            .get()
            .is_some_and(|c| c.count() == 0 && !c.listening());
        let mut q = lock(&self.queue);
        let news = q.take_told(o.session_id);
        q.items.push(Item::Outcome(o, at, news));
        if q.rung {
            return None; // Python has yet to drain: it takes this one too
        }
        let delay = if can_wait && !drained && q.items.len() < LEISURE_BATCH {
            LEISURE_DELAY
        } else {
            RING_DELAY
        };
        let due = q.rang_at.map(|t| t + delay);
        match due {
            Some(due) if Instant::now() < due => Some(due),
            _ => {
                q.ring(&self.bell);
                None
            }
        }
    }

    fn ring(&self) {
        let mut q = lock(&self.queue);
        if !q.items.is_empty() {
            q.ring(&self.bell);
        }
    }
}

/// One side of a session as the control plane hands it over: its socket past the handshake,
/// the TLS connection on it (if any, in the state the handshake left it), and the bytes read
/// past the handshake (the start of its frames).
pub struct Handed {
    /// The connected socket.
    pub sock: std::net::TcpStream,
    /// Its TLS, begun by the control plane.
    pub tls: Option<Tls>,
    /// Bytes already read past the handshake.
    pub pending: Vec<u8>,
}

/// The relay engine. See the module docs.
///
/// Threads work like nginx's workers: each runs its own epoll loop, and a session (both its
/// sockets) lives on one of them, handed out in turn. No work stealing, no wake-ups across
/// threads on the hot path: measured cheaper per message than tokio's multi-threaded scheduler,
/// then than a current-thread tokio runtime per thread, for this workload of many independent
/// sessions.
pub struct Engine {
    workers: Vec<Shard>,
    shared: Arc<Shared>,
    bell_rx: UnixStream,
    dead_peer_timeout: Duration,
    counters: Arc<Counters>,
    /// Sessions open or being opened per service host (the control plane's and the engine's).
    places: Places,
    /// What opens the sessions the engine opens by itself (and its route table).
    opener: Arc<Opener>,
    /// The listening socket prepared for its sockets to inherit their options (-1: none).
    listener: std::sync::atomic::AtomicI32,
    /// What decides each accepted connection's fate; its session ids and relay-thread turns
    /// are the control plane's sessions' too.
    acceptor: Acceptor,
    /// The connections held, accepted on the relay thread.
    held: Arc<Connections>,
}

impl Engine {
    /// Starts `threads` relay threads (0: [`shard::default_count`]). A peer that vanishes
    /// without a FIN (power cut, NAT timeout) is detected within `dead_peer_timeout` by the
    /// kernel: TCP keepalive probes while the connection is idle, `TCP_USER_TIMEOUT` while data
    /// waits for its ACK. Either costs nothing per message, unlike pings of our own. (Not on a
    /// bot socket the engine dials to loopback: `sockets::dialled_options`.)
    pub fn new(threads: usize, dead_peer_timeout: Duration) -> io::Result<Self> {
        let n = if threads > 0 {
            threads
        } else {
            shard::default_count()?
        };
        let (bell, bell_rx) = UnixStream::pair()?;
        bell.set_nonblocking(true)?;
        bell_rx.set_nonblocking(true)?;
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            bell,
            sessions: Mutex::new(HashMap::new()),
            inproc: Mutex::new(HashMap::new()),
            connections: OnceLock::new(),
        });
        let report: Arc<dyn Reports> = shared.clone();
        let workers = (0..n)
            .map(|i| Shard::start(i, report.clone()))
            .collect::<io::Result<Vec<_>>>()?;
        let counters = Arc::new(Counters::new(workers.len()));
        let opener = Arc::new(Opener::new(
            shared.clone(),
            counters.clone(),
            dead_peer_timeout,
        ));
        let acceptor = Acceptor {
            opener: opener.clone(),
            ids: Arc::new(AtomicU64::new(1)),
            next: Arc::new(AtomicUsize::new(0)),
            mailboxes: workers.iter().map(Shard::mailbox).collect(),
        };
        let held = Arc::new(Connections::new(workers.first().map(Shard::mailbox)));
        let _ = shared.connections.set(held.clone());
        Ok(Self {
            counters: counters.clone(),
            places: Places::default(),
            opener,
            listener: std::sync::atomic::AtomicI32::new(-1),
            acceptor,
            held,
            workers,
            shared,
            bell_rx,
            dead_peer_timeout,
        })
    }

    /// The descriptor that is readable while outcomes wait in the queue.
    pub fn doorbell_fd(&self) -> RawFd {
        self.bell_rx.as_raw_fd()
    }

    /// The index of the relay thread whose turn it is.
    fn pick(&self) -> io::Result<usize> {
        self.acceptor
            .pick()
            .ok_or_else(|| io::Error::other("engine is shut down"))
    }

    /// A fresh session id (unique for the engine's lifetime), for a session the control plane
    /// opens.
    pub fn next_id(&self) -> u64 {
        self.acceptor.next_id()
    }

    /// Takes a place among `service_host`'s `max` sessions; false when all are taken.
    pub fn take_place(&self, service_host: &str, max: usize) -> bool {
        open::take(&self.places.of(service_host), max)
    }

    /// Gives back a place [`take_place`](Self::take_place) took.
    pub fn give_place(&self, service_host: &str) {
        open::give(&self.places.of(service_host));
    }

    /// Sessions open or being opened: of `service_host`, or in all.
    pub fn places(&self, service_host: Option<&str>) -> usize {
        self.places.count(service_host)
    }

    /// The agents whose sessions the engine opens by itself from now on (none: every
    /// connection goes to the control plane). See `open.rs`.
    pub fn set_routes(&self, routes: Vec<Route>) -> io::Result<()> {
        let mut table = HashMap::new();
        for mut r in routes {
            if !self.counters.knows(r.agent) {
                return Err(io::Error::new(
                    ErrorKind::InvalidInput,
                    "unknown agent index",
                ));
            }
            r.place = self.places.of(&r.service_host);
            table.insert(r.service_host.clone(), Arc::new(r));
        }
        self.opener.set_routes(Arc::new(table));
        Ok(())
    }

    /// Sets the options of the relayed sockets (`sockets::options`) on the listening socket
    /// `listener`, before it listens: the sockets [`accept`](Self::accept) takes from it inherit
    /// them (no calls per connection). A socket accepted from a listener not prepared so gets
    /// them when its session opens (a connection queued before the options were set would not
    /// have inherited them).
    pub fn prepare_listener(&self, listener: RawFd) -> io::Result<()> {
        // SAFETY: the caller keeps the socket open during the call.
        let sock = unsafe { BorrowedFd::borrow_raw(listener) };
        options(&socket2::SockRef::from(&sock), self.dead_peer_timeout)?;
        self.listener.store(listener, Ordering::Release);
        Ok(())
    }

    /// The listener's TLS for connections accepted from now on (`None`: plain). With TLS, every
    /// connection is read on a relay thread (its handshake, then its request) as
    /// [`set_wait`](Self::set_wait) says; with no wait set, each comes back unread, for the
    /// control plane's own TLS.
    pub fn set_tls(&self, config: Option<Arc<rustls::ServerConfig>>) {
        self.opener.set_tls(config);
    }

    /// How requests not there when their connection was accepted are waited for: on a relay
    /// thread, at most `wait.most` at once, each for `wait.timeout` from its accept (none until
    /// this is called: such connections go to the control plane unread). See `reading.rs`.
    pub fn set_wait(&self, wait: Wait) {
        self.opener.set_wait(wait);
    }

    /// Connections whose request a relay thread waits for now.
    pub fn waiting(&self) -> usize {
        self.opener.waiting()
    }

    /// How long the connection whose request a relay thread has waited for longest has waited
    /// (`None`: none is waited for).
    pub fn oldest_wait(&self) -> Option<Duration> {
        self.opener.oldest_wait()
    }

    /// Evicts the connection whose request a relay thread has waited for longest, to make room
    /// for one waiting in the backlog (after a [`News::Crowded`](crate::open::News)); false if
    /// none is waited for now.
    pub fn make_room(&self) -> bool {
        let Some((id, worker)) = self.opener.oldest_waiting() else {
            return false;
        };
        if let Some(w) = self.workers.get(worker) {
            w.stop_task(id, EVICTED, String::new());
        }
        true
    }

    /// Evicts every connection whose request a relay thread waits for (the gateway is closing).
    pub fn stop_waiting(&self) {
        for (id, worker) in self.opener.stop_waiting() {
            if let Some(w) = self.workers.get(worker) {
                w.stop_task(id, CLOSING, String::new());
            }
        }
    }

    /// Accepts up to `max` connections waiting on `listener`, reads what each sent, and opens
    /// the sessions whose request the route table serves (see `open.rs`); a request not all
    /// there yet is waited for on a relay thread while there is room (`reading.rs`). The others
    /// are returned with what was read. A connection that closed at once, or failed, is
    /// dropped. Stops at the first error of `accept` other than a connection aborted, and
    /// returns it beside what it took. (The gateway accepts on a relay thread instead:
    /// [`listen`](Self::listen); the same decisions, `accepting.rs`.)
    #[cfg(test)]
    pub fn accept(&self, listener: RawFd, max: usize) -> (Vec<Accepted>, Option<io::Error>) {
        use crate::accepting::Taken;
        // Its sockets inherit the relayed sockets' options if it was prepared before it
        // listened; otherwise each gets them when its session opens.
        let prepared = self.listener.load(Ordering::Acquire) == listener;
        let mut taken = Vec::new();
        let batch = self.acceptor.batch(listener, prepared, max, None, |t| {
            taken.push(match t {
                Taken::Task(id, worker, task) => {
                    self.workers[worker].start_task(id, task);
                    Accepted::Opening
                }
                Taken::Told => Accepted::Opening,
                Taken::Handed { sock, peer, read } => Accepted::Handed { sock, peer, read },
            })
        });
        (taken, batch.err())
    }

    /// Relay thread 0 accepts on `listener` from now on (a copy of it, until
    /// [`unlisten`](Self::unlisten)), holding at most `limit` connections at once (past it, new
    /// ones wait in the backlog until one is [`closed`](Self::closed)). Each connection is
    /// opened by the engine, waited for, or handed to Python as news (`Handed`); see
    /// `accepting.rs`.
    pub fn listen(&self, listener: RawFd, limit: usize) -> io::Result<()> {
        let Some(first) = self.workers.first() else {
            return Err(io::Error::other("engine is shut down"));
        };
        // SAFETY: the caller keeps the socket open during the call.
        let copy = unsafe { BorrowedFd::borrow_raw(listener) }.try_clone_to_owned()?;
        self.held.set_limit(limit.max(1));
        self.held.set_listening(true);
        let listening = first.listen(Box::new(OnRelay {
            acceptor: self.acceptor.clone(),
            listener: copy,
            prepared: self.listener.load(Ordering::Acquire) == listener,
            held: self.held.clone(),
        }));
        if listening.is_err() {
            self.held.set_listening(false);
        }
        listening
    }

    /// Stops accepting on a relay thread; returns once the listener's copy is closed.
    pub fn unlisten(&self) {
        self.held.set_listening(false);
        if let Some(first) = self.workers.first() {
            first.unlisten();
        }
    }

    /// Connections accepted on the relay thread and not yet [`closed`](Self::closed).
    pub fn held(&self) -> usize {
        self.held.count()
    }

    /// A connection accepted on the relay thread is over: how many are held now.
    pub fn closed(&self) -> usize {
        self.held.closed()
    }

    /// Connections accepted on the relay thread that are over, so far.
    pub fn ends(&self) -> u64 {
        self.held.ends()
    }

    /// The index of agent `name` in the live counters, registered now if it is new. Sessions
    /// started with that index are counted (see [`counters`](Self::counters)).
    pub fn register_agent(&self, name: &str) -> usize {
        self.counters.register(name)
    }

    /// Every registered agent's live counters.
    pub fn counters(&self) -> Vec<Snapshot> {
        self.counters.snapshot()
    }

    fn register(&self, id: u64, worker: usize) -> io::Result<Arc<Live>> {
        self.shared.register(id, worker, None)
    }

    /// The news of live session `id`, one the engine opened, taken: Python knows it from now on,
    /// and its outcome comes without it. `None` if it is not such a session, is over, was taken
    /// already, or is not of `service_host` (when given: then it is left as it is).
    pub fn adopt(&self, id: u64, service_host: Option<&str>) -> Option<News> {
        let mut q = lock(&self.shared.queue);
        if let Some(want) = service_host {
            match q.told.get(&id)? {
                News::Opened { service_host, .. } if service_host == want => {}
                _ => return None,
            }
        }
        q.take_told(id)
    }

    /// The id of the live session the engine opened, not adopted, whose UUID is `uuid`.
    pub fn told_id(&self, uuid: &str) -> Option<u64> {
        lock(&self.shared.queue).by_uuid.get(uuid).copied()
    }

    /// `f` of the news of every live session the engine opened and Python has not adopted (of
    /// `service_host`'s, when given).
    pub fn told<R>(&self, service_host: Option<&str>, f: impl FnMut(&News) -> R) -> Vec<R> {
        let q = lock(&self.shared.queue);
        let of = |n: &&News| match (n, service_host) {
            (News::Opened { service_host, .. }, Some(want)) => service_host == want,
            _ => true,
        };
        q.told.values().filter(of).map(f).collect()
    }

    /// How many live sessions the engine opened and Python has not adopted.
    pub fn told_count(&self) -> usize {
        lock(&self.shared.queue).told.len()
    }

    /// The most live sessions the engine opened and Python had not adopted at once, since the
    /// last call (the first: since the engine started).
    pub fn told_peak(&self) -> usize {
        let mut q = lock(&self.shared.queue);
        let peak = q.told_peak.max(q.told.len());
        q.told_peak = q.told.len();
        peak
    }

    /// Gives back now the place of live session `id`, one the engine opened, instead of at its
    /// end (a stop through the Session API frees its place before the close handshakes); false
    /// if it has none to give (not such a session, over, or given already).
    pub fn give_back_place(&self, id: u64) -> bool {
        let hold = lock(&self.shared.sessions)
            .get(&id)
            .and_then(|e| e.hold.clone());
        hold.is_some_and(|h| h.give_back())
    }

    /// The messages and bytes so far of the live sessions among `ids` (of every live session
    /// when `None`), as their meters last published them: one lock, no work per message.
    pub fn tallies(&self, ids: Option<&[u64]>) -> Vec<(u64, Tally)> {
        let sessions = lock(&self.shared.sessions);
        match ids {
            None => sessions
                .iter()
                .map(|(&id, e)| (id, e.live.read()))
                .collect(),
            Some(ids) => ids
                .iter()
                .filter_map(|id| sessions.get(id).map(|e| (*id, e.live.read())))
                .collect(),
        }
    }

    /// Runs one session on relay thread `worker`: `adopt` prepares its sockets, `session` makes
    /// the session of them, counted for `agent` (an index from
    /// [`register_agent`](Self::register_agent), or `None`) as served by `served`. Its outcome
    /// is queued however it ends.
    fn launch<S, T>(
        &self,
        id: u64,
        worker: usize,
        (agent, served): (Option<usize>, Served),
        adopt: impl FnOnce() -> io::Result<S>,
        session: impl FnOnce(S, Meter) -> T,
    ) -> io::Result<()>
    where
        T: Task + 'static,
    {
        if !self.counters.knows(agent) {
            return Err(io::Error::new(
                ErrorKind::InvalidInput,
                "unknown agent index",
            ));
        }
        let sockets = adopt()?;
        let live = self.register(id, worker)?;
        // Counted from here on: the session owns the meter, however it ends.
        let meter = self.counters.meter(agent, served, worker).showing(live);
        self.workers[worker].start_task(id, Box::new(session(sockets, meter)));
        Ok(())
    }

    /// Relays between a client (we are its server) and a bot (we are its client), both past
    /// their handshakes. `agent`: the index its traffic is counted under, if any.
    pub fn relay(
        &self,
        id: u64,
        client: Handed,
        bot: Handed,
        limits: Limits,
        agent: Option<usize>,
    ) -> io::Result<()> {
        let dpt = self.dead_peer_timeout;
        let pending = Pending {
            client: client.pending,
            bot: bot.pending,
        };
        let (c, b) = ((client.sock, client.tls), (bot.sock, bot.tls));
        self.launch(
            id,
            self.pick()?,
            (agent, Served::Upstream),
            || Ok((adopt(c.0, c.1, dpt)?, adopt(b.0, b.1, dpt)?)),
            |(client, bot), meter| relay::session(id, client, bot, pending, limits, meter),
        )
    }

    /// Serves a client with the built-in echo bot, counted for `agent` if given.
    pub fn echo(
        &self,
        id: u64,
        client: Handed,
        limits: Limits,
        agent: Option<usize>,
    ) -> io::Result<()> {
        let dpt = self.dead_peer_timeout;
        let (sock, tls, pending) = (client.sock, client.tls, client.pending);
        self.launch(
            id,
            self.pick()?,
            (agent, Served::Builtin),
            || adopt(sock, tls, dpt),
            |client, meter| echo::session(id, client, pending, limits, meter),
        )
    }

    /// Serves a client for an in-process Python bot: messages go to Python through
    /// [`drain`](Self::drain), Python's go out through [`send`](Self::send).
    pub fn attach(
        &self,
        id: u64,
        client: Handed,
        limits: Limits,
        inbox_limit: usize,
        send_buffer_limit: usize,
        agent: Option<usize>,
    ) -> io::Result<()> {
        let dpt = self.dead_peer_timeout;
        let worker = self.pick()?;
        let poker = self.workers[worker].poker(id);
        let handle = Arc::new(Handle::new(inbox_limit, send_buffer_limit, Some(poker)));
        let ours = handle.clone();
        let shared = self.shared.clone();
        let deliver = move |m: Message| shared.push(Item::Message(m));
        let (sock, tls, pending) = (client.sock, client.tls, client.pending);
        self.launch(
            id,
            worker,
            (agent, Served::InProcess),
            || adopt(sock, tls, dpt),
            |client, meter| inproc::session(id, client, pending, limits, ours, deliver, meter),
        )?;
        // Registered after the launch: a session that failed to start has no handle to leak.
        lock(&self.shared.inproc).insert(id, handle);
        Ok(())
    }

    /// Queues a message for an in-process session's client: the bytes now queued, or `None`
    /// when the session is closing or gone.
    pub fn send(&self, id: u64, text: bool, data: &[u8]) -> Option<usize> {
        let handle = lock(&self.shared.inproc).get(&id).cloned()?;
        handle.send(text, data)
    }

    /// Python's bot consumed `n` bytes of an in-process session's messages.
    pub fn consumed(&self, id: u64, n: usize) {
        if let Some(h) = lock(&self.shared.inproc).get(&id) {
            h.consumed(n);
        }
    }

    /// Closes both sides of a live session with `code` and `reason`. False if it is unknown.
    pub fn close(&self, id: u64, code: u16, reason: &str) -> bool {
        let Some(worker) = lock(&self.shared.sessions).get(&id).map(|e| e.worker) else {
            return false;
        };
        match self.workers.get(worker) {
            Some(w) => {
                w.stop_task(id, code, reason.to_owned());
                true
            }
            None => false,
        }
    }

    /// Takes everything queued, in order, and silences the doorbell.
    pub fn drain(&self) -> Vec<Item> {
        let mut q = lock(&self.shared.queue);
        if q.rung {
            // Rung: its one byte was written under this lock, so one read takes it (and a
            // drain without a ring, a registry's catch-up, makes no system call at all).
            let mut sink = [0u8; 64];
            let _ = (&self.bell_rx).read(&mut sink);
            q.rung = false;
        }
        std::mem::take(&mut q.items)
    }

    /// Drops every session (closing its sockets) and stops the worker threads.
    pub fn shutdown(&mut self) {
        for w in &mut self.workers {
            w.quit();
        }
        self.workers.clear();
        self.acceptor.mailboxes.clear(); // what is accepted now is the control plane's
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.shutdown();
    }
}
