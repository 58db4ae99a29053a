//! A relay thread: one epoll instance (through `mio`) and the sessions that live on it, from
//! their handover to their end. The loop is nginx's: wait for events, mark each socket's
//! readiness, run each session that has something to do, until it can do nothing more without
//! another event. No task scheduler, waker or future sits between an event and the session: a
//! message costs the two syscalls that move it and a share of one `epoll_wait`.
//!
//! What else can wake a session reaches it through the shard, never a channel of its own:
//! - its deadline (the time limit, then the close timeout): one heap of deadlines per shard,
//!   whose earliest is `epoll_wait`'s timeout;
//! - a stop from the control plane, a new session, an in-process bot's send: mail in the
//!   shard's inbox, and one eventfd write when the inbox turns non-empty.
//!
//! A session runs at most [`BUDGET`] steps at a time, then waits its turn behind the others: one
//! busy session cannot starve its neighbours.
//!
//! One relay thread may also hold the gateway's listening socket ([`Listening`]): it accepts in
//! the same loop, as nginx's worker does; with one relay thread (the default on 2 CPUs) a new
//! connection's session starts where it was accepted, without a hand-off between threads
//! (`accepting.rs`).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::io;
use std::os::fd::RawFd;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{mpsc, Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};

use crate::limits::CLOSE_TIMEOUT;
use crate::session::Outcome;
use crate::stream::Stream;

/// Steps a session may take per turn before the others get theirs.
pub const BUDGET: u32 = 64;

/// The variable that sets how many relay threads an engine told 0 starts (as tokio's
/// `TOKIO_WORKER_THREADS` does its workers): a deployment sizes it without editing settings, and
/// the tests run the relay tests under each count.
pub const THREADS_ENV: &str = "WSGATE_RELAY_THREADS";

/// How many relay threads an engine told 0 starts: `$WSGATE_RELAY_THREADS` if set (a positive
/// integer, else an error), otherwise half the CPUs this process may use, at least one.
///
/// Half, from the figures in `benches/README.md` ("Relay threads"): on 2 CPUs shared with the
/// kernel's network work and the peers, one relay thread spent less CPU per relayed message
/// than two (0.83-0.92x, saturated and telephony alike) and kept the lower p99, with the same
/// saturated throughput; four did worse still. A thread that stays busy takes several events
/// per wake-up, where a thread per CPU sleeps and wakes for nearly every message. A host whose
/// relay alone saturates its CPUs may set `relay_threads` to their number.
pub fn default_count() -> io::Result<usize> {
    match std::env::var(THREADS_ENV) {
        Ok(v) => match v.trim().parse::<usize>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{THREADS_ENV} must be a positive integer, not {v:?}"),
            )),
        },
        Err(_) => {
            let cpus = std::thread::available_parallelism().map_or(1, usize::from);
            Ok((cpus / 2).max(1))
        }
    }
}

/// The inbox's token, and the listening socket's; a socket's is its session's slot times two,
/// plus its side.
const MAIL: Token = Token(usize::MAX);
const LISTENER: Token = Token(usize::MAX - 1);

/// Where outcomes go (the engine's queue for Python, `engine.rs`).
pub trait Reports: Send + Sync {
    /// Queues a session's outcome (`can_wait`: see [`Task::can_wait`]). `Some(t)`: it did not
    /// ring the doorbell; a [`ring`](Self::ring) is owed at `t`.
    fn report(&self, outcome: Outcome, can_wait: bool) -> Option<Instant>;

    /// Rings for what was queued without a ring.
    fn ring(&self);
}

/// The engine's [`Reports`].
pub type Report = Arc<dyn Reports>;

/// What a session asks for after a turn.
#[derive(Debug, PartialEq, Eq)]
pub enum Run {
    /// Nothing to do until an event, its deadline or mail.
    Blocked,
    /// Its budget ran out with work left: run it again soon.
    More,
    /// It is over: take its outcome.
    Done,
}

/// A session as a shard runs it (`driver::Driven`).
pub trait Task: Send {
    /// Its sockets: 0 the client's, 1 the bot's when it has one.
    fn stream(&self, side: usize) -> Option<&Stream>;

    /// Does what its sockets' readiness, its deadline (passed at `now`) and its mail allow.
    fn run(&mut self, now: Instant) -> Run;

