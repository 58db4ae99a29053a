//! The relay engine: sessions handed over by the control plane as two connected sockets, pumped
//! both ways on tokio worker threads until they end, and their outcomes queued for Python.
//!
//! Python learns of finished sessions through one doorbell (a socketpair) per engine: a byte is
//! written when the outcome queue turns non-empty, so one event-loop wake-up drains many
//! outcomes. Nothing here touches Python or holds its GIL.

use std::collections::HashMap;
use std::io::{self, ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::net::TcpStream;
use tokio::runtime::Handle as Runtime;
use tokio::sync::mpsc;
use tokio::sync::oneshot;
use tokio::time::{sleep_until, Instant};

use crate::inproc::{self, Handle, Message};
use crate::pump::{Event, Pump, Transform};

/// How long a session may take to finish once one side closed (a close handshake, or the
/// other side noticing), before the gateway drops both connections.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Who ended a session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndedBy {
    /// The client closed or left.
    Client,
    /// The bot closed or was lost.
    Bot,
    /// The gateway: a protocol violation, a size limit, a shutdown or a time limit.
    Gateway,
}

impl EndedBy {
    /// `"client"`, `"bot"` or `"gateway"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Client => "client",
            Self::Bot => "bot",
            Self::Gateway => "gateway",
        }
    }
}

/// How one session ended. Payloads never appear here, only counts.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// The id the control plane gave the session.
    pub session_id: u64,
    /// The close frame the client sent: code and reason (1005 for a close without a code).
    pub client_close: Option<(u16, String)>,
    /// The close frame the bot sent (for the echo bot: the close it echoed).
    pub bot_close: Option<(u16, String)>,
    /// Who ended the session.
    pub ended_by: EndedBy,
    /// One line for the log.
    pub detail: String,
    /// Data messages client → bot.
    pub messages_in: u64,
    /// Data messages bot → client.
    pub messages_out: u64,
    /// Payload bytes client → bot.
    pub bytes_in: u64,
    /// Payload bytes bot → client.
    pub bytes_out: u64,
}

impl Outcome {
    pub(crate) fn new(session_id: u64) -> Self {
        Self {
            session_id,
            client_close: None,
            bot_close: None,
            ended_by: EndedBy::Gateway,
            detail: "engine stopped".into(),
            messages_in: 0,
            messages_out: 0,
            bytes_in: 0,
            bytes_out: 0,
        }
    }

    pub(crate) fn end(&mut self, by: EndedBy, detail: impl Into<String>, ended: &mut bool) {
        if !*ended {
            *ended = true;
            self.ended_by = by;
            self.detail = detail.into();
        }
    }
}

/// The limits of one relayed session.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Largest message (all fragments); over it the sender gets 1009.
    pub max_message_size: u64,
    /// After it both sides get 1000 "session time limit"; `None`: no limit.
    pub time_limit: Option<Duration>,
}

/// A request from the control plane to a live session.
#[derive(Debug)]
pub(crate) enum Command {
    Close(u16, String),
}

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

