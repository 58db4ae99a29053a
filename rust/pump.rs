//! One direction of a session on sockets: read from one, write to another. What the bytes mean
//! and how they are rewritten (in place, in the buffer they were read into) is the session core's
//! [`Forwarder`]; the pump only moves them, so a 1 MiB message never sits whole in memory.
//!
//! Every await point (`readable`, `writable`) is cancel-safe: whatever was read and not yet
//! written is kept in the pump, so a session can `select!` over both pumps and its commands.
//! Memory per pump is bounded: at most one read buffer ([`READ_BUF`]) is held, and only while
//! its bytes wait for the destination to accept them; an idle pump holds no buffer at all.

use std::io::ErrorKind;

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

/// What a call to [`Pump::step`] saw.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
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
    /// What the session core hears of it, for a pump from side `src` to side `dst`.
    pub fn input(self, src: Side, dst: Side) -> Option<Input> {
        match self {
            Self::Progress => None,
            Self::Close(c) => Some(Input::Close(src, c)),
            Self::Eof => Some(Input::Gone(src)),
            Self::Violation(v) => Some(Input::Violation(src, v)),
            Self::DstLost => Some(Input::Gone(dst)),
        }
    }
}

/// One direction of a session. See the module docs.
pub struct Pump<'a> {
    src: &'a Stream,
    dst: &'a Stream,
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

impl<'a> Pump<'a> {
    /// A pump reading `src` and writing `dst` (the same socket for the echo bot).
    pub fn new(
        src: &'a Stream,
        dst: &'a Stream,
        transform: Transform,
        max_message_size: u64,
        pending_in: Vec<u8>,
    ) -> Self {
        Self {
            src,
            dst,
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

    /// Whether [`step`](Self::step) still has anything to do.
    pub fn wants_poll(&self) -> bool {
        !self.src_done
            || self.out_pos < self.out.len()
            || (self.dst_open && (self.shutdown_after_flush || self.dst.pending_out()))
    }

    /// Writes what is queued, then reads and forwards the next chunk of the source.
    pub async fn step(&mut self) -> Event {
        if let Err(ev) = self.flush().await {
            return ev;
        }
        if self.src_done {
            return Event::Progress;
        }
        let (mut buf, pooled) = if self.pending_in.is_empty() {
            loop {
                // TLS may hold decrypted bytes already: then the socket's readiness is moot.
                let mut ready = if self.src.buffered() {
                    None
                } else {
                    let Ok(ready) = self.src.fd().readable().await else {
                        self.src_done = true;
                        return Event::Eof;
                    };
                    Some(ready)
                };
                // Taken only now that the socket is readable: an idle pump holds no buffer, and
                // the carry stays in the forwarder until a read succeeds, so a `select!` that
                // drops this future while it waits loses nothing.
                let mut buf = take_buffer();
                let carry = self.fwd.carry();
                let c = carry.len();
                buf[..c].copy_from_slice(carry);
                match self.src.read(&mut buf[c..]) {
                    Ok(0) => {
                        give_back(buf, true);
                        self.src_done = true;
                        return Event::Eof;
                    }
                    Ok(n) => {
                        if c + n < BUF_CAPACITY && !self.src.buffered() {
                            // A short plain read emptied the socket: skip the read that would
                            // only say EAGAIN (as nginx does). Data arriving meanwhile re-arms
                            // it. (A TLS read says so only by WouldBlock.)
                            if let Some(ready) = ready.as_mut() {
                                ready.clear_ready();
                            }
                        }
                        buf.truncate(c + n);
                        self.fwd.clear_carry();
                        break (buf, true);
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        if let Some(ready) = ready.as_mut() {
                            ready.clear_ready();
                        }
                        give_back(buf, true);
                    }
                    Err(e) if e.kind() == ErrorKind::Interrupted => give_back(buf, true),
                    Err(_) => {
                        give_back(buf, true);
                        self.src_done = true;
                        return Event::Eof;
                    }
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
                // Write now, in this same poll: the usual case needs no second trip through
                // the session's select!. What does not fit waits in `out` for `flush`.
                if let Err(lost) = self.write_some() {
                    return lost;
                }
            }
        } else {
            give_back(buf, pooled);
        }
        ev
    }

    /// Writes what the destination takes without waiting; frees the buffer once all is out.
    fn write_some(&mut self) -> Result<(), Event> {
        while self.out_pos < self.out.len() {
            match self.dst.write(&self.out[self.out_pos..]) {
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

    async fn flush(&mut self) -> Result<(), Event> {
        // Plaintext to write, or TLS records it left queued.
        while self.dst_open && (self.out_pos < self.out.len() || self.dst.pending_out()) {
            let dst = self.dst;
            let Ok(mut ready) = dst.fd().writable().await else {
                self.abandon_dst();
                return Err(Event::DstLost);
            };
            match ready.try_io(|_| dst.write(&self.out[self.out_pos..])) {
                Ok(Ok(n)) => self.out_pos += n,
                Ok(Err(e)) if e.kind() == ErrorKind::Interrupted => {}
                Ok(Err(_)) => {
                    self.abandon_dst();
                    return Err(Event::DstLost);
                }
                Err(_would_block) => {} // readiness cleared: wait again
            }
        }
        // Back to the pool: an idle session holds no buffer.
        self.release_out();
        if self.shutdown_after_flush && self.dst_open {
            // TLS: the close_notify first, written before the half-close.
            loop {
                let dst = self.dst;
                match dst.shutdown_write() {
                    Ok(false) => {
                        let Ok(mut ready) = dst.fd().writable().await else {
                            break;
                        };
                        let _ = ready.try_io(|_| dst.flush_out());
                    }
                    Ok(true) | Err(_) => break,
                }
            }
            self.dst_open = false;
        }
        Ok(())
    }
}