    /// The control plane stops it with this close code and reason (acted on at its next turn).
    fn stop(&mut self, code: u16, reason: String);

    /// When it next wants a turn whatever happens (`None`: never).
    fn deadline(&self) -> Option<Instant>;

    /// Once [`run`](Self::run) said [`Run::Done`], before [`finish`](Self::finish): whether
    /// its outcome can wait to be told, because nothing waits on it: a session the engine
    /// opened gives its place and its connection back itself (`open.rs`), and its news and end
    /// are only counted and logged (`engine.rs`, [`Reports::report`]).
    fn can_wait(&self) -> bool {
        false
    }

    /// How it ended, once [`run`](Self::run) said [`Run::Done`].
    fn finish(self: Box<Self>) -> Outcome;

    /// Once [`run`](Self::run) said [`Run::Done`], before [`finish`](Self::finish): a socket
    /// to read to its EOF after the outcome is told ([`Linger`]), or none.
    fn linger(&mut self) -> Option<Stream> {
        None
    }
}

/// A client's socket after its session ended at the gateway's FIN, read (and dropped) to its
/// EOF, for at most the close timeout: bytes still coming (the rest of a message that broke a
/// rule, a pong owed) then meet an open socket, not a reset that would throw away what the
/// client has not read yet. The session's outcome is told already; this holds a slot and a
/// descriptor, nothing else. A stop drops it with the sessions (docs/ARCHITECTURE.md).
struct Linger {
    stream: Stream,
    until: Instant,
}

impl Task for Linger {
    fn stream(&self, side: usize) -> Option<&Stream> {
        (side == 0).then_some(&self.stream)
    }

    fn run(&mut self, now: Instant) -> Run {
        if now >= self.until {
            return Run::Done;
        }
        let mut sink = [0u8; 4096];
        for _ in 0..BUDGET {
            if !self.stream.may_read() {
                return Run::Blocked;
            }
            match self.stream.read(&mut sink) {
                Ok(0) => return Run::Done,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Run::Blocked,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Run::Done,
            }
        }
        Run::More
    }

    fn stop(&mut self, _code: u16, _reason: String) {}

    fn deadline(&self) -> Option<Instant> {
        Some(self.until)
    }

    fn finish(self: Box<Self>) -> Outcome {
        unreachable!("a Linger tells nothing")
    }
}

/// What a batch of accepts came to.
#[derive(Debug, PartialEq, Eq)]
pub enum Batch {
    /// Nothing more waits in the backlog: until its next event.
    Drained,
    /// A whole batch: more may wait (taken after this turn's sessions ran).
    More,
    /// As many connections are held as allowed: until [`Mailbox::resume`].
    Full,
    /// Accepting failed for want of a resource (descriptors, memory): again at this time.
    RetryAt(Instant),
    /// Accepting failed for good: the listener is dropped.
    Stop,
}

/// A listening socket a relay thread accepts on (`accepting.rs`).
pub trait Listening: Send {
    /// Its descriptor, for the epoll.
    fn fd(&self) -> RawFd;

    /// Accepts a batch; the sessions for relay thread `worker` (this one) go to `here`.
    fn accept(&mut self, worker: usize, here: &mut Vec<(u64, Box<dyn Task>)>) -> Batch;
}

enum Mail {
    /// Accept on it, then say whether the epoll took it.
    Listen(Box<dyn Listening>, mpsc::Sender<io::Result<()>>),
    /// Drop the listener, then say so.
    Unlisten(mpsc::Sender<()>),
    /// Accept again (a connection ended after the listener was full).
    Resume,
    Start(u64, Box<dyn Task>),
    Stop(u64, u16, String),
    Poke(u64),
    Quit,
}

struct Inbox {
    mail: Mutex<Vec<Mail>>,
    waker: mio::Waker,
}

impl Inbox {
    fn send(&self, m: Mail) {
        let first = {
            let mut q = self.mail.lock().unwrap_or_else(PoisonError::into_inner);
            q.push(m);
            q.len() == 1
        };
        // The shard takes the whole inbox per wake-up: only the first letter needs to ring.
        if first {
            let _ = self.waker.wake();
        }
    }

