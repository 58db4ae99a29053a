//! One direction of a session: read frames from one socket, write them to another.
//!
//! A pump only parses frame headers. Payload bytes are forwarded as they arrive (a 1 MiB message
//! never sits whole in memory), transformed in place in the buffer they were read into:
//! - bot → client: server frames are unmasked on both hops, bytes pass as they came;
//! - client → bot: the gateway is the bot's client, and RFC 6455 §5.3 wants a fresh masking key
//!   per frame, so each frame is re-masked with our own random key in one XOR pass
//!   (`client_key ^ our_key`);
//! - echo: the built-in echo bot sends client frames back unmasked (a ping comes back as a pong).
//!
//! Every await point (`readable`, `writable`) is cancel-safe: whatever was read and not yet
//! written is kept in the pump, so a session can `select!` over both pumps and its commands.
//! Memory per pump is bounded: at most one read buffer ([`READ_BUF`]) is held, and only while
//! its bytes wait for the destination to accept them; an idle pump holds no buffer at all.

use std::io::{self, ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};

use tokio::io::unix::AsyncFd;

use crate::frame::{
    apply_mask, close_frame, parse_close, parse_header, write_header, Header, MessageState, Opcode,
    Violation, MAX_CONTROL_PAYLOAD, MAX_HEADER_LEN,
};

/// Bytes read from a socket at once. While the destination is slow, the pump holds at most this
/// much and stops reading its source: backpressure reaches the sender through TCP.
pub const READ_BUF: usize = 16 * 1024;
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

/// How frames leave the pump.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transform {
    /// Bot → client: unchanged.
    Keep,
    /// Client → bot: re-masked with a fresh key of ours.
    Remask,
    /// Client → itself (echo bot): unmasked; pings answered as pongs.
    Echo,
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

/// A data frame whose payload is still arriving.
#[derive(Debug)]
struct InFlight {
    remaining: u64,
    /// Key to XOR the payload with (`None`: bytes pass unchanged).
    key: Option<[u8; 4]>,
    offset: usize,
    completes_message: bool,
}

/// One direction of a session.
pub struct Pump<'a> {
    src: &'a AsyncFd<TcpStream>,
    dst: &'a AsyncFd<TcpStream>,
    from_client: bool,
    transform: Transform,
    max_message_size: u64,
    /// Bytes that arrived with the HTTP handshake: the start of the frame stream.
    pending_in: Vec<u8>,
    /// A header, or a whole control frame, split across reads (at most 139 bytes).
    carry: Vec<u8>,
    frame: Option<InFlight>,
    message: MessageState,
    out: Vec<u8>,
    out_pos: usize,
    /// `out` came from the buffer pool.
    out_pooled: bool,
    /// The source ended; nothing more will be read.
    pub src_done: bool,
    /// Read and drop whatever the source still sends (after its close or a violation).
    pub discard: bool,
    /// A close frame went to the destination, or it is gone: no more frames go there.
    pub dst_done: bool,
    dst_open: bool,
    shutdown_after_flush: bool,
    /// Data messages completed on this direction.
    pub messages: u64,
    /// Payload bytes of data frames forwarded on this direction.
    pub bytes: u64,
}

impl<'a> Pump<'a> {
    /// A pump reading `src` and writing `dst` (the same socket for the echo bot).
    pub fn new(
        src: &'a AsyncFd<TcpStream>,
        dst: &'a AsyncFd<TcpStream>,
        transform: Transform,
        max_message_size: u64,
        pending_in: Vec<u8>,
    ) -> Self {
        Self {
            src,
            dst,
            from_client: transform != Transform::Keep,
            transform,
            max_message_size,
            pending_in,
            carry: Vec::new(),
            frame: None,
            message: MessageState::default(),
            out: Vec::new(),
            out_pos: 0,
            out_pooled: false,
            src_done: false,
            discard: false,
            dst_done: false,
            dst_open: true,
            shutdown_after_flush: false,
            messages: 0,
            bytes: 0,
        }
    }

