//! One direction of a session on sockets: read from one, write to another. What the bytes mean
//! and how they are rewritten (in place, in the buffer they were read into) is the session core's
//! [`Forwarder`]; the pump only moves them, so a 1 MiB message never sits whole in memory.
//!
//! A pump never waits: [`Pump::step`] does what the sockets' readiness allows and says when
//! nothing more can be done until an event ([`Event::Blocked`]). Whatever was read and not yet
//! written is kept in the pump, and the source is not read again until it is written: a slow
//! destination holds its source back, and backpressure reaches the sender through TCP.
//! Memory per pump is bounded: at most one read buffer ([`READ_BUF`]) is held, and only while
//! its bytes wait for the destination to accept them; an idle pump holds no buffer at all.

use std::io::ErrorKind;

use crate::driver::Step;
use crate::frame::{Violation, MAX_CONTROL_PAYLOAD, MAX_HEADER_LEN};
use crate::limits::READ_BUF;
use crate::session::{Forwarded, Forwarder, Input, OwnClose, Side, Transform};
use crate::stream::Stream;

/// A read buffer's capacity: a read plus the largest carry (a whole control frame).
const BUF_CAPACITY: usize = READ_BUF + MAX_HEADER_LEN + MAX_CONTROL_PAYLOAD;
/// Spare read buffers kept per relay thread: a busy thread reuses them instead of calling the
/// allocator on every read, and idle sessions still hold none.
const POOL_SIZE: usize = 64;

thread_local! {
    static POOL: std::cell::RefCell<Vec<Vec<u8>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A read buffer of `BUF_CAPACITY` bytes, every one of them initialized: new ones are zeroed,
/// pooled ones were, and nothing but in-bounds writes touched them since.
fn take_buffer() -> Vec<u8> {
    let mut buf = POOL
        .with(|p| p.borrow_mut().pop())
        .unwrap_or_else(|| vec![0; BUF_CAPACITY]);
    // SAFETY: see above: the whole capacity is initialized, so the bytes past `len` may be
    // exposed. `give_back` only takes buffers that came from here and kept their allocation.
    unsafe { buf.set_len(BUF_CAPACITY) };
    buf
}

/// Returns a buffer from [`take_buffer`] to the pool. `pooled` says it came from there; a
/// buffer that grew was reallocated (its tail uninitialized) and is freed instead.
fn give_back(mut buf: Vec<u8>, pooled: bool) {
    if pooled && buf.capacity() == BUF_CAPACITY {
        buf.clear();
        POOL.with(|p| {
            let mut p = p.borrow_mut();
            if p.len() < POOL_SIZE {
                p.push(buf);
            }
        });
    }
}

/// What a call to [`Pump::step`] did or saw.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    /// Nothing can be done until an event on a socket: the source is drained (or done) and
    /// nothing is left to write, or the destination is full.
    Blocked,
    /// Frames were read (and queued for the destination), or pending bytes were written.
    Progress,
    /// The source sent a close frame (already queued for the destination): its code and reason,
    /// or `None` for a close without a status code.
    Close(Option<(u16, String)>),
    /// The source's connection ended (EOF or error).
    Eof,
    /// The source broke the protocol or the size limit; nothing after it was forwarded.
    Violation(Violation),
    /// Writing to the destination failed: it is gone.
    DstLost,
}

impl Event {
    /// What the session loop makes of it, for a pump from side `src` to side `dst`.
    pub fn step(self, src: Side, dst: Side) -> Step {
        match self {
            Self::Blocked => Step::Blocked,
            Self::Progress => Step::Progress,
            Self::Close(c) => Step::Input(Input::Close(src, c)),
            Self::Eof => Step::Input(Input::Gone(src)),
            Self::Violation(v) => Step::Input(Input::Violation(src, v)),
            Self::DstLost => Step::Input(Input::Gone(dst)),
        }
    }
}

/// One direction of a session. See the module docs. Its sockets are lent to each call (the
/// session owns them; a relayed session's two pumps share them crosswise).
pub struct Pump {
    fwd: Forwarder,
    /// Bytes that arrived with the HTTP handshake: the start of the frame stream.
    pending_in: Vec<u8>,
    out: Vec<u8>,
    out_pos: usize,
    /// `out` came from the buffer pool.
    out_pooled: bool,
    /// The source ended; nothing more will be read.
    src_done: bool,
    dst_open: bool,
    shutdown_after_flush: bool,
}

impl Pump {
    /// A pump that rewrites frames as `transform` says; `pending_in`: what its source sent past
    /// its handshake.
    pub fn new(transform: Transform, max_message_size: u64, pending_in: Vec<u8>) -> Self {
        Self {
            fwd: Forwarder::new(transform, max_message_size),
            pending_in,
            out: Vec::new(),
            out_pos: 0,
            out_pooled: false,
            src_done: false,
            dst_open: true,
            shutdown_after_flush: false,
        }
    }

    /// Data messages and payload bytes forwarded so far.
    pub fn counts(&self) -> (u64, u64) {
        (self.fwd.messages(), self.fwd.bytes())
    }

    /// Whether [`step`](Self::step) still has anything to do, with `dst` its destination.
    pub fn wants_poll(&self, dst: &Stream) -> bool {
        !self.src_done
            || self.out_pos < self.out.len()
            || (self.dst_open && (self.shutdown_after_flush || dst.pending_out()))
    }

