//! A session's connection to one peer as the pumps see it: a non-blocking TCP socket registered
//! with its relay thread's epoll (`shard.rs`), plain or with TLS on it.
//!
//! [`read`](Stream::read) and [`write`](Stream::write) keep the socket's non-blocking contract
//! (`WouldBlock`: wait for readiness), so the pumps are the same code for both. The socket's
//! readiness is kept here: set by the shard's edge-triggered events, cleared by a `WouldBlock`
//! (or by a pump that knows the next call would only return it), so no call is made that is
//! known to fail. With TLS:
//! - a read may find plaintext already decrypted without the socket being readable
//!   ([`may_read`](Stream::may_read) counts it);
//! - a write encrypts what it accepts and may leave records queued
//!   ([`pending_out`](Stream::pending_out)); a write of nothing writes them, and a pump is not
//!   idle while any wait.
//!
//! One [`Tls`] serves both directions of a connection, and the two pumps of a session (or the
//! echo bot's single pump) both reach it: a session runs on one thread, so it sits in a
//! `RefCell`, borrowed for one call at a time.

use std::cell::{Cell, RefCell, RefMut};
use std::io::{self, ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsRawFd, RawFd};

use crate::tls::Tls;

/// The TLS half of a [`Stream`].
struct TlsState {
    tls: Tls,
    /// Records were processed since plaintext was last found missing: a read may find some
    /// without the socket being readable.
    buffered: bool,
    /// The close_notify went (or is queued).
    closed: bool,
}

/// A connection to one peer. See the module docs.
pub struct Stream {
    sock: TcpStream,
    /// Boxed: a rustls connection is over a kilobyte, and a plain session (most of them) must
    /// not carry its room (idle memory per session is what a gateway of many holds).
    tls: Option<Box<RefCell<TlsState>>>,
    /// The socket may have bytes to read.
    readable: Cell<bool>,
    /// The socket may take bytes.
    writable: Cell<bool>,
    /// The peer's EOF (or an error) was seen: reads never wait again (they return what is left,
    /// then the end), however short a read was.
    read_closed: Cell<bool>,
    /// The connection broke: writes never wait again (they fail).
    write_closed: Cell<bool>,
    /// Another descriptor shares the socket (`try_clone_socket`): closing this one does not
    /// take it out of the epoll.
    shared: Cell<bool>,
}

impl Stream {
    /// A plain connection on a non-blocking socket, not ready either way until its first event
    /// (registering it reports its state as one).
    pub fn plain(sock: TcpStream) -> Self {
        Self {
            sock,
            tls: None,
            readable: Cell::new(false),
            writable: Cell::new(false),
            read_closed: Cell::new(false),
            write_closed: Cell::new(false),
            shared: Cell::new(false),
        }
    }

    /// A connection whose TLS `tls` the control plane began (handshake done or under way).
    pub fn tls(sock: TcpStream, tls: Tls) -> Self {
        let state = TlsState {
            tls,
            buffered: true, // the control plane may have left decrypted bytes in it
            closed: false,
        };
        Self {
            tls: Some(Box::new(RefCell::new(state))),
            ..Self::plain(sock)
        }
    }

    /// Shuts both directions of the socket (a connection that cannot be used): reads and
    /// writes fail from now on.
    pub fn shutdown_both(&self) {
        let _ = self.sock.shutdown(Shutdown::Both);
        self.mark_ready(true, true, true, true);
    }

    /// The socket (for its options).
    pub(crate) fn socket(&self) -> &TcpStream {
        &self.sock
    }

    /// The socket, for the control plane. A TLS connection's state is dropped: only for one
    /// nothing was read from yet.
    pub fn into_socket(self) -> TcpStream {
        self.sock
    }

    /// Takes the TLS connection off (for the control plane to go on with it on its own copy of
    /// the socket); this stream is not to be read or written after.
    pub fn take_tls(&mut self) -> Option<Tls> {
        self.tls.take().map(|st| st.into_inner().tls)
    }

    /// A descriptor of its own on the same socket (for the control plane to answer on).
    pub fn try_clone_socket(&self) -> io::Result<TcpStream> {
        self.shared.set(true);
        self.sock.try_clone()
    }

    /// Whether another descriptor may share the socket (see `try_clone_socket`).
    pub fn shared(&self) -> bool {
        self.shared.get()
    }

