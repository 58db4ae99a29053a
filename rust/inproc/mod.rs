//! Sessions served by an in-process Python bot: the engine speaks WebSocket with the client and
//! Python sees whole messages.
//!
//! Inbound, the session core's [`Assembler`] checks and reassembles frames (text must be UTF-8:
//! else 1007), pings are answered, and each whole message is queued for Python with the engine's
//! other news, behind the same doorbell. Python tells the engine how much it has consumed; past
//! `inbox_limit` undelivered bytes the session stops reading its client, so a bot that never
//! reads costs a bounded amount of memory and the client meets TCP backpressure.
//!
//! Outbound, Python's `send` frames the message into a per-session outbox and gives the session
//! a turn on its relay thread, where it is written. `send` returns the bytes queued; past `send_buffer_limit` Python waits
//! for a `Drained` message, queued once the outbox has emptied to half the limit.

mod handle;

use std::sync::atomic::Ordering;
use std::sync::Arc;

pub use handle::{Delivery, Handle, Message};

use crate::counters::{Meter, Tally};
use crate::driver::{self, Driven, Io, Step};
use crate::limits::READ_BUF;
use crate::session::{Action, Assembler, Inbound, Input, Kind, Limits, Session, Side};
use crate::stream::Stream;

/// Session `id` serving `client` for an in-process bot until it ends, for a relay thread to run.
/// `deliver` queues a message for Python (and rings the doorbell); `meter` hears of its traffic.
pub fn session(
    id: u64,
    client: Stream,
    pending: Vec<u8>,
    limits: Limits,
    handle: Arc<Handle>,
    deliver: impl Fn(Message) + Send + Sync,
    meter: Meter,
) -> Driven<impl Io + Send> {
    let peer = Peer {
        id,
        fresh: !pending.is_empty(),
        client: Some(client),
        handle,
        deliver,
        asm: Assembler::new(limits.max_message_size),
        inbuf: pending,
        inbound: Vec::new(),
        reading: true,
        client_closed: false,
        out: Vec::new(),
        out_pos: 0,
        shutdown: false,
        fin_sent: false,
        done: false,
        messages: 0,
        bytes: 0,
    };
    driver::drive(
        Session::new(id, Kind::InProcess),
        peer,
        limits.time_limit,
        meter,
    )
}

/// The client's socket and the session's side of the [`Handle`].
struct Peer<D> {
    id: u64,
    /// Taken at the end when it is to be read to its EOF ([`Io::linger`]).
    client: Option<Stream>,
    handle: Arc<Handle>,
    deliver: D,
    asm: Assembler,
    inbuf: Vec<u8>,
    /// Bytes came into `inbuf` since it was last judged.
    fresh: bool,
    inbound: Vec<Inbound>,
    /// The client's stream goes on (no close, no broken rule yet).
    reading: bool,
    client_closed: bool,
    /// What is being written: taken from the outbox whole.
    out: Vec<u8>,
    out_pos: usize,
    /// End the connection once our close is written.
    shutdown: bool,
    /// Our close and FIN are out: the session ended there, its client is still to be read.
    fin_sent: bool,
    done: bool,
    messages: u64,
    bytes: u64,
}

impl<D: Fn(Message)> Peer<D> {
    /// Delivers what has arrived; returns the close or broken rule that ended the stream.
    fn judge(&mut self) -> Option<Input> {
        if self.asm.feed(&mut self.inbuf, &mut self.inbound) {
            self.reading = false;
        }
        let mut inbound = std::mem::take(&mut self.inbound);
        let mut last = None;
        for ev in inbound.drain(..) {
            match ev {
                Inbound::Text(s) => self.deliver(Delivery::Text(s)),
                Inbound::Binary(b) => self.deliver(Delivery::Binary(b)),
                Inbound::Ping(p) => self.handle.queue_pong(&p),
                Inbound::Close(c) => {
                    self.client_closed = true;
                    self.inbuf = Vec::new();
                    last = Some(Input::Close(Side::Client, c));
                }
                Inbound::Violation(v) => {
                    self.inbuf = Vec::new();
                    last = Some(Input::Violation(Side::Client, v));
                }
            }
        }
        self.inbound = inbound;
        last
    }

    fn deliver(&mut self, data: Delivery) {
        let n = match &data {
            Delivery::Text(s) => s.len(),
            Delivery::Binary(b) => b.len(),
            Delivery::Drained => 0,
        };
        self.messages += 1;
        self.bytes += n as u64;
        self.handle.undelivered.fetch_add(n, Ordering::AcqRel);
        (self.deliver)(Message {
            session_id: self.id,
            data,
        });
    }