struct Shared {
    queue: Mutex<Queue>,
    bell: UnixStream,
    sessions: Mutex<HashMap<u64, mpsc::UnboundedSender<Command>>>,
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
/// shut down mid-session, or a bug panics), so no waiter in Python is left hanging.
struct Report {
    shared: Arc<Shared>,
    outcome: Option<Outcome>,
}

impl Drop for Report {
    fn drop(&mut self) {
        if let Some(o) = self.outcome.take() {
            self.shared.push(Item::Outcome(o));
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

    /// The runtime of the worker whose turn it is.
    fn runtime(&self) -> io::Result<&Runtime> {
        if self.workers.is_empty() {
            return Err(io::Error::other("engine is shut down"));
        }
        let i = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(&self.workers[i % self.workers.len()].handle)
    }

    fn register(&self, id: u64) -> io::Result<mpsc::UnboundedReceiver<Command>> {
        let mut sessions = lock(&self.shared.sessions);
        if sessions.contains_key(&id) {
            return Err(io::Error::new(
                ErrorKind::InvalidInput,
                "session id already in use",
            ));
        }
        let (tx, rx) = mpsc::unbounded_channel();
        sessions.insert(id, tx);
        Ok(rx)
    }

    /// Runs one session on the next worker: `adopt` takes its sockets into that worker's
    /// runtime, `session` relays them until the end. Its outcome is queued however it ends.
    fn launch<S, F, Fut>(
        &self,
        id: u64,
        adopt: impl FnOnce() -> io::Result<S>,
        session: F,
    ) -> io::Result<()>
    where
        S: Send + 'static,
        F: FnOnce(S, mpsc::UnboundedReceiver<Command>, Arc<Shared>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Outcome> + Send,
    {
        let rt = self.runtime()?;
        let sockets = {
            let _guard = rt.enter();
            adopt()?
        };
        let rx = self.register(id)?;
        let mut report = Report {
            shared: self.shared.clone(),
            outcome: Some(Outcome::new(id)),
        };
        rt.spawn(async move {
            let shared = report.shared.clone();
            report.outcome = Some(session(sockets, rx, shared).await);
            drop(report); // queues the outcome
        });
        Ok(())
    }

    /// Relays between a client (we are its server) and a bot (we are its client), both past
    /// their handshakes. `*_pending`: bytes already read past each handshake.
    pub fn relay(
        &self,
        id: u64,
        client: std::net::TcpStream,
        bot: std::net::TcpStream,
        client_pending: Vec<u8>,
        bot_pending: Vec<u8>,
        limits: Limits,
    ) -> io::Result<()> {
        let dpt = self.dead_peer_timeout;
        self.launch(
            id,
            || Ok((adopt(client, dpt)?, adopt(bot, dpt)?)),
            move |(client, bot), rx, _| async move {
                let s = RelaySession {
                    client_pending,
                    bot_pending,
                    limits,
                };
                s.run(id, &client, &bot, rx).await
            },
        )
    }

    /// Serves a client with the built-in echo bot.
    pub fn echo(
        &self,
        id: u64,
        client: std::net::TcpStream,
        client_pending: Vec<u8>,
        limits: Limits,
    ) -> io::Result<()> {
        let dpt = self.dead_peer_timeout;
        self.launch(
            id,
            || adopt(client, dpt),
            move |client, rx, _| async move {
                echo_session(id, &client, client_pending, limits, rx).await
            },
        )
    }

    /// Serves a client for an in-process Python bot: messages go to Python through
    /// [`drain`](Self::drain), Python's go out through [`send`](Self::send).
    pub fn attach(
        &self,
        id: u64,
        client: std::net::TcpStream,
        client_pending: Vec<u8>,
        max_message_size: u64,
        inbox_limit: usize,
        send_buffer_limit: usize,
    ) -> io::Result<()> {
        let dpt = self.dead_peer_timeout;
        let handle = Arc::new(Handle::new(inbox_limit, send_buffer_limit));
        let ours = handle.clone();
        self.launch(
            id,
            || adopt_stream(client, dpt),
            move |client, rx, shared| async move {
                let deliver = |m: Message| shared.push(Item::Message(m));
                inproc::run(
                    id,
                    &client,
                    client_pending,
                    max_message_size,
                    &ours,
                    rx,
                    deliver,
                )
                .await
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
    pub fn close(&self, id: u64, code: u16, reason: &str) -> bool {
        match lock(&self.shared.sessions).get(&id) {
            Some(tx) => tx.send(Command::Close(code, reason.to_owned())).is_ok(),
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

    /// Sessions being relayed now.
    pub fn active(&self) -> usize {
        lock(&self.shared.sessions).len()
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

/// Takes a handed-over socket into tokio: non-blocking first (a blocking fd would stall a worker
/// thread), Nagle off (small audio frames must not wait for ACKs), dead-peer detection on.
fn adopt(
    s: std::net::TcpStream,
    dead_peer_timeout: Duration,
) -> io::Result<AsyncFd<std::net::TcpStream>> {
    prepare(&s, dead_peer_timeout)?;
    // Raw readiness (not tokio's TcpStream) so a pump can drop readiness after a short read,
    // sparing the read that would only return EAGAIN.
    // SAFETY: the AsyncFd owns `s`, an open socket whose descriptor stays the same and open
    // until the AsyncFd is dropped (nothing else holds it: Python detached it).
    unsafe { AsyncFd::register(s) }.map_err(|e| e.into_parts().1)
}

/// [`adopt`] for in-process sessions, which use tokio's own stream.
fn adopt_stream(s: std::net::TcpStream, dead_peer_timeout: Duration) -> io::Result<TcpStream> {
    prepare(&s, dead_peer_timeout)?;
    TcpStream::from_std(s)
}

fn prepare(s: &std::net::TcpStream, dead_peer_timeout: Duration) -> io::Result<()> {
    s.set_nonblocking(true)?;
    s.set_nodelay(true)?;
    let sock = socket2::SockRef::from(s);
    // Half the budget idle, then three probes spread over the other half.
    let probes = 3;
    let interval = (dead_peer_timeout / 2 / probes).max(Duration::from_secs(1));
    let keepalive = socket2::TcpKeepalive::new()
        .with_time((dead_peer_timeout / 2).max(Duration::from_secs(1)))
        .with_interval(interval)
        .with_retries(probes);
    sock.set_tcp_keepalive(&keepalive)?;
    #[cfg(target_os = "linux")]
    sock.set_tcp_user_timeout(Some(dead_peer_timeout))?;
    Ok(())
}

struct RelaySession {
    client_pending: Vec<u8>,
    bot_pending: Vec<u8>,
    limits: Limits,
}

/// A session's one timer: first its time limit, then, once it is ending, the close timeout.
/// Created once and reset, rather than a fresh `Sleep` on every turn of the `select!`.
fn first_deadline(time_limit: Option<Duration>) -> Instant {
    // Far enough to never fire; tokio's wheel clamps it.
    Instant::now() + time_limit.unwrap_or(Duration::from_secs(365 * 86400))
}

/// The close both sides get at the session time limit (SPEC §6).
const TIME_LIMIT_CLOSE: (u16, &str) = (1000, "session time limit");

impl RelaySession {
    async fn run(
        self,
        id: u64,
        client: &AsyncFd<std::net::TcpStream>,
        bot: &AsyncFd<std::net::TcpStream>,
        mut commands: mpsc::UnboundedReceiver<Command>,
    ) -> Outcome {
        let max = self.limits.max_message_size;
        let mut up = Pump::new(client, bot, Transform::Remask, max, self.client_pending);
        let mut down = Pump::new(bot, client, Transform::Keep, max, self.bot_pending);
        let mut o = Outcome::new(id);
        let mut ended = false;
        let mut closing = false;
        let timer = sleep_until(first_deadline(self.limits.time_limit));
        tokio::pin!(timer);
        let mut commands_open = true;
        while up.wants_poll() || down.wants_poll() {
            tokio::select! {
                cmd = commands.recv(), if commands_open => match cmd {
                    Some(Command::Close(code, reason)) => {
                        o.end(EndedBy::Gateway, reason.clone(), &mut ended);
                        up.queue_close(code, &reason, false);
                        down.queue_close(code, &reason, false);
                    }
                    None => commands_open = false,
                },
                () = &mut timer => {
                    if closing {
                        o.end(EndedBy::Gateway, "close timeout", &mut ended);
                        break;
                    }
                    let (code, reason) = TIME_LIMIT_CLOSE;
                    o.end(EndedBy::Gateway, reason, &mut ended);
                    up.queue_close(code, reason, false);
                    down.queue_close(code, reason, false);
                }
                ev = up.step(), if up.wants_poll() => match ev {
                    Event::Progress => {}
                    Event::Close(c) => {
                        o.client_close = Some(c.unwrap_or((1005, String::new())));
                        o.end(EndedBy::Client, "client closed", &mut ended);
                        // The client answered (or opened) a close handshake: when a close went
                        // to it too, the handshake on its hop is complete.
                        if down.dst_done {
                            down.shutdown_dst();
                        }
                    }
                    Event::Eof => {
                        o.end(EndedBy::Client, "client gone", &mut ended);
                        down.abandon_dst();
                        up.queue_close(1001, "client gone", false);
                    }
                    Event::Violation(v) => {
                        o.end(EndedBy::Gateway, format!("client: {v}"), &mut ended);
                        up.discard = true;
                        down.queue_close(v.close_code(), &v.to_string(), true);
                        up.queue_close(1001, "client error", false);
                    }
                    Event::DstLost => {
                        o.end(EndedBy::Bot, "bot lost", &mut ended);
                        down.queue_close(1011, "bot lost", true);
                    }
                },
                ev = down.step(), if down.wants_poll() => match ev {
                    Event::Progress => {}
                    Event::Close(c) => {
                        o.bot_close = Some(c.unwrap_or((1005, String::new())));
                        o.end(EndedBy::Bot, "bot closed", &mut ended);
                        if up.discard {
                            // The client closed first: this was the reply, the hop is done.
                            down.shutdown_dst();
                        }
                    }
                    Event::Eof => {
                        o.end(EndedBy::Bot, "bot lost", &mut ended);
                        up.abandon_dst();
                        down.queue_close(1011, "bot lost", true);
                    }
                    Event::Violation(v) => {
                        o.end(EndedBy::Gateway, format!("bot: {v}"), &mut ended);
                        down.discard = true;
                        up.queue_close(v.close_code(), &v.to_string(), false);
                        down.queue_close(1001, "bot error", true);
                    }
                    Event::DstLost => {
                        o.end(EndedBy::Client, "client gone", &mut ended);
                        up.queue_close(1001, "client gone", false);
                    }
                },
            }
            if ended && !closing {
                closing = true;
                timer.as_mut().reset(Instant::now() + CLOSE_TIMEOUT);
            }
        }
        o.messages_in = up.messages;
        o.bytes_in = up.bytes;
        o.messages_out = down.messages;
        o.bytes_out = down.bytes;
        o
    }
}

async fn echo_session(
    id: u64,
    client: &AsyncFd<std::net::TcpStream>,
    pending: Vec<u8>,
    limits: Limits,
    mut commands: mpsc::UnboundedReceiver<Command>,
) -> Outcome {
    let mut pump = Pump::new(
        client,
        client,
        Transform::Echo,
        limits.max_message_size,
        pending,
    );
    let mut o = Outcome::new(id);
    let mut ended = false;
    let mut closing = false;
    let timer = sleep_until(first_deadline(limits.time_limit));
    tokio::pin!(timer);
    let mut commands_open = true;
    while pump.wants_poll() {
        tokio::select! {
            cmd = commands.recv(), if commands_open => match cmd {
                Some(Command::Close(code, reason)) => {
                    o.end(EndedBy::Gateway, reason.clone(), &mut ended);
                    pump.queue_close(code, &reason, false);
                }
                None => commands_open = false,
            },
            () = &mut timer => {
                if closing {
                    o.end(EndedBy::Gateway, "close timeout", &mut ended);
                    break;
                }
                let (code, reason) = TIME_LIMIT_CLOSE;
                o.end(EndedBy::Gateway, reason, &mut ended);
                pump.queue_close(code, reason, false);
            }
            ev = pump.step() => match ev {
                Event::Progress => {}
                Event::Close(c) => {
                    // Echoed back as the bot's reply: the handshake is complete.
                    let c = c.unwrap_or((1005, String::new()));
                    o.client_close = Some(c.clone());
                    o.bot_close = Some(c);
                    o.end(EndedBy::Client, "client closed", &mut ended);
                    pump.shutdown_dst();
                }
                Event::Eof | Event::DstLost => {
                    o.end(EndedBy::Client, "client gone", &mut ended);
                    break;
                }
                Event::Violation(v) => {
                    o.end(EndedBy::Gateway, format!("client: {v}"), &mut ended);
                    pump.discard = true;
                    pump.queue_close(v.close_code(), &v.to_string(), true);
                }
            },
        }
        if ended && !closing {
            closing = true;
            timer.as_mut().reset(Instant::now() + CLOSE_TIMEOUT);
        }
    }
    o.messages_in = pump.messages;
    o.bytes_in = pump.bytes;
    o.messages_out = pump.messages;
    o.bytes_out = pump.bytes;
    o
}
