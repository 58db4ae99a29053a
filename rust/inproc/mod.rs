//! Sessions served by an in-process Python bot: the engine speaks WebSocket with the client and
//! Python sees whole messages.
//!
//! Inbound, the session core's [`Assembler`] checks and reassembles frames (text must be UTF-8:
//! else 1007), pings are answered, and each whole message is queued for Python with the engine's
//! other news, behind the same doorbell. Python tells the engine how much it has consumed; past
//! `inbox_limit` undelivered bytes the session stops reading its client, so a bot that never
//! reads costs a bounded amount of memory and the client meets TCP backpressure.
//!
//! Outbound, Python's `send` frames the message into a per-session outbox and wakes the session
//! task, which writes it. `send` returns the bytes queued; past `send_buffer_limit` Python waits
//! for a `Drained` message, queued once the outbox has emptied to half the limit.

mod handle;

use std::future::Future;
use std::sync::atomic::Ordering;

pub use handle::{Delivery, Handle, Message};

use crate::counters::{Meter, Tally};
use crate::driver::{self, Commands, Io};
use crate::limits::READ_BUF;
use crate::session::{Action, Assembler, Inbound, Input, Kind, Limits, Outcome, Session, Side};
use crate::stream::Stream;

/// Serves one client for an in-process bot until the session ends. `deliver` queues a message
/// for Python (and rings the doorbell); `meter` hears of its traffic.
#[allow(clippy::too_many_arguments)] // the session's parts, each used once: no struct to name
pub fn run<'a>(
    id: u64,
    client: &'a Stream,
    pending: Vec<u8>,
    limits: Limits,
    handle: &'a Handle,
    commands: Commands,
    deliver: impl Fn(Message) + Send + Sync + 'a,
    meter: Meter,
) -> impl Future<Output = Outcome> + 'a {
    let peer = Peer {
        id,
        client,
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
        done: false,
        messages: 0,
        bytes: 0,
    };
    driver::run(
        Session::new(id, Kind::InProcess),
        peer,
        limits.time_limit,
        commands,
        meter,
    )
}

/// The client's socket and the session's side of the [`Handle`].
struct Peer<'a, D> {
    id: u64,
    client: &'a Stream,
    handle: &'a Handle,
    deliver: D,
    asm: Assembler,
    inbuf: Vec<u8>,
    inbound: Vec<Inbound>,
    /// The client's stream goes on (no close, no broken rule yet).
    reading: bool,
    client_closed: bool,
    /// What is being written: taken from the outbox whole.
    out: Vec<u8>,
    out_pos: usize,
    /// End the connection once our close is written.
    shutdown: bool,
    done: bool,
    messages: u64,
    bytes: u64,
}

impl<D: Fn(Message)> Peer<'_, D> {
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
    /// is over: our close is out and the client's came (or it broke a rule).
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
            // With TLS the close_notify may wait for the socket: until then, not over.
            return !matches!(self.client.shutdown_write(), Ok(true) | Err(_));
        }
        true
    }
}

impl<D> Drop for Peer<'_, D> {
    fn drop(&mut self) {
        // The session is over, however it ended: Python's sends are dropped from now on.
        self.handle.out().closed = true;
    }
}

impl<D: Fn(Message) + Send + Sync> Io for Peer<'_, D> {
    fn live(&self) -> bool {
        !self.done
    }

    async fn step(&mut self) -> Option<Input> {
        // Judge what has arrived before waiting for more.
        if self.reading && !self.inbuf.is_empty() {
            if let Some(input) = self.judge() {
                return Some(input);
            }
        }
        if !self.refill() {
            self.done = true;
            return None;
        }
        let (client, handle) = (self.client, self.handle);
        let has_credit = handle.undelivered.load(Ordering::Acquire) < handle.inbox_limit;
        let gone = Some(Input::Gone(Side::Client));
        tokio::select! {
            r = client.read_vec(&mut self.inbuf, READ_BUF),
                if (self.reading && has_credit) || (!self.reading && !self.client_closed) =>
            {
                if !self.reading {
                    // After our close: read and drop until the client's close reply or EOF.
                    self.inbuf.clear();
                }
                match r {
                    Ok(0) | Err(_) => gone,
                    Ok(_) => None,
                }
            }
            _ = handle.credit_wake.notified(), if self.reading && !has_credit => None,
            _ = handle.out_wake.notified(), if self.out_pos == self.out.len() => None,
            w = client.write_async(&self.out[self.out_pos..]),
                if self.out_pos < self.out.len() || client.pending_out() =>
            {
                match w {
                    Ok(n) => {
                        self.out_pos += n;
                        None
                    }
                    Err(_) => gone,
                }
            }
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
}