    /// The socket's descriptor, for registering it.
    pub fn raw_fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }

    /// What an event said of the socket: it became readable, writable, the peer's EOF came
    /// (or an error: the next read reports it), the connection broke (the next write fails).
    pub fn mark_ready(&self, readable: bool, writable: bool, read_closed: bool, broken: bool) {
        self.readable.set(self.readable.get() | readable);
        self.writable.set(self.writable.get() | writable);
        self.read_closed
            .set(self.read_closed.get() | read_closed | broken);
        self.write_closed.set(self.write_closed.get() | broken);
    }

    /// Whether a read may find something without an event first: the socket was not found
    /// empty since its last event, its end is due, or TLS holds decrypted bytes.
    pub fn may_read(&self) -> bool {
        self.readable.get() || self.read_closed.get() || self.buffered()
    }

    /// Whether the socket was not found full since its last event (or a write would fail).
    pub fn may_write(&self) -> bool {
        self.writable.get() || self.write_closed.get()
    }

    /// The socket is empty: wait for an event before reading it again.
    pub fn read_drained(&self) {
        self.readable.set(false);
    }

    /// The socket is full: wait for an event before writing to it again.
    pub fn write_blocked(&self) {
        self.writable.set(false);
    }

    /// Whether this is a TLS connection.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    fn state(&self) -> Option<RefMut<'_, TlsState>> {
        self.tls.as_ref().map(|c| c.borrow_mut())
    }

    /// Whether a read may succeed without waiting for the socket to be readable.
    pub fn buffered(&self) -> bool {
        self.state().is_some_and(|s| s.buffered)
    }

    /// Whether TLS records wait to be written.
    pub fn pending_out(&self) -> bool {
        self.state().is_some_and(|s| s.tls.wants_write())
    }

    /// Reads plaintext, without waiting. `Ok(0)`: the peer's EOF (or close_notify). A
    /// `WouldBlock` marks the socket drained. Whether a plain read that filled less than `buf`
    /// drained the socket is the caller's guess; with TLS only `WouldBlock` says so.
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        let r = match self.state() {
            None => (&self.sock).read(buf),
            Some(mut st) => read_tls(&mut st, &self.sock, buf),
        };
        if matches!(&r, Err(e) if e.kind() == ErrorKind::WouldBlock) {
            self.read_drained();
        }
        r
    }

    /// Writes `data` (or encrypts what it accepts), without waiting. With TLS, records left
    /// queued are written first; `WouldBlock` while any remain. A socket found full is marked
    /// so.
    pub fn write(&self, data: &[u8]) -> io::Result<usize> {
        match self.state() {
            None => self.blocks((&self.sock).write(data)),
            Some(mut st) => {
                self.blocks(flush(&mut st.tls, &self.sock))?;
                if data.is_empty() {
                    return Ok(0);
                }
                let n = st.tls.write_plain(data)?;
                match self.blocks(flush(&mut st.tls, &self.sock)) {
                    Ok(()) => Ok(n),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => Ok(n), // queued: flushed later
                    Err(e) => Err(e),
                }
            }
        }
    }

    /// Writes an answer (a 101) whole: what is left to write, empty once all went. Over TLS,
    /// handshake records still queued may hold it back until the socket takes them: it is
    /// returned whole, for [`flush_held`](Self::flush_held). `Err`: gone or broken (a fresh
    /// plain socket's send buffer takes an answer whole).
    pub fn write_or_hold(&self, answer: Vec<u8>) -> io::Result<Vec<u8>> {
        match self.write(&answer) {
            Ok(n) if n == answer.len() => Ok(Vec::new()),
            Err(e) if e.kind() == ErrorKind::WouldBlock && self.is_tls() => Ok(answer),
            Ok(_) => Err(ErrorKind::WriteZero.into()),
            Err(e) => Err(e),
        }
    }

    /// Writes what [`write_or_hold`](Self::write_or_hold) held, and any queued TLS records, as
    /// far as the socket takes them: whether nothing is held any more (false: wait until it is
    /// writable). `Err`: gone or broken.
    pub fn flush_held(&self, held: &mut Vec<u8>) -> io::Result<bool> {
        if (self.pending_out() || !held.is_empty()) && self.may_write() {
            *held = self.write_or_hold(std::mem::take(held))?;
        }
        Ok(held.is_empty())
    }

    /// Marks the socket full when `r` is a `WouldBlock`.
    fn blocks<T>(&self, r: io::Result<T>) -> io::Result<T> {
        if matches!(&r, Err(e) if e.kind() == ErrorKind::WouldBlock) {
            self.write_blocked();
        }
        r
    }

    /// Ends our side: a TLS close_notify first, then, once no record is left queued, the TCP
    /// half-close. Returns whether the half-close was done (false: records still wait, call
    /// again once writable).
    pub fn shutdown_write(&self) -> io::Result<bool> {
        if let Some(mut st) = self.state() {
            if !st.closed {
                st.closed = true;
                st.tls.close_notify();
            }
            match self.blocks(flush(&mut st.tls, &self.sock)) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(e),
            }
        }
        self.sock.shutdown(Shutdown::Write)?;
        Ok(true)
    }
}

/// A TLS read: plaintext already decrypted, else records read from the socket and decrypted.
fn read_tls(st: &mut TlsState, sock: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match st.tls.read_plain(buf) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            // EOF without close_notify: an EOF all the same (truncation cannot hurt a framed
            // protocol: a cut frame is never forwarded whole).
            Err(e) if e.kind() == ErrorKind::UnexpectedEof => return Ok(0),
            Err(e) => return Err(e),
        }
        st.buffered = false;
        match st.tls.read_tls(&mut &*sock) {
            Ok(0) => return Ok(0),
            Ok(_) => {
                st.buffered = true;
                // Answers the peer may wait for (a KeyUpdate's), without waiting.
                let _ = flush(&mut st.tls, sock);
            }
            Err(e) => {
                if e.kind() == ErrorKind::InvalidData {
                    // A TLS error: its alert goes out if it can, then the peer is gone.
                    let _ = flush(&mut st.tls, sock);
                }
                return Err(e);
            }
        }
    }
}

/// Writes queued records until none are left or the socket would block.
fn flush(tls: &mut Tls, mut sock: &TcpStream) -> io::Result<()> {
    while tls.wants_write() {
        match tls.write_tls(&mut sock) {
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