    /// Takes the outbox once what was taken before is written. Returns false once the session
    /// is over: our close is out and the client's came (or it broke a rule); its socket is then
    /// read to its EOF on the side ([`Io::linger`]), the bot told at once.
    fn refill(&mut self) -> bool {
        if self.out_pos < self.out.len() {
            return true;
        }
        self.out.clear();
        self.out_pos = 0;
        let mut st = self.handle.out();
        st.writing = 0;
        if st.over && st.buf.len() <= self.handle.send_buffer_limit / 2 {
            st.over = false;
            (self.deliver)(Message {
                session_id: self.id,
                data: Delivery::Drained,
            });
        }
        if !st.buf.is_empty() {
            std::mem::swap(&mut self.out, &mut st.buf);
            st.writing = self.out.len();
        } else if st.closed && self.shutdown {
            drop(st);
            let client = self.client.as_ref().expect(LIVE);
            return match client.shutdown_write() {
                // With TLS the close_notify may wait for the socket: until then, not over.
                Ok(false) => true,
                Ok(true) => {
                    self.fin_sent = true;
                    false
                }
                Err(_) => false,
            };
        }
        true
    }
}

impl<D> Drop for Peer<D> {
    fn drop(&mut self) {
        // The session is over, however it ended: Python's sends are dropped from now on.
        self.handle.out().closed = true;
    }
}

impl<D: Fn(Message) + Send + Sync> Io for Peer<D> {
    fn live(&self) -> bool {
        !self.done
    }

    fn step(&mut self) -> Step {
        // Python's calls from here on give the session another turn.
        self.handle.rearm();
        // Judge what has arrived before reading more.
        if self.reading && self.fresh {
            self.fresh = false;
            if let Some(input) = self.judge() {
                return Step::Input(input);
            }
        }
        if !self.refill() {
            self.done = true;
            return Step::Progress;
        }
        let client = self.client.as_ref().expect(LIVE);
        let gone = Step::Input(Input::Gone(Side::Client));
        if (self.out_pos < self.out.len() || client.pending_out()) && client.may_write() {
            match client.write(&self.out[self.out_pos..]) {
                Ok(n) => {
                    self.out_pos += n;
                    return Step::Progress;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => return Step::Progress,
                Err(_) => return gone,
            }
        }
        let handle = &self.handle;
        let has_credit = handle.undelivered.load(Ordering::Acquire) < handle.inbox_limit;
        let wants = (self.reading && has_credit) || (!self.reading && !self.client_closed);
        if !wants || !client.may_read() {
            return Step::Blocked;
        }
        let start = self.inbuf.len();
        self.inbuf.resize(start + READ_BUF, 0);
        let r = client.read(&mut self.inbuf[start..]);
        self.inbuf.truncate(start + r.as_ref().map_or(0, |n| *n));
        match r {
            Ok(0) => gone,
            Ok(n) => {
                if n < READ_BUF && !client.is_tls() {
                    client.read_drained(); // as a pump's short read
                }
                if self.reading {
                    self.fresh = true;
                } else {
                    // After our close: read and drop until the client's close reply or EOF.
                    self.inbuf.clear();
                }
                Step::Progress
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Step::Blocked,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => Step::Progress,
            Err(_) => gone,
        }
    }

    fn apply(&mut self, action: Action) {
        match action {
            Action::Close {
                code,
                reason,
                then_shutdown,
                ..
            } => {
                self.handle.queue_close(code, &reason);
                self.shutdown |= then_shutdown;
            }
            Action::Shutdown(_) => self.shutdown = true,
            // The core abandons only a relayed bot.
            Action::Abandon(_) | Action::Drop => {}
        }
    }

    fn tally(&self) -> Tally {
        let (messages_out, bytes_out) = self.handle.sent();
        Tally {
            messages_in: self.messages,
            bytes_in: self.bytes,
            messages_out,
            bytes_out,
        }
    }

    fn stream(&self, side: usize) -> Option<&Stream> {
        self.client.as_ref().filter(|_| side == 0)
    }

    fn linger(&mut self) -> Option<Stream> {
        // Past our FIN the client may still be sending: the rest of a message that broke a
        // rule, a pong it owed. Read to its EOF, so that no reset answers it and takes what it
        // has not read yet with it (`shard::Linger`).
        // Taken only then: the relay thread still needs the socket of a session that ends
        // otherwise (to take it out of the epoll if Python holds a copy).
        if self.fin_sent {
            self.client.take()
        } else {
            None
        }
    }
}

/// The client's socket is there until the session's end.
const LIVE: &str = "the client's socket, until the end";