    fn take(&self) -> Vec<Mail> {
        std::mem::take(&mut *self.mail.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

/// Where other threads post to a relay thread: new sessions, stops.
#[derive(Clone)]
pub struct Mailbox {
    inbox: Arc<Inbox>,
}

impl Mailbox {
    /// Hands session `id` over to the thread.
    pub fn start_task(&self, id: u64, task: Box<dyn Task>) {
        self.inbox.send(Mail::Start(id, task));
    }

    /// Stops session `id` with this close code and reason, if it is still there.
    pub fn stop_task(&self, id: u64, code: u16, reason: String) {
        self.inbox.send(Mail::Stop(id, code, reason));
    }

    /// Its listener accepts again, if it stopped for being full.
    pub fn resume(&self) {
        self.inbox.send(Mail::Resume);
    }
}

/// Wakes one session of a shard from another thread (an in-process bot's send).
#[derive(Clone)]
pub struct Poker {
    inbox: Arc<Inbox>,
    id: u64,
}

impl Poker {
    /// Gives the session a turn soon.
    pub fn poke(&self) {
        self.inbox.send(Mail::Poke(self.id));
    }
}

/// One relay thread. See the module docs.
pub struct Shard {
    mailbox: Mailbox,
    thread: Option<JoinHandle<()>>,
}

impl Shard {
    /// Starts relay thread number `index`; the outcomes of its sessions go to `report`.
    pub fn start(index: usize, report: Report) -> io::Result<Self> {
        let poll = Poll::new()?;
        let waker = mio::Waker::new(poll.registry(), MAIL)?;
        let inbox = Arc::new(Inbox {
            mail: Mutex::new(Vec::new()),
            waker,
        });
        let ours = inbox.clone();
        let thread = std::thread::Builder::new()
            .name(format!("wsgate-relay-{index}"))
            .spawn(move || Loop::new(poll, ours, report, index).run())?;
        Ok(Self {
            mailbox: Mailbox { inbox },
            thread: Some(thread),
        })
    }

    /// Where other threads post to this one.
    pub fn mailbox(&self) -> Mailbox {
        self.mailbox.clone()
    }

    /// Hands session `id` over to this thread.
    pub fn start_task(&self, id: u64, task: Box<dyn Task>) {
        self.mailbox.start_task(id, task);
    }

    /// Stops session `id` with this close code and reason, if it is still here.
    pub fn stop_task(&self, id: u64, code: u16, reason: String) {
        self.mailbox.stop_task(id, code, reason);
    }

    /// This thread accepts on `listening` from now on (in place of any listener before), once
    /// its epoll took it.
    pub fn listen(&self, listening: Box<dyn Listening>) -> io::Result<()> {
        let (done, listened) = mpsc::channel();
        self.mailbox.inbox.send(Mail::Listen(listening, done));
        self.answer(&listened)
            .unwrap_or_else(|| Err(io::Error::other("relay thread gone")))
    }

    /// This thread stops accepting: returns once it dropped its listener (or is gone).
    pub fn unlisten(&self) {
        let (done, dropped) = mpsc::channel();
        self.mailbox.inbox.send(Mail::Unlisten(done));
        let _ = self.answer(&dropped);
    }

    /// The thread's answer to a letter, however long it takes, unless the thread is gone.
    fn answer<T>(&self, answer: &mpsc::Receiver<T>) -> Option<T> {
        loop {
            match answer.recv_timeout(Duration::from_millis(100)) {
                Ok(t) => return Some(t),
                Err(mpsc::RecvTimeoutError::Disconnected) => return None,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if !self.thread.as_ref().is_some_and(|t| !t.is_finished()) {
                        return None;
                    }
                }
            }
        }
    }

    /// What wakes session `id` from another thread.
    pub fn poker(&self, id: u64) -> Poker {
        Poker {
            inbox: self.mailbox.inbox.clone(),
            id,
        }
    }

    /// Drops every session (each reports an outcome) and ends the thread.
    pub fn quit(&mut self) {
        if let Some(thread) = self.thread.take() {
            self.mailbox.inbox.send(Mail::Quit);
            let _ = thread.join();
        }
    }
}

impl Drop for Shard {
    fn drop(&mut self) {
        self.quit();
    }
}

struct Entry {
    id: u64,
    task: Box<dyn Task>,
    /// In the run queue already.
    queued: bool,
    /// The deadline in the heap for it.
    armed: Option<Instant>,
    /// Which of its sockets are in the epoll (a session may gain its bot's after its start).
    registered: [bool; 2],
    /// A [`Linger`]: the session of `id` is over and told; its client's socket is read out.
    lingering: bool,
}

/// The thread's state: its sessions in slots (a socket's token names its slot).
struct Loop {
    poll: Poll,
    inbox: Arc<Inbox>,
    report: Report,
    slots: Vec<Option<Entry>>,
    free: Vec<usize>,
    by_id: HashMap<u64, usize>,
    deadlines: BinaryHeap<Reverse<(Instant, usize, u64)>>,
    /// Slots to run this turn, and those that asked for another.
    runq: Vec<usize>,
    again: Vec<usize>,
    /// This thread's index among the engine's.
    index: usize,
    /// The listening socket it accepts on, if any; whether to accept now (an event came, or a
    /// batch left more), and not before when.
    listening: Option<Box<dyn Listening>>,
    accept_now: bool,
    accept_at: Option<Instant>,
    /// When the doorbell ring it owes for outcomes it queued without one is due.
    owed: Option<Instant>,
    /// Slots holding a [`Linger`].
    lingering: usize,
}

impl Loop {
    fn new(poll: Poll, inbox: Arc<Inbox>, report: Report, index: usize) -> Self {
        Self {
            poll,
            inbox,
            report,
            slots: Vec::new(),
            free: Vec::new(),
            by_id: HashMap::new(),
            deadlines: BinaryHeap::new(),
            runq: Vec::new(),
            again: Vec::new(),
            index,
            listening: None,
            accept_now: false,
            accept_at: None,
            owed: None,
            lingering: 0,
        }
    }

    fn run(mut self) {
        let mut events = Events::with_capacity(1024);
        loop {
            if self.owed.is_some_and(|t| t <= Instant::now()) {
                self.owed = None;
                self.report.ring();
            }
            let timeout = if !self.runq.is_empty() || (self.accept_now && self.accept_at.is_none())
            {
                Some(Duration::ZERO)
            } else {
                let accept_at = self.accept_at.filter(|_| self.accept_now);
                let deadline = self.deadlines.peek().map(|Reverse((t, ..))| *t);
                [deadline, accept_at, self.owed]
                    .into_iter()
                    .flatten()
                    .min()
                    .map(|t| t.saturating_duration_since(Instant::now()))
            };
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                break; // the epoll fd is broken: end every session
            }
            let mut mail = false;
            for ev in events.iter() {
                if ev.token() == MAIL {
                    mail = true;
                    continue;
                }
                if ev.token() == LISTENER {
                    self.accept_now = true;
                    continue;
                }
                let (slot, side) = (ev.token().0 >> 1, ev.token().0 & 1);
                let Some(Some(entry)) = self.slots.get_mut(slot) else {
                    continue; // a closed socket's last event
                };
                if let Some(s) = entry.task.stream(side) {
                    s.mark_ready(
                        ev.is_readable(),
                        ev.is_writable(),
                        ev.is_read_closed(),
                        ev.is_error() || ev.is_write_closed(),
                    );
                }
                if !entry.queued {
                    entry.queued = true;
                    self.runq.push(slot);
                }
            }
            if mail && !self.read_mail() {
                break;
            }
            let now = Instant::now();
            if self.accept_now && !self.accept_at.is_some_and(|t| t > now) {
                self.accept();
            }
            while let Some(&Reverse((t, slot, id))) = self.deadlines.peek() {
                if t > now {
                    break;
                }
                self.deadlines.pop();
                self.queue_if(slot, id);
            }
            let runq = std::mem::take(&mut self.runq);
            for &slot in &runq {
                self.turn(slot, now);
            }
            self.runq = runq;
            self.runq.clear();
            std::mem::swap(&mut self.runq, &mut self.again);
        }
        // Dropping the sessions closes their sockets; each reports that the engine stopped.
        // (A client still lingering is dropped with them: a stop does not read it out.)
        for entry in std::mem::take(&mut self.slots).into_iter().flatten() {
            if !entry.lingering {
                self.tell(Outcome::new(entry.id), false);
            }
        }
        self.report.ring();
    }

    /// Queues an outcome for Python; a ring it did not make is owed.
    fn tell(&mut self, outcome: Outcome, can_wait: bool) {
        if let Some(due) = self.report.report(outcome, can_wait) {
            self.owed = Some(self.owed.map_or(due, |t| t.min(due)));
        }
    }

    /// Accepts a batch on the listener; the sessions it starts here run this turn.
    fn accept(&mut self) {
        self.accept_at = None;
        let Some(listening) = self.listening.as_mut() else {
            self.accept_now = false;
            return;
        };
        let mut here = Vec::new();
        match listening.accept(self.index, &mut here) {
            Batch::Drained | Batch::Full => self.accept_now = false,
            Batch::More => {}
            Batch::RetryAt(t) => self.accept_at = Some(t),
            Batch::Stop => self.unlisten(),
        }
        for (id, task) in here {
            self.insert(id, task);
        }
    }

    fn unlisten(&mut self) {
        if let Some(l) = self.listening.take() {
            let _ = self.poll.registry().deregister(&mut SourceFd(&l.fd()));
        }
        self.accept_now = false;
        self.accept_at = None;
    }

    /// Takes the inbox; false once told to quit.
    fn read_mail(&mut self) -> bool {
        let mut quit = false;
        for m in self.inbox.take() {
            match m {
                // Handed over as the engine stopped: it ends at once, as the others.
                Mail::Start(id, _) if quit => self.tell(Outcome::new(id), false),
                Mail::Start(id, task) => self.insert(id, task),
                Mail::Stop(id, code, reason) => {
                    if let Some(&slot) = self.by_id.get(&id) {
                        if let Some(entry) = self.slots[slot].as_mut() {
                            entry.task.stop(code, reason);
                        }
                        self.queue_if(slot, id);
                    }
                }
                Mail::Poke(id) => {
                    if let Some(&slot) = self.by_id.get(&id) {
                        self.queue_if(slot, id);
                    }
                }
                Mail::Quit => quit = true,
                Mail::Listen(l, done) => {
                    self.unlisten();
                    let fd = l.fd();
                    let registry = self.poll.registry();
                    let listened =
                        registry.register(&mut SourceFd(&fd), LISTENER, Interest::READABLE);
                    if listened.is_ok() {
                        // Its backlog is looked at now: connections queued before the
                        // registration raise no edge of their own.
                        self.listening = Some(l);
                        self.accept_now = true;
                    }
                    let _ = done.send(listened);
                }
                Mail::Unlisten(done) => {
                    self.unlisten();
                    let _ = done.send(());
                }
                Mail::Resume => self.accept_now = self.listening.is_some(),
            }
        }
        !quit
    }

    fn queue_if(&mut self, slot: usize, id: u64) {
        if let Some(Some(entry)) = self.slots.get_mut(slot) {
            if entry.id == id && !entry.queued {
                entry.queued = true;
                self.runq.push(slot);
            }
        }
    }

    fn insert(&mut self, id: u64, task: Box<dyn Task>) {
        let slot = self.free.pop().unwrap_or_else(|| {
            self.slots.push(None);
            self.slots.len() - 1
        });
        let mut registered = [false; 2];
        for (side, done) in registered.iter_mut().enumerate() {
            let Some(s) = task.stream(side) else { continue };
            if let Err(e) = register(self.poll.registry(), s, slot, side) {
                self.free.push(slot);
                let mut outcome = Outcome::new(id);
                outcome.detail = format!("relay thread could not take the session: {e}");
                self.tell(outcome, false);
                return;
            }
            *done = true;
        }
        self.slots[slot] = Some(Entry {
            id,
            task,
            queued: true,
            armed: None,
            registered,
            lingering: false,
        });
        self.by_id.insert(id, slot);
        self.runq.push(slot);
    }

    /// Runs the session in `slot` once, then files it by what it asked for.
    fn turn(&mut self, slot: usize, now: Instant) {
        let Some(entry) = self.slots[slot].as_mut() else {
            return;
        };
        entry.queued = false;
        // A panic ends the session it happened in, not the thread's other sessions.
        match catch_unwind(AssertUnwindSafe(|| entry.task.run(now))) {
            Ok(Run::Blocked) => {}
            Ok(Run::More) => {
                entry.queued = true;
                self.again.push(slot);
            }
            Ok(Run::Done) if entry.lingering => {
                self.remove(slot);
                return;
            }
            Ok(Run::Done) => {
                let lingering = catch_unwind(AssertUnwindSafe(|| entry.task.linger()));
                let id = entry.id;
                let task = match lingering {
                    Ok(Some(stream)) => self.linger(slot, stream, now),
                    _ => self.remove(slot).task,
                };
                let can_wait = task.can_wait();
                let outcome = catch_unwind(AssertUnwindSafe(|| task.finish()));
                self.tell(outcome.unwrap_or_else(|_| Outcome::new(id)), can_wait);
                return;
            }
            Err(_) => {
                let Entry { id, lingering, .. } = self.remove(slot);
                if !lingering {
                    self.tell(Outcome::new(id), false);
                }
                return;
            }
        }
        // A socket it gained in this turn (an opening's bot, once its request was read). Should
        // the epoll refuse it, the session's own deadline ends it (an opening's dial timeout).
        for (side, done) in entry.registered.iter_mut().enumerate() {
            if !*done {
                if let Some(s) = entry.task.stream(side) {
                    *done = register(self.poll.registry(), s, slot, side).is_ok();
                }
            }
        }
        let deadline = entry.task.deadline();
        if deadline != entry.armed {
            entry.armed = deadline;
            if let Some(t) = deadline {
                self.deadlines.push(Reverse((t, slot, entry.id)));
            }
        }
    }

    /// Hands the slot of the session that just ended, and its client's place in the epoll
    /// under it, to a [`Linger`] on `stream`; returns the session's task.
    fn linger(&mut self, slot: usize, stream: Stream, now: Instant) -> Box<dyn Task> {
        let until = now + CLOSE_TIMEOUT;
        let entry = self.slots[slot].as_mut().expect("a live slot");
        self.by_id.remove(&entry.id);
        self.lingering += 1;
        entry.lingering = true;
        entry.armed = Some(until);
        // Its bot's socket, if it had one, closes with the task.
        entry.registered = [true, false];
        self.deadlines.push(Reverse((until, slot, entry.id)));
        // A first turn now: the client's bytes may be there already, with no edge to come.
        entry.queued = true;
        self.again.push(slot);
        std::mem::replace(&mut entry.task, Box::new(Linger { stream, until }))
    }

    fn remove(&mut self, slot: usize) -> Entry {
        let entry = self.slots[slot].take().expect("a live slot");
        // Closing the last descriptor of a socket takes it out of the epoll (as nginx counts
        // on, two syscalls a session fewer); one that Python holds a copy of stays registered
        // until taken out here, or its events would reach the slot's next session.
        for side in 0..2 {
            if let Some(s) = entry.task.stream(side).filter(|s| s.shared()) {
                let _ = self.poll.registry().deregister(&mut SourceFd(&s.raw_fd()));
            }
        }
        if entry.lingering {
            self.lingering -= 1;
        } else {
            self.by_id.remove(&entry.id);
        }
        self.free.push(slot);
        // Deadlines of ended sessions stay in the heap until due; past twice the live ones,
        // the heap is rebuilt from the live ones (a day's time limits must not pile up).
        if self.deadlines.len() > 2 * (self.by_id.len() + self.lingering) + 64 {
            self.deadlines = (self.slots.iter().enumerate())
                .filter_map(|(slot, e)| {
                    let e = e.as_ref()?;
                    Some(Reverse((e.armed?, slot, e.id)))
                })
                .collect();
        }
        entry
    }
}

/// Puts `s`, side `side` of the session in `slot`, in the epoll. The registration reports the
/// socket's state as a first event.
fn register(registry: &mio::Registry, s: &Stream, slot: usize, side: usize) -> io::Result<()> {
    let token = Token(slot << 1 | side);
    let both = Interest::READABLE | Interest::WRITABLE;
    registry.register(&mut SourceFd(&s.raw_fd()), token, both)
}

#[cfg(test)]
mod tests {
    //! The loop through the engine's own entry points, on loopback TCP: what a turn must not
    //! miss (an EOF behind a session's last bytes, a stop, its deadline, a shutdown).