    /// Whether [`step`](Self::step) still has anything to do.
    pub fn wants_poll(&self) -> bool {
        !self.src_done
            || self.out_pos < self.out.len()
            || (self.shutdown_after_flush && self.dst_open)
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
                let Ok(mut ready) = self.src.readable().await else {
                    self.src_done = true;
                    return Event::Eof;
                };
                // Taken only now that the socket is readable: an idle pump holds no buffer, and
                // `carry` stays in `self` until a read succeeds, so a `select!` that drops this
                // future while it waits loses nothing.
                let mut buf = take_buffer();
                let c = self.carry.len();
                buf[..c].copy_from_slice(&self.carry);
                match self.src.get_ref().read(&mut buf[c..]) {
                    Ok(0) => {
                        give_back(buf, true);
                        self.src_done = true;
                        return Event::Eof;
                    }
                    Ok(n) => {
                        if c + n < BUF_CAPACITY {
                            // A short read emptied the socket: skip the read that would only
                            // say EAGAIN (as nginx does). Data arriving meanwhile re-arms it.
                            ready.clear_ready();
                        }
                        buf.truncate(c + n);
                        self.carry.clear();
                        break (buf, true);
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        ready.clear_ready();
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
        if self.discard {
            give_back(buf, pooled);
            return Event::Progress;
        }
        let ev = self.process(&mut buf);
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
            match self.dst.get_ref().write(&self.out[self.out_pos..]) {
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
        if self.dst_done || !self.dst_open {
            return;
        }
        self.dst_done = true;
        if self.frame.is_some() {
            self.shutdown_after_flush = true;
            return;
        }
        let mask = (self.transform == Transform::Remask).then(rand::random::<[u8; 4]>);
        self.out.extend_from_slice(&close_frame(code, reason, mask));
        self.shutdown_after_flush |= then_shutdown;
    }

    /// Ends our side of the destination's TCP connection once queued bytes are written.
    pub fn shutdown_dst(&mut self) {
        self.shutdown_after_flush = true;
    }

    /// Stops writing to the destination: it is gone.
    pub fn abandon_dst(&mut self) {
        self.dst_open = false;
        self.dst_done = true;
        self.release_out();
    }

    async fn flush(&mut self) -> Result<(), Event> {
        while self.dst_open && self.out_pos < self.out.len() {
            let Ok(mut ready) = self.dst.writable().await else {
                self.abandon_dst();
                return Err(Event::DstLost);
            };
            match ready.try_io(|fd| fd.get_ref().write(&self.out[self.out_pos..])) {
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
            self.dst_open = false;
            let _ = shutdown_write(self.dst);
        }
        Ok(())
    }

    /// Parses and transforms `buf` in place; `buf` is left holding exactly the bytes to write.
    /// The output never runs ahead of the input (a header keeps or loses its 4-byte key), so
    /// one buffer serves both.
    fn process(&mut self, buf: &mut Vec<u8>) -> Event {
        let n = buf.len();
        let muted = self.dst_done;
        let (mut r, mut w) = (0usize, 0usize);
        let mut event = Event::Progress;
        while r < n {
            if let Some(f) = &mut self.frame {
                let take = (n - r).min(usize::try_from(f.remaining).unwrap_or(usize::MAX));
                if let Some(key) = f.key {
                    apply_mask(&mut buf[r..r + take], key, f.offset);
                }
                if w != r {
                    buf.copy_within(r..r + take, w);
                }
                r += take;
                w += take;
                f.remaining -= take as u64;
                f.offset += take;
                self.bytes += take as u64;
                if f.remaining == 0 {
                    self.messages += u64::from(f.completes_message);
                    self.frame = None;
                }
                continue;
            }
            let h = match parse_header(&buf[r..], self.from_client) {
                Ok(Some(h)) => h,
                Ok(None) => {
                    self.carry.extend_from_slice(&buf[r..]);
                    break;
                }
                Err(v) => {
                    event = Event::Violation(v);
                    break;
                }
            };
            let completes_message = match self.message.check(&h, self.max_message_size) {
                Ok(c) => c,
                Err(v) => {
                    event = Event::Violation(v);
                    break;
                }
            };
            if h.opcode.is_control() {
                // Control frames are handled whole: a close must be read before it is passed on.
                let total = h.header_len + h.len as usize;
                if n - r < total {
                    self.carry.extend_from_slice(&buf[r..]);
                    break;
                }
                let mut close = None;
                if h.opcode == Opcode::CLOSE {
                    let mut payload = [0u8; MAX_CONTROL_PAYLOAD];
                    let p = &mut payload[..h.len as usize];
                    p.copy_from_slice(&buf[r + h.header_len..r + total]);
                    if let Some(key) = h.mask {
                        apply_mask(p, key, 0);
                    }
                    match parse_close(p) {
                        Ok(c) => close = Some(c),
                        Err(v) => {
                            event = Event::Violation(v);
                            break;
                        }
                    }
                }
                let key = self.rewrite_header(buf, w, &h);
                let (from, to) = (r + h.header_len, w + key.1);
                if let Some(k) = key.0 {
                    apply_mask(&mut buf[from..r + total], k, 0);
                }
                buf.copy_within(from..r + total, to);
                w = to + h.len as usize;
                r += total;
                if let Some(c) = close {
                    self.dst_done = true;
                    self.discard = true;
                    event = Event::Close(c);
                    break;
                }
            } else {
                let (key, hn) = self.rewrite_header(buf, w, &h);
                r += h.header_len;
                w += hn;
                if h.len == 0 {
                    self.messages += u64::from(completes_message);
                } else {
                    self.frame = Some(InFlight {
                        remaining: h.len,
                        key,
                        offset: 0,
                        completes_message,
                    });
                }
            }
        }
        buf.truncate(w);
        if muted {
            // A close went to the destination earlier: nothing may follow it.
            buf.clear();
        }
        event
    }

    /// Writes the outgoing header for `h` at `w`. Returns the key to XOR the
    /// payload with and the new header's length (never longer than the old one).
    fn rewrite_header(&self, buf: &mut [u8], w: usize, h: &Header) -> (Option<[u8; 4]>, usize) {
        let (opcode, out_mask, key) = match (self.transform, h.mask) {
            (Transform::Keep, _) => (h.opcode, None, None),
            (Transform::Remask, Some(k)) => {
                let ours: [u8; 4] = rand::random();
                let both = [
                    k[0] ^ ours[0],
                    k[1] ^ ours[1],
                    k[2] ^ ours[2],
                    k[3] ^ ours[3],
                ];
                (h.opcode, Some(ours), Some(both))
            }
            (Transform::Echo, k) if h.opcode == Opcode::PING => (Opcode::PONG, None, k),
            (Transform::Echo, k) => (h.opcode, None, k),
            (Transform::Remask, None) => unreachable!("client frames are checked to be masked"),
        };
        let mut hb = [0u8; MAX_HEADER_LEN];
        let hn = write_header(&mut hb, h.fin, opcode, out_mask, h.len);
        debug_assert!(hn <= h.header_len);
        buf[w..w + hn].copy_from_slice(&hb[..hn]);
        (key, hn)
    }
}

/// Half-closes a socket: the peer reads EOF, we may still read what it sends.
pub fn shutdown_write(s: &AsyncFd<TcpStream>) -> io::Result<()> {
    s.get_ref().shutdown(Shutdown::Write)
}