    /// Whether [`step`](Self::step) would do anything now, with `src` and `dst` as their
    /// readiness stands: something to write or a buffer to give back, a half-close due, or a
    /// source that may be read. When not, `step` would only say [`Event::Blocked`], so a
    /// session with two pumps asks this first and spares the call (one ready socket of two is
    /// the usual turn).
    pub fn has_work(&self, src: &Stream, dst: &Stream) -> bool {
        let writing = self.dst_open
            && (self.out_pos < self.out.len() || self.shutdown_after_flush || dst.pending_out());
        let reading = !self.src_done && (!self.pending_in.is_empty() || src.may_read());
        writing || reading || self.out.capacity() > 0
    }

    /// Writes what is queued, then reads and forwards the next chunk of `src` to `dst`.
    pub fn step(&mut self, src: &Stream, dst: &Stream) -> Event {
        match self.flush(dst) {
            Err(ev) => return ev,
            Ok(false) => return Event::Blocked,
            Ok(true) => {}
        }
        if self.src_done {
            return Event::Blocked;
        }
        let (mut buf, pooled) = if self.pending_in.is_empty() {
            if !src.may_read() {
                return Event::Blocked;
            }
            // Taken only now that the socket is readable: an idle pump holds no buffer, and
            // the carry stays in the forwarder until a read succeeds.
            let mut buf = take_buffer();
            let carry = self.fwd.carry();
            let c = carry.len();
            buf[..c].copy_from_slice(carry);
            match src.read(&mut buf[c..]) {
                Ok(0) => {
                    give_back(buf, true);
                    self.src_done = true;
                    return Event::Eof;
                }
                Ok(n) => {
                    if c + n < BUF_CAPACITY && !src.is_tls() {
                        // A short plain read emptied the socket: skip the read that would only
                        // say EAGAIN (as nginx does). Data arriving meanwhile brings an event.
                        // (A TLS read says so only by WouldBlock.)
                        src.read_drained();
                    }
                    buf.truncate(c + n);
                    self.fwd.clear_carry();
                    (buf, true)
                }
                Err(e) => {
                    give_back(buf, true);
                    return match e.kind() {
                        ErrorKind::WouldBlock => Event::Blocked,
                        ErrorKind::Interrupted => Event::Progress,
                        _ => {
                            self.src_done = true;
                            Event::Eof
                        }
                    };
                }
            }
        } else {
            (std::mem::take(&mut self.pending_in), false)
        };
        if self.fwd.discarding() {
            give_back(buf, pooled);
            return Event::Progress;
        }
        let ev = match self.fwd.forward(&mut buf) {
            Forwarded::Frames => Event::Progress,
            Forwarded::Close(c) => Event::Close(c),
            Forwarded::Violation(v) => Event::Violation(v),
        };
        if self.dst_open {
            self.out = buf;
            self.out_pos = 0;
            self.out_pooled = pooled;
            if ev == Event::Progress {
                // Write now, in this same step: the usual case needs no second one. What does
                // not fit waits in `out` for `flush`.
                if let Err(lost) = self.write_some(dst) {
                    return lost;
                }
            }
        } else {
            give_back(buf, pooled);
        }
        ev
    }

    /// Writes what the destination takes without waiting; frees the buffer once all is out.
    fn write_some(&mut self, dst: &Stream) -> Result<(), Event> {
        while self.out_pos < self.out.len() {
            match dst.write(&self.out[self.out_pos..]) {
                Ok(n) => self.out_pos += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => {
                    self.abandon_dst();
                    return Err(Event::DstLost);
                }
            }
        }
        self.release_out();
        Ok(())
    }

    fn release_out(&mut self) {
        give_back(std::mem::take(&mut self.out), self.out_pooled);
        self.out_pos = 0;
        self.out_pooled = false;
    }

    /// Queues a close frame of the gateway's own for the destination, unless one went already.
    /// When the destination holds part of a frame, a close cannot follow it: the connection is
    /// shut down instead. `then_shutdown`: end our side of the TCP connection once it is sent.
    pub fn queue_close(&mut self, code: u16, reason: &str, then_shutdown: bool) {
        if !self.dst_open {
            return;
        }
        match self.fwd.close(code, reason) {
            OwnClose::Muted => {}
            OwnClose::MidFrame => self.shutdown_after_flush = true,
            OwnClose::Frame(frame) => {
                self.out.extend_from_slice(&frame);
                self.shutdown_after_flush |= then_shutdown;
            }
        }
    }

    /// Ends our side of the destination's TCP connection once queued bytes are written.
    pub fn shutdown_dst(&mut self) {
        self.shutdown_after_flush = true;
    }

    /// Stops writing to the destination: it is gone.
    pub fn abandon_dst(&mut self) {
        self.dst_open = false;
        self.fwd.mute();
        self.release_out();
    }

    /// Writes what is queued for `dst` (our bytes, then TLS records), then the half-close if
    /// one is due. `Ok(false)`: `dst` is full and something is still queued.
    fn flush(&mut self, dst: &Stream) -> Result<bool, Event> {
        // Plaintext to write, or TLS records it left queued.
        while self.dst_open && (self.out_pos < self.out.len() || dst.pending_out()) {
            if !dst.may_write() {
                return Ok(false);
            }
            match dst.write(&self.out[self.out_pos..]) {
                Ok(n) => self.out_pos += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => {
                    self.abandon_dst();
                    return Err(Event::DstLost);
                }
            }
        }
        // Back to the pool: an idle session holds no buffer.
        self.release_out();
        if self.shutdown_after_flush && self.dst_open {
            // TLS: the close_notify first, written before the half-close.
            if let Ok(false) = dst.shutdown_write() {
                return Ok(false);
            }
            self.dst_open = false;
        }
        Ok(true)
    }
}