    use std::io::{Read, Write};
    use std::net::{Shutdown, TcpListener, TcpStream};
    use std::time::{Duration, Instant};

    use crate::engine::{Engine, Handed, Item};
    use crate::frame::{close_frame, encode_frame, Opcode};
    use crate::session::{EndedBy, Limits, Outcome};

    const KEY: Option<[u8; 4]> = Some([1, 2, 3, 4]);

    /// A connected pair: (ours, the one handed to the engine).
    fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let ours = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (theirs, _) = l.accept().unwrap();
        ours.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        (ours, theirs)
    }

    fn handed(sock: TcpStream) -> Handed {
        Handed {
            sock,
            tls: None,
            pending: Vec::new(),
        }
    }

    fn limits(time_limit: Option<Duration>) -> Limits {
        Limits {
            max_message_size: 1 << 20,
            time_limit,
        }
    }

    /// The outcome of session `id`, waiting at most 5 s for it.
    fn outcome(engine: &Engine, id: u64) -> Outcome {
        let end = Instant::now() + Duration::from_secs(5);
        while Instant::now() < end {
            for item in engine.drain() {
                if let Item::Outcome(o, ..) = item {
                    if o.session_id == id {
                        return o;
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        panic!("no outcome for session {id}");
    }

    /// Reads exactly `n` bytes.
    fn read_n(s: &mut TcpStream, n: usize) -> Vec<u8> {
        let mut buf = vec![0; n];
        s.read_exact(&mut buf).unwrap();
        buf
    }

    #[test]
    fn an_eof_right_behind_the_last_bytes_ends_the_session() {
        // Frame and FIN wait in the socket together, so the first event reports both: a short
        // read must not hide the end that follows it.
        let engine = Engine::new(1, Duration::from_secs(60)).unwrap();
        let (mut client, theirs) = pair();
        client
            .write_all(&encode_frame(true, Opcode::TEXT, b"hi", KEY))
            .unwrap();
        client.shutdown(Shutdown::Write).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        engine.echo(1, handed(theirs), limits(None), None).unwrap();
        assert_eq!(
            read_n(&mut client, 4),
            encode_frame(true, Opcode::TEXT, b"hi", None)
        );
        let o = outcome(&engine, 1);
        assert_eq!(
            (o.ended_by, o.detail.as_str()),
            (EndedBy::Client, "client gone")
        );
        assert_eq!((o.messages_in, o.bytes_in), (1, 2));
    }

    /// Whether the engine's doorbell rings within 5 s.
    fn rings(engine: &Engine) -> bool {
        let mut fd = libc::pollfd {
            fd: engine.doorbell_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut fd, 1, 5000) == 1 }
    }

    #[test]
    fn an_outcome_right_behind_a_ring_is_rung_for_by_its_relay_thread() {
        let engine = Engine::new(1, Duration::from_secs(60)).unwrap();
        let (first, theirs) = pair();
        engine.echo(1, handed(theirs), limits(None), None).unwrap();
        let (second, theirs) = pair();
        engine.echo(2, handed(theirs), limits(None), None).unwrap();
        first.shutdown(Shutdown::Write).unwrap();
        assert!(rings(&engine));
        assert!(matches!(&engine.drain()[..], [Item::Outcome(o, ..)] if o.session_id == 1));
        // Within RING_DELAY of that ring: queued without one, then rung for when it is due,
        // with nobody draining meanwhile.
        second.shutdown(Shutdown::Write).unwrap();
        assert!(rings(&engine));
        assert!(matches!(&engine.drain()[..], [Item::Outcome(o, ..)] if o.session_id == 2));
    }

    #[test]
    fn a_stop_closes_both_sides_of_a_relayed_session() {
        let engine = Engine::new(2, Duration::from_secs(60)).unwrap();
        let (mut client, c) = pair();
        let (mut bot, b) = pair();
        engine
            .relay(7, handed(c), handed(b), limits(None), None)
            .unwrap();
        client
            .write_all(&encode_frame(true, Opcode::BINARY, b"ping", KEY))
            .unwrap();
        let got = read_n(&mut bot, 10); // 2 + 4 (our key) + 4
        assert_eq!(&got[..2], &[0x82, 0x84]);
        assert!(engine.close(7, 4000, "bye"));
        let expected = close_frame(4000, "bye", None);
        assert_eq!(read_n(&mut client, expected.len()), expected);
        let to_bot = read_n(&mut bot, expected.len() + 4); // masked by us
        assert_eq!(&to_bot[..2], &[0x88, 0x85]);
        // Both peers answer and leave: the session ends by the gateway's stop.
        client.write_all(&close_frame(4000, "", KEY)).unwrap();
        bot.write_all(&close_frame(4000, "", None)).unwrap();
        drop((client, bot));
        let o = outcome(&engine, 7);
        assert_eq!((o.ended_by, o.code), (EndedBy::Gateway, 4000));
        assert_eq!((o.messages_in, o.bytes_in), (1, 4));
        assert!(
            !engine.close(7, 1000, ""),
            "gone once its outcome is queued"
        );
    }

    #[test]
    fn an_in_process_session_ends_at_its_fin_and_its_client_is_read_to_its_eof() {
        // Its outcome comes at the gateway's FIN (Python's bot hears at once); what the client
        // sends after it (a ping here) meets an open socket: a reset would throw away the part
        // of the message still queued for it.
        let engine = Engine::new(1, Duration::from_secs(60)).unwrap();
        let (mut client, theirs) = pair();
        // The message fits in the gateway's send buffer, not in the client's receive window.
        socket2::SockRef::from(&theirs)
            .set_send_buffer_size(1 << 20)
            .unwrap();
        socket2::SockRef::from(&client)
            .set_recv_buffer_size(16 << 10)
            .unwrap();
        engine
            .attach(5, handed(theirs), limits(None), 1 << 20, 4 << 20, None)
            .unwrap();
        let message = vec![b'm'; 128 << 10];
        assert!(engine.send(5, false, &message).is_some());
        client.write_all(&close_frame(1000, "", KEY)).unwrap();
        let o = outcome(&engine, 5);
        assert_eq!((o.ended_by, o.code), (EndedBy::Client, 1000));
        client
            .write_all(&encode_frame(true, Opcode::PING, b"there?", KEY))
            .unwrap();
        let mut got = Vec::new();
        client.read_to_end(&mut got).unwrap();
        let mut expected = encode_frame(true, Opcode::BINARY, &message, None);
        expected.extend(close_frame(1000, "", None));
        assert_eq!(got.len(), expected.len());
        assert!(got == expected);
    }

    #[test]
    fn any_session_id_gets_its_outcome() {
        let engine = Engine::new(1, Duration::from_secs(60)).unwrap();
        let (client, theirs) = pair();
        engine
            .echo(u64::MAX, handed(theirs), limits(None), None)
            .unwrap();
        client.shutdown(Shutdown::Write).unwrap();
        assert_eq!(outcome(&engine, u64::MAX).ended_by, EndedBy::Client);
    }

    #[test]
    fn the_time_limit_closes_the_session() {
        let engine = Engine::new(1, Duration::from_secs(60)).unwrap();
        let (mut client, theirs) = pair();
        let started = Instant::now();
        let limit = Some(Duration::from_millis(100));
        engine.echo(3, handed(theirs), limits(limit), None).unwrap();
        let expected = close_frame(1000, "session time limit", None);
        assert_eq!(read_n(&mut client, expected.len()), expected);
        assert!(started.elapsed() >= Duration::from_millis(100));
        // The reply completes the handshake: the gateway ends its side, then the client.
        client.write_all(&close_frame(1000, "", KEY)).unwrap();
        assert_eq!(client.read_to_end(&mut Vec::new()).unwrap(), 0);
        client.shutdown(Shutdown::Write).unwrap();
        let o = outcome(&engine, 3);
        assert_eq!((o.ended_by, o.code), (EndedBy::Gateway, 1000));
    }

    #[test]
    fn a_shutdown_ends_every_live_session_with_an_outcome() {
        let mut engine = Engine::new(2, Duration::from_secs(60)).unwrap();
        let mut clients = Vec::new();
        for id in 1..=4 {
            let (client, theirs) = pair();
            engine.echo(id, handed(theirs), limits(None), None).unwrap();
            clients.push(client);
        }
        engine.shutdown();
        let mut ended: Vec<u64> = engine
            .drain()
            .into_iter()
            .filter_map(|item| match item {
                Item::Outcome(o, ..) => Some(o.session_id),
                Item::Message(_) | Item::Open(_) | Item::StoreCalls(_) => None,
            })
            .collect();
        ended.sort_unstable();
        assert_eq!(ended, [1, 2, 3, 4]);
        for mut c in clients {
            assert_eq!(c.read(&mut [0; 8]).unwrap(), 0, "its socket is closed");
        }
    }
}
