//! The engine: sessions handed over by the control plane as connected sockets, served on relay
//! threads (`shard.rs`) until they end (`relay.rs`, `echo.rs`, `inproc/`), and their outcomes
//! queued for Python.
//!
//! Python learns of finished sessions through one doorbell (a socketpair) per engine: a byte is
//! written when the outcome queue turns non-empty, so one event-loop wake-up drains many
//! outcomes. Nothing here touches Python or holds its GIL. Live counts per agent, for metrics,
//! are the [`Counters`]' (a session of a registered agent carries a `Meter` on them); each
//! live session's own messages and bytes are its [`Live`], kept beside its command channel
//! and read all at once by [`Engine::tallies`].

use std::collections::HashMap;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use crate::counters::{Counters, Live, Meter, Served, Snapshot, Tally};
use crate::inproc::{self, Handle, Message};
use crate::open::{self, Fast, News, Places, Route};
use crate::relay::Pending;
use crate::session::{Limits, Outcome};
use crate::shard::{self, Shard, Task};
use crate::sockets::{adopt, options, prepare};
use crate::stream::Stream;
use crate::tls::Tls;
use crate::upgrade;
use crate::{echo, relay};

/// Bytes read from a connection as it is accepted: a request head at most, and what the client
/// sent behind it.
const FIRST_READ: usize = upgrade::MAX_HEADER_BYTES + 4096;

/// News for Python, in the order it happened: a session's messages come before its outcome.
#[derive(Debug)]
pub enum Item {
    /// A session ended.
    Outcome(Outcome),
    /// A message of an in-process session.
    Message(Message),
    /// A session the engine opened by itself, or could not.
    Open(News),
}

/// A connection [`Engine::accept`] took: opened by the engine, or for the control plane.
pub enum Accepted {
    /// The engine opens it (its news comes through the doorbell).
    Opening,
    /// The control plane's: the socket (non-blocking), its peer and the bytes read from it.
    Handed {
        /// The connection.
        sock: TcpStream,
        /// The client's address.
        peer: Option<SocketAddr>,
        /// What it sent so far (maybe nothing yet).
        read: Vec<u8>,
    },
}

#[derive(Default)]
struct Queue {
    items: Vec<Item>,
    rung: bool,
}

/// A live session as the engine reaches it: its relay thread, and its traffic so far.
struct Entry {
    worker: usize,
    live: Arc<Live>,
}

struct Shared {
    queue: Mutex<Queue>,
    bell: UnixStream,
    /// Live sessions: the relay thread of each, and its traffic so far.
    sessions: Mutex<HashMap<u64, Entry>>,
    inproc: Mutex<HashMap<u64, Arc<Handle>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding these locks leaves plain data behind; keep going.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    /// Queues `item` without ringing: Python takes it with the next item that rings, or when it
    /// reads its registry (news of an opened session: nothing waits on it).
    fn push_quiet(&self, item: Item) {
        lock(&self.queue).items.push(item);
    }

    fn push(&self, item: Item) {
        if let Item::Outcome(o) = &item {
            lock(&self.sessions).remove(&o.session_id);
            lock(&self.inproc).remove(&o.session_id);
        }
        let mut q = lock(&self.queue);
        q.items.push(item);
        if !q.rung {
            q.rung = true;
            // A full socketpair already holds a byte, which is all the doorbell needs.
            let _ = (&self.bell).write(&[1]);
        }
    }
}

/// The claims of the token `upgrade` carries for `service_host`, if it passes every check the
/// Python path makes before using it up (signature, service host, expiry, body binding).
fn check_token(
    tokens: &open::Tokens,
    upgrade: &upgrade::Upgrade<'_>,
    service_host: &str,
) -> Option<crate::token::Claims> {
    let token = upgrade.token.as_ref().ok().copied().flatten()?;
    let claims = tokens.keys.verify(token, service_host, unix_now()).ok()?;
    let body = upgrade.body.as_ref().map(|b| b.json.as_bytes());
    claims.check_body(body).ok()?;
    Some(claims)
}

