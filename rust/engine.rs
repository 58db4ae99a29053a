//! The engine: sessions handed over by the control plane as connected sockets, served on tokio
//! worker threads until they end (`relay.rs`, `echo.rs`, `inproc/`), and their outcomes queued
//! for Python.
//!
//! Python learns of finished sessions through one doorbell (a socketpair) per engine: a byte is
//! written when the outcome queue turns non-empty, so one event-loop wake-up drains many
//! outcomes. Nothing here touches Python or holds its GIL. Live counts per agent, for metrics,
//! are the [`Counters`]' (a session of a registered agent carries a `Meter` on them); each
//! live session's own messages and bytes are its [`Live`], kept beside its command's sender
//! and read all at once by [`Engine::tallies`].

use std::collections::HashMap;
use std::io::{self, ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::runtime::Handle as Runtime;
use tokio::sync::oneshot;

use crate::counters::{Counters, Live, Meter, Served, Snapshot, Tally};
use crate::driver::{Command, Commands};
use crate::inproc::{self, Handle, Message};
use crate::relay::Pending;
use crate::session::{Limits, Outcome};
use crate::sockets::adopt;
use crate::tls::Tls;
use crate::{echo, relay};

/// News for Python, in the order it happened: a session's messages come before its outcome.
#[derive(Debug)]
pub enum Item {
    /// A session ended.
    Outcome(Outcome),
    /// A message of an in-process session.
    Message(Message),
}

#[derive(Default)]
struct Queue {
    items: Vec<Item>,
    rung: bool,
}

/// A live session as the engine reaches it: its command, and its traffic so far.
struct Entry {
    /// The sender of its one command, until it is sent.
    command: Option<oneshot::Sender<Command>>,
    live: Arc<Live>,
}

struct Shared {
    queue: Mutex<Queue>,
    bell: UnixStream,
    sessions: Mutex<HashMap<u64, Entry>>,
    inproc: Mutex<HashMap<u64, Arc<Handle>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding these locks leaves plain data behind; keep going.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
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

/// Reports a session's outcome when its task ends, however it ends (also when the runtime is
/// shut down mid-session, or a bug panics), so no waiter in Python is left hanging. It keeps
/// the session's id, not an outcome in waiting: every live session's task holds one.
struct Report {
    shared: Arc<Shared>,
    /// The session's, until its outcome is queued.
    id: Option<u64>,
}

impl Report {
    /// Queues the session's outcome.
    fn send(mut self, outcome: Outcome) {
        self.id = None;
        self.shared.push(Item::Outcome(outcome));
    }

    /// Queues a message of an in-process session.
    fn deliver(&self, message: Message) {
        self.shared.push(Item::Message(message));
    }
}

impl Drop for Report {
    fn drop(&mut self) {
        if let Some(id) = self.id.take() {
            // Dropped unfinished: an outcome that says nothing more than its end.
            self.shared.push(Item::Outcome(Outcome::new(id)));
        }
    }
}

/// One relay thread: a single-threaded tokio runtime that owns its sessions from start to end.
struct Worker {
    handle: Runtime,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Worker {
    fn start(index: usize) -> io::Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let handle = rt.handle().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(format!("wsgate-relay-{index}"))
            .spawn(move || {
                let _ = rt.block_on(stopped);
                // Dropping the runtime drops its sessions: each one's Report queues an outcome.
                drop(rt);
            })?;
        Ok(Self {
            handle,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
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
/// Threads work like nginx's workers: each runs its own single-threaded runtime, and a session
/// (both its sockets) lives on one of them, handed out in turn. No work stealing, no wake-ups
/// across threads on the hot path: measured cheaper per message than tokio's multi-threaded
/// scheduler for this workload of many independent sessions.
pub struct Engine {
    workers: Vec<Worker>,
    next: std::sync::atomic::AtomicUsize,
    shared: Arc<Shared>,
    bell_rx: UnixStream,
    dead_peer_timeout: Duration,
    counters: Counters,
}

impl Engine {
    /// Starts `threads` worker threads (0: one per CPU). A peer that vanishes without a FIN
    /// (power cut, NAT timeout) is detected within `dead_peer_timeout` by the kernel: TCP
    /// keepalive probes while the connection is idle, `TCP_USER_TIMEOUT` while data waits
    /// for its ACK. Either costs nothing per message, unlike pings of our own.
    pub fn new(threads: usize, dead_peer_timeout: Duration) -> io::Result<Self> {
        let n = if threads > 0 {
            threads
        } else {
            std::thread::available_parallelism().map_or(1, usize::from)
        };
        let workers = (0..n).map(Worker::start).collect::<io::Result<Vec<_>>>()?;
        let (bell, bell_rx) = UnixStream::pair()?;
        bell.set_nonblocking(true)?;
        bell_rx.set_nonblocking(true)?;
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            bell,
            sessions: Mutex::new(HashMap::new()),
            inproc: Mutex::new(HashMap::new()),
        });
        Ok(Self {
            counters: Counters::new(workers.len()),
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

    /// The worker whose turn it is: its index and its runtime.
    fn runtime(&self) -> io::Result<(usize, &Runtime)> {
        if self.workers.is_empty() {
            return Err(io::Error::other("engine is shut down"));
        }
        let i = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % self.workers.len();
        Ok((i, &self.workers[i].handle))
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

    fn register(&self, id: u64) -> io::Result<(Commands, Arc<Live>)> {
        let mut sessions = lock(&self.shared.sessions);
        if sessions.contains_key(&id) {
            return Err(io::Error::new(
                ErrorKind::InvalidInput,
                "session id already in use",
            ));
        }
        let (command, rx) = oneshot::channel();
        let live = Arc::new(Live::default());
        let entry = Entry {
            command: Some(command),
            live: live.clone(),
        };
        sessions.insert(id, entry);
        Ok((rx, live))
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

    /// Runs one session on the next worker: `adopt` takes its sockets into that worker's
    /// runtime, `session` relays them until the end and sends its outcome to the [`Report`],
    /// counted for `agent` (an index from [`register_agent`](Self::register_agent), or `None`)
    /// as served by `served`. Its outcome is queued however it ends.
    ///
    /// The future `session` returns is the task itself, not awaited inside another: each
    /// layer of `async` keeps what it was given beside the future it awaits, and this is what
    /// an idle session costs.
    fn launch<S, F, Fut>(
        &self,
        id: u64,
        (agent, served): (Option<usize>, Served),
        adopt: impl FnOnce() -> io::Result<S>,
        session: F,
    ) -> io::Result<()>
    where
        S: Send + 'static,
        F: FnOnce(S, Commands, Report, Meter) -> Fut,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        if !self.counters.knows(agent) {
            return Err(io::Error::new(
                ErrorKind::InvalidInput,
                "unknown agent index",
            ));
        }
        let (worker, rt) = self.runtime()?;
        let sockets = {
            let _guard = rt.enter();
            adopt()?
        };
        let (rx, live) = self.register(id)?;
        // Counted from here on: the session's task owns the meter, however it ends.
        let meter = self.counters.meter(agent, served, worker).showing(live);
        let report = Report {
            shared: self.shared.clone(),
            id: Some(id),
        };
        rt.spawn(session(sockets, rx, report, meter));
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
            (agent, Served::Upstream),
            || Ok((adopt(c.0, c.1, dpt)?, adopt(b.0, b.1, dpt)?)),
            move |(client, bot), rx, report, meter| async move {
                report.send(relay::run(id, &client, &bot, pending, limits, rx, meter).await);
            },
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
            (agent, Served::Builtin),
            || adopt(sock, tls, dpt),
            move |client, rx, report, meter| async move {
                report.send(echo::run(id, &client, pending, limits, rx, meter).await);
            },
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
        let handle = Arc::new(Handle::new(inbox_limit, send_buffer_limit));
        let ours = handle.clone();
        let (sock, tls, pending) = (client.sock, client.tls, client.pending);
        self.launch(
            id,
            (agent, Served::InProcess),
            || adopt(sock, tls, dpt),
            move |client, rx, report, meter| async move {
                let deliver = |m: Message| report.deliver(m);
                let outcome =
                    inproc::run(id, &client, pending, limits, &ours, rx, deliver, meter).await;
                report.send(outcome);
            },
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
    /// A session stops once: a later close of the same session changes nothing.
    pub fn close(&self, id: u64, code: u16, reason: &str) -> bool {
        match lock(&self.shared.sessions).get_mut(&id) {
            Some(e) => match e.command.take() {
                Some(tx) => tx.send(Command::Close(code, reason.to_owned())).is_ok(),
                None => true,
            },
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
            w.stop();
        }
        self.workers.clear();
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.shutdown();
    }
}
