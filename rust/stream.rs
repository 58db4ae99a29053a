//! A session's connection to one peer as the pumps see it: a non-blocking TCP socket in tokio's
//! reactor, plain or with TLS on it.
//!
//! [`read`](Stream::read) and [`write`](Stream::write) keep the socket's non-blocking contract
//! (`WouldBlock`: wait for readiness), so the pumps are the same code for both. With TLS:
//! - a read may find plaintext already decrypted without the socket being readable
//!   ([`buffered`](Stream::buffered) says when not to wait for readiness);
//! - a write encrypts what it accepts and may leave records queued
//!   ([`pending_out`](Stream::pending_out)); [`flush_out`](Stream::flush_out) writes them, and a
//!   pump is not idle while any wait.
//!
//! One [`Tls`] serves both directions of a connection, and the two pumps of a session (or the
//! echo bot's single pump) both reach it: it sits behind a mutex, never held across an await,
//! uncontended in practice (a session's pumps run in one task).

use std::io::{self, ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::{Mutex, MutexGuard, PoisonError};

use tokio::io::unix::AsyncFd;

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
    fd: AsyncFd<TcpStream>,
    /// Boxed: a rustls connection is over a kilobyte, and a plain session (most of them) must
    /// not carry its room (idle memory per session is what a gateway of many holds).
    tls: Option<Box<Mutex<TlsState>>>,
}

impl Stream {
    /// A plain connection.
    pub fn plain(fd: AsyncFd<TcpStream>) -> Self {
        Self { fd, tls: None }
    }

    /// A connection whose TLS `tls` the control plane began (handshake done or under way).
    pub fn tls(fd: AsyncFd<TcpStream>, tls: Tls) -> Self {
        let state = TlsState {
            tls,
            buffered: true, // the control plane may have left decrypted bytes in it
            closed: false,
        };
        Self {
            fd,
            tls: Some(Box::new(Mutex::new(state))),
        }
    }

    /// The socket's readiness, for waiting.
    pub fn fd(&self) -> &AsyncFd<TcpStream> {
        &self.fd
    }

    fn state(&self) -> Option<MutexGuard<'_, TlsState>> {
        self.tls
            .as_ref()
            .map(|m| m.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Whether a read may succeed without waiting for the socket to be readable.
    pub fn buffered(&self) -> bool {
        self.state().is_some_and(|s| s.buffered)
    }

    /// Whether TLS records wait to be written.
    pub fn pending_out(&self) -> bool {
        self.state().is_some_and(|s| s.tls.wants_write())
    }

    /// Reads plaintext, without waiting. `Ok(0)`: the peer's EOF (or close_notify).
    /// Whether a plain read that filled less than `buf` drained the socket is the caller's
    /// guess; with TLS only `WouldBlock` says so.
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(mut st) = self.state() else {
            return self.fd.get_ref().read(buf);
        };
        loop {
            match st.tls.read_plain(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                // EOF without close_notify: an EOF all the same (truncation cannot hurt a
                // framed protocol: a cut frame is never forwarded whole).
                Err(e) if e.kind() == ErrorKind::UnexpectedEof => return Ok(0),
                Err(e) => return Err(e),
            }
            st.buffered = false;
            match st.tls.read_tls(&mut self.fd.get_ref()) {
                Ok(0) => return Ok(0),
                Ok(_) => {
                    st.buffered = true;
                    // Answers the peer may wait for (a KeyUpdate's), without waiting.
                    let _ = flush(&mut st.tls, self.fd.get_ref());
                }
                Err(e) => {
                    if e.kind() == ErrorKind::InvalidData {
                        // A TLS error: its alert goes out if it can, then the peer is gone.
                        let _ = flush(&mut st.tls, self.fd.get_ref());
                    }
                    return Err(e);
                }
            }
        }
    }

    /// Writes `data` (or encrypts what it accepts), without waiting. With TLS, records left
    /// queued are written first; `WouldBlock` while any remain.
    pub fn write(&self, data: &[u8]) -> io::Result<usize> {
        let Some(mut st) = self.state() else {
            return self.fd.get_ref().write(data);
        };
        flush(&mut st.tls, self.fd.get_ref())?;
        if data.is_empty() {
            return Ok(0);
        }
        let n = st.tls.write_plain(data)?;
        match flush(&mut st.tls, self.fd.get_ref()) {
            Ok(()) => Ok(n),
            Err(e) if e.kind() == ErrorKind::WouldBlock => Ok(n), // queued: flushed later
            Err(e) => Err(e),
        }
    }

    /// Writes queued TLS records, without waiting (`WouldBlock` while any remain).
    pub fn flush_out(&self) -> io::Result<()> {
        match self.state() {
            Some(mut st) => flush(&mut st.tls, self.fd.get_ref()),
            None => Ok(()),
        }
    }

    /// Ends our side: a TLS close_notify first (queued; see [`flush_out`](Self::flush_out)),
    /// then, once nothing is queued, the TCP half-close. Returns whether the half-close was
    /// done (false: records still wait, call again once writable).
    pub fn shutdown_write(&self) -> io::Result<bool> {
        if let Some(mut st) = self.state() {
            if !st.closed {
                st.closed = true;
                st.tls.close_notify();
            }
            match flush(&mut st.tls, self.fd.get_ref()) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(e),
            }
        }
        self.fd.get_ref().shutdown(Shutdown::Write)?;
        Ok(true)
    }

    /// Reads up to `max` bytes of plaintext onto the end of `v`, waiting for them.
    /// Cancel-safe: `v` is touched only once the read is done.
    pub async fn read_vec(&self, v: &mut Vec<u8>, max: usize) -> io::Result<usize> {
        loop {
            let mut ready = if self.buffered() {
                None
            } else {
                Some(self.fd.readable().await?)
            };
            let start = v.len();
            v.resize(start + max, 0);
            let r = self.read(&mut v[start..]);
            v.truncate(start + r.as_ref().map_or(0, |n| *n));
            match r {
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    if let Some(ready) = ready.as_mut() {
                        ready.clear_ready();
                    }
                }
                r => return r,
            }
        }
    }

    /// Writes some of `data` (or, for an empty `data`, the queued TLS records), waiting until
    /// the socket takes it. Cancel-safe.
    pub async fn write_async(&self, data: &[u8]) -> io::Result<usize> {
        loop {
            let mut ready = self.fd.writable().await?;
            match ready.try_io(|_| self.write(data)) {
                Ok(r) => return r,
                Err(_would_block) => {}
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