/// Unix seconds now, as tokens count them.
fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A non-blocking socket connecting to `addr`, and the connect's error if it failed at once.
fn connect(addr: SocketAddr) -> io::Result<(TcpStream, Option<io::Error>)> {
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM.nonblocking(),
        None,
    )?;
    let failed = match sock.connect(&addr.into()) {
        Ok(()) => None,
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => None,
        Err(e) => Some(e),
    };
    Ok((TcpStream::from(sock), failed))
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
    next: std::sync::atomic::AtomicUsize,
    shared: Arc<Shared>,
    bell_rx: UnixStream,
    dead_peer_timeout: Duration,
    counters: Arc<Counters>,
    /// Session ids, for the control plane's sessions and the engine's own.
    ids: AtomicU64,
    /// Sessions open or being opened per service host (the control plane's and the engine's).
    places: Places,
    /// The agents whose sessions the engine opens by itself, by service host.
    routes: Mutex<Arc<HashMap<String, Arc<Route>>>>,
    /// The listening socket whose options were set for its sockets (-1: none yet).
    listener: std::sync::atomic::AtomicI32,
}

impl Engine {
    /// Starts `threads` relay threads (0: [`shard::default_count`]). A peer that vanishes
    /// without a FIN (power cut, NAT timeout) is detected within `dead_peer_timeout` by the
    /// kernel: TCP keepalive probes while the connection is idle, `TCP_USER_TIMEOUT` while data
    /// waits for its ACK. Either costs nothing per message, unlike pings of our own.
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
        });
        let report = {
            let shared = shared.clone();
            Arc::new(move |o: Outcome| shared.push(Item::Outcome(o)))
        };
        let workers = (0..n)
            .map(|i| Shard::start(i, report.clone()))
            .collect::<io::Result<Vec<_>>>()?;
        Ok(Self {
            counters: Arc::new(Counters::new(workers.len())),
            ids: AtomicU64::new(1),
            places: Places::default(),
            routes: Mutex::new(Arc::new(HashMap::new())),
            listener: std::sync::atomic::AtomicI32::new(-1),
            workers,
            next: std::sync::atomic::AtomicUsize::new(0),
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
        if self.workers.is_empty() {
            return Err(io::Error::other("engine is shut down"));
        }
        let i = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(i % self.workers.len())
    }

    /// A fresh session id (unique for the engine's lifetime), for a session the control plane
    /// opens.
    pub fn next_id(&self) -> u64 {
        self.ids.fetch_add(1, Ordering::Relaxed)
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
        *lock(&self.routes) = Arc::new(table);
        Ok(())
    }

    /// Accepts up to `max` connections waiting on `listener`, reads what each sent, and opens
    /// the sessions whose request the route table serves (see `open.rs`); the others are
    /// returned with what was read. A connection that closed at once, or failed, is dropped.
    /// Stops at the first error of `accept` other than a connection aborted, and returns it
    /// beside what it took.
    pub fn accept(&self, listener: RawFd, max: usize) -> (Vec<Accepted>, Option<io::Error>) {
        let routes = lock(&self.routes).clone();
        // SAFETY: the control plane keeps the listening socket open during the call.
        let listening = unsafe { BorrowedFd::borrow_raw(listener) };
        let listening = socket2::SockRef::from(&listening);
        // The relayed sockets' options, set on the listener once: its sockets inherit them.
        if self.listener.swap(listener, Ordering::AcqRel) != listener {
            if let Err(e) = options(&listening, self.dead_peer_timeout) {
                self.listener.store(-1, Ordering::Release);
                return (Vec::new(), Some(e));
            }
        }
        let mut taken = Vec::new();
        let mut buf = vec![0u8; FIRST_READ];
        while taken.len() < max {
            let (sock, peer) = match listening.accept4(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC) {
                Ok(s) => s,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::ConnectionAborted => continue,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return (taken, Some(e)),
            };
            let sock = TcpStream::from(sock);
            let n = match (&sock).read(&mut buf) {
                Ok(0) => continue, // gone before its request
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => 0,
                Err(_) => continue,
            };
            let read = &buf[..n];
            let sock = match self.open_fast(&routes, sock, read, true) {
                None => {
                    taken.push(Accepted::Opening);
                    continue;
                }
                Some(sock) => sock,
            };
            taken.push(Accepted::Handed {
                sock,
                peer: peer.as_socket(),
                read: read.to_vec(),
            });
        }
        (taken, None)
    }

    /// Opens the session whose request the control plane read (`read`: the head and what
    /// followed it) if the route table serves it, as [`accept`](Self::accept) does for a
    /// request read whole at once; otherwise gives the socket back.
    pub fn open(&self, client: TcpStream, read: &[u8]) -> Option<TcpStream> {
        let routes = lock(&self.routes).clone();
        self.open_fast(&routes, client, read, false)
    }

    /// Opens the session `read` asks for if the route table serves it and its agent has a place
    /// left; otherwise gives the socket back.
    fn open_fast(
        &self,
        routes: &HashMap<String, Arc<Route>>,
        client: TcpStream,
        read: &[u8],
        prepared: bool,
    ) -> Option<TcpStream> {
        if routes.is_empty() || read.is_empty() {
            return Some(client);
        }
        let Some(upgrade) = upgrade::recognise(read) else {
            return Some(client);
        };
        let Some(route) = routes.get(upgrade.service_host) else {
            return Some(client);
        };
        // A token agent's token, checked as the Python path checks it; any refusal is its to
        // answer (403), so the token is left unused here.
        let checked = match &route.tokens {
            None => None,
            Some(tokens) => match check_token(tokens, &upgrade, &route.service_host) {
                Some(claims) => Some((tokens, claims)),
                None => return Some(client),
            },
        };
        if !open::take(&route.place, route.max_sessions) {
            return Some(client); // the Python path answers 503
        }
        // Used up after the capacity check, as the Python path does: a 503 does not burn it.
        let claimed = match checked {
            None => None,
            Some((tokens, claims)) => {
                let started = std::time::Instant::now();
                if tokens.nonces.claim(&claims.nonce, claims.exp, unix_now()) != Ok(true) {
                    open::give(&route.place);
                    return Some(client); // replayed (403) or the set full (503): Python's
                }
                Some(open::Claimed {
                    nonces: tokens.nonces.clone(),
                    nonce: claims.nonce,
                    calls: vec![started.elapsed().as_secs_f64()],
                })
            }
        };
        match self.dial_fast(route, client, read, upgrade, prepared, claimed) {
            Ok(()) => None,
            Err((client, claimed)) => {
                open::give(&route.place);
                if let Some(c) = claimed {
                    c.nonces.release(&c.nonce);
                }
                Some(client)
            }
        }
    }

    /// Starts the bot's connect and hands the session to a relay thread; gives the client back
    /// if that cannot be done (no descriptor left: the Python path fails the same way, in its
    /// own words).
    fn dial_fast(
        &self,
        route: &Arc<Route>,
        client: TcpStream,
        read: &[u8],
        upgrade: upgrade::Upgrade<'_>,
        prepared: bool,
        claimed: Option<open::Claimed>,
    ) -> Result<(), (TcpStream, Option<open::Claimed>)> {
        let dpt = self.dead_peer_timeout;
        let Ok(worker) = self.pick() else {
            return Err((client, claimed));
        };
        let Ok((bot, failed)) = connect(route.bot) else {
            return Err((client, claimed));
        };
        // Non-blocking since its creation; the client's options came from the listener when
        // the engine accepted it (`prepared`).
        if options(&socket2::SockRef::from(&bot), dpt).is_err()
            || (!prepared && prepare(&client, dpt).is_err())
        {
            return Err((client, claimed));
        }
        let (client, bot) = (Stream::plain(client), Stream::plain(bot));
        let id = self.next_id();
        let Ok(live) = self.register(id, worker) else {
            unreachable!("ids are unique");
        };
        let counters = self.counters.clone();
        let agent = route.agent;
        let meter = Box::new(move || {
            counters
                .meter(agent, Served::Upstream, worker)
                .showing(live)
        });
        let shared = self.shared.clone();
        let tell: open::Tell = Arc::new(move |news| match news {
            // Nothing in Python waits for it: it comes with the session's outcome, or when
            // Python reads its registry, without a wake-up of its own.
            News::Opened { .. } => shared.push_quiet(Item::Open(news)),
            News::Unopened { .. } => shared.push(Item::Open(news)),
        });
        let o = open::Open {
            route: route.clone(),
            upgrade,
            read,
            meter,
            tell,
            claimed,
        };
        let task = Fast::new(id, client, bot, failed, o);
        self.workers[worker].start_task(id, Box::new(task));
        Ok(())
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
        let mut sessions = lock(&self.shared.sessions);
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
            },
        );
        Ok(live)
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
        let mut sink = [0u8; 64];
        while matches!((&self.bell_rx).read(&mut sink), Ok(n) if n > 0) {}
        let mut q = lock(&self.shared.queue);
        q.rung = false;
        std::mem::take(&mut q.items)
    }

    /// Drops every session (closing its sockets) and stops the worker threads.
    pub fn shutdown(&mut self) {
        for w in &mut self.workers {
            w.quit();
        }
        self.workers.clear();
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.shutdown();
    }
}
